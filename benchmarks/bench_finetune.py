"""Fine-tuning throughput: `falconet finetune --lora`'s step vs a PEFT + transformers loop.

Both sides fine-tune the same Falcon (7B-style; hidden 256, 6 layers, 4 heads by
default) with LoRA of the same rank on the same linear layers, AdamW, gradient clipping
and fp32, on the same rows: synthetic chat examples rendered and packed by falconet
(sft_data.py). falconet runs them with its block-diagonal mask (examples kept apart);
the transformers loop runs the same tokens under a plain causal mask with the same
labels, so both do the same matmuls. Steps are timed alternately (one warm-up step each),
so a noisy machine's drift hits both alike; the table gives median tokens/s and the ratio.
Not used by the tests.

    python benchmarks/bench_finetune.py
    python benchmarks/bench_finetune.py --hidden 512 --layers 8 --rank 16 --steps 8
    python benchmarks/bench_finetune.py --smoke      # a few seconds: does it run at all
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDS = tuple(
    [
        "lease",
        "tenant",
        "landlord",
        "notice",
        "month",
        "rent",
        "deposit",
        "invoice",
        "amount",
        "due",
        "date",
        "schedule",
        "meeting",
        "letter",
        "office",
        "payment",
        "clause",
        "repair",
        "key",
        "garden",
        "water",
        "heating",
    ]
)


def _examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        out.append({"messages": [
            {"role": "system", "content": facts},
            {"role": "user", "content": q + "?"},
            {"role": "assistant", "content": a + "."},
        ]})  # fmt: skip
    return out


def _build_base(folder: Path, args: argparse.Namespace) -> None:
    from transformers import FalconConfig, FalconForCausalLM

    from falconet.train.data import train_tokenizer

    text = [" ".join(WORDS) * 20, *(json.dumps(e) for e in _examples(200, 1))]
    tokenizer = train_tokenizer(text, args.vocab)
    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, multi_query=True, parallel_attn=True, bias=False,
        new_decoder_architecture=False, alibi=False, max_position_embeddings=2048,
        bos_token_id=11, eos_token_id=11,
    )  # fmt: skip
    FalconForCausalLM(config).save_pretrained(folder)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per engine")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.examples = 64, 2, 400, 40
        args.block_size, args.batch_size, args.steps = 128, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import FalconForCausalLM
    from transformers.utils import logging as hf_logging

    from falconet.train.finetune import Finetuner, FinetuneSettings
    from falconet.train.sft_data import INPUTS, LABELS

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench_finetune."))
    base = tmp / "base"
    _build_base(base, args)
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in _examples(args.examples, 0)))

    settings = FinetuneSettings(
        data=[str(data)], model=str(base), out=str(tmp / "out"), lora=args.rank,
        lora_alpha=2.0 * args.rank, lora_dropout=0.0, block_size=args.block_size,
        batch_size=args.batch_size, steps=10**6, warmup=0, lr=1e-4, eval_fraction=0.0,
    )  # fmt: skip
    ours = Finetuner(settings)
    ours.prepare()
    # falconet's default targets: every linear layer but the head, i.e. these four
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    hf = FalconForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    peft_model = get_peft_model(
        hf, LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
                       target_modules=targets, task_type="CAUSAL_LM"),
    ).train()  # fmt: skip
    opt = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0
    )
    rows = ours.blocks.train

    def hf_step(i: int) -> None:
        batch = rows[np.arange(i * args.batch_size, (i + 1) * args.batch_size) % len(rows)]
        x = torch.from_numpy(batch[:, INPUTS].astype(np.int64))
        y = torch.from_numpy(batch[:, LABELS].astype(np.int64))
        logits = peft_model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = args.batch_size * args.block_size
    times: dict[str, list[float]] = {"falconet": [], "peft+transformers": []}
    for i in range(args.steps + 1):
        for name, step in (
            ("falconet", ours.train_step),
            ("peft+transformers", lambda i=i: hf_step(i)),
        ):
            t0 = time.perf_counter()
            step()
            if i:  # step 0 warms up
                times[name].append(time.perf_counter() - t0)
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"LoRA rank {args.rank}, Falcon hidden {args.hidden} x {args.layers} layers, "
          f"{len(rows)} packed rows of {args.block_size}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")  # fmt: skip
    print("| engine | tok/s | vs peft |\n|---|---|---|")
    for k, r in rates.items():
        print(f"| {k} | {r:,.0f} | {r / rates['peft+transformers']:.2f}x |")


if __name__ == "__main__":
    main()
