"""Benchmark falconet against llama.cpp on the same quantized GGUF: prefill, decode, memory,
and the memory-bandwidth roofline, side by side in one run.

The model is bench_generate.py's ~1.15 B Falcon-7B-shaped checkpoint (built once and
cached), written as GGUF by `falconet convert` at each requested type (llama.cpp's type
plan: the tied head/embedding in Q8_0, every other matrix in the type). Both engines
read the same file:

- llama.cpp through llama-cpp-python (`Llama(n_threads=2)`; prefill = `eval` of the
  prompt, decode = one `eval` per greedy token, the argmax taken from its logits);
- falconet through `falconet.load(gguf)`: `generate.prefill` into a KVCache, then
  `generate.decode_step` per greedy token.

Prefill is a --prompt-len random prompt, decode --decode-tokens greedy steps after it.
Timings are medians over --repeats after one warm-up, the engines alternating run by
run (both loaded at once) so a noisy machine's drift hits both alike. Peak RSS is
measured per engine in a fresh subprocess (load + prefill + one step). The roofline is
the read bandwidth measured in this run divided by the bytes one decode step reads
(every matrix once, plus one embedding row).

    python benchmarks/bench_quant.py                        # q8_0 and q4_0, full size
    python benchmarks/bench_quant.py --types q4_0 --repeats 3
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_SHAPE,
    cpu_model,
    ensure_checkpoint,
    measure_bandwidth,
    proc_status,
)

REPO = Path(__file__).resolve().parent.parent


def gguf_path(folder: Path, qtype: str) -> Path:
    path = folder.parent / f"{folder.name}-{qtype}.gguf"
    if not path.exists():
        cmd = [sys.executable, "-m", "falconet", "convert", str(folder), str(path), "--type", qtype]
        subprocess.run(cmd, check=True)
    return path


class FalconetRunner:
    def __init__(self, path: Path, ids: list[int], decode: int) -> None:
        import falconet

        self.llm = falconet.load(path)
        self.ids, self.D = torch.tensor([ids]), decode

    def run(self) -> tuple[float, float, list[int]]:
        from falconet.models.dense import decode_step, prefill
        from falconet.nn.cache import KVCache

        model, ids = self.llm.model, self.ids
        with torch.inference_mode():
            cache = KVCache(
                model.config, 1, ids.shape[1] + self.D, model.compute_dtype, model.device
            )
            t0 = time.perf_counter()
            tok = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache).argmax(-1)
            t1 = time.perf_counter()
            tokens = [int(tok)]
            for _ in range(self.D):
                tok = decode_step(model, tok, cache).argmax(-1)
                tokens.append(int(tok))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    def decode_profile(self) -> tuple[float, float]:
        """(seconds in the quantized matmuls, seconds in total) over D decode steps."""
        from falconet.models.dense import decode_step, prefill
        from falconet.nn.cache import KVCache
        from falconet.quant import kernels

        spent = [0.0]
        originals = {name: getattr(kernels, name) for name in ("x8_linear", "quant_linear")}

        def timed(f):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                y = f(*a, **kw)
                spent[0] += time.perf_counter() - t0
                return y

            return wrapper

        model, ids = self.llm.model, self.ids
        with torch.inference_mode():
            cache = KVCache(
                model.config, 1, ids.shape[1] + self.D, model.compute_dtype, model.device
            )
            tok = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache).argmax(-1)
            for name, f in originals.items():
                setattr(kernels, name, timed(f))
            try:
                t0 = time.perf_counter()
                for _ in range(self.D):
                    tok = decode_step(model, tok, cache).argmax(-1)
                total = time.perf_counter() - t0
            finally:
                for name, f in originals.items():
                    setattr(kernels, name, f)
        return spent[0], total


class LlamaCppRunner:
    def __init__(self, path: Path, ids: list[int], decode: int, threads: int) -> None:
        from llama_cpp import Llama

        n_ctx = len(ids) + decode + 8
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )  # fmt: skip
        self.ids, self.D = ids, decode

    def last_logits(self):
        # Without logits_all, llama-cpp-python keeps no scores: read the context's
        # logits of the batch's last token (the only one llama.cpp computed).
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self) -> tuple[float, float, list[int]]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.ids)
        t1 = time.perf_counter()
        tok = int(self.last_logits().argmax())
        tokens = [tok]
        for _ in range(self.D):
            llm.eval([tok])
            tok = int(self.last_logits().argmax())
            tokens.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens


def prompt_ids(vocab: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


def decode_bytes(path: Path) -> tuple[int, int]:
    """(bytes one decode step reads, total tensor bytes) of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    names = {t.name for t in reader.tensors}
    per_token = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            rows = int(t.shape[1])
            row = int(t.n_bytes) // rows
            per_token += (
                row if "output.weight" in names else int(t.n_bytes)
            )  # tied: the head reads it all
        else:
            per_token += int(t.n_bytes)
    return per_token, total


