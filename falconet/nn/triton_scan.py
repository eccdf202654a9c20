"""Triton kernels for the SSM scans on CUDA: Mamba-1's selective scan and Mamba-2's SSD
recurrence, the same recurrences as nn/selective_scan.py and nn/ssd.py.

Both are sequential in T: one program owns a tile of the state in registers for a whole
call, reads each token's inputs, advances the tile and writes that token's output, and
stores the tile back at the end. Decode is the same kernel at T = 1, so prefill and
decode share one step (and one arithmetic order), as on the CPU kernels.

- Mamba-1: one program per (sequence, block of BLOCK_E channels); its (BLOCK_E, N) fp32
  state tile advances by h = exp(dt A) h + (dt B) u and gives y = h C per channel.
- Mamba-2: one program per (sequence, head, block of BLOCK_P head channels); its
  (BLOCK_P, N) fp32 state tile decays by the head's scalar exp(dt A) and adds dt x B^T,
  with B and C of the head's group, y = state C + D x.

Sequential in T is the right first version on a GPU for decode (one step, bound by
reading the state) and for moderate prefills; a long prefill leaves the GPU mostly idle
here (B * E / BLOCK_E or B * H * P / BLOCK_P programs, each walking T steps). The next
step for long prompts is a chunked SSD kernel (the matrix form of ssd.torch_ssd_chunked,
tl.dot within chunks and the state carried between them). Block sizes are untuned first
guesses; benchmarks/bench_triton.py --parts scan measures them against the PyTorch path.

The launchers take tensors as the wrappers in nn/selective_scan.py and nn/ssd.py prepare
them (shapes checked, contiguous, fp32, on one device) and advance the state in place.
tests/test_triton_scan.py runs them in Triton's CPU interpreter; on a GPU they are
checked only by the benchmark so far.
"""

from __future__ import annotations

import torch

try:  # optional: CUDA installs of torch bring triton along, CPU ones do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

SCAN_BLOCK_E = 32  # Mamba-1 channels per program: E / 32 programs per sequence (256 for the 7B)
# Mamba-2 state values per program (BLOCK_P * BLOCK_N): 2,048 fp32 are 16 registers per
# thread at 4 warps, leaving room for the token's loads
SSD_TILE = 2048


def available() -> bool:
    """Triton is installed (the callers send it CUDA tensors only)."""
    return triton is not None


def selective_scan(
    h: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_e: int | None = None,
) -> torch.Tensor:
    """Mamba-1's scan over T tokens: h (Bt, E, N) advanced in place; u, dt (Bt, T, E);
    A (E, N); B, C (Bt, T, N); all contiguous fp32. Returns y (Bt, T, E) fp32 without
    the D skip. `block_e` (a power of two) is the channels per program, None for
    SCAN_BLOCK_E."""
    Bt, T, E = u.shape
    N = A.shape[-1]
    y = torch.empty(Bt, T, E, dtype=torch.float32, device=u.device)
    if Bt == 0 or T == 0 or E == 0:
        return y
    block_e = block_e or SCAN_BLOCK_E
    grid = (Bt, triton.cdiv(E, block_e))
    _selective_scan_kernel[grid](
        h, u, dt, A, B, C, y, T, E, N,
        BLOCK_E=block_e, BLOCK_N=triton.next_power_of_2(N),
    )  # fmt: skip
    return y


