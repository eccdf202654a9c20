"""`falconet train`: train a small Falcon on your own text."""

from __future__ import annotations

import argparse
import sys

from falconet.cli.common import Out
from falconet.errors import FalconetError


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a small Falcon on your own text")
    add_train_flags(train)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    from falconet.train.trainer import VARIANTS, TrainSettings

    d = TrainSettings(data=[], out="x")
    p.add_argument(
        "data", nargs="+", help='text files, folders of .txt/.md/.html, or a JSONL of {"text": ...}'
    )
    p.add_argument("--out", "-o", required=True, help="output HF model folder")
    p.add_argument("--run-dir", default="", help="checkpoints and history (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--tokenizer", default="", help="tokenizer.json or folder to use instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--variant", choices=list(VARIANTS), default=d.variant)
    p.add_argument("--hidden", type=int, default=d.hidden_size, dest="hidden_size")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=d.dtype, help="training precision"
    )
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default=d.save_dtype,
                   help="weight dtype of the output folder")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")


def cmd_train(args: argparse.Namespace, out: Out) -> int:
    from falconet.train.trainer import Trainer, TrainSettings

    final, settings = run_training(args, TrainSettings, Trainer, "train")
    summary = f"step {final['step']}: train loss {final['loss']:.4f}"
    if "val_loss" in final:
        summary += f", held-out loss {final['val_loss']:.4f} (perplexity {final['val_ppl']:.2f})"
    out(f"{summary}\nwrote {settings.out}\n")
    return 0


def run_training(
    args: argparse.Namespace, settings_cls, trainer_cls, desc: str
) -> tuple[dict, object]:
    """Settings from the parsed flags (the dataclass's fields), then the run under a
    progress bar: (its final history record, the settings)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(settings_cls)} - {"extra"}
    settings = settings_cls(**{k: v for k, v in vars(args).items() if k in names})
    set_threads(args.threads)
    final = run_with_progress(
        lambda log, on_step: trainer_cls(
            settings, resume=args.resume, overwrite=args.overwrite, log=log, on_step=on_step
        ),
        settings.steps,
        desc,
    )
    return final, settings


def set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise FalconetError("--threads must be >= 0 (0: PyTorch's default)")
    if threads:
        torch.set_num_threads(threads)


def run_with_progress(make_trainer, steps: int, desc: str) -> dict:
    """Run the trainer `make_trainer(log, on_step)` builds under a progress bar on stderr;
    its final history record."""
    from tqdm import tqdm

    bar = None

    def on_step(record: dict) -> None:
        nonlocal bar
        if bar is None:  # drawn from the first step on, so setup errors stay one line
            bar = tqdm(total=steps, initial=record["step"] - 1, desc=desc, unit="step",
                       dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tok_s']:.0f}"}
        if "val_ppl" in record:
            post["val_ppl"] = f"{record['val_ppl']:.1f}"
        bar.set_postfix(post, refresh=False)
        bar.update(record["step"] - bar.n)

    def log(msg: str) -> None:
        tqdm.write(f"falconet: {msg}", file=sys.stderr)

    trainer = make_trainer(log, on_step)
    try:
        return trainer.run()
    finally:
        if bar is not None:
            bar.close()