def worker_rss(args: argparse.Namespace) -> dict:
    ids = prompt_ids(args.vocab, args.prompt_len)
    before = proc_status()["VmRSS"]
    runner = (
        FalconetRunner(Path(args.gguf), ids, 1)
        if args.engine == "falconet"
        else LlamaCppRunner(Path(args.gguf), ids, 1, args.threads)
    )
    runner.run()
    return {"peak": proc_status()["VmHWM"] - before}


def rss_of(engine: str, path: Path, args: argparse.Namespace) -> int:
    cmd = [sys.executable, __file__, "--worker-rss", "--engine", engine, "--gguf", str(path),
           "--vocab", str(args.vocab), "--prompt-len", str(args.prompt_len), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def bench_type(qtype: str, folder: Path, args: argparse.Namespace, bandwidth: float) -> dict:
    path = gguf_path(folder, qtype)
    ids = prompt_ids(args.vocab, args.prompt_len)
    runners = {
        "falconet": FalconetRunner(path, ids, args.decode_tokens),
        "llama.cpp": LlamaCppRunner(path, ids, args.decode_tokens, args.threads),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for i in range(args.repeats + 1):
        for name, runner in runners.items():
            pre, dec, tokens[name] = runner.run()
            if i:
                times[name].append((pre, dec))
    kernel_s, step_s = runners["falconet"].decode_profile()
    del runners
    per_token, total = decode_bytes(path)
    out = {"type": qtype, "file_bytes": path.stat().st_size, "tensor_bytes": total,
           "bytes_per_token": per_token, "roofline": bandwidth / per_token, "engines": {},
           "kernel_share": kernel_s / step_s,
           "kernel_bandwidth": per_token * args.decode_tokens / kernel_s}  # fmt: skip
    for name in times:
        out["engines"][name] = {
            "prefill": args.prompt_len / statistics.median(t[0] for t in times[name]),
            "decode": args.decode_tokens / statistics.median(t[1] for t in times[name]),
            "rss": rss_of(name, path, args),
            "tokens": tokens[name],
        }
    return out


def report(results: list[dict], args: argparse.Namespace, bandwidth: float) -> None:
    print(f"\nCPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"read bandwidth (measured this run): {bandwidth / 1e9:.1f} GB/s")
    print(f"prompt {args.prompt_len} tokens, decode {args.decode_tokens} tokens, "
          f"median of {args.repeats}\n")  # fmt: skip
    head = ("type", "engine", "prefill tok/s", "decode tok/s", "decode % roofline", "peak RSS")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        for name, e in r["engines"].items():
            print(
                f"| {r['type']} | {name} | {e['prefill']:.1f} | {e['decode']:.2f} | "
                f"{100 * e['decode'] / r['roofline']:.0f} % | {e['rss'] / 2**20:.0f} MiB |"
            )
    print(
        "\nratios falconet / llama.cpp (targets: decode >= 1.0, prefill >= 0.8, decode >= 80 % of roofline)"
    )
    print("| type | prefill | decode | decode vs roofline | peak RSS | greedy tokens equal |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f, ll = r["engines"]["falconet"], r["engines"]["llama.cpp"]
        same = sum(a == b for a, b in zip(f["tokens"], ll["tokens"], strict=True))
        print(
            f"| {r['type']} | {f['prefill'] / ll['prefill']:.2f}x | {f['decode'] / ll['decode']:.2f}x | "
            f"{f['decode'] / r['roofline']:.2f} | {f['rss'] / ll['rss']:.2f}x | {same}/{len(f['tokens'])} |"
        )
    for r in results:
        print(f"{r['type']}: file {r['file_bytes'] / 1e9:.3f} GB, reads {r['bytes_per_token'] / 1e9:.3f} GB "
              f"per token -> roofline {r['roofline']:.1f} tok/s; falconet decode: "
              f"{100 * r['kernel_share']:.0f} % of a step in the quantized matmuls, which stream "
              f"the weights at {r['kernel_bandwidth'] / 1e9:.1f} GB/s")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--vocab", type=int, default=DEFAULT_SHAPE["vocab"])
    p.add_argument("--worker-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_rss:
        print(json.dumps(worker_rss(args)))
        return
    folder = args.cache_dir
    build = argparse.Namespace(
        hidden=DEFAULT_SHAPE["hidden"], layers=DEFAULT_SHAPE["layers"], heads=DEFAULT_SHAPE["heads"],
        vocab=args.vocab, cache_dir=folder, threads=args.threads,
    )  # fmt: skip
    ensure_checkpoint(build, folder)
    bandwidth = measure_bandwidth(1.0)
    results = [bench_type(t.strip(), folder, args, bandwidth) for t in args.types.split(",")]
    report(results, args, bandwidth)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
