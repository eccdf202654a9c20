"""Mamba-1's selective scan and causal depthwise conv, with a carried state.

Notation: B batch, T tokens, E d_inner (the scanned channels), N state_size, K conv_kernel.

The selective state space recurrence, per channel e and state index n (Mamba paper,
eq. 2a/2b with zero-order-hold A and Euler B, as the reference kernels discretize):

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * B_t) * u_t        h: (B, E, N), fp32
    y_t = sum_n h_t[..., n] * C_t[n] + D * u_t

A = -exp(A_log) (E, N) is fixed per channel; dt (B, T, E), B and C (B, T, N) depend on
the input. The state stays fp32 whatever the compute dtype, as in transformers.

Two entry points share one step, so a prompt fed in chunks, whole, or a token at a time
gives bit-identical states (each step is the same elementwise arithmetic):

- `selective_scan` (prefill): the sequence in chunks of `chunk` tokens; each chunk
  discretizes its tokens at once ((B, chunk, E, N) tensors, never (B, T, E, N), which
  for Falcon-Mamba-7B at 32k tokens would be 16 GiB) and then runs the recurrence over
  them, carrying the state from chunk to chunk;
- `selective_step` (decode): one token.

On CPU both run the compiled kernel (falconet/quant/kernels_scan.h) when it is built:
the Python loop over tokens took three quarters as long as all of a Falcon-Mamba-7B
layer's matmuls at prefill, the kernel 13x less (docs/benchmarks.md). Prefill and
decode then share the kernel's step, as they share the PyTorch step elsewhere; the two
paths agree within 1e-5 relative, not bit for bit (exp and the sum over N round
differently), so one model never mixes them. On CUDA they run the Triton kernel
(nn/triton_scan.py) when triton is installed, the same sequential step with the state
in registers; PyTorch serves every other case.

`causal_conv` is the depthwise conv before the scan, reading and updating the last
K - 1 inputs it keeps per sequence (the conv state), so chunks join without a seam.
"""

from __future__ import annotations

import torch

from falconet.nn.scan_paths import native_applies, triton_applies

try:  # the compiled kernels are optional (falconet/quant/kernels_scan.h)
    from falconet.quant import _kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

# Tokens discretized at once by the prefill scan: bounds its temporaries to
# chunk * E * N fp32 values per sequence (64 * 8192 * 16 * 4 B = 32 MiB for the 7B).
SCAN_CHUNK = 64


