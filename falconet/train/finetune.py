"""`falconet finetune`: supervised fine-tuning of a model on chat data, full or LoRA.

The run is `falconet train`'s (trainer.Trainer): the same AdamW, warmup and cosine
schedule, clipping, accumulation, autocast, held-out loss, atomic checkpoints and exact
`--resume`. What differs:

- the data (sft_data.py): conversations rendered with the model's chat template, loss on
  the assistant's tokens only (with `prompt_loss` on every token, as pretraining: long
  prompts then teach the model to copy from its context, which a few answer tokens per
  prompt teach slowly), several examples packed per row;
- the model: any registered architecture, loaded from a HF folder in fp32. Attention
  models (Falcon, Falcon3) run packed rows through `CausalLM.forward_segments` (a
  block-diagonal causal mask and positions restarting per example); recurrent ones
  (Falcon-Mamba, Falcon-H1) get one example per row, padded on the right, since their
  state would run on from one example into the next;
- what learns: every parameter, or with `lora > 0` only LoRA's A and B (lora.py). A
  checkpoint holds just the trainable parameters with the optimizer, so a LoRA run of a
  large model checkpoints in megabytes; the base folder is checked by digest on resume;
- the context: `context` raises the model's position limit (a model trained on short rows
  learns longer ones), with RoPE's base raised (`rope_theta`, as Code Llama did) or its
  positions interpolated (`rope_scaling="linear"`); the output's config.json says so;
- the output: the model (merged with its LoRA update) in the base folder's HF shape, or
  with `save_adapter` a PEFT adapter folder (models/adapters.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from falconet.durable import atomic_write_text
from falconet.errors import ConfigError, FalconetError
from falconet.models.adapters import to_hf_rows, write_peft_adapter
from falconet.models.checkpoint import load_hf_weights
from falconet.models.falcon_config import read_config_json, rope_from_hf
from falconet.models.registry import config_from_hf, for_config
from falconet.tokenizer import Tokenizer
from falconet.train.data import Blocks
from falconet.train.lora import add_lora, lora_layers, match_targets, merge_lora
from falconet.train.save import save_like
from falconet.train.sft_data import IGNORE, INPUTS, LABELS, SEGMENTS, pack, read_sft, split_held_out
from falconet.train.trainer import (
    CHECKPOINT,
    HISTORY,
    Trainer,
    _check_paths,
    _check_writable,
    loop_checks,
    settle,
)
from falconet.weights.hf import weight_files

FREE_ON_RESUME = ("steps", "data", "eval_data", "model", "out", "run_dir", "eval_every",
                  "eval_batches", "checkpoint_every", "save_dtype", "save_adapter", "extra")  # fmt: skip


@dataclass
class FinetuneSettings:
    """Everything that defines a fine-tuning run; a resumed run must be given the same."""

    data: list[str]
    model: str
    out: str
    run_dir: str = ""  # checkpoints and history; default: OUT.run beside OUT
    eval_data: str = ""  # a JSONL held out whole; default: eval_fraction of the data
    eval_fraction: float = 0.05
    lora: int = 0  # LoRA rank; 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = ""  # comma-separated layer name patterns; "" = every linear layer
    save_adapter: bool = False  # publish a PEFT adapter folder instead of a merged model
    block_size: int = 1024
    context: int = 0  # the output's position limit; 0 = the base model's
    rope_theta: float = 0.0  # a new RoPE base with `context`; 0 = the base model's
    rope_scaling: str = ""  # "linear": positions interpolated by context / the base's limit
    packing: bool = True  # attention models only (see the module docstring)
    prompt_loss: bool = False  # learn the prompts' tokens too (held-out loss: answers only)
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    dtype: str = "float32"  # or "bfloat16" (autocast)
    save_dtype: str = "float32"
    eval_every: int = 50
    eval_batches: int = 0  # 0: the whole held-out set
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # recorded in the model card, never used

    def __post_init__(self) -> None:
        checks = [
            (self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16"),
            (self.save_dtype in ("float32", "bfloat16"), "--save-dtype must be float32 or bfloat16"),
            (self.lora >= 0, "--lora (the rank) must be >= 1, or 0 for full fine-tuning"),
            (self.lora_alpha > 0, "--lora-alpha must be positive"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (not self.save_adapter or self.lora > 0, "--save-adapter needs --lora RANK"),
            (not self.lora_targets or self.lora > 0, "--lora-targets needs --lora RANK"),
            *loop_checks(self),
            (0 <= self.eval_fraction < 1, "--eval-fraction must be in [0, 1)"),
            (self.context >= 0, "--context must be a number of positions (0: the model's own)"),
            (self.rope_theta >= 0, "--rope-theta must be positive"),
            (self.rope_scaling in ("", "linear"), "--rope-scaling must be linear"),
            (self.context or not (self.rope_theta or self.rope_scaling),
             "--rope-theta and --rope-scaling need --context N"),
        ]  # fmt: skip
        settle(self, checks)

    @property
    def targets(self) -> list[str]:
        return [p.strip() for p in self.lora_targets.split(",") if p.strip()]

    def same_run(self, saved: dict) -> list[str]:
        """Names of the settings that differ from a checkpoint's and change what is computed."""
        mine = asdict(self)
        return [
            f.name
            for f in fields(self)
            if f.name not in FREE_ON_RESUME and saved.get(f.name) != mine[f.name]
        ]


