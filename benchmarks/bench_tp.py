"""Tensor parallelism on CPU: TP=1 vs TP=2 (gloo, one thread per rank) on one machine.

The model is bench_generate.py's ~1.15 B Falcon-7B-shaped random checkpoint (bf16
safetensors, built once), or a tiny one with --smoke. For each TP size, in a fresh
subprocess (so the ranks' memory and threads are their own), through `falconet.load(tp=N)`
and the engine:

- prefill tokens/s: a --prompt-len prompt up to its first token (max_tokens=1);
- decode tokens/s: the --decode-tokens greedy steps after it;
- where rank 0's time goes: in collectives (the row-parallel all-reduces, the embedding
  all-reduce, the logit gather -- in shared memory, parallel/shm.py, or gloo with
  --gloo -- and the step broadcast; waiting for the slower rank counts here) vs the rest
  (its share of the compute);
- each rank's peak RSS.

Every rank gets one thread (torch.set_num_threads(1)), so TP=2 uses two cores where TP=1
uses one: the ratio is what splitting the weights over two cores (and two shares of the
memory bandwidth) buys, less the cost of the collectives. Not used by the tests.

    python benchmarks/bench_tp.py            # 1.15 B model (2.3 GB bf16, built once)
    python benchmarks/bench_tp.py --smoke    # tiny model, a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEFAULT_CACHE, DEFAULT_SHAPE, cpu_model, ensure_checkpoint  # noqa: E402

SMOKE_SHAPE = {"hidden": 256, "layers": 2, "heads": 4, "vocab": 4096}
SMOKE_CACHE = Path("/tmp/bench_tp_smoke")
COLLECTIVES = ("all_reduce", "all_gather", "broadcast")


def timed_collectives(totals: dict[str, float]) -> None:
    """Wrap torch.distributed's collectives so each call adds its seconds to `totals`
    (a benchmark's instrument: the library calls them through the module)."""
    import torch.distributed as dist

    from falconet.parallel.shm import SharedMemoryGroup

    # torch.distributed's (gloo), and the shared-memory group's where the ranks meet there
    for owner, name in [(dist, n) for n in COLLECTIVES] + [
        (SharedMemoryGroup, "all_reduce"),
        (SharedMemoryGroup, "all_gather"),
    ]:
        original = getattr(owner, name)

        def timed(*a, _original=original, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                totals[_name] += time.perf_counter() - t0

        setattr(owner, name, timed)


def worker(args: argparse.Namespace) -> dict:
    """One TP size in this process: load, warm up, time prefill and decode."""
    import torch

    import falconet
    from falconet.sampling import SamplingParams

    torch.set_num_threads(1)
    totals = dict.fromkeys(COLLECTIVES, 0.0)
    timed_collectives(totals)
    llm = falconet.load(args.folder, dtype=args.dtype, tp=args.tp)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(300, llm.config.vocab_size, (args.prompt_len,), generator=g).tolist()

    def run(max_tokens: int) -> tuple[float, float, list[int]]:
        """(seconds, seconds in collectives, tokens) of one request."""
        before = sum(totals.values())
        t0 = time.perf_counter()
        [c] = llm.complete([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return time.perf_counter() - t0, sum(totals.values()) - before, c.token_ids

    run(2)  # warm-up (kernels' first calls, x8 repacking)
    prefill = [run(1) for _ in range(args.repeats)]
    full = [run(1 + args.decode_tokens) for _ in range(args.repeats)]
    p_s, p_comm = (
        statistics.median(t for t, _, _ in prefill),
        statistics.median(c for _, c, _ in prefill),
    )
    f_s, f_comm = statistics.median(t for t, _, _ in full), statistics.median(c for _, c, _ in full)
    out = {
        "prefill_tok_s": args.prompt_len / p_s,
        "decode_tok_s": args.decode_tokens / (f_s - p_s),
        "prefill_comm_share": p_comm / p_s,
        "decode_comm_share": (f_comm - p_comm) / max(1e-9, f_s - p_s),
        "tokens": full[0][2],
    }
    if args.tp > 1:
        out["peak_rss"] = llm.model.peak_rss()
        llm.close()
    else:
        from falconet.parallel.runtime import peak_resident_bytes

        out["peak_rss"] = [peak_resident_bytes()]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help=f"tiny model {SMOKE_SHAPE}")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"checkpoint folder (default {DEFAULT_CACHE}, or {SMOKE_CACHE} with "
                   "--smoke)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="weights: auto (the checkpoint's bf16), float32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)  # a worker's
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.prompt_len, args.decode_tokens, args.repeats = 32, 8, 1
    if args.tp is not None:  # a worker: one TP size, JSON on stdout
        print(json.dumps(worker(args)))
        return
    shape, folder = (SMOKE_SHAPE, SMOKE_CACHE) if args.smoke else (DEFAULT_SHAPE, DEFAULT_CACHE)
    folder = args.cache_dir or folder
    ensure_checkpoint(argparse.Namespace(**shape, cache_dir=folder, threads=1), folder)
    results = {}
    # (label, TP size, environment): TP=2 with the ranks meeting in shared memory (the
    # default on one CPU machine) and through gloo (FALCONET_TP_SHM=0)
    runs = [("TP=1", 1, {}), ("TP=2 shm", 2, {}), ("TP=2 gloo", 2, {"FALCONET_TP_SHM": "0"})]
    for label, tp, env in runs:
        print(f"{label} ...", file=sys.stderr, flush=True)
        argv = [sys.executable, __file__, "--tp", str(tp), "--folder", str(folder),
                "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
                "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
        if run.returncode != 0:
            sys.exit(f"{label} failed:\n{run.stderr}")
        results[label] = json.loads(run.stdout.strip().splitlines()[-1])
    one = results["TP=1"]
    print(f"{cpu_model()}; model {shape} ({args.dtype}); 1 thread per rank")
    print(f"prompt {args.prompt_len} tokens, {args.decode_tokens} decode tokens, "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| | TP=1 | TP=2 shm | / TP=1 | TP=2 gloo | / TP=1 |")
    print("|---|---|---|---|---|---|")
    shm, gloo = results["TP=2 shm"], results["TP=2 gloo"]
    for key, label in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")):
        print(f"| {label} | {one[key]:.1f} | {shm[key]:.1f} | {shm[key] / one[key]:.2f}x | "
              f"{gloo[key]:.1f} | {gloo[key] / one[key]:.2f}x |")  # fmt: skip
    for key, label in (("prefill_comm_share", "prefill"), ("decode_comm_share", "decode")):
        print(f"| rank 0's {label} time in collectives | - | {100 * shm[key]:.0f}% | | "
              f"{100 * gloo[key]:.0f}% | |")  # fmt: skip
    rss = [" / ".join(f"{b / 2**30:.2f}" for b in r["peak_rss"]) for r in (shm, gloo)]
    print(f"| peak RSS GiB per rank | {one['peak_rss'][0] / 2**30:.2f} | {rss[0]} | | {rss[1]} | |")
    for label in ("TP=2 shm", "TP=2 gloo"):
        same = results[label]["tokens"] == one["tokens"]
        print(f"\n{label}: greedy tokens equal to TP=1's: {same}", end="")
    print()


if __name__ == "__main__":
    main()
