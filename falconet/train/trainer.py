"""`falconet train`: pretrain (or continue training) a small Falcon on your own text.

The loop is the usual one: AdamW (no weight decay on biases and norms), linear warmup
then cosine decay to `min_lr_ratio * lr`, gradient clipping, gradient accumulation, fp32
or bf16 autocast, held-out loss / perplexity every `eval_every` steps.

Resuming is exact: the batch order is a pure function of (seed, sample index)
(data.batch_order), and a checkpoint holds the model, the optimizer state, the step, the
RNG state and the history. A run killed after a checkpoint and resumed computes
bit-for-bit the steps the uninterrupted run computes. Checkpoints are written atomically
(durable.atomic_write), so a kill while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from falconet.durable import atomic_write, atomic_write_text
from falconet.errors import FalconetError
from falconet.models.falcon import Falcon
from falconet.models.falcon_config import FalconConfig
from falconet.tokenizer import Tokenizer
from falconet.train.data import (
    DataError,
    batch_order,
    pack_blocks,
    read_corpus,
    tokenize_corpus,
    train_tokenizer,
)
from falconet.train.save import save_hf

CHECKPOINT = "checkpoint.pt"
# Settings a resumed run may change: they do not change what is computed.
FREE_ON_RESUME = ("steps", "data", "out", "run_dir", "eval_every", "eval_batches", "checkpoint_every",
                  "save_dtype", "extra")  # fmt: skip
HISTORY = "history.jsonl"

# Falcon layouts by name: FalconConfig switches (see config.py's table).
VARIANTS = {
    "7b": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False),
    "40b": dict(new_decoder_architecture=True, num_ln_in_parallel_attn=2, alibi=False, bias=False),
    "11b": dict(new_decoder_architecture=True, num_ln_in_parallel_attn=1, alibi=False, bias=False,
                tie_word_embeddings=False),
    "rw": dict(multi_query=False, parallel_attn=False, new_decoder_architecture=False, alibi=True, bias=True),
}  # fmt: skip


@dataclass
class TrainSettings:
    """Everything that defines a run; a resumed run must be given the same values."""

    data: list[str]
    out: str
    run_dir: str = ""  # checkpoints and history; default: OUT.run beside OUT
    tokenizer: str = ""  # a tokenizer.json (or folder) to use instead of training one
    vocab_size: int = 8192
    variant: str = "7b"
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # grouped variants (40b, 11b) only
    block_size: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "float32"  # or "bfloat16" (autocast; slow on CPUs without bf16 units)
    save_dtype: str = "float32"  # weights of the output folder: float32 or bfloat16 (half the size)
    eval_every: int = 100
    eval_batches: int = 0  # 0: the whole held-out set
    val_fraction: float = 0.05
    checkpoint_every: int = 100
    seed: int = 0
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # recorded in the model card, never used

    def __post_init__(self) -> None:
        checks = [
            (self.variant in VARIANTS, f"--variant must be one of {', '.join(VARIANTS)}"),
            (self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16"),
            (self.save_dtype in ("float32", "bfloat16"), "--save-dtype must be float32 or bfloat16"),
            (self.hidden_size > 0 and self.heads > 0 and self.hidden_size % self.heads == 0,
             f"--hidden {self.hidden_size} must be a positive multiple of --heads {self.heads}"),
            ((self.hidden_size // max(self.heads, 1)) % 2 == 0 or self.variant == "rw",
             "the head size (hidden / heads) must be even for rotary embeddings"),
            (self.variant not in ("40b", "11b") or (self.kv_heads > 0 and self.heads % self.kv_heads == 0),
             f"--heads {self.heads} must be a multiple of --kv-heads {self.kv_heads}"),
            (self.layers > 0, "--layers must be positive"),
            *loop_checks(self),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.vocab_size > 268 or self.tokenizer, "--vocab-size must be > 268"),
        ]  # fmt: skip
        settle(self, checks)

    def model_config(self, vocab_size: int, eos_id: int) -> FalconConfig:
        return FalconConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_kv_heads=self.kv_heads if self.variant in ("40b", "11b") else None,
            max_position_embeddings=self.block_size,
            bos_token_id=eos_id,
            eos_token_ids=(eos_id,),
            **VARIANTS[self.variant],
        )

    def same_run(self, saved: dict) -> list[str]:
        """Names of the settings that differ from a checkpoint's, among those that change
        the computation (paths, evaluation and checkpoint intervals may change; the data
        itself is compared by digest)."""
        mine = asdict(self)
        return [
            f.name
            for f in fields(self)
            if f.name not in FREE_ON_RESUME and saved.get(f.name) != mine[f.name]
        ]


def loop_checks(s) -> list[tuple[bool, str]]:
    """(ok, message) for the settings of the training loop itself, which `falconet train`
    and `falconet finetune` share."""
    return [
        (s.block_size >= 2, "--block-size must be at least 2"),
        (s.batch_size > 0 and s.grad_accum > 0, "--batch-size and --grad-accum must be positive"),
        (s.steps > 0, "--steps must be positive"),
        (s.lr > 0 and math.isfinite(s.lr), "--lr must be a positive number"),
        (0 <= s.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (s.warmup >= 0, "--warmup must be >= 0"),
        (s.weight_decay >= 0, "--weight-decay must be >= 0"),
        (s.clip >= 0, "--clip must be >= 0 (0 = off)"),
        (s.eval_every > 0 and s.checkpoint_every > 0, "--eval-every and --checkpoint-every must be positive"),
    ]  # fmt: skip


def settle(s, checks: list[tuple[bool, str]]) -> None:
    """Raise the first failed check's message; check --out and default --run-dir beside it."""
    for ok, message in checks:
        if not ok:
            raise FalconetError(message)
    if not Path(s.out).resolve().name or Path(s.out).resolve() == Path.cwd():
        raise FalconetError(f"--out {s.out!r} must name a new folder, not . or /")
    if not s.run_dir:
        s.run_dir = str(Path(s.out).with_name(Path(s.out).name + ".run"))


