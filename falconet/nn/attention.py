"""Attention pieces shared by every Falcon variant: positions, rotary, ALiBi, masks, SDPA.

Notation: B batch, T new tokens (queries), S keys (cached + new), H query heads,
K kv heads (1 for multi-query, 8 for 40B, H for MHA), D head dim.

Keys and values stay at K heads all the way into `scaled_dot_product_attention`
(`enable_gqa`), so multi-query and grouped models never materialise H copies of K/V.
PyTorch's CPU flash kernel takes a mask and GQA and needs no (T, S) score matrix, so
attention memory grows with T·S only through the mask, which callers bound by chunking
long prompts (see `prefill_chunk_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from falconet.nn import elementwise

try:
    from falconet.quant import _kernels as native
except ImportError:  # built without a C compiler: SDPA everywhere
    native = None


class AttentionConfig(Protocol):
    """What attention reads from a model's config (every architecture's config has it)."""

    num_attention_heads: int
    head_dim: int
    alibi: bool
    rope_theta: float
    rope_scaling_type: str | None
    rope_scaling_factor: float
    max_position_embeddings: int


class AttentionStep(Protocol):
    """How one forward stores new keys/values and attends: `cache.DenseStep` for a padded
    batch with an optional static cache, the engine's `PackedStep` for continuous batching.
    Models call it once per layer and never see how keys are stored."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


# Upper bound on mask elements (B·H·T·S) built for one forward; prompts are cut into
# query chunks so that an 8k-token prompt never needs a T² mask.
MASK_BUDGET = 1 << 25


