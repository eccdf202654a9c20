"""The x8 quant GEMV's two int8 product paths side by side: AVX-512 VNNI (vpdpbusd) and
AVX2 (maddubs + madd), which give the same bits (tests/test_quant_linear.py), so the
choice is only speed. For each weight shape, type, activation row count M and thread
count: the median time of each path, the ratio, and the VNNI path's weight GB/s and
GMAC/s. The paths alternate call by call and each call takes the next of 12 copies of
the weight, so a decode-sized call reads its weight from memory as a model's step does.

    python benchmarks/bench_x8.py
    python benchmarks/bench_x8.py --types q4_0 --rows 1,16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from falconet.quant import kernels  # noqa: E402
from falconet.quant.linear import QuantLinear, QuantTensor  # noqa: E402

SHAPES = [(8192, 2048), (2048, 8192)]  # (out_features, in_features): the 1 B model's MLP
PATHS = ("maddubs", "vnni")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", default="q4_0,q8_0")
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    native = kernels.native
    if native is None or native.simd() != "avx2":
        print("the x8 kernels need the compiled AVX2 kernels")
        return 1
    try:
        native.set_int8_dot("vnni")
    except ValueError:
        print("this CPU has no AVX-512 VNNI: only the AVX2 path exists here")
        return 1
    print(
        "| type | N x K | threads | M | maddubs ms | vnni ms | speed-up | vnni GB/s | vnni GMAC/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for qtype in args.types.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for N, K in SHAPES:
                g = torch.Generator().manual_seed(0)
                layers = [
                    QuantLinear(QuantTensor.quantize(torch.randn(N, K, generator=g) * 0.02, qtype))
                    for _ in range(12)
                ]
                with torch.inference_mode():
                    for M in (int(m) for m in args.rows.split(",")):
                        x = torch.randn(M, K, generator=g)
                        times: dict[str, list[float]] = {path: [] for path in PATHS}
                        for i in range(args.repeats + len(layers)):
                            layer = layers[i % len(layers)]
                            for path in PATHS:
                                native.set_int8_dot(path)
                                t0 = time.perf_counter()
                                layer(x)
                                if i >= len(layers):  # the first pass repacks and warms up
                                    times[path].append(time.perf_counter() - t0)
                        a, b = (statistics.median(times[path]) for path in PATHS)
                        gbs = layers[0].weight.nbytes / b / 1e9
                        print(f"| {qtype} | {N} x {K} | {threads} | {M} | {a * 1e3:.3f} | "
                              f"{b * 1e3:.3f} | {a / b:.2f}x | {gbs:.1f} | {M * N * K / b / 1e9:.1f} |")  # fmt: skip
    native.set_int8_dot("vnni")
    return 0


if __name__ == "__main__":
    sys.exit(main())