def ssd_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    block_p: int | None = None,
) -> torch.Tensor:
    """Mamba-2's recurrence over T tokens: state (Bt, H, P, N) advanced in place;
    x (Bt, T, H, P); dt (Bt, T, H) discretized; A, D (H,); B, C (Bt, T, G, N) with G
    dividing H; all contiguous fp32. Returns y (Bt, T, H, P) fp32, D skip included.
    `block_p` (a power of two) is the head channels per program; None sizes the tile
    to SSD_TILE state values."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = torch.empty(Bt, T, H, P, dtype=torch.float32, device=x.device)
    if Bt == 0 or T == 0 or H == 0 or P == 0:
        return y
    block_n = triton.next_power_of_2(N)
    if block_p is None:
        block_p = min(triton.next_power_of_2(P), max(1, SSD_TILE // block_n))
    grid = (Bt, H, triton.cdiv(P, block_p))
    _ssd_scan_kernel[grid](
        state, x, dt, A, D, B, C, y, T, H, P, G, N,
        BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return y


if triton is not None:

    @triton.jit
    def _selective_scan_kernel(
        h_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, T, E, N,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0).to(tl.int64)  # 64-bit offsets: Bt * T * E may pass 2^31
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # (BE,)
        n = tl.arange(0, BLOCK_N)  # (BN,)
        e_ok, n_ok = e < E, n < N
        ok = e_ok[:, None] & n_ok[None, :]  # (BE, BN)
        en = e[:, None] * N + n[None, :]  # (BE, BN) offsets in an (E, N) matrix
        h_tile = h_ptr + seq * E * N + en
        # masked entries stay 0: A = 0 decays by exp(0) = 1 and B = 0 adds nothing
        h = tl.load(h_tile, mask=ok, other=0.0)
        A = tl.load(A_ptr + en, mask=ok, other=0.0)
        ue = seq * T * E + e  # (BE,) offsets of token 0 in u, dt and y
        bc = seq * T * N + n  # (BN,) offsets of token 0 in B and C
        for t in range(T):
            u = tl.load(u_ptr + ue + t * E, mask=e_ok, other=0.0)  # (BE,)
            dt = tl.load(dt_ptr + ue + t * E, mask=e_ok, other=0.0)
            Bt = tl.load(B_ptr + bc + t * N, mask=n_ok, other=0.0)  # (BN,)
            Ct = tl.load(C_ptr + bc + t * N, mask=n_ok, other=0.0)
            dA = tl.exp(dt[:, None] * A)  # (BE, BN)
            h = dA * h + (dt[:, None] * Bt[None, :]) * u[:, None]
            tl.store(y_ptr + ue + t * E, tl.sum(h * Ct[None, :], axis=1), mask=e_ok)
        tl.store(h_tile, h, mask=ok)

    @triton.jit
    def _ssd_scan_kernel(
        s_ptr, x_ptr, dt_ptr, A_ptr, D_ptr, B_ptr, C_ptr, y_ptr, T, H, P, G, N,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BP,)
        n = tl.arange(0, BLOCK_N)  # (BN,)
        p_ok, n_ok = p < P, n < N
        ok = p_ok[:, None] & n_ok[None, :]  # (BP, BN)
        group = head // (H // G)  # each group's B and C serve H / G consecutive heads
        s_tile = s_ptr + (seq * H + head) * P * N + p[:, None] * N + n[None, :]
        state = tl.load(s_tile, mask=ok, other=0.0)
        A = tl.load(A_ptr + head)
        D = tl.load(D_ptr + head)
        xp = (seq * T * H + head) * P + p  # (BP,) offsets of token 0 in x and y
        dt_at = seq * T * H + head  # offset of token 0 in dt
        bc = (seq * T * G + group) * N + n  # (BN,) offsets of token 0 in B and C
        for t in range(T):
            dt = tl.load(dt_ptr + dt_at + t * H)  # the head's scalar step
            x = tl.load(x_ptr + xp + t * H * P, mask=p_ok, other=0.0)  # (BP,)
            Bt = tl.load(B_ptr + bc + t * G * N, mask=n_ok, other=0.0)  # (BN,)
            Ct = tl.load(C_ptr + bc + t * G * N, mask=n_ok, other=0.0)
            decay = tl.exp(dt * A)
            state = state * decay + (dt * x)[:, None] * Bt[None, :]  # (BP, BN)
            y = tl.sum(state * Ct[None, :], axis=1) + D * x
            tl.store(y_ptr + xp + t * H * P, y, mask=p_ok)
        tl.store(s_tile, state, mask=ok)
