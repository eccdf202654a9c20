"""Decode speed under CPU contention: falconet vs llama.cpp on the same GGUF, alone and
with a busy neighbour (issue 15 item 5).

A user's machine is rarely idle: a browser, an indexer or a second model takes a core.
Each engine decodes --decode-tokens greedy tokens after a --prompt-len prompt, once
alone and once while another process spins on one core (`--neighbours` of them), the
conditions and the engines alternating run by run. falconet runs through the engine
(`LLM.engine`, as `LLM.stream` does) with speculation off, llama.cpp through
llama-cpp-python with the same thread count. The table gives decode tok/s (medians),
each engine's busy/alone ratio (how much of its speed it keeps) and falconet/llama.cpp
in each condition.

    python benchmarks/bench_contention.py                      # the 1.15 B model, q4_0
    python benchmarks/bench_contention.py --types q4_0,q4_k_m --repeats 5

The checkpoint is bench_quant.py's (built and cached by it: run it once first); a GGUF
of a type not yet there is converted from it by `falconet convert`. Not used by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from bench_quant import gguf_path, make_runners, prompt_ids

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".bench_cache" / "falcon-1b-mq"

ENGINES = ("falconet API", "llama.cpp")
SPIN = "while True: pass"


def neighbours(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def bench(path: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    from gguf import GGUFReader

    [embd] = [t for t in GGUFReader(str(path)).tensors if t.name == "token_embd.weight"]
    ids = prompt_ids(int(embd.shape[-1]), args.prompt_len)  # GGUF shapes: (hidden, vocab)
    runners = make_runners(ENGINES, path, ids, args.decode_tokens, args.threads)
    for r in runners.values():  # warm-up: pools built, pages touched
        r.run()
    speeds = {e: {"alone": [], "busy": []} for e in ENGINES}
    for i in range(args.repeats):
        conditions = ["alone", "busy"] if i % 2 == 0 else ["busy", "alone"]
        for cond in conditions:
            procs = neighbours(args.neighbours) if cond == "busy" else []
            try:
                order = ENGINES if i % 2 == 0 else ENGINES[::-1]
                for name in order:
                    _, decode_s, _ = runners[name].run()
                    speeds[name][cond].append(args.decode_tokens / decode_s)
            finally:
                stop(procs)
    return speeds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--types", default="q4_0")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="bench_quant.py's checkpoint folder; its GGUFs lie beside it")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--neighbours", type=int, default=1, help="busy processes, one core each")
    args = p.parse_args()
    rows = []
    for qtype in args.types.split(","):
        if not (args.cache_dir / "config.json").exists():
            sys.exit(f"no checkpoint in {args.cache_dir}: run benchmarks/bench_quant.py once first")
        path = gguf_path(args.cache_dir, qtype)  # converted from it on first use
        speeds = bench(path, args)
        med = {e: {c: statistics.median(v) for c, v in s.items()} for e, s in speeds.items()}
        rows.append((qtype, med))
    print(f"{args.decode_tokens} greedy tokens after a {args.prompt_len}-token prompt, "
          f"{args.threads} threads, {args.neighbours} busy neighbour(s), medians of "
          f"{args.repeats} alternating runs\n")  # fmt: skip
    print("| type | engine | alone tok/s | busy tok/s | busy/alone |")
    print("|---|---|---:|---:|---:|")
    for qtype, med in rows:
        for e in ENGINES:
            a, b = med[e]["alone"], med[e]["busy"]
            print(f"| {qtype} | {e} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print("\n| type | falconet/llama.cpp alone | falconet/llama.cpp busy |")
    print("|---|---:|---:|")
    for qtype, med in rows:
        f, ll = med["falconet API"], med["llama.cpp"]
        print(f"| {qtype} | {f['alone'] / ll['alone']:.2f}x | {f['busy'] / ll['busy']:.2f}x |")


if __name__ == "__main__":
    main()