def base_digest(folder: Path) -> str:
    """Identifies the base model cheaply: its config.json and its weight files' sizes."""
    h = hashlib.blake2b(digest_size=16)
    h.update((folder / "config.json").read_bytes())
    for f in weight_files(folder):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def extend_context(hf: dict, context: int, rope_theta: float = 0.0, scaling: str = "") -> dict:
    """A copy of config.json's dict whose model takes `context` positions: RoPE's base set
    to `rope_theta` (when given) or, with scaling "linear", positions interpolated by
    context / the old limit. Written in transformers' v5 keys (`rope_parameters`), which
    transformers and falconet both read; other architectures' keys are left alone."""
    old = hf.get("max_position_embeddings")
    if not isinstance(old, int) or isinstance(old, bool):
        raise FalconetError("--context: the model has no position limit to extend")
    if context < old:
        raise FalconetError(f"--context {context} is shorter than the model's ({old} positions)")
    if (rope_theta or scaling) and hf.get("alibi"):
        raise FalconetError("--rope-theta/--rope-scaling: the model uses ALiBi, not rotary")
    out = dict(hf, max_position_embeddings=context)
    theta, kind, factor = rope_from_hf(hf)
    if kind not in (None, "linear") and (rope_theta or scaling):
        raise FalconetError(f"--context: the model already scales RoPE ({kind}); leave it as is")
    theta = rope_theta or theta
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear" or kind == "linear":
        rope = {
            "rope_type": "linear",
            "rope_theta": theta,
            "factor": factor * (context / old if scaling else 1),
        }
    if rope_theta or scaling:
        out.pop("rope_scaling", None)
        out["rope_parameters"], out["rope_theta"] = rope, theta
    return out


def load_for_training(
    folder: Path, context: int = 0, rope_theta: float = 0.0, rope_scaling: str = ""
) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """The HF folder's model in fp32 (every architecture the registry knows), its
    tokenizer and the config.json dict the output will carry (with `context`, see
    extend_context). Ternary checkpoints hold packed codes, which no gradient can move."""
    if not (folder / "config.json").is_file():
        raise FalconetError(f"--model {folder}: not a Hugging Face model folder (no config.json)")
    hf = read_config_json(folder / "config.json")
    if context:
        hf = extend_context(hf, context, rope_theta, rope_scaling)
    try:
        config = config_from_hf(hf)
    except ConfigError as e:
        raise FalconetError(f"--model {folder}: {e}") from None
    arch = for_config(config)
    if arch.layout(config).ternary:
        raise FalconetError(f"--model {folder}: a ternary (BitNet) model cannot be fine-tuned")
    model = arch.shapes(config, torch.float32, torch.float32)
    load_hf_weights(model, folder)
    return model, Tokenizer.from_dir(folder), hf


