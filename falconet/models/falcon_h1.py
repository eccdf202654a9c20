"""Falcon-H1: attention and Mamba-2 side by side in every layer.

Falcon-H1 (TII, May 2025; 0.5B to 34B, Base and Instruct) ships as transformers'
`FalconH1ForCausalLM`; this file runs that class. Each layer feeds one normed input to
two mixers in parallel and adds their outputs, then a SwiGLU MLP follows:

    x ─┬─ input_layernorm ─┬─ ×attn_in ─ self_attn ─ ×attn_out ─┐
       │                   └─ ×ssm_in ── mamba ───── ×ssm_out ──+─┐
       └──────────────────────────────────────────────────────────+─ h ─┬─ pre_ff_layernorm ─ feed_forward ─┐
                                                                        └─────────────────────────────────────+─ out

- attention: grouped-query with rotary embeddings of the whole head (as llama.py),
  keys scaled by key_multiplier before the rotation;
- mamba (Mamba-2): in_proj gives z (gate), xBC and dt per token, each slice scaled by
  its ssm_multipliers entry; a depthwise causal conv + activation over xBC; the SSD scan
  (nn/ssd.py) over heads of mamba_d_head channels with B, C shared per group; then
  y·silu(z) -- or, with mamba_rms_norm, a gated RMSNorm per group, normed before or after
  the gate -- and out_proj;
- feed_forward: down(up(x) · act(gate(x)·m_gate)) · m_down.

muP multipliers (config.json, all 1.0 by default) scale activations where transformers
does: embeddings ×embedding_multiplier; attention input ×attention_in_multiplier,
keys ×key_multiplier, output ×attention_out_multiplier; Mamba input ×ssm_in_multiplier,
in_proj's z/x/B/C/dt slices ×ssm_multipliers[0..4], output ×ssm_out_multiplier; MLP
gate ×mlp_multipliers[0], output ×mlp_multipliers[1]; logits ×lm_head_multiplier.

State: attention keeps a KV cache; Mamba keeps, per layer, the conv's last
mamba_d_conv-1 inputs and the (heads, d_head, d_state) SSM state in fp32 -- a fixed size
whatever the length (`H1State`). `forward(ids, state)` reads and updates it in place,
so a prompt prefilled in pieces and then decoded one token at a time equals one forward.

Module and parameter names equal transformers' (model.layers.N.mamba.in_proj, ...,
model.final_layernorm), so an HF state dict maps one to one (`checkpoint_layout`).
Notation: B batch, T tokens, C hidden, H query heads, K kv heads, D head_dim,
Hm Mamba heads, P mamba_d_head, G groups, N mamba_d_state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from falconet.errors import GenerationError
from falconet.models import llama
from falconet.models.base import AttentionStep, CausalLM, CheckpointLayout, Rope
from falconet.models.falcon import ACTIVATIONS
from falconet.models.falcon_h1_config import FalconH1Config
from falconet.nn import elementwise
from falconet.nn.attention import apply_rotary, build_mask, rotary_cos_sin
from falconet.nn.cache import DenseStep, KVCache
from falconet.nn.linear import Linear
from falconet.nn.norms import RMSNorm
from falconet.nn.segments import SegmentState, per_segment
from falconet.nn.ssd import causal_conv1d, discretize_dt, ssd_chunked, ssd_step


@dataclass
class H1State:
    """What one batch of sequences carries between forwards: the attention KV cache and,
    per layer, the Mamba conv window and SSM state. Fixed size: allocated once for
    `max_len` tokens (the KV part), and the recurrent part does not grow at all."""

    kv: KVCache
    conv: torch.Tensor  # (layers, B, conv_dim, d_conv - 1), compute dtype
    ssm: torch.Tensor  # (layers, B, Hm, P, N), fp32

    @classmethod
    def empty(
        cls,
        config: FalconH1Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> H1State:
        L = config.num_hidden_layers
        conv_shape, ssm_shape = config.ssm_state_shapes()
        conv = torch.zeros(L, batch_size, *conv_shape, dtype=dtype, device=device)
        ssm = torch.zeros(L, batch_size, *ssm_shape, dtype=torch.float32, device=device)
        return cls(KVCache(config, batch_size, max_len, dtype, device), conv, ssm)

    @property
    def length(self) -> int:
        """Tokens seen so far (the same for every row)."""
        return self.kv.length


class Attention(llama.Attention):
    """Llama's attention (same projections and names) with keys scaled by
    key_multiplier before the rotation, as transformers does."""

    def __init__(
        self, config: FalconH1Config, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.key_multiplier = config.key_multiplier

    def forward(
        self, x: torch.Tensor, layer: int, rope: Rope, attention: AttentionStep
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2) * self.key_multiplier  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = attention(layer, q, k, v)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(llama.MLP):
    """SwiGLU with the muP gate and output multipliers."""

    def __init__(
        self, config: FalconH1Config, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.gate_multiplier, self.down_multiplier = config.mlp_multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up_proj(x)
        g = self.gate_proj(x) * self.gate_multiplier
        h = (
            elementwise.silu_mul(g, u, self.torch_ops)
            if self.act is elementwise.silu
            else u * self.act(g)
        )
        return self.down_proj(h) * self.down_multiplier  # (B, T, C)


class GatedRMSNorm(nn.Module):
    """transformers' FalconH1RMSNormGated: RMS-normalize each of the G groups of the
    Mamba width separately, in fp32, and gate by silu(z) before or after."""

    def __init__(
        self, size: int, groups: int, eps: float, norm_before_gate: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        # A group spread over tensor-parallel ranks (parallel/load.py sets both): each
        # holds a slice of its channels, so the mean of squares is the ranks' sums of
        # squares added (`reduce_squares`) over the group's whole width.
        self.reduce_squares = None
        self.group_width = size // groups

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, T, E = y.shape
        h = y.float()
        if not self.norm_before_gate:
            h = h * elementwise.silu(z.float())
        h = h.view(B, T, self.groups, E // self.groups)
        if self.reduce_squares is None:
            mean_square = h.pow(2).mean(-1, keepdim=True)
        else:
            mean_square = self.reduce_squares(h.pow(2).sum(-1, keepdim=True)) / self.group_width
        h = h * torch.rsqrt(mean_square + self.eps)
        h = (self.weight.view(self.groups, E // self.groups) * h).view(B, T, E)
        if self.norm_before_gate:
            h = h * elementwise.silu(z.float())
        return h  # fp32, rounded by the caller


class Mamba(nn.Module):
    """transformers' FalconH1Mixer (Mamba-2), torch path."""

    def __init__(
        self, config: FalconH1Config, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        C, E = config.hidden_size, config.mamba_d_ssm
        self.n_heads, self.head_dim = config.mamba_n_heads, config.mamba_d_head
        self.n_groups, self.d_state = config.mamba_n_groups, config.mamba_d_state
        self.chunk_size = config.mamba_chunk_size
        self.time_step_limit = config.time_step_limit
        self.in_multiplier = config.ssm_in_multiplier
        self.d_ssm, self.conv_dim = E, config.conv_dim
        self.in_proj = Linear(C, config.in_proj_size, config.mamba_proj_bias, dtype, compute_dtype)
        # nn.Conv1d only holds the weight (conv_dim, 1, K) and bias under HF's names; the
        # causal padding and the carried window are ssd.causal_conv1d's.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.mamba_d_conv, groups=self.conv_dim,
            bias=config.mamba_conv_bias, dtype=dtype,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads, dtype=dtype), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads, dtype=dtype), requires_grad=False)
        self.D = nn.Parameter(torch.ones(self.n_heads, dtype=dtype), requires_grad=False)
        self.norm = (
            GatedRMSNorm(
                E, self.n_groups, config.rms_norm_eps, config.mamba_norm_before_gate, dtype
            )
            if config.mamba_rms_norm
            else None
        )
        self.out_proj = Linear(E, C, config.projectors_bias, dtype, compute_dtype)
        self.act = ACTIVATIONS[config.hidden_act]
        # muP: one multiplier per slice of in_proj's output (z, x, B, C, dt). Not in the
        # checkpoint (transformers' mup_vector buffer); built from the config on first
        # use per device and dtype (not at construction), so a model made on the meta
        # device and then loaded has it right, and no step rebuilds it.
        GN = self.n_groups * self.d_state
        self._mup_vectors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.mup_slices = tuple(
            zip((E, E, GN, GN, self.n_heads), config.ssm_multipliers, strict=True)
        )

    def mup_vector(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        vector = self._mup_vectors.get((device, dtype))
        if vector is None:
            vector = torch.cat(
                [torch.full((n,), float(m), dtype=dtype, device=device) for n, m in self.mup_slices]
            )
            self._mup_vectors[(device, dtype)] = vector
        return vector

    def forward(self, x: torch.Tensor, states: list[SegmentState]) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `states` cut the T tokens into sequences, each with
        its conv state (B, conv_dim, K-1) and SSM state (B, Hm, P, N) (None and None: a
        stateless forward), read and advanced in place: one segment over all T for a
        dense batch, several sequences side by side (B = 1) for the engine's packed row.
        The projections run on every row at once, the conv and the scan per segment."""
        B, T, _ = x.shape
        Hm, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        zxbcdt = self.in_proj(x * self.in_multiplier)  # (B, T, in_proj_size)
        zxbcdt = zxbcdt * self.mup_vector(x.device, zxbcdt.dtype)
        z, xBC, dt = zxbcdt.split([self.d_ssm, self.conv_dim, Hm], dim=-1)
        w, bias = self.conv1d.weight, self.conv1d.bias
        xBC = per_segment(states, lambda rows, conv, _: causal_conv1d(xBC[:, rows], w, bias, conv))
        xs, Bs, Cs = self.act(xBC).split([self.d_ssm, G * N, G * N], dim=-1)
        A = -torch.exp(self.A_log.float())  # (Hm,)
        dt = discretize_dt(dt, self.dt_bias)  # (B, T, Hm) fp32

        def scan(rows: slice, _, ssm: torch.Tensor | None) -> torch.Tensor:
            n = rows.stop - rows.start
            if ssm is not None and n == 1:  # decode: the recurrence, no dt clamp (ssd.py)
                i = rows.start
                return ssd_step(
                    ssm, xs[:, i].view(B, Hm, P), dt[:, i], A,
                    Bs[:, i].view(B, G, N), Cs[:, i].view(B, G, N), self.D,
                )[:, None]  # fmt: skip
            y, final = ssd_chunked(
                xs[:, rows].view(B, n, Hm, P), dt[:, rows].clamp(*self.time_step_limit), A,
                Bs[:, rows].view(B, n, G, N), Cs[:, rows].view(B, n, G, N),
                self.D, self.chunk_size, ssm,
            )  # fmt: skip
            if ssm is not None:
                ssm.copy_(final)
            return y

        y = per_segment(states, scan).reshape(B, T, self.d_ssm)  # (B, T, Hm*P) fp32
        y = self.norm(y, z) if self.norm is not None else y * elementwise.silu(z)
        return self.out_proj(y.to(x.dtype))  # (B, T, C)


class Block(nn.Module):
    def __init__(
        self, config: FalconH1Config, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(C, eps, compute_dtype)
        self.self_attn = Attention(config, dtype, compute_dtype)
        self.mamba = Mamba(config, dtype, compute_dtype)
        self.pre_ff_layernorm = RMSNorm(C, eps, compute_dtype)
        self.feed_forward = MLP(config, dtype, compute_dtype)
        self.attn_in = config.attention_in_multiplier
        self.attn_out = config.attention_out_multiplier
        self.ssm_out = config.ssm_out_multiplier

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        rope: Rope,
        attention: AttentionStep,
        states: list[SegmentState],
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        m = self.mamba(h, states) * self.ssm_out
        a = self.self_attn(h * self.attn_in, layer, rope, attention) * self.attn_out
        h = x + (m + a)
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class FalconH1Model(nn.Module):
    """transformers' FalconH1Model: the embeddings, the blocks and the final norm."""

    def __init__(
        self, config: FalconH1Config, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(config, dtype, compute_dtype) for _ in range(config.num_hidden_layers)
        )
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, compute_dtype)


