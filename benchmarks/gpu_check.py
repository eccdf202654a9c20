"""End-to-end check of the CUDA path, for a session that is lent a GPU (none on the dev
machine): the quantized model on the GPU (Triton kernels for Q4_0/Q8_0, the dequantize
fallback for other types) against the same model on the CPU.

For the embedded default model at fp32 / q8_0 / q4_0 / q4_1 it prints the largest logit
difference relative to the largest |logit| (GPU vs CPU; both round differently: the CPU
kernels round activations to 8 bits, Triton multiplies them as they are), whether the 32
greedy tokens agree, and GPU decode tokens/s. Exits 1 if a relative difference exceeds
--tol (a wrong kernel shows up as O(1)).

The ternary (BitNet) product runs on the GPU's Triton kernel for a Falcon3-1B-shaped
matrix (8192 x 2048, 1 and 64 activation rows): its int32 sums must equal the CPU
reference's exactly; it prints the time and the packed bytes streamed per second.

With --tp N (default 2) and at least N GPUs, it then runs the model over N NCCL ranks
(falconet/parallel/) against one GPU: the largest logit difference (fp32: only the
all-reduce's summation order differs), whether the greedy tokens agree, and decode
tokens/s of each. NCCL needs a GPU per rank, so a one-GPU machine skips it and says so.

    python benchmarks/gpu_check.py                 # then: python benchmarks/bench_triton.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import falconet

PROMPT = "In the beginning God created the heaven and the earth. And the earth was"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the embedded model)")
    p.add_argument("--tol", type=float, default=0.05)
    p.add_argument("--tp", type=int, default=2, help="NCCL ranks for the tensor-parallel check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU; torch sees none")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| weights | max rel logit diff GPU vs CPU | greedy tokens equal | GPU decode tok/s |")
    print("|---|---|---|---|")
    worst = 0.0
    for quant in (None, "q8_0", "q4_0", "q4_1"):
        cpu = falconet.load(args.model, dtype="float32", quant=quant)
        gpu = falconet.load(args.model, dtype="float32", quant=quant, device="cuda")
        ids = cpu.tokenizer.encode(PROMPT)
        a, b = cpu.logits(ids), gpu.logits(ids).cpu()
        rel = ((a - b).abs().max() / a.abs().max()).item()
        worst = max(worst, rel)
        same = cpu.generate(ids, max_tokens=32, temperature=0) == gpu.generate(
            ids, max_tokens=32, temperature=0
        )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu.generate(ids, max_tokens=64, temperature=0, ignore_eos=True)
        torch.cuda.synchronize()
        rate = 64 / (time.perf_counter() - t0)
        print(f"| {quant or 'fp32'} | {rel:.2e} | {same} | {rate:.1f} |")
    if worst > args.tol:
        sys.exit(f"a GPU result differs from the CPU's by {worst:.3f} of the largest logit")
    check_ternary()
    check_tensor_parallel(args)


def check_ternary(n: int = 8192, k: int = 2048) -> None:
    """The Triton ternary product against the CPU reference: exact, and its speed."""
    from falconet.quant import triton_kernels
    from falconet.quant.ternary import reference_matmul

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (n // 4, k), dtype=torch.uint8, generator=g)
    on_gpu = packed.cuda()
    print("\n| ternary 8192 x 2048 | rows | equal to the CPU reference | ms | packed GB/s |")
    print("|---|---|---|---|---|")
    for m in (1, 64):
        x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        x_gpu = x.cuda()
        y = triton_kernels.ternary_matmul(x_gpu, on_gpu)
        same = torch.equal(y.cpu().float(), reference_matmul(x, packed))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            triton_kernels.ternary_matmul(x_gpu, on_gpu)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 20 * 1e3
        print(f"| Triton | {m} | {same} | {ms:.3f} | {packed.numel() / ms / 1e6:.1f} |")
        if not same:
            sys.exit("the Triton ternary product differs from the CPU reference")


def decode_rate(llm, ids: list[int], tokens: int = 64) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(ids, max_tokens=tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def check_tensor_parallel(args: argparse.Namespace) -> None:
    """TP=N over NCCL against one GPU, fp32."""
    gpus = torch.cuda.device_count()
    if gpus < args.tp:
        print(f"\nNCCL tensor parallelism: skipped (--tp {args.tp} needs {args.tp} GPUs, "
              f"this machine has {gpus})")  # fmt: skip
        return
    one = falconet.load(args.model, dtype="float32", device="cuda")
    many = falconet.load(args.model, dtype="float32", device="cuda", tp=args.tp)
    try:
        ids = one.tokenizer.encode(PROMPT)
        a, b = one.logits(ids).cpu(), many.logits(ids).cpu()
        rel = ((a - b).abs().max() / a.abs().max()).item()
        same = one.generate(ids, max_tokens=32) == many.generate(ids, max_tokens=32)
        print(f"\n| fp32 | max rel logit diff TP={args.tp} vs TP=1 | greedy tokens equal "
              "| decode tok/s TP=1 | decode tok/s TP=N |")  # fmt: skip
        print("|---|---|---|---|---|")
        print(f"| NCCL | {rel:.2e} | {same} | {decode_rate(one, ids):.1f} | "
              f"{decode_rate(many, ids):.1f} |")  # fmt: skip
    finally:
        many.close()
    if rel > 1e-4 or not same:
        sys.exit(f"TP={args.tp} differs from one GPU: {rel:.2e} of the largest logit")


if __name__ == "__main__":
    main()
