"""Benchmark `falconet serve` against llama.cpp's server under concurrent streaming clients.

The model is bench_generate.py's ~1.15 B Falcon-7B-shaped random checkpoint (bf16
safetensors, built once and cached). falconet serves that HF folder (bf16 weights, fp32
compute on CPU, continuous batching with --max-batch 16); llama.cpp serves a bf16 GGUF
of the same weights written by `falconet convert` (bench_quant's gguf_path), through
llama-cpp-python's server (`python -m llama_cpp.server`), which runs one request at a
time and queues the rest (--interrupt_requests False, else a new request would cut
the one streaming).

Both read a copy of the checkpoint folder ("<folder>-text": the weights symlinked, a
new tokenizer) whose tokenizer gives every id a printable piece (" abc"). The bench
tokenizer covers only its first ~400 ids, and a random model generates ids all over
the 65,024: those decode to nothing, so falconet would stream no chunk for them (and
llama.cpp an empty one), and time to first token and inter-token latency could not be
read from the stream. Prompts are --prompt-len random words " xy", each one token in
both tokenizers, so both servers see the same token counts.

Each server runs alone (2 threads: OMP_NUM_THREADS=2, llama.cpp --n_threads 2) on a
free port, gets one warm-up request, then for each --clients level that many
concurrent streaming clients (the official `openai` AsyncOpenAI client,
`completions.create(stream=True)`, temperature 0) each send --requests-per-client
requests one after another, every prompt distinct. Measured per level:

- aggregate tok/s: generated tokens of all requests / wall time of the level. falconet
  is asked for ignore_eos and reports usage in the stream; llama.cpp has no
  ignore_eos and no stream usage, so its tokens are its streamed chunks (one per token,
  checked against a non-streamed request's usage in the warm-up);
- TTFT: request sent -> first chunk carrying text (includes waiting in a queue);
- ITL: gaps between successive text-carrying chunks of one request.

Levels run once per --repeats, the servers alternating repeat by repeat; the table
holds medians over repeats. This script is not used by the tests.

--health-under-load measures something else: falconet alone, on its embedded default
model, gets --big-prompts requests of a ~4 MiB prompt each at once (a /v1/completions
body just under the 4 MiB limit; each is tokenized, then refused as longer than the
context), while /health is polled back to back on one keep-alive connection. It
reports the /health latencies (p50/p99/max) of polls sent while a large prompt was in
flight, beside idle ones; --falconet-src serves from another source tree (before/after).

    python benchmarks/bench_server.py                       # full size (~2.3 GB + 2.3 GB GGUF)
    python benchmarks/bench_server.py --smoke               # small model, a quick check
    python benchmarks/bench_server.py --health-under-load   # /health p99 beside 3 x 4 MiB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEFAULT_CACHE, DEFAULT_SHAPE, EOS, cpu_model, ensure_checkpoint  # noqa: E402
from bench_quant import gguf_path  # noqa: E402

SMOKE_SHAPE = {"hidden": 256, "layers": 2, "heads": 4, "vocab": 4096}
SMOKE_CACHE = Path("/tmp/bench_server_small")
SERVED_NAME = "bench"
THREADS = 2
TEXT_META = "bench_server_text.json"  # written last: marks a complete text-tokenizer copy
LETTERS = "abcdefghijklmnopqrstuvwxyz"
READY_TIMEOUT_S = 900
STOP_TIMEOUT_S = 30


# ---- model: the checkpoint, its printable-tokenizer copy, the GGUF ---------------------
def pair_words() -> list[str]:
    return [a + b for a in LETTERS for b in LETTERS]


def write_text_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE in which every one of `vocab` ids decodes to printable ASCII.

    id 0 is EOS (as in bench_generate's tokenizer); then the byte-level symbols of
    newline and printable ASCII; then the 676 letter pairs "xy" and " xy" (reachable
    through merges, so a prompt word " xy" is one token); the rest are " abc", " abcd",
    ... pieces that only the model produces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    symbols = ["Ċ", "Ġ"] + [chr(c) for c in range(0x21, 0x7F)]  # GPT-2's byte -> char map
    pairs = pair_words()
    tokens = [EOS, *symbols, *pairs, *("Ġ" + p for p in pairs)]
    merges = [(p[0], p[1]) for p in pairs] + [("Ġ", p) for p in pairs]
    n = 3
    while len(tokens) < vocab:
        for i in range(len(LETTERS) ** n):
            word = "".join(LETTERS[(i // len(LETTERS) ** k) % len(LETTERS)] for k in range(n))
            tokens.append("Ġ" + word)
            if len(tokens) == vocab:
                break
        n += 1
    if len(tokens) > vocab:
        sys.exit(f"--vocab {vocab} is too small for the benchmark tokenizer ({len(tokens)} ids)")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))


def ensure_text_copy(folder: Path, vocab: int) -> Path:
    """`<folder>-text`: the checkpoint's files symlinked, with the printable tokenizer."""
    out = folder.parent / f"{folder.name}-text"
    if (out / TEXT_META).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for src in folder.iterdir():
        if src.name.startswith("tokenizer") or src.name == "bench_meta.json":
            continue
        link = out / src.name
        link.unlink(missing_ok=True)
        link.symlink_to(src.resolve())
    write_text_tokenizer(out, vocab)
    (out / TEXT_META).write_text(json.dumps({"source": str(folder.resolve()), "vocab": vocab}))
    return out


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    """`n` distinct prompts of `words` random " xy" words (one token each)."""
    rng = random.Random(seed)
    pairs = pair_words()
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        p = "".join(" " + rng.choice(pairs) for _ in range(words))
        if p not in seen:
            seen.add(p)
            prompts.append(p)
    return prompts


