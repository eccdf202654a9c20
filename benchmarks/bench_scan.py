"""How much of a Mamba layer's time the scan and the conv take beside its matmuls (issue 13).

One layer at full width, random inputs, fp32; the model totals scale it by the layer
count. Shapes:

- Falcon-Mamba-7B (Mamba-1): hidden 4096, d_inner E 8192, state N 16, dt_rank 256,
  conv 4, 64 layers. Matmuls: in_proj, x_proj, dt_proj, out_proj.
- Falcon-H1-0.5B-like (Mamba-2 beside attention): hidden 1024, d_ssm 1536, 24 heads of
  64, 1 group, state 128, conv 4, chunk 128, 36 layers; attention 8 q / 2 kv heads of
  64, MLP 2048 (these three assumed). Matmuls: the Mamba in/out projections, q/k/v/o
  and the gated MLP.

Prefill is `--tokens` tokens in one call; decode one token. Each cell is the median of
`--repeats` timed runs after one warm-up. The matmuls are torch.nn.functional.linear on
fp32 weights (a quantized model streams 4-8x fewer weight bytes, so at decode its
matmuls are that much faster and the scan's share larger).

    python benchmarks/bench_scan.py               # both models, 512 tokens
    python benchmarks/bench_scan.py --repeats 3 --tokens 256 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from falconet.nn import selective_scan as s1
from falconet.nn import ssd


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmuls(shapes: list[tuple[int, int]], rows: int) -> Callable[[], None]:
    """F.linear for each (in, out) weight shape on `rows` activation rows."""
    ws = [torch.randn(o, i) * i**-0.5 for i, o in shapes]
    xs = [torch.randn(rows, i) for i, _ in shapes]
    return lambda: [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]


def mamba1(T: int, repeats: int) -> list[tuple[str, float]]:
    H, E, N, R, K = 4096, 8192, 16, 256, 4
    u, dt = torch.randn(1, T, E), F.softplus(torch.randn(1, T, E) - 3)
    B, C = torch.randn(1, T, N), torch.randn(1, T, N)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    w, b = torch.randn(E, K), torch.randn(E)
    h, conv = torch.zeros(1, E, N), torch.zeros(1, E, K - 1)
    shapes = [(H, 2 * E), (E, R + 2 * N), (R, E), (E, H)]
    rows = []
    for phase, t in (("prefill", T), ("decode", 1)):
        args = (h, u[:, :t], dt[:, :t], A, B[:, :t], C[:, :t])
        rows.append(
            (f"{phase} conv", median_ms(partial(s1.causal_conv, args[1], conv, w, b), repeats))
        )
        rows.append(
            (f"{phase} scan, PyTorch", median_ms(partial(s1.torch_selective_scan, *args), repeats))
        )
        if s1.native_scan_available():
            kernel = partial(s1.native_selective_scan, *args)
            rows.append((f"{phase} scan, compiled", median_ms(kernel, repeats)))
        rows.append((f"{phase} matmuls", median_ms(matmuls(shapes, t), repeats)))
    return rows


def mamba2(T: int, repeats: int) -> list[tuple[str, float]]:
    Hd, E, Hm, P, G, N, K, L = 1024, 1536, 24, 64, 1, 128, 4, 128
    q_heads, kv_heads, d_head, inter = 8, 2, 64, 2048
    conv_dim = E + 2 * G * N
    xBC = torch.randn(1, T, conv_dim)
    w, b = torch.randn(conv_dim, 1, K), torch.randn(conv_dim)
    conv = torch.zeros(1, conv_dim, K - 1)
    x, dt = torch.randn(1, T, Hm, P), F.softplus(torch.randn(1, T, Hm) - 3)
    B, C = torch.randn(1, T, G, N), torch.randn(1, T, G, N)
    A, D = -torch.rand(Hm) * 8, torch.randn(Hm)
    state = torch.zeros(1, Hm, P, N)
    shapes = [
        (Hd, 2 * E + 2 * G * N + Hm), (E, Hd),  # Mamba in/out projections
        (Hd, q_heads * d_head), (Hd, kv_heads * d_head), (Hd, kv_heads * d_head),
        (q_heads * d_head, Hd),  # attention
        (Hd, 2 * inter), (inter, Hd),  # gated MLP
    ]  # fmt: skip
    rows = []
    for phase, t in (("prefill", T), ("decode", 1)):
        rows.append(
            (
                f"{phase} conv",
                median_ms(partial(ssd.causal_conv1d, xBC[:, :t], w, b, conv), repeats),
            )
        )
        if t == 1:
            args = (state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
            torch_scan = partial(ssd.torch_ssd_step, *args)
            kernel = partial(
                ssd.native_ssd_scan, state, x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], D
            )
        else:
            args = (x[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], D)
            torch_scan = partial(ssd.torch_ssd_chunked, *args, L, state)
            kernel = partial(ssd.native_ssd_scan, state.clone(), *args)
        rows.append((f"{phase} scan, PyTorch", median_ms(torch_scan, repeats)))
        if ssd.native_ssd_scan_available():
            rows.append((f"{phase} scan, compiled", median_ms(kernel, repeats)))
        rows.append((f"{phase} matmuls", median_ms(matmuls(shapes, t), repeats)))
    return rows


def report(title: str, layers: int, rows: list[tuple[str, float]]) -> None:
    """One table; the share of a step is of its phase's conv + scan + matmuls, once with
    each scan path where there are two."""
    times = dict(rows)
    paths = [p for p in ("PyTorch", "compiled") if f"prefill scan, {p}" in times]
    print(f"\n{title} ({layers} layers)\n")
    print(
        "| step | ms / layer | ms / model | " + " | ".join(f"share, {p} scan" for p in paths) + " |"
    )
    print("|---|---:|---:|" + "---:|" * len(paths))
    for name, ms in rows:
        phase = name.split()[0]
        shares = []
        for p in paths:
            scan = f"{phase} scan, {p}"
            if "scan" in name and name != scan:
                shares.append("")
                continue
            total = times[f"{phase} conv"] + times[scan] + times[f"{phase} matmuls"]
            shares.append(f"{100 * ms / total:.1f} %")
        print(f"| {name} | {ms:.3f} | {ms * layers:.1f} | " + " | ".join(shares) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", choices=["mamba1", "mamba2", "both"], default="both")
    ap.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens")
    built = s1.native_scan_available() and ssd.native_ssd_scan_available()
    print(f"compiled scans: {'yes' if built else 'no'}")
    with torch.inference_mode():
        if args.model in ("mamba1", "both"):
            report("Falcon-Mamba-7B, Mamba-1", 64, mamba1(args.tokens, args.repeats))
        if args.model in ("mamba2", "both"):
            report("Falcon-H1-0.5B-like, Mamba-2", 36, mamba2(args.tokens, args.repeats))


if __name__ == "__main__":
    main()
