"""The Falcon decoder: every variant in one file.

Falcon (TII, 2023) is a decoder-only transformer: token embeddings (no scaling, no
embedding norm) -> N blocks -> final LayerNorm -> LM head (tied to the embeddings except
in Falcon2-11B). The variants differ only inside the block:

- attention heads: MHA (falcon-rw-1b), multi-query with one K/V head (falcon-7b), or
  grouped with K K/V heads shared by H/K query heads each (falcon-40b/180b, Falcon2-11B);
- position: ALiBi (rw) or rotary with optional linear/dynamic scaling (all others);
- residual wiring, as drawn below.

    sequential (rw)                 parallel (7b, 11b)            parallel_2ln (40b, 180b)
    x ─┬─ LN1 ─ attn ─┐             x ─┬─ LN ─┬─ attn ─┐          x ─┬─ ln_attn ─ attn ─┐
       └──────────────+─ h          │        └─ mlp  ─+           ├─ ln_mlp ── mlp ──+
    h ─┬─ LN2 ─ mlp ──┐             └─────────────────+─ out      └──────────────────+─ out
       └──────────────+─ out

Module and parameter names follow transformers' FalconForCausalLM, so an HF state dict
maps one to one; only the fused QKV weight is regrouped at load time (weights/hf.py)
from its three HF layouts into one: [all Q heads | all K heads | all V heads].

Weights may be stored narrower than the compute dtype (bf16 weights, fp32 activations
on CPU): see linear.py. Activations, norms, the residual stream and the KV cache use
`compute_dtype`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.models.falcon_config import FalconConfig
from falconet.nn.attention import (
    AttentionStep,
    alibi_slopes,
    apply_rotary,
    build_mask,
    rotary_cos_sin,
)
from falconet.nn.cache import DenseStep, KVCache
from falconet.nn.linear import Linear

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU: the tanh form breaks parity (TRT issue #663)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Attention(nn.Module):
    def __init__(
        self, config: FalconConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.kv_heads,
            config.head_dim,
        )
        self.query_key_value = Linear(
            config.hidden_size, config.qkv_size, config.bias, dtype, compute_dtype
        )
        self.dense = Linear(
            config.hidden_size, config.hidden_size, config.bias, dtype, compute_dtype
        )

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attention: AttentionStep,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        qk, v = self.query_key_value(x).split([(H + K) * D, K * D], dim=-1)
        qk = qk.view(B, T, H + K, D).transpose(1, 2)  # (B, H+K, T, D)
        if rope is not None:  # queries and keys rotate alike: one call for both
            qk = apply_rotary(qk, *rope)
        q, k = qk.split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        y = attention(layer, q, k, v)  # (B, H, T, D): caches k/v, attends to all keys so far
        return self.dense(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(
        self, config: FalconConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(
            config.hidden_size, config.ffn_size, config.bias, dtype, compute_dtype
        )
        self.dense_4h_to_h = Linear(
            config.ffn_size, config.hidden_size, config.bias, dtype, compute_dtype
        )
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(
        self, config: FalconConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.layout = config.block_layout

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(
                config.hidden_size, eps=config.layer_norm_epsilon, dtype=compute_dtype
            )

        if self.layout == "parallel_2ln":
            self.ln_attn, self.ln_mlp = norm(), norm()
        else:
            self.input_layernorm = norm()
            if self.layout == "sequential":
                self.post_attention_layernorm = norm()
        self.self_attention = Attention(config, dtype, compute_dtype)
        self.mlp = MLP(config, dtype, compute_dtype)

    def forward(self, x, layer, rope, attention) -> torch.Tensor:
        if self.layout == "sequential":
            h = x + self.self_attention(self.input_layernorm(x), layer, rope, attention)
            return h + self.mlp(self.post_attention_layernorm(h))
        if self.layout == "parallel_2ln":
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, layer, rope, attention)
        # transformers adds attention into the MLP output, then the residual.
        return x + (self.mlp(mlp_in) + attn)


class Transformer(nn.Module):
    def __init__(
        self, config: FalconConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.word_embeddings.weight.requires_grad_(False)
        self.h = nn.ModuleList(
            Block(config, dtype, compute_dtype) for _ in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(
            config.hidden_size, eps=config.layer_norm_epsilon, dtype=compute_dtype
        )


class Falcon(nn.Module):
    """FalconForCausalLM. `forward` returns next-token logits for every (or the last) position."""

    def __init__(
        self,
        config: FalconConfig,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype or dtype
        self.transformer = Transformer(config, dtype, self.compute_dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        last_only: bool = False,
        rope_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T or 1, V) in compute dtype.

        valid (B, T) is False at left-padding positions. With a cache, the new tokens are
        appended after what it holds; without one, the tokens attend only to each other.
        rope_len (B,) is each row's sequence length for dynamic RoPE scaling (default: up
        to the last token of this call); a chunked prefill passes the whole prompt's.
        """
        config = self.config
        B, T = input_ids.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if cache is not None:
            positions, past = cache.reserve(valid)
            key_valid = cache.key_valid[:, : past + T]
            key_positions = cache.key_positions[:, : past + T]
        else:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0) * valid
            past, key_valid, key_positions = 0, valid, positions
        slopes = alibi_slopes(config.num_attention_heads) if config.alibi else None
        mask = build_mask(
            positions, key_valid, key_positions, past, config, slopes, self.compute_dtype
        )
        rope = None
        if not config.alibi:
            if rope_len is None:
                rope_len = positions.max(dim=-1).values + 1
            rope = rotary_cos_sin(config, positions, rope_len, self.compute_dtype)

        x = self._trunk(input_ids, rope, DenseStep(mask, cache, past))
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def forward_packed(
        self, input_ids: torch.Tensor, step: AttentionStep, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """Continuous batching: the new tokens of several sequences packed in one row.

        input_ids (N,) are the tokens of `step.segments` side by side (decode tokens and
        prefill chunks); each attends to its own sequence's paged cache. Returns logits
        (R, V) for the packed positions `logit_rows` (R,), e.g. each sequence's last token.
        """
        x = self._trunk(input_ids[None], step.rope, step)  # (1, N, C)
        x = x[0].index_select(0, logit_rows)  # (R, C)
        return self.lm_head(self.transformer.ln_f(x))  # (R, V)

    def _trunk(self, input_ids: torch.Tensor, rope, attention: AttentionStep) -> torch.Tensor:
        """Embeddings and every block: (B, T) ids -> (B, T, C) hidden states before ln_f."""
        x = self.transformer.word_embeddings(input_ids).to(self.compute_dtype)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, rope, attention)
        return x

    def num_parameters(self) -> int:
        """Weights as float values (a quantized matrix counts its rows x cols); a tied
        head is counted once."""
        return sum(n for n, _ in self._weights())

    def weight_bytes(self) -> int:
        """Bytes the weights take as stored (quantized blocks at their packed size)."""
        return sum(b for _, b in self._weights())

    def storage_summary(self) -> str:
        """How the matrices are stored, e.g. "q4_0 x 96, q8_0 x 1, bfloat16 x 0" -> "q4_0 x 96, q8_0 x 1"."""
        counts: dict[str, int] = {}
        for m in self.modules():
            kind = getattr(m, "qtype", None) or getattr(getattr(m, "fmt", None), "name", None)
            if kind is None and isinstance(m, Linear | nn.Embedding):
                kind = str(m.weight.dtype).replace("torch.", "")
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    def _weights(self) -> list[tuple[int, int]]:
        # parameters() already skips a tied duplicate; a tied quantized head shares its
        # embedding's blocks, so blocks count once per storage.
        out = [(p.numel(), p.numel() * p.element_size()) for p in self.parameters()]
        seen: set[tuple[int, str]] = set()
        for m in self.modules():
            blocks = getattr(m, "weight_blocks", None)
            if blocks is None or (blocks.data_ptr(), str(blocks.device)) in seen:
                continue
            seen.add((blocks.data_ptr(), str(blocks.device)))
            out.append((m.weight.shape[0] * m.weight.shape[1], blocks.numel()))
        return out
