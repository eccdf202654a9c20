"""`Linear`: nn.Linear whose weight may be stored in a narrower dtype than the compute.

CPUs without native bf16 matmul (AVX2, most AVX-512) multiply bf16 matrices several
times slower than fp32, yet a bf16 weight read at memory bandwidth is what decode wants.
So the weight keeps its storage dtype, and the layer computes what a bf16 (or fp16)
linear layer computes -- inputs rounded to the weight dtype, products accumulated in
fp32, the result rounded to the weight dtype -- by whichever path is fast for the shape:

- decode (up to DECODE_ROWS = 8 rows), CPU, fp32 input: the compiled row-invariant
  kernel (`row_invariant_linear`, falconet/quant/kernels_float.h), for fp32, bf16 and
  fp16 weights alike; it streams the weight at memory bandwidth;
- prefill (more rows): upcast the weight one tile of output features at a time into a
  small reusable fp32 buffer and run fp32 GEMMs on the rounded inputs, so no full fp32
  copy of the weight ever exists and the conversion stays in cache;
- decode without the compiled kernels (or on another device): PyTorch's low-precision
  GEMV (bf16/fp16 weights) or F.linear (fp32).

All paths round at the same two places, so a row's result does not depend on how many
rows share the call (a batch of 9 equals each row alone, cached decode equals a full
forward) beyond fp32 accumulation order, which flips a rounded output in about one
element in 10^4. `batch_invariant()` removes that last difference (below).

Measured on the 2-core AVX2 dev machine for a 8192x2048 weight and 128 rows: bf16 GEMM
157 ms, fp32 GEMM 41 ms, tiled bf16->fp32 + GEMM 39 ms. For decode, kernel vs the
PyTorch path (benchmarks/bench_linear.py, weights read from memory, not cache): bf16
8192x2048 1 row 0.80 vs 0.97 ms, 4 rows 1.14 vs 4.26 ms, 8 rows 2.3 vs 23.6 ms (the
tiled path); bf16 2048x8192 1 row 0.71 vs 1.28 ms; fp32 8192x2048 1 row 1.43 vs 3.86 ms,
8 rows 3.2 vs 10.2 ms. It was faster at every shape and row count up to 8 measured there,
hence the default (benchmarks/bench_generate.py measures the whole model).

Batch invariance. Inside `with batch_invariant():` (per thread) a row's result is
bit-identical whatever other rows share the call, which a server batching requests
together needs: a CPU layer with an fp32, bf16 or fp16 weight and fp32 input runs the
kernel for every row count (one fixed summation order per output element, independent
of the row count, the neighbouring rows and the thread count), with the same rounding as
above. Anything else -- no compiled kernels, another device or input dtype, autograd --
runs the paths above one row at a time: as exact, much slower for many rows. It covers
`Linear` only; the rest of a forward (attention, norms) has to be row-invariant on its
own (tests/test_linear.py checks a tiny model's uncached forward).

The bias is added after the matmul, not fused into it: Falcon was trained that way and
transformers keeps the extra rounding step (`FalconLinear`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:  # the compiled kernels are optional: without them batch_invariant() goes row by row
    from falconet.quant import _kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

# Rows at or above which the tiled upcast beats the low-precision matmul on CPU.
PREFILL_ROWS = 8
# Bytes of the fp32 weight tile; a few MB stays in L2/L3 while the GEMM reuses it.
TILE_BYTES = 4 << 20
# Weight dtypes the row-invariant kernel takes (its dtype codes).
KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
UNROUNDED = 16  # added to the dtype code: the kernel leaves its output in fp32
# Rows up to which the kernel is also the default outside batch_invariant(): it beat
# PyTorch at every shape measured there (module docstring).
DECODE_ROWS = 8

_state = threading.local()


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """Within the block, on this thread, every `Linear` gives each row the same bits
    whatever rows share its call (see the module docstring for the cost without the
    compiled kernels)."""
    before = batch_invariant_active()
    _state.active = True
    try:
        yield
    finally:
        _state.active = before


def batch_invariant_active() -> bool:
    """Whether this thread is inside `batch_invariant()`."""
    return getattr(_state, "active", False)


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(
                torch.empty(out_features, dtype=bias_dtype or dtype, device=device),
                requires_grad=False,
            )
            if bias
            else None
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, weight={self.weight.dtype}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if kernel_applies(x, w) and (
            batch_invariant_active() or x.numel() <= DECODE_ROWS * self.in_features
        ):
            y = _kernel_linear(x, w)
        elif batch_invariant_active():
            y = _row_by_row(x, w)
        else:
            y = _linear(x, w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def unrounded(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T (no bias) as fp32 sums not yet rounded to a narrow weight's dtype, or
        None where the compiled kernel does not apply (then `forward` is all there is). A
        tensor-parallel rank's row-parallel partial sums, added over the ranks and then
        rounded once, give what one process rounds."""
        if self.weight.dtype == torch.float32 or not kernel_applies(x, self.weight):
            return None
        return _kernel_linear(x, self.weight, rounded=False)


