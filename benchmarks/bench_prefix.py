"""Time to first token with the prefix cache on and off: 8 requests sharing a prompt prefix.

The model and servers are bench_server.py's: the ~1.15 B Falcon-7B-shaped random
checkpoint (bf16 weights, fp32 compute, 2 threads) served by `falconet serve` from its
printable-tokenizer copy, prompts made of " xy" words (one token each). For each of
`--prefix-cache` and `--no-prefix-cache` a fresh server gets one warm-up request, then
two rounds, each over its own shared prefix of --prefix-len tokens followed by a distinct
--suffix-len-token suffix per request:

    alone     request 1, then requests 2..8 one after another
    together  request 1, then requests 2..8 at once (prefills share steps)

TTFT is request sent -> first streamed chunk carrying text (the official `openai`
AsyncOpenAI client, temperature 0, --max-tokens tokens). The table gives request 1's
TTFT and the median of requests 2..8, per round and setting; the completions' text
with the cache on must equal the text with it off, and /metrics' hit rate is read
after each run. This script is not used by the tests.

    python benchmarks/bench_prefix.py            # 1.15 B model (2.3 GB, built once)
    python benchmarks/bench_prefix.py --small    # ~0.1 B model of the same shape family
    python benchmarks/bench_prefix.py --smoke    # tiny model, a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEFAULT_CACHE, DEFAULT_SHAPE, cpu_model, ensure_checkpoint  # noqa: E402
from bench_server import (  # noqa: E402
    SERVED_NAME,
    SMOKE_CACHE,
    SMOKE_SHAPE,
    THREADS,
    RunningServer,
    ensure_text_copy,
    falconet_spec,
    make_prompts,
    new_client,
)

ROUNDS = ("alone", "together")
# A ~0.1 B model of the same family: the full-size model takes over half an hour of
# prefills on a busy 2-core machine.
SMALL_SHAPE = {"hidden": 1024, "layers": 8, "heads": 16, "vocab": 4096}
SMALL_CACHE = Path("/tmp/bench_prefix_small")


async def ask(client, prompt: str, max_tokens: int, kw: dict) -> tuple[float, str]:
    """(TTFT, the completion's text) of one streamed request."""
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, **kw
    )
    ttft, text = None, ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            text += chunk.choices[0].text
    if ttft is None:
        raise SystemExit("a request streamed no text")
    return ttft, text


async def run_rounds(base_url: str, prompts: dict[str, list[str]], warm: str, args, kw) -> dict:
    client = new_client(base_url)
    await ask(client, warm, args.max_tokens, kw)
    out = {}
    for name in ROUNDS:
        first, rest = prompts[name][0], prompts[name][1:]
        results = [await ask(client, first, args.max_tokens, kw)]
        if name == "alone":
            for p in rest:
                results.append(await ask(client, p, args.max_tokens, kw))
        else:
            results += await asyncio.gather(*(ask(client, p, args.max_tokens, kw) for p in rest))
        out[name] = results
    return out


def hit_rate(base_url: str) -> float:
    url = base_url.removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("falconet_prefix_cache_hit_rate "):
                return float(line.split()[1])
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prefix-len", type=int, default=200, help="shared prompt tokens")
    p.add_argument("--suffix-len", type=int, default=16, help="distinct tokens per request")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help=f"tiny model {SMOKE_SHAPE}")
    p.add_argument("--small", action="store_true", help=f"small model {SMALL_SHAPE}")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"checkpoint folder (default {DEFAULT_CACHE}, or {SMOKE_CACHE} with "
                   "--smoke)")  # fmt: skip
    args = p.parse_args()
    if min(args.prefix_len, args.suffix_len, args.max_tokens) < 1 or args.requests < 2:
        p.error("--prefix-len, --suffix-len, --max-tokens must be positive, --requests >= 2")
    shape, folder = DEFAULT_SHAPE, DEFAULT_CACHE
    if args.smoke or args.small:
        shape, folder = (SMOKE_SHAPE, SMOKE_CACHE) if args.smoke else (SMALL_SHAPE, SMALL_CACHE)
    folder = args.cache_dir or folder
    ensure_checkpoint(argparse.Namespace(**shape, cache_dir=folder, threads=THREADS), folder)
    text_folder = ensure_text_copy(folder, shape["vocab"])

    n = args.requests
    words = make_prompts(len(ROUNDS) * (n + 1) + 1, args.suffix_len, seed=1)
    prefixes = make_prompts(len(ROUNDS), args.prefix_len, seed=2)
    prompts = {
        name: [prefixes[i] + words[i * n + j] for j in range(n)] for i, name in enumerate(ROUNDS)
    }
    ctx = args.prefix_len + args.suffix_len + args.max_tokens + 16
    spec = falconet_spec(text_folder, ctx, argparse.Namespace(max_batch=n))
    results, rates = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_prefix_") as log_dir:
        for flag in ("--prefix-cache", "--no-prefix-cache"):
            spec.argv = [a for a in spec.argv if "prefix-cache" not in a] + [flag]
            print(f"falconet serve {flag}", file=sys.stderr, flush=True)
            server = RunningServer(spec, Path(log_dir))
            try:
                server.wait_ready()
                results[flag] = asyncio.run(
                    run_rounds(server.base_url, prompts, words[-1], args, spec.request_kw)
                )
                rates[flag] = hit_rate(server.base_url)
                ttfts = {r: [round(t, 3) for t, _ in results[flag][r]] for r in ROUNDS}
                print(f"  TTFT (s) {ttfts}", file=sys.stderr, flush=True)
            finally:
                server.stop()
    same = all(
        [t for _, t in results["--prefix-cache"][r]]
        == [t for _, t in results["--no-prefix-cache"][r]]
        for r in ROUNDS
    )
    print(f"model {folder.name} {shape}; {cpu_model()}, {THREADS} threads; prompts "
          f"{args.prefix_len} shared + {args.suffix_len} own tokens, {args.max_tokens} out\n")  # fmt: skip
    print(f"| round | prefix cache | TTFT request 1 (s) | TTFT requests 2..{n}, median (s) |")
    print("|---|---|---:|---:|")
    for r in ROUNDS:
        for flag in results:
            ttfts = [t for t, _ in results[flag][r]]
            on = "on" if flag == "--prefix-cache" else "off"
            print(f"| {r} | {on} | {ttfts[0]:.3f} | {statistics.median(ttfts[1:]):.3f} |")
    print(f"\nhit rate (tokens) on: {rates['--prefix-cache']:.3f}, off: "
          f"{rates['--no-prefix-cache']:.3f}; outputs identical on/off: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
