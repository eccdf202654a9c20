"""Benchmark falconet against llama.cpp on the same quantized GGUF: prefill, decode, memory,
and the memory-bandwidth roofline, side by side in one run.

The model is one of bench_generate.py's random checkpoints (built once and cached):
--arch falcon (default) its ~1.15 B Falcon-7B-shaped model, --arch falcon3 a model of
Falcon3-1B's shape (Llama: GQA 8q/4kv, head_dim 256, untied head, vocab 131,072;
1.67 B parameters), --arch falcon_h1 Falcon-H1-0.5B's shape (0.52 B) and --arch
falcon_mamba Falcon-Mamba-7B's layers, 8 of them (1.1 B; recurrent_shapes.py). It is
written as GGUF by `falconet convert` at each requested type
(llama.cpp's type plan: the head/embedding in Q8_0, every other matrix in the type).
Every engine reads the same file:

- llama.cpp through llama-cpp-python (`Llama(n_threads=2)`; prefill = `eval` of the
  prompt, decode = one `eval` per greedy token, the argmax taken from its logits);
- falconet direct (`falconet.load(gguf)`, then `models.dense.prefill` into a static
  KVCache and `decode_step` per greedy token; for the recurrent models their own
  `forward(ids, state)` on `model.new_state(...)`) and falconet API (the engine `LLM.stream`
  runs, on the same loaded model: prefill = submit -> first token): falconet_runners.py.

Prefill is a --prompt-len random prompt, decode --decode-tokens greedy steps after it.
Timings are medians over --repeats after one warm-up, the runners alternating run by
run (all loaded at once) so a noisy machine's drift hits them alike. Peak RSS is
measured per runner in a fresh subprocess (load + prefill + one step). The roofline is
the read bandwidth measured in this run divided by the bytes one decode step reads
(every matrix once, plus one embedding row). The direct decode step is split into the
time in the quantized matmuls, the SSM scan step and the causal conv (each function
wrapped with a timer) and everything else.

    python benchmarks/bench_quant.py                        # q8_0 and q4_0, full size
    python benchmarks/bench_quant.py --arch falcon3         # the Falcon3-1B-shaped row
    python benchmarks/bench_quant.py --types q4_0 --repeats 3
    python benchmarks/bench_quant.py --arch falcon_mamba --repeats 3 --long-context 16384
        # + decode tok/s after a 16k-token prompt vs after 256 (API and llama.cpp, q8_0)
    python benchmarks/bench_quant.py --hidden 256 --layers 2 --heads 4 --vocab 4096 \\
        --cache-dir /tmp/bench_small --repeats 1            # smoke run

Ternary (Falcon-E / Falcon3-*-1.58bit): --types tq2_0 (or tq1_0) needs --arch falcon3
(the default then) and runs every requested type -- put q4_0 beside it -- on a ternary
copy of the random checkpoint (`<cache>-ternary`: each decoder projection replaced by
its absmean ternarization, codes x mean|W|, as BitNet's weight quantizer gives; the
embeddings and head stay as they are and llama.cpp's converter keeps them at F16 in
a TQ file). The shape flags make it Falcon3-1.58bit-shaped at any size (the default
is Falcon3-1B's; Falcon3-3B: --hidden 3072 --layers 22 --heads 12 --intermediate
9216); a ternary type's matrices need rows of whole 256-value blocks. The report adds
decode and prefill against our own Q4_0 of the same model (issue 19's targets:
decode >= 1.2x llama.cpp on TQ2_0, >= 1.8x our Q4_0, >= 80 % of roofline).

    python benchmarks/bench_quant.py --types tq2_0,q4_0     # Falcon3-1B-shaped, ternary
    python benchmarks/bench_quant.py --types tq2_0:q8_0,q4_0  # TQ2_0, head + embeddings Q8_0
    python benchmarks/bench_quant.py --types tq2_0,q4_0 --smoke   # a tiny shape, 1 repeat
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
RECURRENT = ("falcon_h1", "falcon_mamba")
TERNARY_TYPES = ("tq2_0", "tq1_0")
# --smoke: a Falcon3-shaped model whose every matrix row is whole TQ blocks, a short run
SMOKE_SHAPE = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64,
               "intermediate": 512, "vocab": 4096}  # fmt: skip
SMOKE_RUN = {"repeats": 1, "prompt_len": 16, "decode_tokens": 8}


def ternary_checkpoint(folder: Path) -> Path:
    """`folder`'s checkpoint with each decoder projection ternarized (cached beside it):
    W -> clamp(round(W / m), -1, 1) * m, m = mean|W| (BitNet's absmean weight quantizer),
    stored in the checkpoint's dtype, so that TQ2_0/TQ1_0 hold it exactly up to their
    float16 scale and every type is written from the same ternary model."""
    out = folder.parent / f"{folder.name}-ternary"
    if (out / "model.safetensors").is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    from falconet.quant.ternary import ternarize

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (tmp / f.name).write_bytes(f.read_bytes())
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = st.get_tensor(name)
                if name.endswith("_proj.weight"):
                    codes, scale = ternarize(t)
                    t = (codes.float() / scale).to(t.dtype)
                state[name] = t
    save_file(state, tmp / "model.safetensors")
    tmp.rename(out)
    return out


def gguf_path(folder: Path, spec: str) -> Path:
    """The GGUF of `folder` for a --types entry: a --type name, or TYPE:HEAD for that
    type with the head and embeddings in HEAD (convert's --output-tensor-type and
    --token-embedding-type), e.g. tq2_0:q8_0."""
    qtype, _, head = spec.partition(":")
    path = folder.parent / f"{folder.name}-{qtype}{f'-{head}-head' if head else ''}.gguf"
    if not path.exists():
        cmd = [sys.executable, "-m", "falconet", "convert", str(folder), str(path), "--type", qtype]
        if head:
            cmd += ["--output-tensor-type", head, "--token-embedding-type", head]
        subprocess.run(cmd, check=True)
    return path


def base_type(spec: str) -> str:
    return spec.partition(":")[0]


def profiled_functions() -> dict[str, list[tuple[object, str]]]:
    """The functions a decode step's time is split by: (module, attribute) per part. The
    recurrent models call their scan and conv through their own module's names."""
    from falconet.models import falcon_h1, falcon_mamba
    from falconet.quant import kernels

    return {
        "quantized matmuls": [
            (kernels, n) for n in ("x8_linear", "quant_linear", "kquant_linear", "tq2_linear")
        ],
        "SSM scan step": [(falcon_mamba, "selective_step"), (falcon_h1, "ssd_step")],
        "causal conv": [(falcon_mamba, "causal_conv"), (falcon_h1, "causal_conv1d")],
    }


def decode_profile(runner) -> tuple[dict[str, float], float]:
    """({part: seconds}, seconds in total) over the direct runner's D decode steps (a
    prefill first), each part of profiled_functions() timed by wrapping its functions."""
    parts = profiled_functions()
    spent = dict.fromkeys(parts, 0.0)

    def timed(part, f):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            y = f(*a, **kw)
            spent[part] += time.perf_counter() - t0
            return y

        return wrapper

    originals = [(m, n, getattr(m, n)) for fs in parts.values() for m, n in fs]
    with torch.inference_mode():
        cache = runner.new_cache()
        tok = runner.prefill(cache)
        for part, fs in parts.items():
            for m, n in fs:
                setattr(m, n, timed(part, getattr(m, n)))
        try:
            t0 = time.perf_counter()
            for _ in range(runner.D):
                tok = runner.step(tok, cache)
            total = time.perf_counter() - t0
        finally:
            for m, n, f in originals:
                setattr(m, n, f)
    return spent, total


class LlamaCppRunner:
    def __init__(self, path: Path, ids: list[int], decode: int, threads: int) -> None:
        from llama_cpp import Llama

        n_ctx = len(ids) + decode + 8
        # one batch for the whole prompt up to 2048 tokens (llama.cpp splits it into its
        # 512-token micro-batches anyway); a 16k prompt goes in 2048-token batches
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=threads,
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
        llm.eval(self.ids)  # llama-cpp-python feeds it in n_batch pieces
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
        # plain decoding, as llama.cpp does here: speculation (on by default) is measured
        # by bench_speculative.py, and a random model's loops would make it look free
        llm.set_speculative(False)
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
    parts_s, step_s = decode_profile(runners["falconet direct"])
    kernel_s = parts_s["quantized matmuls"]
    del runners
    per_token, total, params = gguf_sizes(path)
    out = {"type": qtype, "file_bytes": path.stat().st_size, "tensor_bytes": total,
           "params": params, "bytes_per_token": per_token, "roofline": bandwidth / per_token,
           "engines": {}, "kernel_share": kernel_s / step_s,
           "step_parts": {k: v / step_s for k, v in parts_s.items()},
           "step_ms": 1e3 * step_s / args.decode_tokens,
           "kernel_bandwidth": per_token * args.decode_tokens / kernel_s}  # fmt: skip
    for name in times:
        out["engines"][name] = {
            "prefill": args.prompt_len / statistics.median(t[0] for t in times[name]),
            "decode": args.decode_tokens / statistics.median(t[1] for t in times[name]),
            "rss": rss_of(name, path, args),
            "tokens": tokens[name],
        }
    return out


def bench_long_context(qtype: str, folder: Path, args: argparse.Namespace) -> dict:
    """Decode tok/s after a --short-context and after a --long-context prompt, falconet
    API and llama.cpp on the `qtype` GGUF: whether a token costs the same however much
    came before it (a recurrent model's promise). The short prompt runs --repeats times
    after a warm-up; the long one once (its prefill takes minutes), right after."""
    path = gguf_path(folder, qtype)
    out: dict[str, dict] = {}
    for n in (args.short_context, args.long_context):
        ids = prompt_ids(args.vocab, n)
        runners = make_runners(("falconet API", "llama.cpp"), path, ids, args.decode_tokens,
                               args.threads)  # fmt: skip
        rounds = args.repeats + 1 if n == args.short_context else 1
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
        for i in range(rounds):
            for name, runner in runners.items():
                print(f"[{qtype}] {n}-token prompt: {name} ...", file=sys.stderr, flush=True)
                pre, dec, _ = runner.run()
                if i or rounds == 1:
                    times[name].append((pre, dec))
        del runners
        for name, t in times.items():
            out.setdefault(name, {})[n] = {
                "prefill": n / statistics.median(x[0] for x in t),
                "decode": args.decode_tokens / statistics.median(x[1] for x in t),
            }
    return {"type": qtype, "engines": out}


def report_long_context(lc: dict, args: argparse.Namespace) -> None:
    S, L = args.short_context, args.long_context
    print(f"\ndecode after a long prompt ({lc['type']}; {args.decode_tokens} tokens after a "
          f"{S}-token prompt, median of {args.repeats}, and after a {L}-token prompt, one run)")  # fmt: skip
    print(f"| engine | prefill tok/s ({L} tokens) | decode tok/s at {S} | decode tok/s at {L} | "
          f"{L} / {S} (target >= 0.80) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, e in lc["engines"].items():
        print(f"| {name} | {e[L]['prefill']:.1f} | {e[S]['decode']:.2f} | {e[L]['decode']:.2f} | "
              f"{e[L]['decode'] / e[S]['decode']:.2f} |")  # fmt: skip
    api, ll = lc["engines"]["falconet API"], lc["engines"]["llama.cpp"]
    print(f"falconet API / llama.cpp at {L}: prefill {api[L]['prefill'] / ll[L]['prefill']:.2f}x, "
          f"decode {api[L]['decode'] / ll[L]['decode']:.2f}x")  # fmt: skip


def report(results: list[dict], args: argparse.Namespace, bandwidth: float) -> None:
    print(f"\nCPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print(f"read bandwidth (measured this run): {bandwidth / 1e9:.1f} GB/s")
    print(
        f"model: {args.cache_dir.name} ({describe_shape(args)}; "
        f"{results[0]['params'] / 1e9:.3f} B parameters, random weights)"
    )
    print(f"prompt {args.prompt_len} tokens, decode {args.decode_tokens} tokens, "
          f"median of {args.repeats}")  # fmt: skip
    if args.arch in RECURRENT:
        print("falconet direct: the model's own forward(ids, state) on model.new_state(...) "
              "(no KV cache); falconet API: the engine (LLM.stream)")  # fmt: skip
    print()
    head = ("type", "engine", "prefill tok/s", "decode tok/s", "decode % roofline", "peak RSS")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        for name, e in r["engines"].items():
            print(
                f"| {r['type']} | {name} | {e['prefill']:.1f} | {e['decode']:.2f} | "
                f"{100 * e['decode'] / r['roofline']:.0f} % | {e['rss'] / 2**20:.0f} MiB |"
            )
    # issue 13 asks the recurrent Falcons for prefill >= 1.0 (the attention ones: 0.8)
    pre_target = "1.0" if args.arch in RECURRENT else "0.8"
    print(
        f"\nratios falconet / llama.cpp (targets: decode >= 1.0, prefill >= {pre_target}, "
        "decode >= 80 % of roofline)"
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
    report_ternary(results)
    for r in results:
        print(f"{r['type']}: file {r['file_bytes'] / 1e9:.3f} GB, reads {r['bytes_per_token'] / 1e9:.3f} GB "
              f"per token -> roofline {r['roofline']:.1f} tok/s; falconet direct decode: "
              f"{100 * r['kernel_share']:.0f} % of a step in the quantized matmuls, which stream "
              f"the weights at {r['kernel_bandwidth'] / 1e9:.1f} GB/s")  # fmt: skip
        parts = ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["step_parts"].items() if v)
        rest = 100 * (1 - sum(r["step_parts"].values()))
        print(f"{r['type']}: falconet direct decode step {r['step_ms']:.1f} ms: {parts}, "
              f"everything else (norms, elementwise, attention, Python) {rest:.0f} %")  # fmt: skip


def report_ternary(results: list[dict]) -> None:
    """A ternary type against our own Q4_0 of the same model, and llama.cpp's and the
    roofline's bounds for it (issue 19's targets)."""
    by_type = {r["type"]: r for r in results}
    q4 = by_type.get("q4_0")
    rows = [r for r in results if base_type(r["type"]) in TERNARY_TYPES]
    if not rows:
        return
    print("\nternary: falconet API on the ternary type against llama.cpp on it and against "
          "falconet API on q4_0 (targets: decode >= 1.2x llama.cpp, >= 1.8x q4_0, "
          ">= 80 % of roofline)")  # fmt: skip
    print("| type | decode tok/s | vs llama.cpp | vs our q4_0 | prefill tok/s | vs llama.cpp "
          "| vs our q4_0 | decode % roofline |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, ll = r["engines"]["falconet API"], r["engines"]["llama.cpp"]
        q = q4["engines"]["falconet API"] if q4 else None
        vs_q4 = {k: f"{f[k] / q[k]:.2f}x" if q else "-" for k in ("decode", "prefill")}
        print(
            f"| {r['type']} | {f['decode']:.2f} | {f['decode'] / ll['decode']:.2f}x | "
            f"{vs_q4['decode']} | {f['prefill']:.1f} | {f['prefill'] / ll['prefill']:.2f}x | "
            f"{vs_q4['prefill']} | {100 * f['decode'] / r['roofline']:.0f} % |"
        )


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
        "--long-context",
        type=int,
        default=0,
        metavar="N",
        help="also measure decode tok/s after an N-token prompt against after a "
        "--short-context one (falconet API and llama.cpp, the first --types type)",
    )
    p.add_argument("--short-context", type=int, default=256)
    p.add_argument("--skip-main", action="store_true", help="only the --long-context measurement")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="checkpoint folder (default: .bench_cache/falcon-1b-mq or falcon3-1b for the "
        "default shapes); its GGUFs are written beside it",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny Falcon3 shape (shape flags given still win) and a short run: checks "
        "that the benchmark works, measures nothing",
    )
    p.add_argument("--worker-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_rss:
        print(json.dumps(worker_rss(args)))
        return
    types = [t.strip() for t in args.types.split(",")]
    ternary = any(base_type(t) in TERNARY_TYPES for t in types)
    if ternary and args.arch == "falcon":  # --arch left at its default
        args.arch = "falcon3"
    if ternary and args.arch != "falcon3":
        p.error("--types tq2_0 / tq1_0 are for the Falcon3-shaped (Llama) model: --arch falcon3")
    if args.smoke:
        if args.arch != "falcon3":
            p.error("--smoke is a Falcon3 shape: use it with --arch falcon3 or a ternary type")
        for key, value in {**SMOKE_SHAPE, **SMOKE_RUN}.items():
            if (
                getattr(args, key) is None
                or key in SMOKE_RUN
                and getattr(args, key) == p.get_default(key)
            ):
                setattr(args, key, value)
    fill_shape_defaults(p, args)
    if args.repeats < 1 or args.decode_tokens < 1 or args.prompt_len < 1:
        p.error("--repeats, --decode-tokens and --prompt-len must be positive")
    args.cache_dir = cache_dir_for(args)
    ensure_checkpoint(args, args.cache_dir)
    bandwidth = measure_bandwidth(1.0)
    source = ternary_checkpoint(args.cache_dir) if ternary else args.cache_dir
    if not args.skip_main:
        results = [bench_type(t, source, args, bandwidth) for t in types]
        report(results, args, bandwidth)
    if args.long_context:
        report_long_context(bench_long_context(types[0], source, args), args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
