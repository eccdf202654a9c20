"""RAG-shaped serving load: falconet serve (prefix cache on and off) vs llama.cpp's own
`llama-server` with parallel slots, on the same Q4_0 GGUF.

Every request is one shared prefix (--prefix-len random " xy" words, one token each: the
system prompt and retrieved passages a RAG app resends) followed by its own question
(--question-len words), answered with --max-tokens tokens at temperature 0 (ignore_eos
on both servers, so every answer is full length). --clients concurrent streaming clients
(the official `openai` AsyncOpenAI client) each send --requests-per-client requests one
after another. Measured per server: time to first token p50/p95 (request sent -> first
chunk carrying text, queueing included), inter-token latency, and aggregate tok/s
(generated tokens / wall time of the load).

The anchor is llama.cpp's `llama-server` (its continuous batching over `-np` slots and its
per-slot prompt cache, `cache_prompt` on by default), built from the llama.cpp that the
installed llama-cpp-python vendors by `benchmarks/build_llama_server.sh` (run here when
the binary is missing; ~8 min on 2 cores). llama-cpp-python's own server runs one request
at a time and is no anchor for concurrency. Its context (`-c`) is split among the slots,
so it gets --clients x the per-request context.

The model is bench_generate's ~1.15 B Falcon-7B-shaped random checkpoint, through
bench_server's printable-tokenizer copy (every id decodes to text, so chunks can be
timed), converted to Q4_0 by `falconet convert`. Both servers run with 2 threads, one
at a time, alternating repeat by repeat; tables hold medians over repeats.

    python benchmarks/bench_server_rag.py                       # the issue's RAG load
    python benchmarks/bench_server_rag.py --prefix-len 0 --question-len 32 \\
        --max-tokens 32 --clients 1,16                          # short prompts, 1 vs 16
    python benchmarks/bench_server_rag.py --smoke               # small model, quick check
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEFAULT_CACHE, DEFAULT_SHAPE, cpu_model, ensure_checkpoint  # noqa: E402
from bench_quant import gguf_path  # noqa: E402
from bench_server import (  # noqa: E402
    SERVED_NAME,
    SMOKE_CACHE,
    SMOKE_SHAPE,
    THREADS,
    LevelResult,
    ServerSpec,
    bench_server,
    ensure_text_copy,
    make_prompts,
    summarize,
)

HERE = Path(__file__).resolve().parent


def falconet_spec(gguf: Path, ctx: int, batch: int, prefix_cache: bool) -> ServerSpec:
    flag = "--prefix-cache" if prefix_cache else "--no-prefix-cache"
    argv = [sys.executable, "-m", "falconet", "serve", "--model", str(gguf),
            "--host", "127.0.0.1", "--max-batch", str(batch), "--max-queue", "256",
            "--max-context", str(ctx), "--served-model-name", SERVED_NAME, flag]  # fmt: skip
    kw = {"extra_body": {"ignore_eos": True}, "stream_options": {"include_usage": True}}
    name = "falconet cache on" if prefix_cache else "falconet cache off"
    return ServerSpec(name, argv, kw, stream_usage=True)


def llama_server_spec(binary: Path, gguf: Path, ctx: int, slots: int, extra: str) -> ServerSpec:
    argv = [str(binary), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1",
            "-c", str(ctx * slots), "-np", str(slots), "-t", str(THREADS),
            "-tb", str(THREADS), "--no-warmup", *shlex.split(extra)]  # fmt: skip
    # llama-server streams one chunk per token; it has no stream usage, so tokens are
    # counted from the chunks (checked against a non-streamed usage in the warm-up).
    return ServerSpec(f"llama-server -np {slots} {extra}".strip(), argv, {"extra_body": {"ignore_eos": True}},
                      stream_usage=False)  # fmt: skip


def ensure_llama_server() -> Path:
    out = subprocess.run(["bash", str(HERE / "build_llama_server.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--clients", default="16", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prefix-len", type=int, default=512, help="shared prefix tokens")
    p.add_argument("--question-len", type=int, default=32, help="tokens of each request's own")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--qtype", default="q4_0", help="GGUF type both servers load")
    p.add_argument("--servers", default="cache-on,cache-off,llama-server",
                   help="which of cache-on, cache-off, llama-server to run")  # fmt: skip
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each load, wait up to S s for other processes to go quiet",
    )
    p.add_argument("--smoke", action="store_true", help=f"small model {SMOKE_SHAPE}")
    p.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="llama-server binary (default: build it, build_llama_server.sh)",
    )
    p.add_argument(
        "--llama-args",
        default="",
        metavar="ARGS",
        help="more llama-server flags, e.g. '-kvu' (a unified KV cache)",
    )
    args = p.parse_args()
    levels = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not levels or min(levels) < 1:
        p.error("--clients must list positive integers")
    if min(args.requests_per_client, args.question_len, args.max_tokens, args.repeats) < 1:
        p.error("--requests-per-client, --question-len, --max-tokens, --repeats must be >= 1")
    if args.prefix_len < 0 or not set(wanted) <= {"cache-on", "cache-off", "llama-server"}:
        p.error("--prefix-len must be >= 0; --servers takes cache-on, cache-off, llama-server")

    shape = SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE
    folder = SMOKE_CACHE if args.smoke else DEFAULT_CACHE
    ensure_checkpoint(argparse.Namespace(**shape, cache_dir=folder, threads=THREADS), folder)
    gguf = gguf_path(ensure_text_copy(folder, shape["vocab"]), args.qtype)
    ctx = args.prefix_len + args.question_len + args.max_tokens + 16
    binary = None
    if "llama-server" in wanted:
        binary = args.llama_server or ensure_llama_server()

    # One shared prefix; every request of every repeat its own question.
    prefix = make_prompts(1, args.prefix_len, seed=1)[0] if args.prefix_len else ""
    n = args.repeats * sum(levels) * args.requests_per_client + 1
    questions = make_prompts(n, args.question_len, seed=2)
    warm, questions = prefix + questions[0], questions[1:]

    results: dict[tuple[str, int], list[LevelResult]] = {}
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_server_rag_") as log_dir:
        for r in range(args.repeats):
            for c in levels:
                k = c * args.requests_per_client
                mine, questions = questions[:k], questions[k:]
                prompts = [prefix + q for q in mine]
                specs = []
                for s in wanted:
                    if s == "llama-server":
                        specs.append(llama_server_spec(binary, gguf, ctx, max(levels),
                                                       args.llama_args))  # fmt: skip
                    else:
                        specs.append(falconet_spec(gguf, ctx, max(levels), s == "cache-on"))
                for spec in specs:
                    args.clients = [c]  # bench_server's load: one level per server start
                    print(f"[repeat {r + 1}/{args.repeats}, {c} clients] {spec.name}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    level, checks[spec.name] = bench_server(spec, {c: prompts}, warm, args,
                                                            Path(log_dir))  # fmt: skip
                    results.setdefault((spec.name, c), []).append(level[c])
    report(results, checks, levels, args, gguf, folder, shape)


def report(results, checks, levels, args, gguf: Path, folder: Path, shape: dict) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    anchor = next((n for n in names if n.startswith("llama-server")), None)
    print()
    print(f"`python {shlex.join(sys.argv)}` — CPU: {cpu_model()} ({os.cpu_count()} logical "
          f"cores), {THREADS} threads per server; model {folder.name} (hidden "
          f"{shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}) as "
          f"{gguf.name}; prompts {args.prefix_len} shared + {args.question_len} own tokens, "
          f"{args.max_tokens} tokens out, temperature 0, {args.requests_per_client} "
          f"request(s) per client, median of {args.repeats}")  # fmt: skip
    print()
    head = ("clients", "server", "tok/s", "tok/s vs anchor", "TTFT p50 / p95 (s)",
            "TTFT p50 vs anchor", "ITL p50 / p95 (ms)")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|---:|---|" + "---:|" * (len(head) - 2))
    for c in levels:
        base = summarize(results[(anchor, c)]) if anchor else None
        for name in names:
            s = summarize(results[(name, c)])
            rate = f"{s['tok_s'] / base['tok_s']:.2f}" if base else "-"
            ttft = f"{s['ttft50'] / base['ttft50']:.2f}" if base else "-"
            print(f"| {c} | {name} | {s['tok_s']:.2f} | {rate} | {s['ttft50']:.2f} / "
                  f"{s['ttft95']:.2f} | {ttft} | {1e3 * s['itl50']:.0f} / "
                  f"{1e3 * s['itl95']:.0f} |")  # fmt: skip
    print()
    for c in levels:
        for name in names:
            s = summarize(results[(name, c)])
            print(
                f"- {c} clients, {name}: {s['requests']:.0f} requests, {s['tokens']:.0f} "
                f"tokens generated; other processes used {s['other_cores']:.2f} cores"
            )
    for name, ck in checks.items():
        print(f"- {name}: ready {ck['ready_s']:.1f} s after start; warm-up prompt "
              f"{ck['prompt_tokens']} tokens (usage), {ck['streamed_tokens']} counted from "
              f"the stream vs {ck['usage_tokens']} in a non-streamed usage")  # fmt: skip


if __name__ == "__main__":
    main()