def init_weights(model: Falcon, std: float, seed: int) -> None:
    """Normal(0, std) weights and zero biases, as transformers initialises Falcon."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or ".ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - 1 - s.warmup)  # the last step is at the floor
    floor = s.lr * s.min_lr_ratio
    return floor + 0.5 * (s.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_indices(n_blocks: int, seed: int, start: int, count: int) -> np.ndarray:
    """Blocks for samples start..start+count-1 of the endless shuffled stream."""
    out = []
    while count:
        epoch, offset = divmod(start, n_blocks)
        take = min(count, n_blocks - offset)
        out.append(batch_order(n_blocks, seed, epoch)[offset : offset + take])
        start, count = start + take, count - take
    return np.concatenate(out)


def _check_writable(folder: Path, what: str) -> None:
    """Fail before hours of training if the output cannot be written."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise FalconetError(
            f"{what} {folder} cannot be written ({e.strerror}); choose another folder"
        ) from None


def _check_paths(s: TrainSettings, overwrite: bool, resume: bool) -> None:
    """Never let publishing the output delete the corpus, the run, or an unrelated folder."""
    out, run = Path(s.out).resolve(), Path(s.run_dir).resolve()
    for d in map(lambda p: Path(p).resolve(), s.data):
        if d.is_relative_to(out) or out.is_relative_to(d):
            raise FalconetError(f"--out {s.out} and the data {d} must not contain one another")
    if run.is_relative_to(out) or out.is_relative_to(run):
        raise FalconetError(f"--out {s.out} and --run-dir {s.run_dir} must not contain one another")
    if run.exists() and not run.is_dir():
        raise FalconetError(f"--run-dir {s.run_dir} is a file, not a folder")
    is_model = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    is_model = is_model or (out / "adapter_config.json").is_file()  # finetune --save-adapter
    if out.exists() and not overwrite and not (resume and is_model):  # a resumed run republishes
        what = "a model folder" if is_model else ("a file" if out.is_file() else "a folder")
        raise FalconetError(
            f"--out {s.out} already exists ({what}); pass --overwrite to replace it"
        )


