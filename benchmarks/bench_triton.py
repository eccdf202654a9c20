"""Benchmark the Triton kernels on a CUDA GPU: Q4_0 / Q8_0 matmuls against torch's bf16
matmul, and the SSM scans against their PyTorch paths.

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

Scans (--parts scan; nn/triton_scan.py): one layer's scan at full width, fp32, batch
--scan-batch, prefill of --scan-tokens tokens in one call and a decode step (T = 1):

- Falcon-Mamba-7B's Mamba-1 (E 8192 channels, N 16): `triton_selective_scan` against
  `torch_selective_scan` (a Python loop over tokens);
- a Falcon-H1-0.5B-like Mamba-2 (24 heads of 64, 1 group, N 128): `triton_ssd_scan`
  against `torch_ssd_chunked` (chunk 128) at prefill and `torch_ssd_step` at decode.

Each pair starts from the same random state; "rel err" is max |diff| / max |ref| over
the output and the final state. Both are fp32 with the same recurrence, so anything
above 1e-4 is a wrong kernel: the script then exits 1 after the table.

    python benchmarks/bench_triton.py
    python benchmarks/bench_triton.py --repeats 20 --qtypes q4_0
    python benchmarks/bench_triton.py --parts scan --scan-tokens 2048
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
SCAN_TOL = 1e-4  # fp32 against fp32: a wrong scan kernel is off by O(1)
SSD_CHUNK = 128  # Falcon-H1's mamba_chunk_size
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
    p.add_argument("--parts", default="matmul,scan", help="comma-separated: matmul, scan")
    p.add_argument("--scan-tokens", type=int, default=512)
    p.add_argument("--scan-batch", type=int, default=1)
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

    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {tk.triton.__version__}")
    print(f"medians of {args.repeats} calls, L2 flushed before each")
    parts = args.parts.split(",")
    if "matmul" in parts:
        matmul_table(tk, args, flush)
    if "scan" in parts:
        worst = scan_table(args, flush)
        if worst > SCAN_TOL:
            sys.exit(f"a Triton scan differs from its PyTorch path by {worst:.1e} (> {SCAN_TOL})")


def matmul_table(tk, args: argparse.Namespace, flush: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    print()
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


def scan_table(args: argparse.Namespace, flush: torch.Tensor) -> float:
    """Times each Triton scan against its PyTorch path; returns the largest rel err."""
    from falconet.nn import selective_scan as s1
    from falconet.nn import ssd

    gen = torch.Generator().manual_seed(0)
    Bt, T = args.scan_batch, args.scan_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).cuda()

    # Falcon-Mamba-7B: E 8192 channels, N 16
    E, N = 8192, 16
    u, dt, h = randn(Bt, T, E), F.softplus(randn(Bt, T, E) - 3), randn(Bt, E, N)
    A, B, C = -torch.exp(randn(E, N)), randn(Bt, T, N), randn(Bt, T, N)
    # H1-0.5B-like: 24 heads of 64, 1 group, N 128
    H, P, G, N2 = 24, 64, 1, 128
    x, dt2, state = randn(Bt, T, H, P), F.softplus(randn(Bt, T, H) - 3), randn(Bt, H, P, N2)
    A2, D2, B2, C2 = -torch.rand(H).cuda() * 8, randn(H), randn(Bt, T, G, N2), randn(Bt, T, G, N2)

    # (scan, phase, initial state, triton, PyTorch): each fn takes a state (advanced in
    # place by the recurrences) and returns (y, the state after)
    def m1(fn, t):
        return lambda s: (fn(s, u[:, :t], dt[:, :t], A, B[:, :t], C[:, :t]), s)

    def m2_args(t):
        return x[:, :t], dt2[:, :t], A2, B2[:, :t], C2[:, :t], D2

    def m2(t):
        return lambda s: (ssd.triton_ssd_scan(s, *m2_args(t)), s)

    def m2_step(s):
        return ssd.torch_ssd_step(s, x[:, 0], dt2[:, 0], A2, B2[:, 0], C2[:, 0], D2)[:, None], s

    mamba1, mamba2 = (
        "Falcon-Mamba-7B, Mamba-1 (E 8192, N 16)",
        "H1-0.5B-like, Mamba-2 (24 x 64, N 128)",
    )
    cases = [
        (mamba1, f"prefill {T}", h, m1(s1.triton_selective_scan, T), m1(s1.torch_selective_scan, T)),
        (mamba1, "decode", h, m1(s1.triton_selective_scan, 1), m1(s1.torch_selective_scan, 1)),
        (mamba2, f"prefill {T}", state, m2(T),
         lambda s: ssd.torch_ssd_chunked(*m2_args(T), SSD_CHUNK, s)),
        (mamba2, "decode", state, m2(1), m2_step),
    ]  # fmt: skip
    print(f"\nscans, fp32, batch {Bt}\n")
    print("| scan | phase | triton ms | PyTorch ms | PyTorch/triton | rel err |")
    print("|---|---|---:|---:|---:|---:|")
    worst = 0.0
    with torch.inference_mode():
        for name, phase, start, kernel, reference in cases:
            got, ref = kernel(start.clone()), reference(start.clone())
            err = max(
                ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref, strict=True)
            )
            worst = max(worst, err)
            # the timed calls advance a scratch state in place, as the models do
            t_k = time_ms(partial(kernel, start.clone()), flush, args.warmup, args.repeats)
            t_t = time_ms(partial(reference, start.clone()), flush, args.warmup, args.repeats)
            cells = [name, phase, f"{t_k:.3f}", f"{t_t:.3f}", f"{t_t / t_k:.1f}", f"{err:.1e}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    return worst


def row(
    shape: str, m: int, qtype: str, t_q: float, t_b: float, q_bytes: float, b_bytes: float, err: str
) -> str:
    cells = [shape, str(m), qtype, f"{t_q:.3f}", f"{q_bytes / t_q / 1e6:.0f}", f"{t_b:.3f}",
             f"{b_bytes / t_b / 1e6:.0f}", f"{t_b / t_q:.2f}", err]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
