"""The recurrent Falcons' benchmark shapes (bench_generate.py's --arch falcon_h1 and
falcon_mamba): their default sizes, transformers configs and random initialisation.

- falcon_h1: Falcon-H1-0.5B's shape (tiiuae/Falcon-H1-0.5B config.json: hidden 1024, 36
  layers, GQA 8q/2kv of 64, intermediate 2048; Mamba-2 with d_ssm 1536 = 24 heads of 64,
  one group, state 128, conv 4, chunk 128; vocab 32,768, untied head), 0.52 B
  parameters, with the real model's muP multipliers where the config values were found
  (embedding, lm_head, key, attention in/out, the MLP pair); the SSM in/out multipliers
  and the five z/x/B/C/dt slices were not, so they take non-trivial values of the same
  kind (powers of two and their square roots), which cost the same to run.
- falcon_mamba: Falcon-Mamba-7B's per-layer shape (hidden 4096, d_inner 8192, state 16,
  conv 4, dt rank 256, vocab 65,024, tied head) with 8 of its 64 layers (1.1 B
  parameters), so the random checkpoint, its fp32 build and two GGUFs fit a 24 GB
  machine. Per token each layer costs what the 7B's does; the 7B is ~8x slower.

Random weights at unit gain: every projection drawn with std 1/sqrt(fan_in) (outputs
about as large as inputs), so activations neither vanish nor blow up through the layers
whatever the multipliers; dt_proj, the embeddings and the SSM parameters (A_log, D, dt
bias) keep transformers' own initialisation, which already gives a realistic dt range
and decay.
"""

from __future__ import annotations

import argparse
import math

import torch

FALCON_H1_0_5B_SHAPE = {
    "hidden": 1024,
    "layers": 36,
    "heads": 8,
    "kv_heads": 2,
    "head_dim": 64,
    "intermediate": 2048,
    "ssm_inner": 1536,
    "ssm_heads": 24,
    "ssm_head_dim": 64,
    "ssm_groups": 1,
    "ssm_state": 128,
    "ssm_conv": 4,
    "ssm_chunk": 128,
    "vocab": 32768,
}
FALCON_MAMBA_SHAPE = {
    "hidden": 4096,
    "layers": 8,
    "intermediate": 8192,  # d_inner = expand * hidden
    "ssm_state": 16,
    "ssm_conv": 4,
    "dt_rank": 256,
    "vocab": 65024,
}
RECURRENT_SHAPES = {"falcon_h1": FALCON_H1_0_5B_SHAPE, "falcon_mamba": FALCON_MAMBA_SHAPE}
SHORT = {"ssm_inner": "e", "ssm_heads": "mh", "ssm_head_dim": "mp", "ssm_groups": "g",
         "ssm_state": "n", "ssm_conv": "c", "ssm_chunk": "ch", "dt_rank": "r"}  # fmt: skip
CACHE_NAMES = {"falcon_h1": "falcon-h1-0.5b", "falcon_mamba": "falcon-mamba-7b-8l"}

# Falcon-H1-0.5B's multipliers (its config.json), except the SSM ones (see above).
H1_MULTIPLIERS = {
    "embedding_multiplier": 5.656854249492381,
    "lm_head_multiplier": 0.0390625,
    "key_multiplier": 0.390625,
    "attention_in_multiplier": 1.0,
    "attention_out_multiplier": 0.9375,
    "mlp_multipliers": [0.8838834764831844, 0.5859375],
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.23570226039551587,
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
}


def check_shape(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """ap.error for a recurrent shape transformers would reject or build differently."""
    if args.arch == "falcon_h1":
        if args.heads % args.kv_heads:
            ap.error("--heads must be a multiple of --kv-heads")
        if args.ssm_inner != args.ssm_heads * args.ssm_head_dim:
            ap.error("--ssm-inner must be --ssm-heads x --ssm-head-dim")
        if args.ssm_heads % args.ssm_groups:
            ap.error("--ssm-heads must be a multiple of --ssm-groups")
    elif args.arch == "falcon_mamba" and args.intermediate % args.hidden:
        ap.error("--intermediate (d_inner) must be a multiple of --hidden (expand is an integer)")


def hf_config(args: argparse.Namespace, eos_id: int):
    """The transformers config of a recurrent --arch checkpoint."""
    if args.arch == "falcon_h1":
        from transformers import FalconH1Config

        return FalconH1Config(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            mamba_d_ssm=args.ssm_inner,
            mamba_n_heads=args.ssm_heads,
            mamba_d_head=args.ssm_head_dim,
            mamba_n_groups=args.ssm_groups,
            mamba_d_state=args.ssm_state,
            mamba_d_conv=args.ssm_conv,
            mamba_chunk_size=args.ssm_chunk,
            mamba_expand=2,
            mamba_conv_bias=True,
            mamba_proj_bias=False,
            mamba_rms_norm=False,
            mamba_norm_before_gate=False,
            projectors_bias=False,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e11},
            rms_norm_eps=1e-5,
            max_position_embeddings=16384,
            tie_word_embeddings=False,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=0,
            **H1_MULTIPLIERS,
        )
    from transformers import FalconMambaConfig

    return FalconMambaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        expand=args.intermediate // args.hidden,
        state_size=args.ssm_state,
        conv_kernel=args.ssm_conv,
        time_step_rank=args.dt_rank,
        use_conv_bias=True,
        use_bias=False,
        layer_norm_epsilon=1e-5,
        mixer_rms_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@torch.no_grad()
def unit_gain(model: torch.nn.Module, seed: int) -> None:
    """Redraw every projection (nn.Linear) but dt_proj with std 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("dt_proj"):
            w = module.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32) / math.sqrt(w.shape[1]))


def describe(args: argparse.Namespace) -> str:
    if args.arch == "falcon_h1":
        return (
            f"Falcon-H1-0.5B-shaped: hidden {args.hidden}, {args.layers} layers, attention "
            f"{args.heads} / {args.kv_heads} KV heads of {args.head_dim} in parallel with "
            f"Mamba-2 ({args.ssm_heads} heads of {args.ssm_head_dim}, {args.ssm_groups} "
            f"group(s), state {args.ssm_state}, chunk {args.ssm_chunk}), intermediate "
            f"{args.intermediate}, vocab {args.vocab}, untied head, muP multipliers"
        )
    return (
        f"Falcon-Mamba-7B's layer shape with {args.layers} layers (the 7B has 64): hidden "
        f"{args.hidden}, d_inner {args.intermediate}, state {args.ssm_state}, conv "
        f"{args.ssm_conv}, dt rank {args.dt_rank}, vocab {args.vocab}, tied head"
    )
