"""Training throughput: `falconet train`'s step vs a plain PyTorch loop over transformers.

Both sides train the same Falcon config (by default falconet-tiny's: 7B-style, hidden
256, 6 layers, 4 heads, vocab 8192) from the same initial weights on the same random
token batches, with AdamW, gradient clipping and fp32, and are timed alternately step by
step (one warm-up step each), so a noisy machine's drift hits both alike. Reports the
median tokens/s and the ratio. Not used by the tests.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --hidden 512 --layers 8 --heads 8 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per engine")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import FalconForCausalLM
    from transformers.utils import logging as hf_logging

    from falconet.train.data import Blocks
    from falconet.train.save import hf_state_dict
    from falconet.train.trainer import Trainer, TrainSettings, sample_indices

    hf_logging.set_verbosity_error()
    settings = TrainSettings(
        data=[], out="/nonexistent", hidden_size=args.hidden, layers=args.layers, heads=args.heads,
        block_size=args.block_size, batch_size=args.batch_size, steps=10**6, warmup=0, lr=1e-3,
    )  # fmt: skip
    config = settings.model_config(args.vocab, eos_id=11)
    rng = np.random.default_rng(0)
    blocks = rng.integers(
        0, args.vocab, (64 * args.batch_size, args.block_size + 1), dtype=np.int32
    )

    ours = Trainer(settings)
    ours.blocks = Blocks(blocks, blocks[:0])
    ours.build_model(config)

    hf = FalconForCausalLM(_hf_config(config)).train()
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours.model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    decay = [p for p in hf.parameters() if p.ndim == 2]  # the same groups as falconet's AdamW
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip

    def hf_step(i: int) -> float:
        idx = sample_indices(len(blocks), settings.seed, i * args.batch_size, args.batch_size)
        batch = torch.from_numpy(blocks[idx].astype(np.int64))  # the batch falconet's step i takes
        logits = hf(batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times: dict[str, list[float]] = {"falconet": [], "transformers": []}
    losses: dict[str, list[float]] = {"falconet": [], "transformers": []}
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        losses["falconet"].append(ours.train_step())
        t1 = time.perf_counter()
        losses["transformers"].append(hf_step(i))
        t2 = time.perf_counter()
        if i:  # step 0 is the warm-up
            times["falconet"].append(t1 - t0)
            times["transformers"].append(t2 - t1)

    tokens = args.batch_size * args.block_size
    fn = tokens / statistics.median(times["falconet"])
    tf = tokens / statistics.median(times["transformers"])
    params = ours.model.num_parameters()
    print(
        f"`python benchmarks/bench_train.py {' '.join(_argv())}` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Falcon 7B-style, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab} ({params / 1e6:.2f} M parameters), batch "
        f"{args.batch_size} x {args.block_size} tokens, fp32, AdamW + clipping\n"
    )
    print("| metric | falconet | transformers | ratio |\n|---|---:|---:|---:|")
    print(
        f"| training tokens/s (median of {args.steps} steps) | {fn:.0f} | {tf:.0f} | {fn / tf:.2f} |"
    )
    print(
        f"\nfirst-step loss: falconet {losses['falconet'][0]:.5f}, transformers "
        f"{losses['transformers'][0]:.5f} (same weights, same batch)"
    )


def _hf_config(config):
    from transformers import FalconConfig as HFConfig

    return HFConfig(
        **{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
    )


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
