"""The compiled scans (falconet/quant/kernels_scan.h) against their PyTorch paths:
Mamba-1's selective scan (nn/selective_scan.py) and Mamba-2's recurrence (nn/ssd.py).
Within rounding on random inputs of odd sizes, the same bits however the tokens are cut
into calls or sequences into batches, the portable C path equal to the AVX2 path, and
clear errors for bad shapes. Model-level parity with transformers is in
tests/test_falcon_mamba.py (both paths) and tests/test_falcon_h1.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from falconet.nn import selective_scan as scan
from falconet.nn import ssd

needs_kernel = pytest.mark.skipif(
    not (scan.native_scan_available() and ssd.native_ssd_scan_available()),
    reason="compiled kernels not built (python setup.py build_ext --inplace)",
)


def avx2_or_skip():
    try:
        scan.native.set_simd("avx2")
    except ValueError:
        pytest.skip("no AVX2 on this CPU")


# (batch, tokens, E channels, N states): E off the 8-lane blocks, N odd and Mamba-1's 16
SHAPES = [(1, 1, 8, 16), (2, 37, 13, 5), (3, 70, 19, 3), (1, 129, 64, 16), (2, 9, 1, 1)]


def inputs(batch: int, T: int, E: int, N: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """h, u, dt, A, B, C as the mixer makes them: dt a softplus, A = -exp(A_log)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, E, N, generator=g)
    u = torch.randn(batch, T, E, generator=g)
    dt = F.softplus(torch.randn(batch, T, E, generator=g) - 1)
    A = -torch.exp(torch.randn(E, N, generator=g))
    B = torch.randn(batch, T, N, generator=g)
    C = torch.randn(batch, T, N, generator=g)
    return h, u, dt, A, B, C


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_pytorch_path(shape):
    h, u, dt, A, B, C = inputs(*shape)
    h_ref, h_got = h.clone(), h.clone()
    ref = scan.torch_selective_scan(h_ref, u, dt, A, B, C)
    got = scan.native_selective_scan(h_got, u, dt, A, B, C)
    assert got.shape == ref.shape == u.shape
    assert rel_diff(got, ref) <= 1e-5
    assert rel_diff(h_got, h_ref) <= 1e-5
    assert not torch.equal(h_got, h)  # the state did advance


@needs_kernel
def test_kernel_matches_the_pytorch_path_over_a_long_run():
    # 600 tokens: decays compound and the state's fp32 rounding accumulates in both paths
    h, u, dt, A, B, C = inputs(1, 600, 24, 16, seed=3)
    h_ref, h_got = h.clone(), h.clone()
    ref = scan.torch_selective_scan(h_ref, u, dt, A, B, C)
    got = scan.native_selective_scan(h_got, u, dt, A, B, C)
    assert rel_diff(got, ref) <= 1e-5 and rel_diff(h_got, h_ref) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("cut", [1, 5, 64])
def test_kernel_gives_the_same_bits_in_pieces_and_batches(cut):
    h, u, dt, A, B, C = inputs(3, 70, 19, 5, seed=1)
    whole_h = h.clone()
    whole = scan.native_selective_scan(whole_h, u, dt, A, B, C)
    # the tokens in pieces of `cut` (cut 1 is decode: selective_step)
    piece_h = h.clone()
    if cut == 1:
        ys = [
            scan.selective_step(piece_h, u[:, t], dt[:, t], A, B[:, t], C[:, t])[:, None]
            for t in range(u.shape[1])
        ]
    else:
        ys = [
            scan.selective_scan(
                piece_h,
                *(x[:, s : s + cut] for x in (u, dt)),
                A,
                *(x[:, s : s + cut] for x in (B, C)),
            )  # fmt: skip
            for s in range(0, u.shape[1], cut)
        ]
    assert torch.equal(torch.cat(ys, dim=1), whole) and torch.equal(piece_h, whole_h)
    # each sequence alone, and with one thread: its own bits
    for b in range(3):
        alone_h = h[b : b + 1].clone()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            alone = scan.native_selective_scan(
                alone_h, u[b : b + 1], dt[b : b + 1], A, B[b : b + 1], C[b : b + 1]
            )
        finally:
            torch.set_num_threads(before)
        assert torch.equal(alone[0], whole[b]) and torch.equal(alone_h[0], whole_h[b])


@needs_kernel
def test_portable_path_gives_the_avx2_bits():
    native = scan.native
    avx2_or_skip()
    h, u, dt, A, B, C = inputs(2, 37, 13, 5, seed=2)
    fast_h = h.clone()
    fast = scan.native_selective_scan(fast_h, u, dt, A, B, C)
    native.set_simd("portable")
    try:
        slow_h = h.clone()
        slow = scan.native_selective_scan(slow_h, u, dt, A, B, C)
    finally:
        native.set_simd("avx2")
    assert torch.equal(slow, fast) and torch.equal(slow_h, fast_h)


