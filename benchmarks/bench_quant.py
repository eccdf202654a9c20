"""Benchmark falconet against llama.cpp on the same quantized GGUF: prefill, decode, memory,
and the memory-bandwidth roofline, side by side in one run.

The model is one of bench_generate.py's random checkpoints (built once and cached):
--arch falcon (default) its ~1.15 B Falcon-7B-shaped model, --arch falcon3 a model of
Falcon3-1B's shape (Llama: GQA 8q/4kv, head_dim 256, untied head, vocab 131,072;
1.67 B parameters). It is written as GGUF by `falconet convert` at each requested type
(llama.cpp's type plan: the head/embedding in Q8_0, every other matrix in the type).
Every engine reads the same file:

- llama.cpp through llama-cpp-python (`Llama(n_threads=2)`; prefill = `eval` of the
  prompt, decode = one `eval` per greedy token, the argmax taken from its logits);
- falconet direct (`falconet.load(gguf)`, then `models.dense.prefill` into a static
  KVCache and `decode_step` per greedy token) and falconet API (the engine `LLM.stream`
  runs, on the same loaded model: prefill = submit -> first token): falconet_runners.py.

Prefill is a --prompt-len random prompt, decode --decode-tokens greedy steps after it.
Timings are medians over --repeats after one warm-up, the runners alternating run by
run (all loaded at once) so a noisy machine's drift hits them alike. Peak RSS is
measured per runner in a fresh subprocess (load + prefill + one step). The roofline is
the read bandwidth measured in this run divided by the bytes one decode step reads
(every matrix once, plus one embedding row).

    python benchmarks/bench_quant.py                        # q8_0 and q4_0, full size
    python benchmarks/bench_quant.py --arch falcon3         # the Falcon3-1B-shaped row
    python benchmarks/bench_quant.py --types q4_0 --repeats 3
    python benchmarks/bench_quant.py --hidden 256 --layers 2 --heads 4 --vocab 4096 \\
        --cache-dir /tmp/bench_small --repeats 1            # smoke run
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
    add_shape_flags,
    cache_dir_for,
    common_prefix,
    cpu_model,
    describe_shape,
    ensure_checkpoint,
    fill_shape_defaults,
    measure_bandwidth,
    proc_status,
)

ENGINES = ("falconet direct", "falconet API", "llama.cpp")


def gguf_path(folder: Path, qtype: str) -> Path:
    path = folder.parent / f"{folder.name}-{qtype}.gguf"
    if not path.exists():
        cmd = [sys.executable, "-m", "falconet", "convert", str(folder), str(path), "--type", qtype]
        subprocess.run(cmd, check=True)
    return path


def decode_profile(model, ids: list[int], decode: int) -> tuple[float, float]:
    """(seconds in the quantized matmuls, seconds in total) over `decode` direct-path
    decode steps."""
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

    ids = torch.tensor([ids])
    with torch.inference_mode():
        cache = KVCache(model.config, 1, ids.shape[1] + decode, model.compute_dtype, model.device)
        tok = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache).argmax(-1)
        for name, f in originals.items():
            setattr(kernels, name, timed(f))
        try:
            t0 = time.perf_counter()
            for _ in range(decode):
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


def gguf_sizes(path: Path) -> tuple[int, int, int]:
    """(bytes one decode step reads, total tensor bytes, parameters) of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    names = {t.name for t in reader.tensors}
    per_token = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            per_token += int(t.n_bytes) // int(t.shape[1])  # one embedding row
        else:  # every matrix, and a tied embedding read whole as the head
            per_token += int(t.n_bytes)
    return per_token, total, params


def make_runners(names, path: Path, ids: list[int], decode: int, threads: int) -> dict:
    """The runners called `names`; the falconet ones share one loaded model."""
    from falconet_runners import APIRunner, DirectRunner

    runners = {}
    if any(n.startswith("falconet") for n in names):
        import falconet

        llm = falconet.load(path)
    for name in names:
        if name == "falconet direct":
            runners[name] = DirectRunner(llm, ids, decode)
        elif name == "falconet API":
            runners[name] = APIRunner(llm, ids, decode)
        else:
            runners[name] = LlamaCppRunner(path, ids, decode, threads)
    return runners