# ---- servers ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    name: str
    argv: list[str]  # without --port
    request_kw: dict  # extra completions.create() arguments
    stream_usage: bool  # True: token counts from the stream's usage chunk
    src: Path | None = None  # serve the falconet package of this source tree


def falconet_spec(folder: Path, ctx: int, args: argparse.Namespace) -> ServerSpec:
    argv = [sys.executable, "-m", "falconet", "serve", "--model", str(folder),
            "--dtype", "bfloat16", "--host", "127.0.0.1", "--max-batch", str(args.max_batch),
            "--max-queue", "256", "--max-context", str(ctx),
            "--served-model-name", SERVED_NAME]  # fmt: skip
    kw = {"extra_body": {"ignore_eos": True}, "stream_options": {"include_usage": True}}
    return ServerSpec("falconet", argv, kw, stream_usage=True)


def llama_cpp_spec(gguf: Path, ctx: int) -> ServerSpec:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--n_ctx", str(ctx),
            "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
            "--interrupt_requests", "False", "--logits_all", "False",
            "--use_mlock", "False", "--verbose", "False"]  # fmt: skip
    return ServerSpec("llama.cpp", argv, {}, stream_usage=False)


class RunningServer:
    """One server subprocess on a free port; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [*spec.argv, "--port", str(self.port)]
        self.log_path = log_dir / f"{spec.name}-{self.port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
        if spec.src is not None:  # `python -m` looks in its working folder first
            env["PYTHONPATH"] = str(spec.src)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=spec.src)  # fmt: skip

    def failure(self, what: str) -> SystemExit:
        tail = self.log_path.read_text(errors="replace")[-4000:]
        return SystemExit(f"{self.spec.name} server {what}\ncommand: {shlex.join(self.cmd)}\n"
                          f"log ({self.log_path}):\n{tail}")  # fmt: skip

    def wait_ready(self) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise self.failure(f"not ready after {READY_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- load ------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ttft: float
    gaps: list[float]
    tokens: int
    chunks: int


@dataclass
class LevelResult:
    wall: float
    requests: list[RequestResult] = field(default_factory=list)
    other_cores: float = float("nan")  # CPU used by processes other than ours, in cores

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    def tok_s(self) -> float:
        return self.tokens / self.wall

    def ttft(self) -> list[float]:
        return [r.ttft for r in self.requests]

    def itl(self) -> list[float]:
        return [g for r in self.requests for g in r.gaps]


def new_client(base_url: str):
    import httpx
    from openai import AsyncOpenAI

    # No retries (a retried request would hide an error and distort the timings), and a
    # new connection per request: llama-server closes idle keep-alive connections after
    # 5 s, and a request sent on one it is closing fails with no retry to hide it.
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=3600.0)
    return AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600.0,
                       http_client=http)  # fmt: skip


async def one_request(client, spec: ServerSpec, prompt: str, max_tokens: int) -> RequestResult:
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        **spec.request_kw,
    )  # fmt: skip
    times: list[float] = []
    usage = None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            times.append(now)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    if not times:
        raise SystemExit(f"{spec.name}: a request streamed no text (prompt {prompt[:40]!r}...)")
    if spec.stream_usage and usage is None:
        raise SystemExit(f"{spec.name}: the stream carried no usage chunk")
    tokens = usage if spec.stream_usage else len(times)
    return RequestResult(times[0] - t0, list(np.diff(times)), tokens, len(times))


def cpu_seconds(server_pid: int) -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds the server and this process
    have used), from /proc; None where there is no /proc (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        stat = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    busy = (user + nice + system + irq + softirq + steal) / tick
    me = os.times()
    ours = (int(stat[11]) + int(stat[12])) / tick + me.user + me.system
    return busy, ours


def wait_quiet(limit_s: float, server_pid: int) -> None:
    """Before a level, wait (up to `limit_s`) until other processes use under a quarter of
    a core: on a shared 2-core machine one busy neighbour can slow a server severalfold."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        a = cpu_seconds(server_pid)
        time.sleep(2.0)
        b = cpu_seconds(server_pid)
        if a is None or b is None or (b[0] - a[0]) - (b[1] - a[1]) < 0.5:
            return
    print(f"  the machine stayed busy for {limit_s:.0f} s; measuring anyway", file=sys.stderr)