class Trainer:
    """One training run. `on_step(record)` is called after every step (the CLI draws a
    progress bar with it); `log(message)` receives warnings."""

    # what --resume needs in a checkpoint, and what the run is called in its errors
    CHECKPOINT_KEYS = frozenset({"settings", "step", "model", "optimizer", "torch_rng", "history",
                                 "tokenizer", "eos_id", "eos_token", "data_digest"})  # fmt: skip
    CHECKPOINT_KIND = "falconet"

    def __init__(
        self,
        settings: TrainSettings,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
    ) -> None:
        self.s = settings
        self.resume = resume
        self.overwrite = overwrite
        self.log = log or (lambda _msg: None)
        self.on_step = on_step or (lambda _record: None)
        self.run_dir = Path(settings.run_dir)
        self.out = Path(settings.out)

    # ---- setup ------------------------------------------------------------------
    def prepare(self) -> None:
        """Read the corpus, build tokenizer, blocks, model and optimizer (or restore them)."""
        s = self.s
        _check_paths(s, self.overwrite, self.resume)
        _check_writable(self.out, "output folder")
        _check_writable(self.run_dir, "run folder")
        saved = self._load_checkpoint() if self.resume else None
        if saved is None and (self.run_dir / CHECKPOINT).exists():
            raise FalconetError(
                f"{self.run_dir} holds a run; pass --resume to continue it, or delete the folder"
            )
        corpus = read_corpus([Path(p) for p in s.data], warn=self.log)
        for _, why in corpus.skipped:  # the reader's messages name the file
            self.log(f"skipped {why}")
        if saved is not None:
            self.tokenizer = Tokenizer(
                _backend_from_str(saved["tokenizer"]),
                eos_token_ids=(saved["eos_id"],),
                eos_token=saved["eos_token"],
                bos_token_id=saved.get("bos_id"),
                chat_template=saved.get("chat_template"),
            )
        elif s.tokenizer:
            path = Path(s.tokenizer)
            self.tokenizer = (
                Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_file(path)
            )
        else:
            self.tokenizer = train_tokenizer(corpus.documents, s.vocab_size)
        tokens = tokenize_corpus(corpus.documents, self.tokenizer)
        self.blocks = pack_blocks(tokens, s.block_size, s.val_fraction)
        self.build_model(s.model_config(self.tokenizer.vocab_size, self.tokenizer.eos_token_id))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(".*.tmp"):  # a save killed midway
            stale.unlink(missing_ok=True)
        if saved is not None:
            if saved["data_digest"] != self.blocks.digest():
                raise FalconetError(
                    "--resume: the corpus differs from the one this run trained on "
                    "(files added, removed or edited); restore it or start a new run"
                )
            self.model.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            self.step, self.history = saved["step"], saved["history"]
            if saved.get("threads") != torch.get_num_threads():
                self.log(
                    f"resuming with {torch.get_num_threads()} threads (the run used "
                    f"{saved.get('threads')}): sums may round differently"
                )
        atomic_write_text(
            self.run_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in self.history)
        )

    def _load_checkpoint(self) -> dict:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise FalconetError(f"--resume: no checkpoint at {path}; start without --resume")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not saved.keys() >= self.CHECKPOINT_KEYS:
                raise ValueError("missing fields")
        except Exception as e:  # torch.load raises many types for foreign or torn files
            raise FalconetError(
                f"--resume: {path} is not a {self.CHECKPOINT_KIND} checkpoint ({type(e).__name__})"
            ) from None
        differ = self.s.same_run(saved["settings"])
        if differ:
            raise FalconetError(
                f"--resume: settings differ from the checkpoint's: {', '.join(differ)}"
            )
        if saved["step"] > self.s.steps:
            raise FalconetError(
                f"--resume: the checkpoint is at step {saved['step']}, past --steps {self.s.steps}"
            )
        if saved["settings"].get("steps") != self.s.steps:
            self.log(
                f"--steps changed from {saved['settings'].get('steps')} to {self.s.steps}: the learning-rate "
                "schedule stretches from here, so the result matches no uninterrupted run"
            )
        return saved

    def build_model(self, config: FalconConfig) -> None:
        """A freshly initialised fp32 model and its AdamW (no decay on biases and norms)."""
        s = self.s
        self.model = Falcon(config, torch.float32)
        self.model.requires_grad_(True)
        init_weights(self.model, s.init_std, s.seed)
        decay = [p for p in self.model.parameters() if p.ndim == 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
        )  # fmt: skip
        self.history: list[dict] = []
        self.step = 0

    # ---- steps ------------------------------------------------------------------
    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch[:, :-1].astype(np.int64))
        y = torch.from_numpy(batch[:, 1:].astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.s.dtype == "bfloat16"):
            logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def train_step(self) -> float:
        s = self.s
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, s)
        self.model.train()
        total = 0.0
        first = self.step * s.grad_accum * s.batch_size
        for micro in range(s.grad_accum):
            idx = sample_indices(
                len(self.blocks.train), s.seed, first + micro * s.batch_size, s.batch_size
            )
            loss = self._loss(self.blocks.train[idx]) / s.grad_accum
            loss.backward()
            total += loss.item()
        if s.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def eval_rows(self) -> int:
        """How many held-out rows an evaluation reads (--eval-batches, 0: all)."""
        n = len(self.blocks.val)
        return n if self.s.eval_batches == 0 else min(n, self.s.eval_batches * self.s.batch_size)

    def evaluate(self) -> float | None:
        """Mean held-out loss per token (perplexity = exp of it); None without a held-out set."""
        val, n = self.blocks.val, self.eval_rows()
        if n == 0:
            return None
        self.model.eval()
        losses = []
        with torch.no_grad():
            for i in range(0, n, self.s.batch_size):
                chunk = val[i : min(n, i + self.s.batch_size)]
                losses.append(self._loss(chunk).item() * len(chunk))
        return sum(losses) / n

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds: enough to resume the run exactly (CHECKPOINT_KEYS)."""
        return {
            "settings": asdict(self.s),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "tokenizer": self.tokenizer.backend.to_str(),
            "eos_id": self.tokenizer.eos_token_id,
            "eos_token": self.tokenizer.id_to_token(self.tokenizer.eos_token_id),
            "bos_id": self.tokenizer.bos_token_id,
            "chat_template": self.tokenizer.chat_template,
            "data_digest": self.blocks.digest(),
            "threads": torch.get_num_threads(),
        }

    def save_checkpoint(self) -> None:
        state = self.checkpoint_state()
        try:
            atomic_write(self.run_dir / CHECKPOINT, lambda p: torch.save(state, p))
        except OSError as e:
            raise FalconetError(
                f"cannot write the checkpoint in {self.run_dir} ({e.strerror}); the previous one is intact"
            ) from None

    # ---- the run ----------------------------------------------------------------
    def run(self) -> dict:
        """Train to `steps` (from a checkpoint with resume), then publish the HF folder.

        Ctrl-C saves a checkpoint before stopping, so `--resume` loses nothing.
        """
        if not hasattr(self, "model"):
            self.prepare()
        s = self.s
        tokens_per_step = s.batch_size * s.grad_accum * s.block_size
        t_last, step_last = time.perf_counter(), self.step
        try:
            with open(self.run_dir / HISTORY, "a", encoding="utf-8") as hist:
                while self.step < s.steps:
                    record = {"step": self.step + 1, "lr": lr_at(self.step, s)}
                    record["loss"] = self.train_step()
                    if self.step % s.eval_every == 0 or self.step == s.steps:
                        val = self.evaluate()
                        if val is not None:
                            record["val_loss"], record["val_ppl"] = val, math.exp(min(val, 50.0))
                    now = time.perf_counter()
                    record["tok_s"] = (
                        tokens_per_step * (self.step - step_last) / max(now - t_last, 1e-9)
                    )
                    t_last, step_last = now, self.step
                    self.history.append(record)
                    hist.write(json.dumps(record) + "\n")
                    hist.flush()
                    self.on_step(record)
                    if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                        self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        final = self.history[-1]
        try:
            self.publish(final)
        except OSError as e:
            raise FalconetError(
                f"cannot write {self.out} ({e.strerror}); the checkpoint in {self.run_dir} is "
                "intact: fix the problem and run again with --resume"
            ) from None
        return final

    def publish(self, final: dict) -> None:
        """Write the output folder once the last step is done."""
        card = model_card(self.s, final, len(self.blocks.train))
        save_hf(self.model, self.tokenizer, self.out, getattr(torch, self.s.save_dtype), card)


def _backend_from_str(text: str):
    import tokenizers

    return tokenizers.Tokenizer.from_str(text)


# Model-card flag names for settings whose CLI flag is not the field name.
_FLAGS = {"hidden_size": "--hidden"}


def model_card(s: TrainSettings, final: dict, n_blocks: int) -> str:
    skip = ("data", "out", "run_dir", "extra", "tokenizer", "init_std")
    args = " ".join(
        f"{_FLAGS.get(k, '--' + k.replace('_', '-'))} {v}"
        for k, v in asdict(s).items()
        if k not in skip and v != ""
    )
    lines = [
        f"# {Path(s.out).name}\n",
        f"A {s.variant}-style Falcon ({s.layers} layers, hidden {s.hidden_size}, {s.heads} heads) "
        "trained from scratch with `falconet train`.\n",
        f"- data: {', '.join(Path(d).name for d in s.data)} ({n_blocks} training blocks of {s.block_size} tokens)",
        f"- steps: {final['step']}; final train loss {final['loss']:.4f}",
    ]
    if "val_loss" in final:
        lines.append(f"- held-out loss {final['val_loss']:.4f}, perplexity {final['val_ppl']:.2f}")
    lines.append(f"- settings: `falconet train DATA --out OUT {args}`")
    lines += [f"- {k}: {v}" for k, v in s.extra.items()]
    return "\n".join(lines) + "\n"


__all__ = ["DataError", "TrainSettings", "Trainer", "init_weights", "lr_at", "sample_indices"]
