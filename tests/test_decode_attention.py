"""The compiled decode attention (kernels_attention.h): one query per sequence read
against its keys where they lie in the paged pool, checked against PyTorch's SDPA on the
gathered keys, and for the bit-exactness batching relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from falconet.nn import attention
from falconet.nn.attention import alibi_bias, alibi_slopes, pooled_decode_attention
from tests.conftest import on_both_simd_paths

pytestmark = pytest.mark.skipif(attention.native is None, reason="compiled kernels not built")


def pools(slots: int, K: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, K, D, generator=g).to(dtype)
    v = torch.randn(slots, K, D, generator=g).to(dtype)
    return k, v


def scattered(lengths: list[int], slots: int, seed: int = 1) -> list[torch.Tensor]:
    """Each sequence's key slots: disjoint, in no particular order in the pool."""
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))
    out, at = [], 0
    for n in lengths:
        out.append(perm[at : at + n])
        at += n
    return out


def run(q, k, v, seq_slots, bias=None):
    starts = torch.tensor([0] + [len(s) for s in seq_slots]).cumsum(0)
    return pooled_decode_attention(q, k, v, torch.cat(seq_slots), starts, bias)


def reference(q, k, v, seq_slots, bias=None):
    """SDPA in float64 on each sequence's gathered keys."""
    outs = []
    for b, sl in enumerate(seq_slots):
        keys = k[sl].double().transpose(0, 1)[None]  # (1, K, S, D)
        values = v[sl].double().transpose(0, 1)[None]
        mask = None if bias is None else bias[:, : len(sl)].double()[None, :, None, :]
        o = F.scaled_dot_product_attention(
            q[b : b + 1, :, None].double(), keys, values, attn_mask=mask, enable_gqa=True
        )
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("H,K,D", [(32, 1, 64), (16, 4, 128), (8, 8, 40), (6, 2, 13)])
def test_matches_sdpa_on_the_gathered_keys(H, K, D):
    """Multi-query, grouped and full multi-head; head dims with and without an 8-lane tail."""
    k, v = pools(300, K, D, torch.float32)
    lengths = [1, 7, 64, 129]
    seq_slots = scattered(lengths, 300)
    q = torch.randn(len(lengths), H, D)
    ours = run(q, k, v, seq_slots)
    want = reference(q, k, v, seq_slots)
    assert ours.dtype == torch.float32 and ours.shape == (len(lengths), H, D)
    # fp32 sums of S products: a few ulps of the largest value
    assert (ours.double() - want).abs().max() < 1e-5


def test_alibi_bias_as_the_mask_path_adds_it():
    H, D = 8, 64
    k, v = pools(200, H, D, torch.float32, seed=3)
    seq_slots = scattered([5, 150], 200, seed=4)
    bias = alibi_bias(alibi_slopes(H), torch.arange(150)[None], D, torch.float32)[0, :, 0]
    q = torch.randn(2, H, D) * 4  # large scores: the bias changes which keys win
    ours = run(q, k, v, seq_slots, bias)
    assert (ours.double() - reference(q, k, v, seq_slots, bias)).abs().max() < 1e-5
    assert (ours - run(q, k, v, seq_slots)).abs().max() > 1e-3  # the bias did something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_pools_widen_exactly(dtype):
    """A bf16/fp16 pool is read as its exact fp32 values: the result equals the fp32 kernel
    on the widened pool, bit for bit, and bf16 queries come back as bf16."""
    k, v = pools(100, 2, 64, dtype)
    seq_slots = scattered([33, 99], 100)
    q = torch.randn(2, 8, 64)
    assert torch.equal(run(q, k, v, seq_slots), run(q, k.float(), v.float(), seq_slots))
    assert run(q.to(dtype), k, v, seq_slots).dtype == dtype


def test_a_batch_equals_each_sequence_alone_at_any_thread_count():
    k, v = pools(600, 1, 64, torch.float32, seed=5)
    lengths = [3, 200, 17, 250, 100]
    seq_slots = scattered(lengths, 600, seed=6)
    q = torch.randn(len(lengths), 32, 64)
    batch = run(q, k, v, seq_slots)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(run(q, k, v, seq_slots), batch)
            for b in range(len(lengths)):
                assert torch.equal(run(q[b : b + 1], k, v, seq_slots[b : b + 1])[0], batch[b])
    finally:
        torch.set_num_threads(before)


def test_portable_path_gives_the_avx2_bits():
    k, v = pools(300, 2, 72, torch.bfloat16, seed=7)  # 72: a tail of 0 lanes after 9 vectors
    seq_slots = scattered([9, 130], 300, seed=8)  # 130 keys: the exps' 8-wide body and tail
    bias = alibi_bias(alibi_slopes(4), torch.arange(130)[None], 72, torch.float32)[0, :, 0]
    q = torch.randn(2, 4, 72)
    fast, portable = on_both_simd_paths(attention.native, lambda: run(q, k, v, seq_slots, bias))
    assert torch.equal(portable, fast)


def test_extreme_scores_stay_finite():
    """exp(s - max): huge logits neither overflow nor turn the weights into NaN."""
    k, v = pools(50, 1, 64, torch.float32)
    k[:10] *= 1e3
    seq_slots = scattered([40], 50)
    q = torch.randn(1, 4, 64) * 1e3
    out = run(q, k, v, seq_slots)
    assert torch.isfinite(out).all()
    assert (out.double() - reference(q, k, v, seq_slots)).abs().max() < 1e-4 * math.sqrt(64)


def test_bad_arguments_are_refused():
    native = attention.native
    q = torch.zeros(1, 6, 8)
    k = torch.zeros(4, 4, 8)
    with pytest.raises(ValueError, match="H a multiple of K"):
        native.decode_attention(
            q.data_ptr(), k.data_ptr(), k.data_ptr(), 0, 0, 0, 1, 6, 4, 8, 0, 0, 1.0, 0, 1
        )
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        native.decode_attention(
            q.data_ptr(), k.data_ptr(), k.data_ptr(), 7, 0, 0, 1, 4, 4, 8, 0, 0, 1.0, 0, 1
        )
