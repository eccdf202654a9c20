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
maps one to one; only the fused QKV weight is regrouped at load time (`regroup_qkv`)
from its three HF layouts into one: [all Q heads | all K heads | all V heads].

Weights may be stored narrower than the compute dtype (bf16 weights, fp32 activations
on CPU): see linear.py. Activations, norms, the residual stream and the KV cache use
`compute_dtype`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from falconet.models.base import AttentionStep, CausalLM, CheckpointLayout
from falconet.models.falcon_config import FalconConfig
from falconet.nn import elementwise
from falconet.nn.attention import apply_rotary
from falconet.nn.elementwise import invariant
from falconet.nn.linear import Linear

# Row-invariant in the engine (nn/elementwise.py): a packed neighbour never moves a bit.
ACTIVATIONS = {
    "gelu": elementwise.gelu,  # exact erf GELU: the tanh form breaks parity (TRT issue #663)
    "gelu_new": invariant(lambda x: F.gelu(x, approximate="tanh")),
    "gelu_pytorch_tanh": invariant(lambda x: F.gelu(x, approximate="tanh")),
    "gelu_fast": invariant(lambda x: F.gelu(x, approximate="tanh")),
    "relu": F.relu,
    "silu": elementwise.silu,
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
        # H * D = hidden_size, except on a tensor-parallel rank, which holds H/N heads
        self.dense = Linear(
            self.n_head * self.head_dim, config.hidden_size, config.bias, dtype, compute_dtype
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


class Falcon(CausalLM):
    """FalconForCausalLM. `forward` returns next-token logits for every (or the last) position."""

    embeddings_name = "transformer.word_embeddings"

    def __init__(
        self,
        config: FalconConfig,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.transformer = Transformer(config, dtype, self.compute_dtype)
        self._add_head(dtype)

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    def _embed_and_blocks(
        self, input_ids: torch.Tensor, rope, attention: AttentionStep
    ) -> torch.Tensor:
        """Embeddings and every block: (B, T) ids -> (B, T, C) hidden states before ln_f."""
        x = self.transformer.word_embeddings(input_ids).to(self.compute_dtype)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, rope, attention)
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))

    @staticmethod
    def checkpoint_layout(config: FalconConfig) -> CheckpointLayout:
        """The HF checkpoint's tensors; the fused QKV is regrouped (`regroup_qkv`) except
        for plain multi-query, which is already [Q heads | K | V] (and so stays zero-copy)."""
        shapes = hf_tensor_shapes(config)
        transforms = {}
        if config.kv_heads != 1:
            regroup = partial(regroup_qkv, config=config)
            transforms = {n: regroup for n in shapes if "query_key_value" in n}
        return CheckpointLayout(shapes, transforms)


# ---- the HF checkpoint ------------------------------------------------------------------
def hf_tensor_shapes(config: FalconConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its HF shape."""
    C, V, F_ = config.hidden_size, config.vocab_size, config.ffn_size
    names: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (V, C)}
    norms = {
        "sequential": ("input_layernorm", "post_attention_layernorm"),
        "parallel": ("input_layernorm",),
        "parallel_2ln": ("ln_attn", "ln_mlp"),
    }[config.block_layout]
    linears = {
        "self_attention.query_key_value": (config.qkv_size, C),
        "self_attention.dense": (C, C),
        "mlp.dense_h_to_4h": (F_, C),
        "mlp.dense_4h_to_h": (C, F_),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        for n in norms:
            names[p + n + ".weight"] = names[p + n + ".bias"] = (C,)
        for n, shape in linears.items():
            names[p + n + ".weight"] = shape
            if config.bias:
                names[p + n + ".bias"] = shape[:1]
    names["transformer.ln_f.weight"] = names["transformer.ln_f.bias"] = (C,)
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (V, C)
    return names


def regroup_qkv(t: torch.Tensor, config: FalconConfig) -> torch.Tensor:
    """HF fused QKV rows -> [all Q | all K | all V].

    The three HF layouts are one view (as vLLM and llama.cpp's converter use it):
    K groups of (H/K query heads, 1 key head, 1 value head). MHA is K = H groups of
    [q, k, v]; multi-query is 1 group of [q_0..q_{H-1}, k, v].
    """
    H, K, D = config.num_attention_heads, config.kv_heads, config.head_dim
    G = H // K
    grouped = t.reshape(K, G + 2, D, *t.shape[1:])
    q = grouped[:, :G].reshape(H * D, *t.shape[1:])
    k = grouped[:, G].reshape(K * D, *t.shape[1:])
    v = grouped[:, G + 1].reshape(K * D, *t.shape[1:])
    return torch.cat([q, k, v])
