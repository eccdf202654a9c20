"""The Llama decoder, as Falcon3 uses it.

Falcon3 (TII, Dec 2024: Falcon3-1B/3B/7B/10B Base and Instruct, Falcon-Arabic-7B) ships
as transformers' `LlamaForCausalLM`; this file runs that class, and any checkpoint of
the same shape (see llama_config.py for what the config may say):

- token embeddings (no scaling) -> N blocks -> final RMSNorm -> LM head (untied unless
  `tie_word_embeddings`);
- attention: grouped-query (H query heads share K kv heads, H/K each; K = H is MHA),
  head_dim its own setting (Falcon3: 256 with 8 or 12 heads, 4 kv heads);
  rotary position embeddings of the whole head (NeoX "rotate half" layout), optionally
  scaled (linear, dynamic NTK, llama3);
- MLP: SwiGLU, down(silu(gate(x)) * up(x));
- norms: RMSNorm with a weight and no bias, computed in fp32 as transformers does.

The block is sequential with pre-norms:

    x ─┬─ input_layernorm ─ self_attn ─┐
       └───────────────────────────────+─ h ─┬─ post_attention_layernorm ─ mlp ─┐
                                             └──────────────────────────────────+─ out

Module and parameter names equal transformers' (model.embed_tokens,
model.layers.N.self_attn.q_proj, ..., model.norm, lm_head), so an HF state dict maps
one to one with no transform (`Llama.checkpoint_layout`). GGUF files store Q and K rows
permuted for llama.cpp's rope; models/gguf_llama.py undoes that.

Weights may be stored narrower than the compute dtype (bf16 weights, fp32 activations
on CPU): every projection is a falconet.nn.linear.Linear. Activations, norms, the residual
stream and the KV cache use `compute_dtype`. Notation: B batch, T tokens, C hidden,
H query heads, K kv heads, D head_dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from falconet.models.base import AttentionStep, CausalLM, CheckpointLayout, Rope
from falconet.models.falcon import ACTIVATIONS
from falconet.models.llama_config import LlamaConfig
from falconet.nn import elementwise
from falconet.nn.attention import apply_rotary
from falconet.nn.linear import Linear
from falconet.nn.norms import RMSNorm
from falconet.quant.ternary import BitNetConfig, TernaryLinear, ternary_tensors


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        C, H, K, D = (
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads,
            config.head_dim,
        )
        self.n_head, self.n_kv, self.head_dim = H, K, D
        bias = config.attention_bias
        self.q_proj = Linear(C, H * D, bias, dtype, compute_dtype)
        self.k_proj = Linear(C, K * D, bias, dtype, compute_dtype)
        self.v_proj = Linear(C, K * D, bias, dtype, compute_dtype)
        self.o_proj = Linear(H * D, C, bias, dtype, compute_dtype)

    def forward(
        self, x: torch.Tensor, layer: int, rope: Rope, attention: AttentionStep
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = attention(layer, q, k, v)  # (B, H, T, D): caches k/v, attends to all keys so far
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), act = silu for every Llama checkpoint."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        C, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(C, F_, bias, dtype, compute_dtype)
        self.up_proj = Linear(C, F_, bias, dtype, compute_dtype)
        self.down_proj = Linear(F_, C, bias, dtype, compute_dtype)
        self.act = ACTIVATIONS[config.hidden_act]
        # torch's ops for the gate, bit for bit transformers' (BitNet: its output is
        # rounded to int8 next); else one compiled pass where it can run
        self.torch_ops = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is elementwise.silu:
            gate = elementwise.silu_mul(self.gate_proj(x), self.up_proj(x), self.torch_ops)
            return self.down_proj(gate)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> C


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(C, eps, compute_dtype)
        self.self_attn = Attention(config, dtype, compute_dtype)
        self.post_attention_layernorm = RMSNorm(C, eps, compute_dtype)
        self.mlp = MLP(config, dtype, compute_dtype)

    def forward(
        self, x: torch.Tensor, layer: int, rope: Rope, attention: AttentionStep
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), layer, rope, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """transformers' LlamaModel: the embeddings, the blocks and the final norm."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(config, dtype, compute_dtype) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, compute_dtype)


class Llama(CausalLM):
    """LlamaForCausalLM. `forward` returns next-token logits for every (or the last) position."""

    embeddings_name = "model.embed_tokens"

    def __init__(
        self,
        config: LlamaConfig,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.model = LlamaModel(config, dtype, self.compute_dtype)
        if config.bitnet is not None:
            self._swap_ternary(config.bitnet)
        self._add_head(dtype)

    def _swap_ternary(self, bitnet: BitNetConfig) -> None:
        """A BitNet checkpoint (Falcon-E, Falcon3-1.58bit): every decoder projection
        becomes a TernaryLinear, as transformers' replace_with_bitnet_linear does; the
        embeddings and the LM head stay float."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, Linear) and bitnet.converts(f"model.{name}"):
                sub_norm = (
                    RMSNorm(module.in_features, bitnet.rms_norm_eps, self.compute_dtype)
                    if bitnet.use_rms_norm
                    else None
                )
                ternary = TernaryLinear(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    bitnet,
                    self.compute_dtype,
                    sub_norm,
                )
                self.model.set_submodule(name, ternary)
        for module in self.model.modules():  # norms and gates feed int8 roundings
            if isinstance(module, (RMSNorm, MLP)):
                module.torch_ops = True

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def _embed_and_blocks(
        self, input_ids: torch.Tensor, rope: Rope, attention: AttentionStep
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids).to(self.compute_dtype)  # (B, T, C)
        for i, block in enumerate(self.model.layers):
            x = block(x, i, rope, attention)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))  # (..., V)

    @staticmethod
    def checkpoint_layout(config: LlamaConfig) -> CheckpointLayout:
        """Every tensor of the HF checkpoint with its shape; all load as stored."""
        C, V, F_ = config.hidden_size, config.vocab_size, config.intermediate_size
        H, K, D = config.num_attention_heads, config.kv_heads, config.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
        attention = {"q_proj": (H * D, C), "k_proj": (K * D, C), "v_proj": (K * D, C)}
        attention["o_proj"] = (C, H * D)
        mlp = {"gate_proj": (F_, C), "up_proj": (F_, C), "down_proj": (C, F_)}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (C,)
            for group, linears, bias in (
                ("self_attn", attention, config.attention_bias),
                ("mlp", mlp, config.mlp_bias),
            ):
                for name, shape in linears.items():
                    shapes[f"{p}{group}.{name}.weight"] = shape
                    if bias:
                        shapes[f"{p}{group}.{name}.bias"] = shape[:1]
            shapes[p + "post_attention_layernorm.weight"] = (C,)
        shapes["model.norm.weight"] = (C,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        if config.bitnet is None:
            return CheckpointLayout(shapes)
        # the ternary projections' tensors replace their float weights (quant/ternary.py)
        weights, packed, kept = set(), set(), set()
        for name in [n for n in shapes if n.startswith("model.layers.")]:
            module, _, attr = name.rpartition(".")
            if attr == "weight" and module.endswith("_proj") and config.bitnet.converts(module):
                tensors, uint8 = ternary_tensors(module, shapes[name], config.bitnet)
                shapes.update(tensors)
                weights.add(name)
                packed |= uint8
                kept |= set(tensors)
        return CheckpointLayout(
            shapes,
            keep_float=frozenset(kept),
            ternary=frozenset(weights),
            packed=frozenset(packed),
        )