def kernel_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `Linear` can run this input and weight through the compiled kernel (which
    does not record autograd history)."""
    return (
        native is not None
        and _kernel_takes(x, w)
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def _kernel_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cpu
        and w.is_cpu
        and x.dtype == torch.float32
        and w.dtype in KERNEL_DTYPES
        and w.ndim == 2
        and x.ndim > 0
        and x.shape[-1] == w.shape[1] > 0
    )


def row_invariant_linear(
    x: torch.Tensor, w: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """x [..., K] fp32 @ w.T for a CPU weight [N, K] in fp32/bf16/fp16 -> [..., N] fp32,
    rounded as `Linear` rounds, each row's bits independent of the others (and of
    `threads`, default torch's). Needs the compiled kernels; no autograd."""
    if native is None:
        raise RuntimeError("falconet's compiled kernels are not built")
    if not _kernel_takes(x, w):
        raise ValueError(
            "row_invariant_linear takes fp32 x [..., K] and a CPU weight [N, K] in "
            f"fp32/bf16/fp16; got x {x.dtype} {tuple(x.shape)} on {x.device}, "
            f"weight {w.dtype} {tuple(w.shape)} on {w.device}"
        )
    return _kernel_linear(x, w, threads)


def _kernel_linear(
    x: torch.Tensor, w: torch.Tensor, threads: int | None = None, rounded: bool = True
) -> torch.Tensor:
    N, K = w.shape
    x = x if x.is_contiguous() else x.contiguous()  # read as (M, K) rows
    w = w if w.is_contiguous() else w.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)  # written as (M, N)
    native.linear_rows(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // K, K, N,
        KERNEL_DTYPES[w.dtype] | (0 if rounded else UNROUNDED), threads or torch.get_num_threads(),
    )  # fmt: skip
    return y


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T by PyTorch, rounded to a narrow weight's dtype as the module docstring says."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    if x.device.type == "cpu" and x.numel() // w.shape[1] >= PREFILL_ROWS:
        return _tiled_upcast_linear(x.to(w.dtype).to(x.dtype), w).to(w.dtype).to(x.dtype)
    return F.linear(x.to(w.dtype), w).to(x.dtype)


def _row_by_row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`_linear` on each row alone, so no row sees another: batch-invariant, slow."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    if rows.shape[0] == 0:
        return _linear(x, w)
    # a fresh copy per row: a BLAS may pick its code path by the pointer's alignment
    y = torch.cat([_linear(r.clone(), w) for r in rows.split(1)])
    return y.view(*x.shape[:-1], w.shape[0])


def _tiled_upcast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with w upcast to x.dtype one tile of output rows at a time."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    out_features, in_features = w.shape
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    tile = max(16, TILE_BYTES // (in_features * x.element_size()))
    buf = torch.empty(min(tile, out_features), in_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, tile):
        stop = min(start + tile, out_features)
        b = buf[: stop - start]
        b.copy_(w[start:stop])
        y[:, start:stop] = rows @ b.t()
    return y.view(*x.shape[:-1], out_features)
