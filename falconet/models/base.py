"""What every falconet decoder shares, whatever its blocks look like.

A causal LM here is: token embeddings -> blocks -> final norm -> LM head. The models
(Falcon, Llama/Falcon3) differ inside the blocks; everything around them lives here so
it is written once:

- `CausalLM.forward`: a left-padded batch with an optional static KVCache: positions,
  the attention mask (ALiBi for falcon-rw) and the rotary tables, built once per forward
  and handed to every block through a `DenseStep`;
- `CausalLM.forward_packed`: the continuous-batching engine's packed step (paged.py);
- weight counting (`num_parameters`, `weight_bytes`, `storage_summary`) and re-tying a
  shared head after loading;
- `CheckpointLayout` (weights/hf.py): the tensor table each model file provides.

A subclass sets `embeddings_name` and implements `_embed_and_blocks` (ids -> hidden
states before the final norm), `_head` (final norm + LM head) and `device`.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["CausalLM", "CheckpointLayout", "Rope"]

import torch
from torch import nn

from falconet.nn.attention import (
    AttentionMask,
    AttentionStep,
    alibi_bias,
    build_mask,
    heads_alibi_slopes,
    rotary_cos_sin,
)
from falconet.nn.cache import DenseStep, KVCache
from falconet.nn.linear import Linear
from falconet.weights.hf import CheckpointLayout

Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, signed sin), each (B, 1, T, D)


class CausalLM(nn.Module):
    """Base of the model classes: `forward` returns next-token logits for every (or the
    last) position; `forward_packed` serves the engine."""

    config: Any
    compute_dtype: torch.dtype
    lm_head: nn.Module
    # HF module name of the token embeddings (the tensor a tied head shares).
    embeddings_name: ClassVar[str]
    # The engine pool the per-sequence state lives in (falconet/engine/state.py): K/V
    # per token in paged blocks, or a fixed-size recurrent state per sequence
    state_pool: ClassVar[str] = "paged_kv"

    def __init__(self, config: Any, dtype: torch.dtype, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype or dtype

    def _add_head(self, dtype: torch.dtype) -> None:
        """The LM head (after the decoder: HF's parameter order), sharing the embeddings'
        weight when the config ties them; the model is inference-only, so frozen."""
        self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size, False, dtype)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.get_submodule(self.embeddings_name).weight
        self.requires_grad_(False)

    # ---- what a model file provides ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _embed_and_blocks(
        self, input_ids: torch.Tensor, rope: Rope, attention: AttentionStep
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states before the final norm."""
        raise NotImplementedError

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) logits: final norm, then the LM head."""
        raise NotImplementedError

    # ---- forward passes --------------------------------------------------------------
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
        slopes = heads_alibi_slopes(config)
        mask = build_mask(
            positions, key_valid, key_positions, past, config, slopes, self.compute_dtype
        )
        rope = None
        if not config.alibi:
            if rope_len is None:
                rope_len = positions.max(dim=-1).values + 1
            rope = rotary_cos_sin(config, positions, rope_len, self.compute_dtype)

        x = self._embed_and_blocks(input_ids, rope, DenseStep(mask, cache, past))
        if last_only:
            x = x[:, -1:]
        return self._head(x)  # (B, T, V)

    def forward_segments(self, input_ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Training on packed rows: input_ids (B, T) hold several sequences side by side,
        segments (B, T) number them (1, 2, ... within a row; 0 = padding). Each token
        attends only to the earlier tokens of its own segment and positions restart at 0
        in every segment, so each sequence computes what it computes alone (fine-tuning's
        packing, falconet/train/sft_data.py). -> logits (B, T, V)."""
        if self.state_pool != "paged_kv":
            raise TypeError(
                f"{type(self).__name__} carries a recurrent state along a row; give it one "
                "sequence per row (forward) instead of packed segments"
            )
        config = self.config
        B, T = input_ids.shape
        index = torch.arange(T, device=input_ids.device).expand(B, T)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
        positions = index - first  # (B, T): the offset inside the segment
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, S)
        allowed = same & (index[:, None, :] <= index[:, :, None]) & (segments[:, None, :] > 0)
        allowed |= torch.eye(T, dtype=torch.bool, device=input_ids.device)  # padding: no NaN row
        allowed = allowed[:, None]  # (B, 1, T, S)
        rope = None
        if config.alibi:
            slopes = heads_alibi_slopes(config)
            bias = alibi_bias(slopes, positions, config.head_dim, self.compute_dtype)
            mask = AttentionMask(bias.masked_fill(~allowed, torch.finfo(self.compute_dtype).min))
        else:
            mask = AttentionMask(allowed)
            rope_len = positions.max(dim=-1).values + 1
            rope = rotary_cos_sin(config, positions, rope_len, self.compute_dtype)
        x = self._embed_and_blocks(input_ids, rope, DenseStep(mask, None, 0))
        return self._head(x)  # (B, T, V)

    def forward_packed(
        self, input_ids: torch.Tensor, step: AttentionStep, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """Continuous batching: the new tokens of several sequences packed in one row.

        input_ids (N,) are the tokens of `step.segments` side by side (decode tokens and
        prefill chunks); each attends to its own sequence's paged cache. Returns logits
        (R, V) for the packed positions `logit_rows` (R,), e.g. each sequence's last token.
        """
        x = self._embed_and_blocks(input_ids[None], step.rope, step)  # (1, N, C)
        x = x[0].index_select(0, logit_rows)  # (R, C)
        return self._head(x)  # (R, V)

    # ---- loading -----------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Point a tied head at the (float) embedding weight again once loading replaced
        it; a quantized embedding already shares its blocks with the head (quant.install)."""
        embeddings = self.get_submodule(self.embeddings_name)
        if self.config.tie_word_embeddings and isinstance(embeddings, nn.Embedding):
            self.lm_head.weight = embeddings.weight

    # ---- sizes -------------------------------------------------------------------------
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
        # a ternary layer's packed codes stand for 4 weights per byte (weight_numel)
        ternary = {
            id(m.weight): m.weight_numel for m in self.modules() if hasattr(m, "weight_numel")
        }
        out = [
            (ternary.get(id(p), p.numel()), p.numel() * p.element_size()) for p in self.parameters()
        ]
        seen: set[tuple[int, str]] = set()
        for m in self.modules():
            blocks = getattr(m, "weight_blocks", None)
            if blocks is None or (blocks.data_ptr(), str(blocks.device)) in seen:
                continue
            seen.add((blocks.data_ptr(), str(blocks.device)))
            out.append((m.weight.shape[0] * m.weight.shape[1], blocks.numel()))
        return out
