"""Mamba-1's selective scan and causal depthwise conv, in PyTorch, with a carried state.

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

`causal_conv` is the depthwise conv before the scan, reading and updating the last
K - 1 inputs it keeps per sequence (the conv state), so chunks join without a seam.
"""

from __future__ import annotations

import torch

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
    T = u.shape[1]
    ys = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        dt_c = dt[:, start:end, :, None]  # (B, L, E, 1)
        dA = torch.exp(dt_c * A)  # (B, L, E, N)
        dBu = (dt_c * B[:, start:end, None, :]) * u[:, start:end, :, None]  # (B, L, E, N)
        states = torch.empty_like(dA)
        state = h
        for i in range(end - start):
            state = dA[:, i] * state + dBu[:, i]
            states[:, i] = state
        h.copy_(state)
        ys.append((states * C[:, start:end, None, :]).sum(-1))  # (B, L, E)
    return torch.cat(ys, dim=1) if ys else u.new_zeros(u.shape)