async def run_level(
    spec: ServerSpec, base_url: str, prompts: list[str], clients: int, max_tokens: int,
    server_pid: int,
) -> LevelResult:  # fmt: skip
    """`clients` concurrent clients, each sending its share of `prompts` in turn."""
    client = new_client(base_url)
    per_client = [prompts[i::clients] for i in range(clients)]

    async def client_loop(mine: list[str]) -> list[RequestResult]:
        return [await one_request(client, spec, p, max_tokens) for p in mine]

    async with client:
        cpu0, t0 = cpu_seconds(server_pid), time.perf_counter()
        done = await asyncio.gather(*(client_loop(m) for m in per_client))
        wall, cpu1 = time.perf_counter() - t0, cpu_seconds(server_pid)
    result = LevelResult(wall, [r for rs in done for r in rs])
    if cpu0 and cpu1:
        # The machine is shared: how much of it other work took while this level ran.
        result.other_cores = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall
    return result


async def warm_up(spec: ServerSpec, base_url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request (the warm-up), and for the same prompt a non-streamed one
    whose usage checks the token count read from the stream."""
    client = new_client(base_url)
    async with client:
        streamed = await one_request(client, spec, prompt, max_tokens)
        plain = await client.completions.create(
            model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body=spec.request_kw.get("extra_body"),
        )  # fmt: skip
    return {"streamed_tokens": streamed.tokens, "usage_tokens": plain.usage.completion_tokens,
            "prompt_tokens": plain.usage.prompt_tokens, "chunks": streamed.chunks}  # fmt: skip


def bench_server(
    spec: ServerSpec, prompts: dict[int, list[str]], warm_prompt: str, args, log_dir: Path
) -> tuple[dict[int, LevelResult], dict]:
    server = RunningServer(spec, log_dir)
    try:
        ready_s = server.wait_ready()
        print(f"  {spec.name} ready in {ready_s:.1f} s (port {server.port})", file=sys.stderr,
              flush=True)  # fmt: skip
        check = asyncio.run(warm_up(spec, server.base_url, warm_prompt, args.max_tokens))
        check["ready_s"] = ready_s
        levels = {}
        for c in args.clients:
            wait_quiet(args.wait_quiet, server.proc.pid)
            levels[c] = asyncio.run(
                run_level(spec, server.base_url, prompts[c], c, args.max_tokens, server.proc.pid)
            )
            lv = levels[c]
            print(f"  {spec.name} {c:>2} clients: {len(lv.requests)} requests, {lv.tokens} "
                  f"tokens in {lv.wall:.1f} s = {lv.tok_s():.2f} tok/s (other processes used "
                  f"{lv.other_cores:.2f} cores)", file=sys.stderr, flush=True)  # fmt: skip
        if server.proc.poll() is not None:
            raise server.failure(f"exited with {server.proc.returncode} during the load")
    except Exception as e:
        raise server.failure(f"failed: {type(e).__name__}: {e}") from e
    finally:
        server.stop()
    return levels, check


# ---- report ----------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(runs: list[LevelResult]) -> dict[str, float]:
    """Each statistic per repeat, then the median over repeats."""
    stats = {
        "tok_s": [r.tok_s() for r in runs],
        "ttft50": [pct(r.ttft(), 50) for r in runs],
        "ttft95": [pct(r.ttft(), 95) for r in runs],
        "itl50": [pct(r.itl(), 50) for r in runs],
        "itl95": [pct(r.itl(), 95) for r in runs],
        "tokens": [r.tokens for r in runs],
        "requests": [len(r.requests) for r in runs],
        "other_cores": [r.other_cores for r in runs],
    }
    return {k: statistics.median(v) for k, v in stats.items()}


def report(results: dict[str, dict[int, list[LevelResult]]], checks: dict, args, model: str):
    fn, ll = (
        {c: summarize(runs) for c, runs in results[name].items()}
        for name in ("falconet", "llama.cpp")
    )
    cmd = "python " + shlex.join(sys.argv)
    print()
    print(f"`{cmd}` — CPU: {cpu_model()} ({os.cpu_count()} logical cores), {THREADS} threads per "
          f"server; {model}; prompts {args.prompt_len} random tokens, max_tokens "
          f"{args.max_tokens}, temperature 0, {args.requests_per_client} request(s) per "
          f"client, median of {args.repeats}")  # fmt: skip
    print()
    head = ("clients", "falconet tok/s", "llama.cpp tok/s", "ratio",
            "falconet TTFT p50/p95 (s)", "llama.cpp TTFT p50/p95 (s)",
            "falconet ITL p50/p95 (ms)", "llama.cpp ITL p50/p95 (ms)")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for c in args.clients:
        f, g = fn[c], ll[c]
        print(f"| {c} | {f['tok_s']:.2f} | {g['tok_s']:.2f} | {f['tok_s'] / g['tok_s']:.2f} | "
              f"{f['ttft50']:.2f} / {f['ttft95']:.2f} | {g['ttft50']:.2f} / {g['ttft95']:.2f} | "
              f"{1e3 * f['itl50']:.0f} / {1e3 * f['itl95']:.0f} | "
              f"{1e3 * g['itl50']:.0f} / {1e3 * g['itl95']:.0f} |")  # fmt: skip
    print()
    lo, hi = min(args.clients), max(args.clients)
    print(f"falconet {hi}-client / {lo}-client = {fn[hi]['tok_s'] / fn[lo]['tok_s']:.2f} "
          f"(target >= 4)")  # fmt: skip
    print(f"falconet / llama.cpp at {hi} clients = {fn[hi]['tok_s'] / ll[hi]['tok_s']:.2f} "
          f"(target >= 2)")  # fmt: skip
    print()
    for c in args.clients:
        print(f"- {c} clients: {fn[c]['requests']:.0f} requests; generated tokens falconet "
              f"{fn[c]['tokens']:.0f}, llama.cpp {ll[c]['tokens']:.0f} (of "
              f"{fn[c]['requests'] * args.max_tokens:.0f} asked); other processes used "
              f"{fn[c]['other_cores']:.2f} / {ll[c]['other_cores']:.2f} cores of "
              f"{os.cpu_count()} during the falconet / llama.cpp runs")  # fmt: skip
    for name, ck in checks.items():
        print(f"- {name}: ready {ck['ready_s']:.1f} s after start; warm-up prompt "
              f"{ck['prompt_tokens']} tokens (usage), {ck['streamed_tokens']} tokens counted "
              f"from the stream vs {ck['usage_tokens']} in a non-streamed request's usage")  # fmt: skip


# ---- /health while large prompts are tokenized ------------------------------------------
BIG_BODY_BYTES = 4 * 2**20 - 256  # just under falconet's default 4 MiB body limit


def poll_health(c, url: str, until: Callable[[list[float]], bool]) -> list[float]:
    """/health asked back to back on one connection until `until(latencies)`."""
    out: list[float] = []
    while not until(out):
        t0 = time.perf_counter()
        if c.get(url).status_code != 200:
            raise SystemExit("/health did not answer 200")
        out.append(time.perf_counter() - t0)
    return out


def big_prompts_round(c, server: RunningServer, body: bytes, n: int) -> tuple[list, list]:
    """`n` large requests at once; /health latencies while any is in flight, and how
    long each large request took."""
    import threading

    import httpx

    took, statuses = [], []

    def big() -> None:
        t0 = time.perf_counter()
        r = httpx.post(server.base_url + "/completions", content=body, timeout=600,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        took.append(time.perf_counter() - t0)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=big) for _ in range(n)]
    for t in threads:
        t.start()
    health = f"http://127.0.0.1:{server.port}/health"
    latencies = poll_health(c, health, lambda _: not any(t.is_alive() for t in threads))
    if statuses != [400] * n:
        raise SystemExit(f"large prompts answered {statuses}, expected 400s (beyond the context)")
    return latencies, took


def health_under_load(args: argparse.Namespace) -> None:
    import httpx

    words = " ".join(f"w{i % 9973}x" for i in range(BIG_BODY_BYTES // 6))
    body = json.dumps({"prompt": words[: BIG_BODY_BYTES - 64], "max_tokens": 1}).encode()
    argv = [sys.executable, "-m", "falconet", "serve", "--served-model-name", SERVED_NAME]
    spec = ServerSpec("falconet", argv, {}, True, args.falconet_src)
    idle: list[float] = []
    loaded: list[float] = []
    big_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_server_") as log_dir:
        server = RunningServer(spec, Path(log_dir))
        try:
            server.wait_ready()
            health = f"http://127.0.0.1:{server.port}/health"
            with httpx.Client(timeout=600) as c:
                for _ in range(args.repeats):
                    idle += poll_health(c, health, lambda xs: len(xs) == 200)
                    wait_quiet(args.wait_quiet, server.proc.pid)
                    latencies, took = big_prompts_round(c, server, body, args.big_prompts)
                    loaded += latencies
                    big_s += took
        finally:
            server.stop()
    src = args.falconet_src or Path(__file__).resolve().parent.parent
    print(f"\n`python {shlex.join(sys.argv)}` — CPU: {cpu_model()} ({os.cpu_count()} logical "
          f"cores); falconet from {src}, embedded default model; {args.big_prompts} x "
          f"{len(body) / 2**20:.2f} MiB /v1/completions bodies at once, {args.repeats} "
          f"round(s)\n")  # fmt: skip
    print("| /health polls | n | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, xs in (("idle", idle), ("while large prompts are in flight", loaded)):
        print(f"| {name} | {len(xs)} | {1e3 * pct(xs, 50):.1f} | {1e3 * pct(xs, 99):.1f} | "
              f"{1e3 * max(xs):.1f} |")  # fmt: skip
    print(f"\nlarge requests took {min(big_s):.2f} .. {max(big_s):.2f} s each "
          "(upload, tokenizing, the 400)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16, help="falconet serve --max-batch")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each level, wait up to S seconds for other processes to use "
                   "under 1/4 core")  # fmt: skip
    p.add_argument("--smoke", action="store_true",
                   help=f"small model {SMOKE_SHAPE} in {SMOKE_CACHE}")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"checkpoint folder (default {DEFAULT_CACHE}, or {SMOKE_CACHE} with "
                   "--smoke)")  # fmt: skip
    p.add_argument("--health-under-load", action="store_true",
                   help="measure /health latency while large prompts are tokenized")  # fmt: skip
    p.add_argument("--big-prompts", type=int, default=3,
                   help="--health-under-load: large prompts sent at once")  # fmt: skip
    p.add_argument("--falconet-src", type=Path, default=None, metavar="DIR",
                   help="--health-under-load: serve falconet from this source tree")  # fmt: skip
    args = p.parse_args()
    if args.health_under_load:
        if args.big_prompts < 1 or args.repeats < 1:
            p.error("--big-prompts and --repeats must be positive")
        health_under_load(args)
        return
    args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if not args.clients or min(args.clients) < 1:
        p.error("--clients must list positive integers")
    if min(args.requests_per_client, args.prompt_len, args.max_tokens, args.repeats) < 1:
        p.error("--requests-per-client, --prompt-len, --max-tokens and --repeats must be positive")

    shape = SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE
    folder = args.cache_dir or (SMOKE_CACHE if args.smoke else DEFAULT_CACHE)
    build = argparse.Namespace(**shape, cache_dir=folder, threads=THREADS)
    ensure_checkpoint(build, folder)
    text_folder = ensure_text_copy(folder, shape["vocab"])
    gguf = gguf_path(text_folder, "bf16")
    ctx = args.prompt_len + args.max_tokens + 16
    specs = {
        "falconet": falconet_spec(text_folder, ctx, args),
        "llama.cpp": llama_cpp_spec(gguf, ctx),
    }

    # Distinct prompts for every request of the run; both servers get the same ones.
    total = args.repeats * sum(c * args.requests_per_client for c in args.clients) + 1
    pool = make_prompts(total, args.prompt_len, seed=0)
    warm_prompt, pool = pool[0], pool[1:]
    per_repeat: list[dict[int, list[str]]] = []
    for _ in range(args.repeats):
        level = {}
        for c in args.clients:
            n = c * args.requests_per_client
            level[c], pool = pool[:n], pool[n:]
        per_repeat.append(level)

    results: dict[str, dict[int, list[LevelResult]]] = {n: {c: [] for c in args.clients}
                                                         for n in specs}  # fmt: skip
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_server_") as log_dir:
        for r in range(args.repeats):
            for name, spec in specs.items():
                print(f"[repeat {r + 1}/{args.repeats}] {name}", file=sys.stderr, flush=True)
                levels, checks[name] = bench_server(
                    spec, per_repeat[r], warm_prompt, args, Path(log_dir)
                )
                for c, lv in levels.items():
                    results[name][c].append(lv)
    model = (f"model {folder.name} (hidden {shape['hidden']}, {shape['layers']} "
             f"layers, {shape['heads']} heads, multi-query, vocab {shape['vocab']}), random "
             f"weights in bf16; falconet serves the HF folder (bf16 weights, fp32 compute, "
             f"--max-batch {args.max_batch}), llama.cpp (llama-cpp-python "
             f"{llama_cpp_version()}) the bf16 GGUF {gguf.name}")  # fmt: skip
    report(results, checks, args, model)


def llama_cpp_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    main()