@needs_kernel
def test_a_strided_state_is_advanced_in_place():
    # the model's state is one (layers, batch, E, N) tensor; a row slice of a layer is strided
    h, u, dt, A, B, C = inputs(2, 11, 13, 5, seed=4)
    pool = torch.zeros(2, 4, 13, 5)
    pool[1, [0, 2]] = h
    view = pool[1, ::2]
    assert not view.is_contiguous()
    ref_h = h.clone()
    ref = scan.native_selective_scan(ref_h, u, dt, A, B, C)
    got = scan.native_selective_scan(view, u, dt, A, B, C)
    assert torch.equal(got, ref) and torch.equal(pool[1, [0, 2]], ref_h)
    assert torch.equal(pool[1, [1, 3]], torch.zeros(2, 13, 5))


@needs_kernel
def test_selective_scan_takes_the_kernel_on_cpu():
    h, u, dt, A, B, C = inputs(2, 37, 13, 5)
    kernel_h, dispatched_h = h.clone(), h.clone()
    kernel = scan.native_selective_scan(kernel_h, u, dt, A, B, C)
    assert torch.equal(scan.selective_scan(dispatched_h, u, dt, A, B, C), kernel)
    assert torch.equal(dispatched_h, kernel_h)


def test_without_the_kernel_the_pytorch_path_runs(monkeypatch):
    monkeypatch.setattr(scan, "native", None)
    assert not scan.native_scan_available()
    h, u, dt, A, B, C = inputs(2, 37, 13, 5)
    ref_h, got_h = h.clone(), h.clone()
    ref = scan.torch_selective_scan(ref_h, u, dt, A, B, C)
    assert torch.equal(scan.selective_scan(got_h, u, dt, A, B, C), ref)
    assert torch.equal(got_h, ref_h)


@needs_kernel
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda h, u, dt, A, B, C: (h[:, :-1], u, dt, A, B, C), "h is"),
        (lambda h, u, dt, A, B, C: (h, u, dt[:, 1:], A, B, C), "dt is"),
        (lambda h, u, dt, A, B, C: (h, u, dt, A[:, :-1], B, C), "h is"),
        (lambda h, u, dt, A, B, C: (h, u, dt, A, B, C[..., 1:]), "C is"),
        (lambda h, u, dt, A, B, C: (h.double(), u, dt, A, B, C), "float32"),
    ],
)
def test_bad_shapes_are_value_errors(bad, message):
    args = bad(*inputs(2, 5, 13, 5))
    with pytest.raises(ValueError, match=message):
        scan.native_selective_scan(*args)


# ---- Mamba-2 ----------------------------------------------------------------------------

# (batch, tokens, heads, head dim P, groups, state N): P and N off the 8 lanes, several
# groups, H1-0.5B's head (64, 128) and a single state
SSD_SHAPES = [
    (2, 19, 6, 5, 3, 4), (1, 1, 24, 64, 1, 128), (2, 70, 4, 13, 2, 9), (1, 130, 3, 64, 1, 128),
    (3, 5, 2, 3, 1, 1),
]  # fmt: skip