def prefill_chunk_size(config: AttentionConfig, batch: int, keys: int, max_chunk: int = 512) -> int:
    """Query tokens per prefill chunk so the attention mask stays within MASK_BUDGET."""
    heads = config.num_attention_heads if config.alibi else 1  # ALiBi bias is per head
    return max(1, min(max_chunk, MASK_BUDGET // max(1, batch * heads * keys)))


# ---- rotary -------------------------------------------------------------------------
def rotary_inv_freq(config: AttentionConfig, seq_len: torch.Tensor) -> torch.Tensor:
    """Inverse frequencies (B, D/2) as transformers computes them, rope_scaling included.

    seq_len (B,) is each row's sequence length. "linear" divides the frequencies by the
    factor; "dynamic" (NTK) raises the base once a row outgrows max_position_embeddings,
    with transformers' fp32 arithmetic; "llama3" rescales by wavelength (below); a llama
    GGUF's `rope_freq_factors` divide them as llama.cpp does. Per row,
    so a row in a batch (or a prompt prefilled in chunks) rotates exactly as it would
    alone in one forward.
    """
    d = config.head_dim
    theta = float(config.rope_theta)
    factor = float(config.rope_scaling_factor)
    max_pos = config.max_position_embeddings
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = (1.0 / (theta**exponents)).expand(len(seq_len), -1)
    grown = seq_len > max_pos
    if config.rope_scaling_type == "dynamic" and bool(grown.any()):
        length = seq_len.long().cpu()
        base = theta * ((factor * length / max_pos) - (factor - 1)) ** (d / (d - 2))  # (B,) fp32
        inv_freq = torch.where(grown.cpu()[:, None], 1.0 / (base[:, None] ** exponents), inv_freq)
    if config.rope_scaling_type == "linear":
        inv_freq = inv_freq / factor
    if config.rope_scaling_type == "llama3":
        inv_freq = llama3_inv_freq(
            inv_freq,
            factor,
            config.rope_low_freq_factor,
            config.rope_high_freq_factor,
            config.rope_original_max_position_embeddings,
        )
    factors = getattr(config, "rope_freq_factors", None)  # a llama GGUF's rope_freqs
    if factors:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, original_len: int
) -> torch.Tensor:
    """Llama 3.1's scaling, in transformers' `_compute_llama3_parameters` fp32 arithmetic:
    wavelengths shorter than original_len / high keep their frequency, those longer than
    original_len / low are divided by `factor`, and the band between is interpolated."""
    low_freq_wavelen = original_len / low
    high_freq_wavelen = original_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(
    config: AttentionConfig, positions: torch.Tensor, seq_len: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for `positions` (B, T) -> each (B, 1, T, D), computed in fp32 as
    HF does. The sin's first half is negated: rotate_half's minus sign, applied once per
    forward instead of once per layer (see apply_rotary)."""
    inv_freq = rotary_inv_freq(config, seq_len).to(positions.device)  # (B, D/2)
    freqs = positions[..., None].float() * inv_freq[:, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    sin = emb.sin().to(dtype)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return emb.cos().to(dtype)[:, None], signed_sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation of the full head dim: x*cos + rotate_half(x)*sin, with
    rotate_half(x)*sin = [-x2, x1]*sin = roll(x)*signed_sin -- the same products,
    bit for bit ((-a)*b == a*(-b)), in fewer operations (a decode step runs this 24-80
    times). fp32 on a CPU outside autograd: one compiled pass with the same three
    roundings, so the same bits (kernels_norm.h)."""
    if _rotary_compiled(x, cos, signed_sin):
        B, H, T, D = x.shape
        # laid out as torch's ops would lay it out (x's dimension order, dense): what
        # follows may take another path -- slower, or other bits -- for another layout
        order = sorted(range(3), key=lambda d: -x.stride(d)) + [3]  # D: unit stride
        y = torch.empty([x.shape[d] for d in order]).permute([order.index(d) for d in range(4)])
        native.rotary(
            x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(),
            signed_sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2),
            y.data_ptr(), y.stride(0), y.stride(1), y.stride(2), B, H, T, D,
        )  # fmt: skip
        return y
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _rotary_compiled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """x (B, H, T, D) with unit stride along D, cos and signed_sin (B or 1, 1, T, D) of
    one layout with unit stride along D: fp32 CPU tensors outside autograd."""
    return (
        elementwise.compiled(x, cos, signed_sin)
        and x.dim() == cos.dim() == 4
        and cos.shape == signed_sin.shape
        and cos.stride() == signed_sin.stride()
        and cos.shape[1:] == (1, *x.shape[2:])
        and cos.shape[0] in (1, x.shape[0])
        and x.stride(-1) == cos.stride(-1) == 1
    )


# ---- ALiBi --------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes (fp32), the geometric sequence of Press et al. as Falcon builds it."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def heads_alibi_slopes(config) -> torch.Tensor | None:
    """The slopes of the heads a model of `config` computes (None without ALiBi). A
    tensor-parallel rank's config holds heads [first_head, first_head + its count) of the
    whole model's `total_heads`, so its slopes are that slice of the whole model's."""
    if not config.alibi:
        return None
    total = getattr(config, "total_heads", config.num_attention_heads)
    first = getattr(config, "first_head", 0)
    return alibi_slopes(total)[first : first + config.num_attention_heads]


def alibi_bias(
    slopes: torch.Tensor, key_positions: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """(B, H, 1, S) additive bias from each key's position among the real tokens.

    Parity quirks kept on purpose (transformers' `build_alibi_tensor` + SDPA path): the
    bias uses the key's absolute position (softmax-equivalent to -(i-j)), the product
    slope*position is rounded to bf16, and the bias is divided by sqrt(head_dim) along
    with QK^T (unlike BLOOM).
    """
    bias = (
        slopes.to(key_positions.device)[None, :, None].bfloat16() * key_positions[:, None, :]
    )  # (B, H, S)
    return (bias.to(dtype) / math.sqrt(head_dim))[:, :, None, :]


# ---- masks --------------------------------------------------------------------------
@dataclass
class AttentionMask:
    """What every layer of one forward needs: a boolean or additive mask, or `causal`."""

    mask: torch.Tensor | None  # (B, 1|H, T, S): bool (True = attend) or additive float
    causal: bool = False  # True: no mask, plain causal over T == S keys


def build_mask(
    query_positions: torch.Tensor,
    key_valid: torch.Tensor,
    key_positions: torch.Tensor,
    past: int,
    config: AttentionConfig,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
) -> AttentionMask:
    """Mask for T new queries stored at slots [past, past+T) attending to S = past+T keys.

    key_valid (B, S) marks real tokens (False for left padding). A padded query may
    attend to itself so no row is fully masked (that would give NaN in SDPA); its
    output is never used.
    """
    B, T = query_positions.shape
    S = key_valid.shape[1]
    no_padding = bool(key_valid.all())
    if slopes is None and no_padding:
        if past == 0:
            return AttentionMask(None, causal=T > 1)
        if T == 1:
            return AttentionMask(None)
    slot_q = torch.arange(past, past + T, device=key_valid.device)  # (T,)
    slot_k = torch.arange(S, device=key_valid.device)  # (S,)
    allowed = (slot_k[None, :] <= slot_q[:, None])[None] & key_valid[:, None, :]  # (B, T, S)
    allowed |= slot_k[None, None, :] == slot_q[None, :, None]
    allowed = allowed[:, None]  # (B, 1, T, S)
    if slopes is None:
        return AttentionMask(allowed)
    bias = alibi_bias(slopes, key_positions, config.head_dim, dtype)  # (B, H, 1, S)
    return AttentionMask(bias.masked_fill(~allowed, torch.finfo(dtype).min))


# the compiled decode attention's pool dtypes (kernels_float.h's W_F32, W_BF16, W_F16)
POOL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pooled_decode_applies(pool: torch.Tensor) -> bool:
    """Whether `pooled_decode_attention` can read this KV pool (compiled, CPU, a float dtype)."""
    return (
        native is not None
        and hasattr(native, "decode_attention")
        and pool.device.type == "cpu"
        and pool.dtype in POOL_DTYPES
        and pool.is_contiguous()
    )


def pooled_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One query token per sequence against its keys where they lie in the paged pool.

    q (B, H, D); pools (slots, K, D); slots int64, sequence b's keys (in position order)
    at [starts[b], starts[b+1]); bias None or (H, >= longest S) fp32 by key position
    (ALiBi). -> (B, H, D) in q's dtype, SDPA's 1/sqrt(D) scale. What SDPA computes with
    gathered keys and an all-true mask, without the gather (kernels_attention.h): each
    (sequence, head) in one fixed order, so batching never changes a sequence's bits.
    """
    B, H, D = q.shape
    K = k_pool.shape[1]
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    native.decode_attention(
        qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), POOL_DTYPES[k_pool.dtype],
        slots.data_ptr(), starts.data_ptr(), B, H, K, D,
        0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.shape[1],
        1.0 / math.sqrt(D), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, K, S, D) -> (B, H, T, D) with SDPA's 1/sqrt(D) scale."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.mask, is_causal=mask.causal, enable_gqa=k.shape[1] != q.shape[1]
    )