def causal_conv(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise causal conv of x (B, T, E) over the K - 1 inputs before it, held in
    conv_state (B, E, K - 1) (zeros at the start of a sequence), which is updated in
    place to the last K - 1 inputs. weight (E, K), bias (E,) or None. Returns (B, T, E).

    Written as K multiply-adds over shifted views rather than F.conv1d, so the value at
    a position does not depend on how the sequence was cut into calls.
    """
    T, K = x.shape[1], weight.shape[-1]
    window = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, E)
    conv_state.copy_(window[:, T:].transpose(1, 2))  # the last K - 1 inputs
    w = weight.to(x.dtype)
    out = window[:, 0:T] * w[:, 0]
    for k in range(1, K):
        out = out + window[:, k : k + T] * w[:, k]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out


def selective_step(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """One token: h (B, E, N) fp32 is advanced in place; u, dt (B, E), B, C (B, N), all
    fp32, A (E, N). Returns y (B, E) without the D skip."""
    if native_applies(
        native_scan_available(), h, u, dt, A, B, C
    ):  # the prefill's kernel, so decode == prefill
        return native_selective_scan(h, u[:, None], dt[:, None], A, B[:, None], C[:, None])[:, 0]
    if triton_applies(h, u, dt, A, B, C):
        return triton_selective_scan(h, u[:, None], dt[:, None], A, B[:, None], C[:, None])[:, 0]
    dA = torch.exp(dt[..., None] * A)  # (B, E, N)
    dBu = (dt[..., None] * B[:, None, :]) * u[..., None]  # (B, E, N)
    h.copy_(dA * h + dBu)
    return (h * C[:, None, :]).sum(-1)


def selective_scan(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int = SCAN_CHUNK,
) -> torch.Tensor:
    """The scan over T tokens from state h (B, E, N) fp32, which ends as the state after
    the last token. u, dt (B, T, E), B, C (B, T, N), all fp32; A (E, N).
    Returns y (B, T, E) without the D skip."""
    if native_applies(native_scan_available(), h, u, dt, A, B, C):
        return native_selective_scan(h, u, dt, A, B, C)
    if triton_applies(h, u, dt, A, B, C):
        return triton_selective_scan(h, u, dt, A, B, C)
    return torch_selective_scan(h, u, dt, A, B, C, chunk)


def torch_selective_scan(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int = SCAN_CHUNK,
) -> torch.Tensor:
    """`selective_scan` in PyTorch ops (any device): each chunk of tokens discretized at
    once, then a Python loop over its tokens."""
    T = u.shape[1]
    ys = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        dt_c = dt[:, start:end, :, None]  # (B, L, E, 1)
        dA = torch.exp(dt_c * A)  # (B, L, E, N)
        dBu = (dt_c * B[:, start:end, None, :]) * u[:, start:end, :, None]  # (B, L, E, N)
        states = torch.empty_like(dA)
        state = h.clone()  # h is written below: autograd keeps the copy
        for i in range(end - start):
            state = dA[:, i] * state + dBu[:, i]
            states[:, i] = state
        h.copy_(state)
        ys.append((states * C[:, start:end, None, :]).sum(-1))  # (B, L, E)
    return torch.cat(ys, dim=1) if ys else u.new_zeros(u.shape)


def native_scan_available() -> bool:
    """Whether the compiled scan is built (an older build may lack it)."""
    return native is not None and hasattr(native, "selective_scan")


def _prepared(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The kernels' inputs: shapes checked, the state fp32 and contiguous (a copy to
    write back when it was not), the rest contiguous fp32."""
    Bt, T, E = u.shape
    N = A.shape[-1]
    expected = {"h": (Bt, E, N), "dt": (Bt, T, E), "A": (E, N), "B": (Bt, T, N), "C": (Bt, T, N)}
    for name, t in zip(expected, (h, dt, A, B, C), strict=True):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"selective_scan: {name} is {tuple(t.shape)}, expected {expected[name]}"
            )
    if h.dtype != torch.float32:
        raise ValueError(f"selective_scan: the state must be float32, got {h.dtype}")
    state = h if h.is_contiguous() else h.contiguous()
    return (state, *(t.to(torch.float32).contiguous() for t in (u, dt, A, B, C)))


def native_selective_scan(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> torch.Tensor:
    """`selective_scan` by the compiled kernel (CPU): the same recurrence with the
    state of 8 channels at a time held in cache over all T tokens; within 1e-5 relative
    of the PyTorch path (its exp and its sum over N round differently), and per
    (sequence, channel) the same bits however the tokens are cut into calls."""
    state, u, dt, A, B, C = _prepared(h, u, dt, A, B, C)
    Bt, T, E = u.shape
    N = A.shape[-1]
    y = torch.empty(Bt, T, E, dtype=torch.float32)
    native.selective_scan(
        state.data_ptr(), u.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
        y.data_ptr(), Bt, T, E, N, torch.get_num_threads(),
    )  # fmt: skip
    if state is not h:
        h.copy_(state)
    return y


def triton_selective_scan(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_e: int | None = None,
) -> torch.Tensor:
    """`selective_scan` by the Triton kernel (nn/triton_scan.py; CUDA, or any device in
    Triton's interpreter): the same recurrence, each block of channels' state held in
    registers over all T tokens; decode is T = 1 of the same kernel. `block_e` overrides
    the channels per program (a power of two)."""
    from falconet.nn import triton_scan

    state, u, dt, A, B, C = _prepared(h, u, dt, A, B, C)
    y = triton_scan.selective_scan(state, u, dt, A, B, C, block_e)
    if state is not h:
        h.copy_(state)
    return y
