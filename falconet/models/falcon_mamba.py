"""Falcon-Mamba: the Mamba-1 decoder of Falcon-Mamba-7B and Falcon3-Mamba-7B.

TII's attention-free Falcons ship as transformers' `FalconMambaForCausalLM`; this file
runs that class (config: falcon_mamba_config.py). No attention and no positions: each
layer keeps a fixed-size recurrent state per sequence (`MambaState`), so memory does
not grow with the context.

- token embeddings -> N blocks -> final RMSNorm (`norm_f`) -> LM head tied to the
  embeddings (unless `tie_word_embeddings` is false);
- block: a pre-norm residual around the mixer; the residual stream is kept in fp32
  between blocks (`residual_in_fp32`, transformers' default):

    x ─┬─ norm ─ mixer ─┐
       └────────────────+─ out

- mixer (Mamba-1, Gu & Dao 2023), with Falcon-Mamba's weightless RMS norms on dt, B
  and C (the one change from Mamba-1, eps `mixer_rms_eps`):

    in_proj ─┬─ u ─ causal depthwise conv1d (+bias) ─ silu ─┬─ x_proj ─ dt, B, C
             │                                              │   rms(dt) ─ dt_proj ─ +bias ─ softplus
             │                                              │   rms(B), rms(C)
             │                                              └─ selective scan (A = -exp(A_log)) + D*u
             └─ z ─ silu ─────────────────────────────────────── * ─ out_proj

Module and parameter names equal transformers' (backbone.embeddings,
backbone.layers.N.mixer.in_proj, ..., backbone.norm_f, lm_head), so an HF state dict maps
one to one (`FalconMamba.checkpoint_layout`); the weightless norms have no tensor.

Notation: B batch, T tokens, C hidden, E d_inner (expand * C), N state_size,
R time_step_rank, K conv_kernel, L layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from falconet.models.base import CausalLM, CheckpointLayout
from falconet.models.falcon_mamba_config import FalconMambaConfig
from falconet.nn import elementwise
from falconet.nn.linear import Linear
from falconet.nn.norms import RMSNorm
from falconet.nn.segments import SegmentState, per_segment
from falconet.nn.selective_scan import causal_conv, selective_scan, selective_step


@dataclass
class MambaState:
    """The recurrent state of B sequences, all layers: what replaces the KV cache.

    conv (L, B, E, K - 1): each layer's last K - 1 conv inputs, in the compute dtype;
    ssm (L, B, E, N): each layer's SSM state, fp32. Zeros start a sequence. Its size does
    not depend on how many tokens it has seen.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(
        cls,
        config: FalconMambaConfig,
        batch: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> MambaState:
        L, E = config.num_hidden_layers, config.intermediate_size
        K, N = config.conv_kernel, config.state_size
        return cls(
            conv=torch.zeros(L, batch, E, K - 1, dtype=dtype, device=device),
            ssm=torch.zeros(L, batch, E, N, dtype=torch.float32, device=device),
        )

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * 4


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, in fp32, rounded back to x's dtype
    (transformers' FalconMambaWeightlessRMSNorm; its `weight` buffer is never used)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Mixer(nn.Module):
    def __init__(
        self, config: FalconMambaConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        C, E, N = config.hidden_size, config.intermediate_size, config.state_size
        R, K = config.time_step_rank, config.conv_kernel
        self.state_size, self.time_step_rank, self.eps = N, R, config.mixer_rms_eps
        self.in_proj = Linear(C, 2 * E, config.use_bias, dtype, compute_dtype)
        # depthwise: one K-tap filter per channel, stored as transformers' nn.Conv1d (E, 1, K)
        self.conv1d = nn.Conv1d(
            E, E, K, groups=E, padding=K - 1, bias=config.use_conv_bias, dtype=dtype
        )
        self.x_proj = Linear(E, R + 2 * N, False, dtype, compute_dtype)
        self.dt_proj = Linear(R, E, True, dtype, compute_dtype)
        self.A_log = nn.Parameter(torch.empty(E, N, dtype=dtype), requires_grad=False)
        self.D = nn.Parameter(torch.empty(E, dtype=dtype), requires_grad=False)
        self.out_proj = Linear(E, C, config.use_bias, dtype, compute_dtype)

    def forward(self, x: torch.Tensor, states: list[SegmentState]) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `states` cut the T tokens into sequences, each with
        its conv state (B, E, K-1) and SSM state (B, E, N), read and advanced in place:
        one segment over all T for a dense batch, several sequences side by side (B = 1)
        for the engine's packed row. The projections run on every row at once; the conv
        and the scan, which carry state along a sequence, per segment."""
        dtype = x.dtype
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        bias, weight = self.conv1d.bias, self.conv1d.weight[:, 0]
        u = per_segment(states, lambda rows, conv, _: causal_conv(u[:, rows], conv, weight, bias))
        u = elementwise.silu(u)  # (B, T, E)
        R, N = self.time_step_rank, self.state_size
        dt, B, C = self.x_proj(u).split([R, N, N], dim=-1)  # (B, T, R), (B, T, N) x2
        dt = weightless_rms_norm(dt, self.eps)
        B = weightless_rms_norm(B, self.eps).float()
        C = weightless_rms_norm(C, self.eps).float()
        # transformers adds dt_proj's bias in fp32 inside the scan; here it is added in
        # the compute dtype like every Linear's (the same in fp32, one rounding apart in
        # bf16), which keeps dt_proj an ordinary (batch-invariant, quantizable) Linear
        dt = elementwise.softplus(self.dt_proj(dt).float())  # (B, T, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        uf = u.float()

        def scan(rows: slice, _, ssm: torch.Tensor) -> torch.Tensor:
            if rows.stop - rows.start == 1:  # decode
                i = rows.start
                return selective_step(ssm, uf[:, i], dt[:, i], A, B[:, i], C[:, i])[:, None]
            return selective_scan(ssm, uf[:, rows], dt[:, rows], A, B[:, rows], C[:, rows])

        y = per_segment(states, scan)  # (B, T, E) fp32
        y = y + u * self.D.float()
        y = y * elementwise.silu(z)
        return self.out_proj(y.to(dtype))  # (B, T, C)


class Block(nn.Module):
    def __init__(
        self, config: FalconMambaConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.compute_dtype = compute_dtype
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, compute_dtype)
        self.mixer = Mixer(config, dtype, compute_dtype)

    def forward(self, x: torch.Tensor, states: list[SegmentState]) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        h = self.mixer(self.norm(x.to(self.compute_dtype)), states)
        return residual + h


class FalconMambaModel(nn.Module):
    """transformers' FalconMambaModel: the embeddings, the blocks and the final norm."""

    def __init__(
        self, config: FalconMambaConfig, dtype: torch.dtype, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(config, dtype, compute_dtype) for _ in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, compute_dtype)


class FalconMamba(CausalLM):
    """FalconMambaForCausalLM. `forward(input_ids, state)` returns next-token logits and
    advances `state`; without one the tokens start fresh sequences."""

    embeddings_name = "backbone.embeddings"
    state_pool = "ssm_slots"  # one fixed-size state per sequence, whatever its length

    def __init__(
        self,
        config: FalconMambaConfig,
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, dtype, compute_dtype)
        self.backbone = FalconMambaModel(config, dtype, self.compute_dtype)
        self._add_head(dtype)

    @property
    def device(self) -> torch.device:
        return self.backbone.norm_f.weight.device

    def new_state(self, batch: int) -> MambaState:
        """Zero state for `batch` new sequences, on the model's device."""
        return MambaState.zeros(self.config, batch, self.compute_dtype, self.device)

    def forward(  # type: ignore[override]  # a recurrent state, not a KV cache
        self, input_ids: torch.Tensor, state: MambaState | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T or 1, V) in compute dtype.

        With `state`, the tokens continue the sequences it holds and it is advanced in
        place (prefill in chunks, then decode a token at a time, each call a forward).
        Sequences of a batch are independent; there is no padding.
        """
        if state is None:
            state = self.new_state(input_ids.shape[0])
        x = self._embed_and_blocks(input_ids, state)
        if last_only:
            x = x[:, -1:]
        return self._head(x)

    def forward_packed(  # type: ignore[override]  # a SlotStep, not an attention step
        self, input_ids: torch.Tensor, step, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """Continuous batching: the new tokens of several sequences packed in one row.

        input_ids (N,) are the tokens of `step.segments` side by side (decode tokens and
        prefill chunks); each sequence's conv and scan run from its own slot of the
        engine's SSM pool (engine/state.py `SlotStep`), which is advanced in place.
        Returns logits (R, V) for the packed positions `logit_rows` (R,).
        """
        x = self.backbone.embeddings(input_ids[None]).to(self.compute_dtype)  # (1, N, C)
        for i, block in enumerate(self.backbone.layers):
            x = block(x, step.states(i))
        x = x[0].index_select(0, logit_rows)  # (R, C)
        return self._head(x)  # (R, V)

    def _embed_and_blocks(self, input_ids: torch.Tensor, state: MambaState) -> torch.Tensor:  # type: ignore[override]
        x = self.backbone.embeddings(input_ids).to(self.compute_dtype)  # (B, T, C)
        everything = slice(0, input_ids.shape[1])
        for i, block in enumerate(self.backbone.layers):
            x = block(x, [(everything, state.conv[i], state.ssm[i])])
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        # norm_f of the fp32 residual stream stays fp32 (its weight promotes); the head
        # reads it in the compute dtype
        return self.lm_head(self.backbone.norm_f(x).to(self.compute_dtype))  # (..., V)

    @staticmethod
    def checkpoint_layout(config: FalconMambaConfig) -> CheckpointLayout:
        """Every tensor of the HF checkpoint with its shape; all load as stored. A_log and
        the conv filters stay float when the model is quantized: the state decays by
        exp(dt * A) at every step, so an error in A compounds along the sequence, and
        both are small; llama.cpp keeps them F32 too."""
        C, V, E = config.hidden_size, config.vocab_size, config.intermediate_size
        N, R, K = config.state_size, config.time_step_rank, config.conv_kernel
        shapes: dict[str, tuple[int, ...]] = {"backbone.embeddings.weight": (V, C)}
        keep_float = set()
        for i in range(config.num_hidden_layers):
            p = f"backbone.layers.{i}."
            m = p + "mixer."
            shapes[p + "norm.weight"] = (C,)
            shapes[m + "A_log"] = (E, N)
            shapes[m + "D"] = (E,)
            shapes[m + "conv1d.weight"] = (E, 1, K)
            keep_float |= {m + "A_log", m + "conv1d.weight"}
            if config.use_conv_bias:
                shapes[m + "conv1d.bias"] = (E,)
            shapes[m + "in_proj.weight"] = (2 * E, C)
            if config.use_bias:
                shapes[m + "in_proj.bias"] = (2 * E,)
            shapes[m + "x_proj.weight"] = (R + 2 * N, E)
            shapes[m + "dt_proj.weight"] = (E, R)
            shapes[m + "dt_proj.bias"] = (E,)
            shapes[m + "out_proj.weight"] = (C, E)
            if config.use_bias:
                shapes[m + "out_proj.bias"] = (C,)
        shapes["backbone.norm_f.weight"] = (C,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return CheckpointLayout(shapes, keep_float=frozenset(keep_float))
