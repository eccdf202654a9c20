"""Mamba-2's state space scan (SSD, "state space duality") and its short causal conv.

Per head h the recurrence, with a scalar decay per head and step, is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T      # (P, N)
    y_t     = state_t C_t + D_h * x_t                                # (P,)

with dt_t = clamp(softplus(dt_raw_t + dt_bias_h), time_step_limit), A_h = -exp(A_log_h) < 0,
x_t the head's P channels, and B_t, C_t (N,) shared by the heads of one group.

`ssd_chunked` computes the same thing for a run of T tokens in chunks of `chunk_size`
(Dao & Gu 2024, "Transformers are SSMs"): inside a chunk the scan is a masked
attention-like product (C B^T weighted by the decays between positions); between chunks
only the (P, N) state per head is carried, so cost is linear in T. Chunks are counted
from the start of each call, as transformers' torch path does, so a prompt fed in
pieces carries the state exactly between calls. `ssd_step` is the one-token recurrence
for decode. The state is fp32 whatever the model's dtype (an exponential decay summed
over thousands of steps).

On CPU both run the compiled recurrence (falconet/quant/kernels_scan.h) when it is
built: token by token with the state in cache it is a few times faster there than the
chunked matrix form, which also pads a short call to a whole chunk (docs/benchmarks.md).
It is the same recurrence, so prefill and decode then share one step, bit for bit; the
PyTorch forms (any device, and where the kernel is not built) agree with it within
rounding. On CUDA the same recurrence runs as a Triton kernel (nn/triton_scan.py) when
triton is installed. The choice depends only on the device, never on sizes, so a model
never mixes paths.

Parity quirk kept on purpose: transformers (and mamba_ssm's `selective_state_update`)
clamp dt to time_step_limit only in the chunked path, not in the decode step.

Notation: Bt batch, T tokens, H heads, P head dim, G groups, N state size, L chunk
length, Ch number of chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from falconet.nn import elementwise
from falconet.nn.scan_paths import native_applies, triton_applies

try:  # the compiled kernels are optional (falconet/quant/kernels_scan.h)
    from falconet.quant import _kernels as native
except ImportError:  # pragma: no cover - depends on the build
    native = None


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """softplus(dt + dt_bias) in fp32: (..., H), row-invariant in the engine."""
    return elementwise.softplus(dt.float() + dt_bias.float())


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a (..., L) -> (..., L, L) with [i, j] = a[j+1] + ... + a[i] for j <= i and -inf
    above the diagonal, so exp() of it is the decay from step j to step i (and 0 for
    the future). Summed from masked copies rather than as differences of one cumsum,
    which lose precision in fp32 once the running sum is large."""
    L = a.shape[-1]
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    # the term a[k] belongs to [i, j] for j < k <= i: cumulate a[k] down the rows from k
    x = a[..., :, None].expand(*a.shape[:-1], L, L).masked_fill(~strictly_lower, 0)  # [k, j]
    sums = x.cumsum(dim=-2)  # [i, j] = sum_{j < k <= i} a[k]
    lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan over T tokens in chunks.

    x (Bt, T, H, P); dt (Bt, T, H) already discretized (softplus, clamped), fp32;
    A (H,) negative decay rates; B, C (Bt, T, G, N); D (H,); state (Bt, H, P, N) fp32 the
    state before the first token (None: zeros), left as it is. Returns y (Bt, T, H, P)
    fp32 (D skip included) and the state after the last token (Bt, H, P, N) fp32.
    """
    tensors = (x, dt, A, B, C, D, *(() if state is None else (state,)))
    if native_applies(native_ssd_scan_available(), *tensors):
        recurrence = native_ssd_scan
    elif triton_applies(*tensors):
        recurrence = triton_ssd_scan
    else:
        return torch_ssd_chunked(x, dt, A, B, C, D, chunk_size, state)
    Bt, _, H, P = x.shape
    if state is None:
        final = torch.zeros(Bt, H, P, B.shape[-1], dtype=torch.float32, device=x.device)
    else:
        final = state.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    return recurrence(final, x, dt, A, B, C, D), final


def torch_ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ssd_chunked` in PyTorch ops, in the chunked matrix form (any device)."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x32 = x.float()
    # each group's B and C serve H / G consecutive heads
    B = B.float().repeat_interleave(H // G, dim=2)  # (Bt, T, H, N)
    C = C.float().repeat_interleave(H // G, dim=2)
    L = chunk_size
    pad = (L - T % L) % L  # zero-padded steps decay by exp(0) and add nothing
    xdt = F.pad(x32 * dt[..., None], (0, 0, 0, 0, 0, pad))  # (Bt, T', H, P)
    a = F.pad(A.float() * dt, (0, 0, 0, pad))  # (Bt, T', H): log-decay per step
    B = F.pad(B, (0, 0, 0, 0, 0, pad))
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
    Ch = xdt.shape[1] // L
    xdt = xdt.view(Bt, Ch, L, H, P)
    B = B.view(Bt, Ch, L, H, N)
    C = C.view(Bt, Ch, L, H, N)
    a = a.view(Bt, Ch, L, H).permute(0, 3, 1, 2)  # (Bt, H, Ch, L)
    a_cum = a.cumsum(-1)  # (Bt, H, Ch, L): log-decay from the chunk start to step l

    # 1. within each chunk: y_l = sum_{s <= l} (C_l . B_s) decay(s -> l) xdt_s
    decay = torch.exp(_segment_sums(a))  # (Bt, H, Ch, L, L)
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * decay.permute(0, 2, 1, 3, 4)
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)  # (Bt, Ch, L, H, P)

    # 2. the state each chunk adds by its end, as if it started from zero
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (Bt, H, Ch, L)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, xdt)  # (Bt, Ch, H, P, N)

    # 3. carry the states across chunks: start state of chunk c = sum over earlier chunk
    # states (and the initial state) decayed to c's start
    if state is None:
        state = torch.zeros(Bt, H, P, N, dtype=torch.float32, device=x.device)
    states = torch.cat([state.float()[:, None], chunk_states], dim=1)  # (Bt, Ch+1, H, P, N)
    chunk_decay = torch.exp(_segment_sums(F.pad(a_cum[..., -1], (1, 0))))  # (Bt, H, Ch+1, Ch+1)
    carried = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (Bt, Ch+1, H, P, N)
    starts, final = carried[:, :-1], carried[:, -1]

    # 4. what each chunk's start state contributes: C_l state decayed to step l
    from_start = torch.exp(a_cum)  # (Bt, H, Ch, L)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, starts, from_start)

    y = y.reshape(Bt, Ch * L, H, P)[:, :T] + D.float()[:, None] * x32
    return y, final


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One token: updates `state` (Bt, H, P, N) fp32 in place, returns y (Bt, H, P) fp32.

    x (Bt, H, P); dt (Bt, H) discretized; A, D (H,); B, C (Bt, G, N)."""
    if native_applies(
        native_ssd_scan_available(), state, x, dt, A, B, C, D
    ):  # the prefill's kernel: decode == prefill
        return native_ssd_scan(state, x[:, None], dt[:, None], A, B[:, None], C[:, None], D)[:, 0]
    if triton_applies(state, x, dt, A, B, C, D):
        return triton_ssd_scan(state, x[:, None], dt[:, None], A, B[:, None], C[:, None], D)[:, 0]
    return torch_ssd_step(state, x, dt, A, B, C, D)