class Finetuner(Trainer):
    """One fine-tuning run (the Trainer's loop over `FinetuneSettings`)."""

    s: FinetuneSettings
    CHECKPOINT_KEYS = frozenset({"settings", "step", "trainable", "optimizer", "torch_rng",
                                 "history", "data_digest", "base_digest"})  # fmt: skip
    CHECKPOINT_KIND = "falconet finetune"

    def prepare(self) -> None:
        s = self.s
        base = Path(s.model)
        if base.resolve().is_relative_to(self.out.resolve()):
            raise FalconetError(f"--out {s.out} must not contain the base model {s.model}")
        _check_paths(s, self.overwrite, self.resume)  # type: ignore[arg-type]  # same fields
        _check_writable(self.out, "output folder")
        _check_writable(self.run_dir, "run folder")
        saved = self._load_checkpoint() if self.resume else None
        if saved is None and (self.run_dir / CHECKPOINT).exists():
            raise FalconetError(
                f"{self.run_dir} holds a run; pass --resume to continue it, or delete the folder"
            )
        self.model, self.tokenizer, self.hf_config = load_for_training(
            base, s.context, s.rope_theta, s.rope_scaling
        )
        config = self.model.config
        if s.block_size > config.max_position_embeddings:
            raise FalconetError(
                f"--block-size {s.block_size} is longer than the model's context "
                f"({config.max_position_embeddings} positions)"
            )
        self.packing = s.packing and self.model.state_pool == "paged_kv"
        if s.packing and not self.packing:
            self.log(f"{type(self.model).__name__} is recurrent: one example per row, no packing")
        self._read_data()
        self._make_trainable()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(".*.tmp"):  # a save killed midway
            stale.unlink(missing_ok=True)
        self.history, self.step = [], 0
        if saved is None:
            torch.manual_seed(s.seed)  # LoRA dropout's draws
        else:
            if saved["data_digest"] != self.blocks.digest():
                raise FalconetError(
                    "--resume: the data differs from the one this run trained on; restore it "
                    "or start a new run"
                )
            if saved["base_digest"] != base_digest(base):
                raise FalconetError(f"--resume: {s.model} is not the model this run started from")
            trainable = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in saved["trainable"].items():
                    trainable[name].copy_(t)
            self.opt.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["torch_rng"])
            self.step, self.history = saved["step"], saved["history"]
        atomic_write_text(
            self.run_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in self.history)
        )

    def _read_data(self) -> None:
        s = self.s
        data = read_sft([Path(p) for p in s.data], self.tokenizer, s.block_size)
        if data.skipped:
            shown = "; ".join(data.skipped[:5]) + ("; ..." if len(data.skipped) > 5 else "")
            self.log(f"skipped {len(data.skipped)} of {data.total} examples: {shown}")
        self.skipped = data.skipped
        if s.eval_data:
            held = read_sft([Path(s.eval_data)], self.tokenizer, s.block_size)
            train, val = data.examples, held.examples
        else:
            train, val = split_held_out(data.examples, s.eval_fraction)
        pad = self.tokenizer.eos_token_id or 0
        self.blocks = Blocks(
            pack(train, s.block_size, self.packing, pad, every_token=s.prompt_loss),
            pack(val, s.block_size, self.packing, pad) if val else np.zeros((0, 3, 1), np.int32),
        )
        self.n_examples = len(train)

    def _make_trainable(self) -> None:
        s = self.s
        if s.lora:
            targets = match_targets(self.model, s.targets)
            add_lora(self.model, targets, s.lora, s.lora_alpha, s.lora_dropout, s.seed)
        else:
            # loading maps the checkpoint's file (read-only pages): own the weights first
            for p in self.model.parameters():
                p.data = p.data.clone()
            self.model.requires_grad_(True)
        self.model.to(s.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim == 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.lr, betas=(0.9, 0.999), eps=1e-8,
        )  # fmt: skip

    # ---- steps ------------------------------------------------------------------------
    def _forward(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) fp32 and labels (B, T) of packed rows (B, 3, T)."""
        t = torch.from_numpy(rows.astype(np.int64)).to(self.s.device)
        x, y, seg = t[:, INPUTS], t[:, LABELS], t[:, SEGMENTS]
        device_type = torch.device(self.s.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.s.dtype == "bfloat16"):
            logits = self.model.forward_segments(x, seg) if self.packing else self.model(x)
        return logits.float(), y

    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        """Mean cross-entropy over the batch's target (assistant) tokens."""
        logits, y = self._forward(batch)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE
        )

    def evaluate(self) -> float | None:
        """Mean held-out loss per target token; None without a held-out set."""
        val, n = self.blocks.val, self.eval_rows()
        if n == 0:
            return None
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, n, self.s.batch_size):
                logits, y = self._forward(val[i : min(n, i + self.s.batch_size)])
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                    ignore_index=IGNORE, reduction="sum",
                ).item()  # fmt: skip
                count += int((y != IGNORE).sum())
        self.model.train()
        return total / max(count, 1)

    # ---- checkpoints ------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """The trainable tensors only (the base is read again from its folder, checked by
        its digest), the optimizer, and what an exact resume needs."""
        return {
            "settings": asdict(self.s),
            "step": self.step,
            "trainable": {
                n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad
            },
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "data_digest": self.blocks.digest(),
            "base_digest": base_digest(Path(self.s.model)),
            "threads": torch.get_num_threads(),
        }

    # ---- output -----------------------------------------------------------------------
    def publish(self, final: dict) -> None:
        s = self.s
        card = finetune_card(s, final, self.n_examples, len(self.blocks.train))
        self.model.to("cpu")
        if s.save_adapter:
            layout = for_config(self.model.config).layout(self.model.config)
            weights = {
                name: (layer.lora_A.detach(), to_hf_rows(layer.lora_B.detach(), layout.transforms.get(f"{name}.weight")))
                for name, layer in lora_layers(self.model).items()
            }  # fmt: skip
            write_peft_adapter(
                self.out, weights, s.lora, s.lora_alpha, s.lora_dropout,
                str(Path(s.model).resolve()), card,
            )  # fmt: skip
            return
        merge_lora(self.model)
        save_like(
            self.model, Path(s.model), self.out, getattr(torch, s.save_dtype), card, self.hf_config
        )


def finetune_card(s: FinetuneSettings, final: dict, n_examples: int, n_rows: int) -> str:
    how = f"LoRA rank {s.lora} (alpha {s.lora_alpha})" if s.lora else "full fine-tuning"
    lines = [
        f"# {Path(s.out).name}\n",
        f"{Path(s.model).name} fine-tuned with `falconet finetune` ({how}).\n",
        f"- data: {', '.join(Path(d).name for d in s.data)} ({n_examples} examples in {n_rows} rows "
        f"of {s.block_size} tokens)",
        f"- steps: {final['step']}; final train loss {final['loss']:.4f}",
    ]
    if "val_loss" in final:
        lines.append(f"- held-out loss per assistant token {final['val_loss']:.4f}")
    lines += [f"- {k}: {v}" for k, v in s.extra.items()]
    return "\n".join(lines) + "\n"


__all__ = ["FinetuneSettings", "Finetuner", "load_for_training"]