def worker_rss(args: argparse.Namespace) -> dict:
    ids = prompt_ids(args.vocab, args.prompt_len)
    before = proc_status()["VmRSS"]
    [runner] = make_runners([args.engine], Path(args.gguf), ids, 1, args.threads).values()
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
    runners = make_runners(ENGINES, path, ids, args.decode_tokens, args.threads)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    tokens: dict[str, list[int]] = {}
    for i in range(args.repeats + 1):
        for name, runner in runners.items():
            pre, dec, tokens[name] = runner.run()
            if i:
                times[name].append((pre, dec))
    kernel_s, step_s = decode_profile(runners["falconet direct"].model, ids, args.decode_tokens)
    del runners
    per_token, total, params = gguf_sizes(path)
    out = {"type": qtype, "file_bytes": path.stat().st_size, "tensor_bytes": total,
           "params": params, "bytes_per_token": per_token, "roofline": bandwidth / per_token,
           "engines": {}, "kernel_share": kernel_s / step_s,
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
    print(
        f"model: {args.cache_dir.name} ({describe_shape(args)}; "
        f"{results[0]['params'] / 1e9:.3f} B parameters, random weights)"
    )
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
    print(
        "| type | falconet | prefill | decode | decode vs roofline | peak RSS | greedy tokens equal |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ll = r["engines"]["llama.cpp"]
        for name in ("falconet direct", "falconet API"):
            f = r["engines"][name]
            same = sum(a == b for a, b in zip(f["tokens"], ll["tokens"], strict=True))
            print(
                f"| {r['type']} | {name.removeprefix('falconet ')} | {f['prefill'] / ll['prefill']:.2f}x | "
                f"{f['decode'] / ll['decode']:.2f}x | {f['decode'] / r['roofline']:.2f} | "
                f"{f['rss'] / ll['rss']:.2f}x | {same}/{len(f['tokens'])} |"
            )
    print("\nthe public API against the direct path it replaced (target: ~1.00, within noise)")
    print("| type | API / direct prefill | API / direct decode | greedy tokens: common prefix |")
    print("|---|---|---|---|")
    for r in results:
        f, api = r["engines"]["falconet direct"], r["engines"]["falconet API"]
        same = common_prefix(api["tokens"], f["tokens"])
        print(
            f"| {r['type']} | {api['prefill'] / f['prefill']:.2f}x | "
            f"{api['decode'] / f['decode']:.2f}x | {same}/{len(f['tokens'])} |"
        )
    for r in results:
        print(f"{r['type']}: file {r['file_bytes'] / 1e9:.3f} GB, reads {r['bytes_per_token'] / 1e9:.3f} GB "
              f"per token -> roofline {r['roofline']:.1f} tok/s; falconet direct decode: "
              f"{100 * r['kernel_share']:.0f} % of a step in the quantized matmuls, which stream "
              f"the weights at {r['kernel_bandwidth'] / 1e9:.1f} GB/s")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_flags(p)
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoint folder (default: .bench_cache/falcon-1b-mq or falcon3-1b for the "
        "default shapes); its GGUFs are written beside it",
    )
    p.add_argument("--worker-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_rss:
        print(json.dumps(worker_rss(args)))
        return
    fill_shape_defaults(p, args)
    if args.repeats < 1 or args.decode_tokens < 1 or args.prompt_len < 1:
        p.error("--repeats, --decode-tokens and --prompt-len must be positive")
    args.cache_dir = cache_dir_for(args)
    ensure_checkpoint(args, args.cache_dir)
    bandwidth = measure_bandwidth(1.0)
    results = [
        bench_type(t.strip(), args.cache_dir, args, bandwidth) for t in args.types.split(",")
    ]
    report(results, args, bandwidth)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
