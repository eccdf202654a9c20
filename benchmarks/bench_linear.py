"""Benchmark the row-invariant float linear kernel (falconet/quant/kernels_float.h)
against the path `Linear` takes outside `batch_invariant()` by PyTorch alone: for a bf16
or fp16 weight a low-precision GEMV below 8 rows, else the tiled upcast + fp32 GEMM;
for an fp32 weight F.linear.

For each weight (out x in features), dtype and row count M: the median time of each
path, the speed-up (PyTorch / kernel), and the kernel's GFLOP/s (2*M*N*K) and weight
GB/s (the weight's bytes once per call). The two paths alternate call by call, so a
noisy machine's drift hits both alike, and each call takes the next of several copies
of the weight (at least --rotate-mib in all), so small M reads the weight from memory
as a model's decode step does, not from a cache that holds it from the previous call.
The read bandwidth of a large sum is printed first, as the roofline of the small-M rows.

    python benchmarks/bench_linear.py
    python benchmarks/bench_linear.py --rows 1,2,4,8 --dtypes bf16,fp32,fp16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from falconet.nn import linear  # noqa: E402

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (out_features, in_features)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def alternate(fns: list, weights: list[torch.Tensor], repeats: int) -> list[float]:
    """Median seconds of each fn(w), the fns taking turns, each call on the next weight."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + len(weights)):  # the first pass over the copies warms up
        for fn, ts in zip(fns, times, strict=True):
            w = weights[i % len(weights)]
            t0 = time.perf_counter()
            fn(w)
            if i >= len(weights):
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a sum over a `gib` GiB fp32 tensor (median of 5)."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    return x.nbytes / alternate([lambda t: t.sum()], [x], 5)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,64", help="comma-separated row counts M")
    ap.add_argument("--dtypes", default="bf16,fp32", help="weight dtypes: bf16, fp32, fp16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rotate-mib", type=int, default=256, help="weight copies, in MiB, >> L3")
    args = ap.parse_args()
    if linear.native is None:
        sys.exit("falconet's compiled kernels are not built (python setup.py build_ext --inplace)")
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, SIMD path {linear.native.simd()}, "
          f"read bandwidth {read_bandwidth() / 1e9:.1f} GB/s")  # fmt: skip
    head = (f"{'weight':>9} {'dtype':>5} {'M':>4} {'kernel ms':>9} {'torch ms':>9} "
            f"{'speed-up':>8} {'GFLOP/s':>7} {'GB/s':>5}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for n, k in SHAPES:
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            copies = max(1, (args.rotate_mib << 20) // (n * k * dtype.itemsize))
            weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k)
                with torch.inference_mode():
                    ours, theirs = alternate(
                        [lambda w, x=x: linear.row_invariant_linear(x, w),
                         lambda w, x=x: linear._linear(x, w)],
                        weights, args.repeats,
                    )  # fmt: skip
                gflops = 2 * m * n * k / ours / 1e9
                gbs = n * k * dtype.itemsize / ours / 1e9
                print(f"{n:>4}x{k:<4} {name:>5} {m:>4} {ours * 1e3:>9.3f} {theirs * 1e3:>9.3f} "
                      f"{theirs / ours:>8.2f} {gflops:>7.1f} {gbs:>5.1f}")  # fmt: skip
            del weights


if __name__ == "__main__":
    main()
