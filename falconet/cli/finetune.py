"""`falconet finetune`: fine-tune a model on chat data (full or LoRA)."""

from __future__ import annotations

import argparse

from falconet.cli.common import Out
from falconet.cli.train import run_training


def add_parsers(sub) -> None:
    from falconet.train.finetune import FinetuneSettings

    d = FinetuneSettings(data=[], model="", out="x")
    p = sub.add_parser(
        "finetune", help="fine-tune a model on chat JSONL (full, or LoRA with --lora RANK)"
    )
    p.add_argument(
        "data", nargs="+",
        help='JSONL files of {"messages": [...]} (OpenAI chat) or {"prompt": ..., "completion": ...}',
    )  # fmt: skip
    p.add_argument("--model", "-m", required=True, help="the base model's Hugging Face folder")
    p.add_argument("--out", "-o", required=True,
                   help="output: the fine-tuned HF folder, or with --save-adapter a PEFT adapter")  # fmt: skip
    p.add_argument("--run-dir", default="", help="checkpoints and history (default: OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--eval", default="", dest="eval_data", help="a held-out JSONL file")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="share of the data held out when --eval is not given")  # fmt: skip
    p.add_argument("--lora", type=int, default=d.lora, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", default=d.lora_targets,
                   help="comma-separated layer names or globs (default: every linear layer)")  # fmt: skip
    p.add_argument("--save-adapter", action="store_true",
                   help="write a PEFT adapter folder instead of the merged model")  # fmt: skip
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per row")
    p.add_argument(
        "--context",
        type=int,
        default=d.context,
        help="raise the model's position limit to N (train with --block-size up to N)",
    )
    p.add_argument(
        "--rope-theta",
        type=float,
        default=d.rope_theta,
        help="with --context: a new RoPE base (e.g. 8x the old one)",
    )
    p.add_argument(
        "--rope-scaling",
        choices=["linear"],
        default=d.rope_scaling,
        help="with --context: interpolate positions by N / the old limit",
    )
    p.add_argument("--prompt-loss", action="store_true",
                   help="learn the prompts' tokens too (the held-out loss stays the answers')")  # fmt: skip
    p.add_argument("--no-packing", action="store_false", dest="packing",
                   help="one example per row (recurrent models never pack)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default=d.save_dtype)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")


def cmd_finetune(args: argparse.Namespace, out: Out) -> int:
    from falconet.train.finetune import Finetuner, FinetuneSettings

    final, settings = run_training(args, FinetuneSettings, Finetuner, "finetune")
    summary = f"step {final['step']}: train loss {final['loss']:.4f}"
    if "val_loss" in final:
        summary += f", held-out loss {final['val_loss']:.4f}"
    out(f"{summary}\nwrote {settings.out}\n")
    return 0
