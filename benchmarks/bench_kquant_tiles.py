"""K-quant GEMV: the x8 tiles (kernels_kq_x8.h) vs the row-major kernel on the GGUF
blocks, with our Q4_0 x8 GEMV of the same shape beside them.

For each decode-step shape of the 1.15 B Falcon-7B-shaped model (8192x2048, 2048x8192,
2048x2048) and each activation row count, the three kernels run alternately over
--copies weight copies in rotation (more than the last-level cache holds at full size,
so the weights stream from memory as in a decode step); medians of --iters. The ratio
row / x8 is the tiles' speed-up (the bits are the same: tests/test_quant_kquants.py).

    python benchmarks/bench_kquant_tiles.py                     # q4_k, q5_k, q6_k
    python benchmarks/bench_kquant_tiles.py --types q6_k --rows 1

Not used by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from falconet.quant import get_format, kernels
from falconet.quant.linear import QuantLinear, QuantTensor

SHAPES = [(8192, 2048), (2048, 8192), (2048, 2048)]  # (out, in)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--types", default="q4_k,q5_k,q6_k")
    ap.add_argument("--rows", default="1,4,8", help="activation rows per call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--iters", type=int, default=80)
    args = ap.parse_args()
    native = kernels.native
    if native is None or not hasattr(native, "kq_gemm_x8"):
        raise SystemExit("the compiled kernels are not built: python setup.py build_ext --inplace")
    torch.set_num_threads(args.threads)
    print(
        "| type | shape (out x in) | rows | row kernel ms | x8 tiles ms | row / x8 | x8 GB/s | Q4_0 x8 ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for qtype in args.types.split(","):
        code = kernels.KQUANT_TYPES[qtype]
        for N, K in SHAPES:
            rows, tiles, q4_0 = [], [], []
            for _ in range(args.copies):
                w = torch.randn(N, K) * 0.02
                blocks = QuantTensor.quantize(w, qtype).data.contiguous()
                rows.append(blocks)
                tiles.append(kernels.repack(get_format(qtype), blocks, K, to_x8=True))
                q4_0.append(QuantLinear(QuantTensor.quantize(w, "q4_0")))
            for M in (int(m) for m in args.rows.split(",")):
                x, y = torch.randn(M, K), torch.empty(M, N)
                t = {"row": [], "x8": [], "q4_0": []}
                with torch.inference_mode():
                    for i in range(args.iters):
                        c = i % args.copies
                        call = (N, K, x.data_ptr(), M, y.data_ptr(), args.threads)
                        t["row"].append(timed(native.kq_gemm, code, rows[c].data_ptr(), *call))
                        t["x8"].append(timed(native.kq_gemm_x8, code, tiles[c].data_ptr(), *call))
                        t["q4_0"].append(timed(q4_0[c], x))
                med = {k: statistics.median(v) for k, v in t.items()}
                gbs = rows[0].numel() / med["x8"] / 1e9
                print(f"| {qtype} | {N}x{K} | {M} | {med['row'] * 1e3:.3f} | {med['x8'] * 1e3:.3f} | "
                      f"{med['row'] / med['x8']:.2f}x | {gbs:.1f} | {med['q4_0'] * 1e3:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