def ssd_inputs(Bt: int, T: int, H: int, P: int, G: int, N: int, seed: int = 0):
    """state, x, dt, A, B, C, D as the H1 mixer makes them (dt discretized, A < 0)."""
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(Bt, H, P, N, generator=g)
    x = torch.randn(Bt, T, H, P, generator=g)
    dt = F.softplus(torch.randn(Bt, T, H, generator=g) - 1)
    A = -torch.exp(torch.randn(H, generator=g))
    B, C = torch.randn(Bt, T, G, N, generator=g), torch.randn(Bt, T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    return state, x, dt, A, B, C, D


@needs_kernel
@pytest.mark.parametrize("shape", SSD_SHAPES)
def test_ssd_kernel_matches_both_pytorch_forms(shape):
    state, x, dt, A, B, C, D = ssd_inputs(*shape)
    ref, ref_final = ssd.torch_ssd_chunked(x, dt, A, B, C, D, 8, state)
    S = state.clone()
    steps = torch.stack(
        [
            ssd.torch_ssd_step(S, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
            for t in range(x.shape[1])
        ],
        dim=1,
    )
    before = state.clone()
    got, final = ssd.ssd_chunked(x, dt, A, B, C, D, 8, state)
    assert torch.equal(state, before)  # the caller's state is left as it was
    assert got.shape == x.shape and final.shape == state.shape
    assert rel_diff(got, ref) <= 1e-5 and rel_diff(final, ref_final) <= 1e-5
    assert rel_diff(got, steps) <= 1e-5 and rel_diff(final, S) <= 1e-5


@needs_kernel
def test_ssd_kernel_from_zeros_equals_the_pytorch_path():
    _, x, dt, A, B, C, D = ssd_inputs(2, 33, 4, 16, 2, 24, seed=5)
    ref, ref_final = ssd.torch_ssd_chunked(x, dt, A, B, C, D, 16)
    got, final = ssd.ssd_chunked(x, dt, A, B, C, D, 16)
    assert rel_diff(got, ref) <= 1e-5 and rel_diff(final, ref_final) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("cut", [1, 4, 128])
def test_ssd_kernel_gives_the_same_bits_in_pieces_and_batches(cut):
    state, x, dt, A, B, C, D = ssd_inputs(3, 41, 6, 12, 3, 20, seed=6)
    whole, final = ssd.ssd_chunked(x, dt, A, B, C, D, 128, state)
    S = state.clone()
    if cut == 1:  # decode
        ys = [
            ssd.ssd_step(S, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)[:, None] for t in range(41)
        ]
    else:
        ys = []
        for s in range(0, 41, cut):
            y, S = ssd.ssd_chunked(*(t[:, s : s + cut] for t in (x, dt)), A,
                                   *(t[:, s : s + cut] for t in (B, C)), D, 128, S)  # fmt: skip
            ys.append(y)
    assert torch.equal(torch.cat(ys, dim=1), whole) and torch.equal(S, final)
    for b in range(3):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            alone, alone_final = ssd.ssd_chunked(
                *(t[b : b + 1] for t in (x, dt)), A, *(t[b : b + 1] for t in (B, C)), D, 128,
                state[b : b + 1],
            )  # fmt: skip
        finally:
            torch.set_num_threads(before)
        assert torch.equal(alone[0], whole[b]) and torch.equal(alone_final[0], final[b])


@needs_kernel
def test_ssd_portable_path_gives_the_avx2_bits():
    avx2_or_skip()
    state, x, dt, A, B, C, D = ssd_inputs(2, 23, 4, 13, 2, 21, seed=7)
    fast, fast_final = ssd.ssd_chunked(x, dt, A, B, C, D, 8, state)
    ssd.native.set_simd("portable")
    try:
        slow, slow_final = ssd.ssd_chunked(x, dt, A, B, C, D, 8, state)
    finally:
        ssd.native.set_simd("avx2")
    assert torch.equal(slow, fast) and torch.equal(slow_final, fast_final)


@needs_kernel
def test_ssd_step_advances_a_strided_state_in_place():
    state, x, dt, A, B, C, D = ssd_inputs(2, 1, 4, 5, 2, 6, seed=8)
    pool = torch.zeros(3, 4, 4, 5, 6)  # (layers, batch slots, H, P, N)
    pool[2, [1, 3]] = state
    view = pool[2, 1::2]
    assert not view.is_contiguous()
    ref_state = state.clone()
    ref = ssd.ssd_step(ref_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    got = ssd.ssd_step(view, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert torch.equal(got, ref) and torch.equal(pool[2, [1, 3]], ref_state)
    assert torch.equal(pool[2, [0, 2]], torch.zeros(2, 4, 5, 6))


def test_without_the_kernel_ssd_runs_the_pytorch_forms(monkeypatch):
    monkeypatch.setattr(ssd, "native", None)
    state, x, dt, A, B, C, D = ssd_inputs(2, 19, 6, 5, 3, 4)
    ref, ref_final = ssd.torch_ssd_chunked(x, dt, A, B, C, D, 8, state)
    got, final = ssd.ssd_chunked(x, dt, A, B, C, D, 8, state)
    assert torch.equal(got, ref) and torch.equal(final, ref_final)
    S, T = state.clone(), state.clone()
    step = ssd.ssd_step(S, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert torch.equal(step, ssd.torch_ssd_step(T, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D))
    assert torch.equal(S, T)


@needs_kernel
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda S, x, dt, A, B, C, D: (S[..., :-1], x, dt, A, B, C, D), "state is"),
        (lambda S, x, dt, A, B, C, D: (S, x, dt[..., :-1], A, B, C, D), "dt is"),
        (lambda S, x, dt, A, B, C, D: (S, x, dt, A[:-1], B, C, D), "A is"),
        (lambda S, x, dt, A, B, C, D: (S, x, dt, A, B, C[:, :-1], D), "C is"),
        (
            lambda S, x, dt, A, B, C, D: (
                S,
                x,
                dt,
                A,
                B[:, :, :1].expand(-1, -1, 4, -1),
                C[:, :, :1].expand(-1, -1, 4, -1),
                D,
            ),
            "4 groups",
        ),  # fmt: skip
        (lambda S, x, dt, A, B, C, D: (S.double(), x, dt, A, B, C, D), "float32"),
    ],
)
def test_ssd_bad_shapes_are_value_errors(bad, message):
    args = bad(*ssd_inputs(2, 5, 6, 5, 3, 4))
    with pytest.raises(ValueError, match=message):
        ssd.native_ssd_scan(*args)