class FalconH1(CausalLM):
    """FalconH1ForCausalLM. `forward(ids, state)` returns logits for every position."""

    embeddings_name = "model.embed_tokens"
    state_pool = "kv_and_ssm"  # KV blocks for the attention, an SSM slot for Mamba-2

    def __init__(
        self,
        config: FalconH1Config,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.model = FalconH1Model(config, dtype, self.compute_dtype)
        self._add_head(dtype)

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    def new_state(self, batch_size: int, max_len: int) -> H1State:
        """An empty state for `batch_size` sequences of up to `max_len` tokens."""
        return H1State.empty(self.config, batch_size, max_len, self.compute_dtype, self.device)

    def forward(  # type: ignore[override]  # the engine's padded/packed forms come later
        self, input_ids: torch.Tensor, state: H1State | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T or 1, V) in compute dtype.

        With a state, the tokens continue the sequences it holds and it is updated in
        place; without one, they are whole sequences. Rows are unpadded (same length)."""
        config = self.config
        B, T = input_ids.shape
        valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if state is not None:
            if state.kv.batch_size != B:
                raise GenerationError(f"state holds {state.kv.batch_size} sequences, got {B} rows")
            positions, past = state.kv.reserve(valid)
            key_valid = state.kv.key_valid[:, : past + T]
            key_positions = state.kv.key_positions[:, : past + T]
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            past, key_valid, key_positions = 0, valid, positions
        mask = build_mask(
            positions, key_valid, key_positions, past, config, None, self.compute_dtype
        )
        rope = rotary_cos_sin(config, positions, positions[:, -1] + 1, self.compute_dtype)
        attention = DenseStep(mask, None if state is None else state.kv, past)

        x = self._embed(input_ids)
        everything = slice(0, T)
        for i, block in enumerate(self.model.layers):
            states = [(everything, None, None)]
            if state is not None:
                states = [(everything, state.conv[i], state.ssm[i])]
            x = block(x, i, rope, attention, states)
        if last_only:
            x = x[:, -1:]
        return self._head(x)

    def forward_packed(  # type: ignore[override]  # a HybridStep: attention + SSM slots
        self, input_ids: torch.Tensor, step, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """Continuous batching: the new tokens of several sequences packed in one row.

        input_ids (N,) are the tokens of the step's sequences side by side; attention
        reads and writes each one's KV blocks (`step.attention`, engine/paged.py), the
        Mamba mixer runs each one's conv and scan from its SSM slot (`step.slots`,
        engine/state.py), advanced in place. Returns logits (R, V) for the packed
        positions `logit_rows` (R,)."""
        x = self._embed(input_ids[None])  # (1, N, C)
        for i, block in enumerate(self.model.layers):
            x = block(x, i, step.rope, step.attention, step.slots.states(i))
        x = x[0].index_select(0, logit_rows)  # (R, C)
        return self._head(x)  # (R, V)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids).to(self.compute_dtype)
        return x * self.config.embedding_multiplier

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.final_layernorm(x)) * self.config.lm_head_multiplier

    @staticmethod
    def checkpoint_layout(config: FalconH1Config) -> CheckpointLayout:
        """Every tensor of the HF checkpoint with its shape; all load as stored."""
        C, V, F_ = config.hidden_size, config.vocab_size, config.intermediate_size
        H, K, D = config.num_attention_heads, config.kv_heads, config.head_dim
        E, Hm = config.mamba_d_ssm, config.mamba_n_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
        linears = {
            "self_attn": (config.attention_bias, {
                "q_proj": (H * D, C), "k_proj": (K * D, C),
                "v_proj": (K * D, C), "o_proj": (C, H * D),
            }),
            "feed_forward": (config.mlp_bias, {
                "gate_proj": (F_, C), "up_proj": (F_, C), "down_proj": (C, F_),
            }),
            "mamba": (None, {"in_proj": (config.in_proj_size, C), "out_proj": (C, E)}),
        }  # fmt: skip
        mamba_bias = {"in_proj": config.mamba_proj_bias, "out_proj": config.projectors_bias}
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (C,)
            shapes[p + "pre_ff_layernorm.weight"] = (C,)
            for group, (bias, table) in linears.items():
                for name, shape in table.items():
                    shapes[f"{p}{group}.{name}.weight"] = shape
                    if mamba_bias[name] if bias is None else bias:
                        shapes[f"{p}{group}.{name}.bias"] = shape[:1]
            m = p + "mamba."
            shapes[m + "conv1d.weight"] = (config.conv_dim, 1, config.mamba_d_conv)
            if config.mamba_conv_bias:
                shapes[m + "conv1d.bias"] = (config.conv_dim,)
            for name in ("dt_bias", "A_log", "D"):
                shapes[m + name] = (Hm,)
            if config.mamba_rms_norm:
                shapes[m + "norm.weight"] = (E,)
        shapes["model.final_layernorm.weight"] = (C,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        # llama.cpp keeps these in F32 in every file type (its converter's SSM_CONV1D rule,
        # A and D, the norms), and quantizing at load leaves them float too
        kept = (".conv1d.weight", ".A_log", ".D", "norm.weight")
        return CheckpointLayout(shapes, keep_float=frozenset(n for n in shapes if n.endswith(kept)))
