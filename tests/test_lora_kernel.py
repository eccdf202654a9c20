"""The compiled LoRA update of decode rows (kernels_lora.h, used by nn/lora.py): each row
through its own adapter, added in place to the layer's fp32 or bf16 output; checked
against a float64 reference, torch's bf16 rounding, and for the bits batching relies on
(a row alone == the row among others, any thread count, AVX2 == portable)."""

from __future__ import annotations

import pytest
import torch

from falconet.nn import lora
from falconet.nn.lora import AdapterRows, LoRA, Stack
from tests.conftest import on_both_simd_paths

pytestmark = pytest.mark.skipif(lora.native is None, reason="compiled kernels not built")

RANKS = (4, 16, 2)  # three adapters side by side, unequal ranks


def stack(K: int, N: int, seed: int = 0) -> Stack:
    g = torch.Generator().manual_seed(seed)
    loras = {
        i: LoRA.from_tensors(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), s)
        for i, (r, s) in enumerate(zip(RANKS, (0.5, 2.0, 1.5), strict=True))
    }
    return Stack.of(loras)


def update(st, x, y, adapters, rows):
    """`y` with the kernel's update of `rows`, row rows[i] through adapter adapters[i] (x
    holds every row, as the layer's input). The rows go in the order the engine's plans
    give them: grouped by adapter."""
    rows_of = {}
    for a, r in zip(adapters, rows, strict=True):
        rows_of.setdefault(a, []).append(r)
    step = AdapterRows(tuple((a, torch.tensor(r)) for a, r in rows_of.items()), total=x.shape[0])
    y = y.clone()
    lora.kernel_update(st, x, y, step.kernel_plan(st))
    return y


@pytest.mark.parametrize("K,N", [(64, 96), (37, 29)])  # 37, 29: tails past the 8 lanes
def test_matches_a_float64_reference(K, N):
    st = stack(K, N)
    x, y = torch.randn(6, K), torch.randn(6, N)
    adapters, rows = [0, 1, 2, 1], [0, 2, 3, 5]
    got = update(st, x, y, adapters, rows)
    want = y.double().clone()
    cols = {i: (start, stop, scaling) for i, start, stop, scaling in st.columns}
    for a, r in zip(adapters, rows, strict=True):
        start, stop, scaling = cols[a]
        A, B = st.A.weight[start:stop].double(), st.B.weight[:, start:stop].double()
        want[r] += scaling * (B @ (A @ x[r].double()))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[[1, 4]], y[[1, 4]])  # rows without an adapter are untouched


def test_bf16_output_rounds_as_torch():
    """y (bf16) + d is rounded once, as (y.float() + d).to(bfloat16)."""
    st = stack(40, 72)
    x = torch.randn(5, 40)
    y = torch.randn(5, 72).to(torch.bfloat16)
    adapters, rows = [2, 0, 1, 1, 0], [0, 1, 2, 3, 4]
    d = update(st, x, torch.zeros(5, 72), adapters, rows)  # 0 + d == d exactly
    got = update(st, x, y, adapters, rows)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (y.float() + d).to(torch.bfloat16))


def test_a_row_alone_has_its_bits_among_others_and_any_threads():
    st = stack(128, 256)
    x, y = torch.randn(9, 128), torch.randn(9, 256)
    adapters, rows = [0, 1, 2, 0, 1, 2, 0, 1, 2], list(range(9))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = update(st, x, y, adapters, rows)
        torch.set_num_threads(1)
        assert torch.equal(update(st, x, y, adapters, rows), together)
    finally:
        torch.set_num_threads(before)
    for r in range(9):
        alone = update(st, x, y, [adapters[r]], [r])
        assert torch.equal(alone[r], together[r])


def test_portable_path_gives_the_avx2_bits():
    st = stack(45, 83)  # tails in both K and N
    x = torch.randn(4, 45)
    for y in (torch.randn(4, 83), torch.randn(4, 83).to(torch.bfloat16)):
        fast, portable = on_both_simd_paths(
            lora.native, lambda y=y: update(st, x, y, [1, 0, 2, 1], [0, 1, 2, 3])
        )
        assert torch.equal(portable, fast)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lora_rows needs"):
        lora.native.lora_rows(0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1)  # K = 0