def torch_ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """`ssd_step` in PyTorch ops (any device)."""
    H, G = x.shape[1], B.shape[1]
    x32 = x.float()
    B = B.float().repeat_interleave(H // G, dim=1)  # (Bt, H, N)
    C = C.float().repeat_interleave(H // G, dim=1)
    decay = torch.exp(dt * A.float())  # (Bt, H)
    state.mul_(decay[..., None, None]).add_((dt[..., None] * x32)[..., None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y + D.float()[:, None] * x32


def native_ssd_scan_available() -> bool:
    """Whether the compiled recurrence is built (an older build may lack it)."""
    return native is not None and hasattr(native, "ssd_scan")


def _prepared(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The kernels' inputs: shapes checked, the state fp32 and contiguous (a copy to
    write back when it was not), the rest contiguous fp32."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    expected = {
        "state": (Bt, H, P, N), "dt": (Bt, T, H), "A": (H,), "B": (Bt, T, G, N),
        "C": (Bt, T, G, N), "D": (H,),
    }  # fmt: skip
    for name, t in zip(expected, (state, dt, A, B, C, D), strict=True):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"ssd scan: {name} is {tuple(t.shape)}, expected {expected[name]}")
    if H % G:
        raise ValueError(f"ssd scan: {G} groups do not divide {H} heads")
    if state.dtype != torch.float32:
        raise ValueError(f"ssd scan: the state must be float32, got {state.dtype}")
    S = state if state.is_contiguous() else state.contiguous()
    return (S, *(t.to(torch.float32).contiguous() for t in (x, dt, A, B, C, D)))


def native_ssd_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """The recurrence over T tokens by the compiled kernel (CPU): `state` (Bt, H, P, N)
    fp32 advanced in place; x (Bt, T, H, P); dt (Bt, T, H) discretized; A, D (H,);
    B, C (Bt, T, G, N). Returns y (Bt, T, H, P) fp32, D skip included. Per (sequence,
    head) the same bits however the tokens are cut into calls."""
    S, x, dt, A, B, C, D = _prepared(state, x, dt, A, B, C, D)
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    y = torch.empty(Bt, T, H, P, dtype=torch.float32)
    native.ssd_scan(
        S.data_ptr(), x.data_ptr(), dt.data_ptr(), A.data_ptr(), D.data_ptr(), B.data_ptr(),
        C.data_ptr(), y.data_ptr(), Bt, T, H, P, G, N, torch.get_num_threads(),
    )  # fmt: skip
    if S is not state:
        state.copy_(S)
    return y


def triton_ssd_scan(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    block_p: int | None = None,
) -> torch.Tensor:
    """`native_ssd_scan`'s recurrence by the Triton kernel (nn/triton_scan.py; CUDA, or
    any device in Triton's interpreter), same arguments: each block of a head's
    channels keeps its (P, N) state rows in registers over all T tokens; decode is
    T = 1 of the same kernel. `block_p` overrides the head channels per program."""
    from falconet.nn import triton_scan

    S, x, dt, A, B, C, D = _prepared(state, x, dt, A, B, C, D)
    y = triton_scan.ssd_scan(S, x, dt, A, B, C, D, block_p)
    if S is not state:
        state.copy_(S)
    return y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal conv over time. x (Bt, T, Ch) -> (Bt, T, Ch), no activation.

    weight (Ch, 1, K). conv_state (Bt, Ch, K-1) holds the previous K-1 inputs (zeros at the
    start, which is the zero padding of a fresh sequence); it is updated in place."""
    K = weight.shape[-1]
    xt = x.transpose(1, 2)  # (Bt, Ch, T)
    if conv_state is None:
        past = xt.new_zeros(xt.shape[0], xt.shape[1], K - 1)
    else:
        past = conv_state.to(xt.dtype)
    window = torch.cat([past, xt], dim=-1)  # (Bt, Ch, K-1+T)
    if conv_state is not None:
        conv_state.copy_(window[..., window.shape[-1] - (K - 1) :])
    bias = None if bias is None else bias.to(xt.dtype)
    y = F.conv1d(window, weight.to(xt.dtype), bias, groups=xt.shape[1])  # (Bt, Ch, T)
    return y.transpose(1, 2)
