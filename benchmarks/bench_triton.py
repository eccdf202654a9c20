"""Benchmark the Triton Q4_0 / Q8_0 matmul kernels against torch's bf16 matmul on a CUDA GPU.

Shapes are the linear layers of the ~1.15 B Falcon-7B-shaped model of bench_generate.py
(hidden 2048, ffn 8192, fused qkv 2048 + 2*64 for multi-query, vocab 65,024, 24 layers).
For each shape, quant type and row count (--decode-rows, default 1, the GEMV; and
--prefill-rows, default 128, the GEMM) it times

- triton: `triton_kernels.matmul` on bf16 activations, the blocks in GGML layout;
- bf16: `F.linear` with the same weight as a bf16 tensor (what an unquantized model runs),

with CUDA events around each call, the L2 cache flushed before each, medians over
--repeats after --warmup calls. GB/s is weight bytes / time (the blocks for triton, 2
bytes a value for bf16): at one row both are bound by reading the weight, so GB/s against
the GPU's DRAM bandwidth is how close to the roofline each gets. The "model" row adds
every linear of one token's forward (24 layers + lm_head).

Before timing, each triton result is checked against the numpy codec's dequantize and
an fp32 matmul on the first rows of the weight (the bf16 prefill path cannot be checked
in Triton's CPU interpreter): "rel err" is max |y - ref| / max |ref|; a value above 1e-2
(bf16 rounding of the weight tile) means a wrong kernel.

    python benchmarks/bench_triton.py
    python benchmarks/bench_triton.py --repeats 20 --qtypes q4_0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from falconet.quant import get_format

HIDDEN, FFN, HEAD_DIM, VOCAB, LAYERS = 2048, 8192, 64, 65024, 24
SHAPES = {  # name -> (N out_features, K in_features, uses per token)
    "qkv": (HIDDEN + 2 * HEAD_DIM, HIDDEN, LAYERS),
    "dense": (HIDDEN, HIDDEN, LAYERS),
    "h_to_4h": (FFN, HIDDEN, LAYERS),
    "4h_to_h": (HIDDEN, FFN, LAYERS),
    "lm_head": (VOCAB, HIDDEN, 1),
}
CHECK_ROWS = 256  # weight rows checked against the numpy codec
FLUSH_BYTES = 512 << 20  # larger than any GPU's L2


def random_blocks(qtype: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGML blocks on the GPU: random quant bytes, fp16 scales in [1e-3, 1e-2]
    (quantizing 133 M floats with the numpy codec would take minutes)."""
    type_size = get_format(qtype).type_size
    blocks = torch.randint(0, 256, (n, k // 32, type_size), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 9e-3 + 1e-3).half()
    blocks[:, :, :2] = d.view(torch.uint8).view(n, k // 32, 2)  # little-endian on x86 and GPU
    return blocks.view(n, -1).cuda()


def time_ms(fn, flush: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()  # evict the weight from L2: decode reads it from DRAM
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(tk, qtype: str, blocks: torch.Tensor, x: torch.Tensor) -> float:
    n, k = min(CHECK_ROWS, blocks.shape[0]), x.shape[1]
    w = get_format(qtype).dequantize(blocks[:n].cpu().numpy(), (n, k))
    ref = x.float().cpu().numpy() @ w.T
    y = tk.matmul(x, qtype, blocks[:n].contiguous(), n).cpu().numpy()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qtypes", default="q4_0,q8_0")
    p.add_argument("--decode-rows", type=int, default=1)
    p.add_argument("--prefill-rows", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit(
            f"bench_triton.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False). Run it on an NVIDIA GPU machine with a "
            "CUDA build of torch."
        )
    try:
        from falconet.quant import triton_kernels as tk
    except ImportError as e:
        sys.exit(f"bench_triton.py needs triton: {e} (pip install triton)")
    if tk.triton is None:
        sys.exit("bench_triton.py needs triton (pip install triton)")

    gen = torch.Generator().manual_seed(0)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {tk.triton.__version__}")
    print(f"medians of {args.repeats} calls, L2 flushed before each\n")
    head = ["shape (N x K)", "M", "qtype", "triton ms", "GB/s", "bf16 ms", "GB/s",
            "bf16/triton", "rel err"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * 6) + "|")
    # (M, qtype) -> [triton ms, bf16 ms, triton bytes, bf16 bytes] summed over a token
    totals: dict[tuple[int, str], list[float]] = {}
    for name, (n, k, uses) in SHAPES.items():
        w_bf16 = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
        for qtype in args.qtypes.split(","):
            blocks = random_blocks(qtype, n, k, gen)
            for m in (args.decode_rows, args.prefill_rows):
                x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
                err = rel_err(tk, qtype, blocks, x)
                run_q = partial(tk.matmul, x, qtype, blocks, n)
                t_q = time_ms(run_q, flush, args.warmup, args.repeats)
                t_b = time_ms(partial(F.linear, x, w_bf16), flush, args.warmup, args.repeats)
                sums = totals.setdefault((m, qtype), [0.0] * 4)
                for i, v in enumerate((t_q, t_b, blocks.numel(), w_bf16.numel() * 2)):
                    sums[i] += v * uses
                print(row(f"{name} ({n} x {k})", m, qtype, t_q, t_b, blocks.numel(),
                          w_bf16.numel() * 2, f"{err:.1e}"), flush=True)  # fmt: skip
    for (m, qtype), (t_q, t_b, q_bytes, b_bytes) in totals.items():
        print(row(f"model ({LAYERS} layers + lm_head)", m, qtype, t_q, t_b, q_bytes, b_bytes, ""))


def row(
    shape: str, m: int, qtype: str, t_q: float, t_b: float, q_bytes: float, b_bytes: float, err: str
) -> str:
    cells = [shape, str(m), qtype, f"{t_q:.3f}", f"{q_bytes / t_q / 1e6:.0f}", f"{t_b:.3f}",
             f"{b_bytes / t_b / 1e6:.0f}", f"{t_b / t_q:.2f}", err]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
