"""`falconet info` and `falconet convert`: describe a model, write it as GGUF."""

from __future__ import annotations

import argparse

from falconet.cli.common import Out, add_model_flags, load_model, progress_bar
from falconet.models.falcon_h1_config import FalconH1Config
from falconet.models.falcon_mamba_config import FalconMambaConfig


def add_parsers(sub) -> None:
    info = sub.add_parser("info", help="describe a model: variant, parameters, memory")
    add_model_flags(info)

    from falconet.weights.gguf import TENSOR_TYPES, WRITE_TYPES

    conv = sub.add_parser("convert", help="write a HF Falcon folder as a GGUF file for llama.cpp")
    conv.add_argument("model", help="Hugging Face Falcon folder")
    conv.add_argument("out", help="GGUF file to write")
    conv.add_argument("--type", dest="qtype", default="f16", choices=list(WRITE_TYPES),
                      help="weight type (default f16); q8_0..q4_0 keep the head in q8_0 as llama.cpp does, "
                           "the K-quant mixes (q4_k_m...) pick each tensor's type as llama-quantize does")  # fmt: skip
    conv.add_argument("--output-tensor-type", choices=list(TENSOR_TYPES), metavar="TYPE", type=str.lower,
                      help="the output head's type, as llama-quantize's flag (tied to the embeddings: "
                           f"theirs); one of {', '.join(TENSOR_TYPES)}")  # fmt: skip
    conv.add_argument(
        "--token-embedding-type",
        choices=list(TENSOR_TYPES),
        metavar="TYPE",
        type=str.lower,
        help="the token embeddings' type, as llama-quantize's flag (the same types)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def quant_kernels() -> str:
    import torch

    from falconet.quant import kernels

    if kernels.native is None:
        return "PyTorch fallback (the compiled kernels were not built)"
    native = kernels.native
    simd = native.simd() + (" + AVX-512 VNNI" if native.int8_dot() == "vnni" else "")
    return f"compiled CPU kernels ({simd}, {torch.get_num_threads()} threads)"


def cmd_info(args: argparse.Namespace, out: Out) -> int:
    llm = load_model(args)
    c, m, card = llm.config, llm.model, llm.card
    rows = [
        ("path", str(llm.path)),
        ("family", f"{card.family} [{card.family_source}: {card.architecture}]"),
        ("licence", str(card.licence)),
        ("variant", c.variant),
        ("parameters", f"{m.num_parameters():,}"),
        ("weights", f"{m.weight_bytes():,} bytes ({m.storage_summary()}; compute {m.compute_dtype})"),
        ("bits per weight", f"{8 * m.weight_bytes() / m.num_parameters():.2f} (all weights, as stored)"),
        ("kernels", quant_kernels()),
        *(_state_rows(c, m.compute_dtype.itemsize)),
        ("vocab", f"{c.vocab_size} (tokenizer {llm.tokenizer.vocab_size})"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out(f"{k:<{width}}  {v}\n")
    return 0


def _state_rows(c, itemsize: int) -> list[tuple[str, str]]:
    """The shape rows and what a sequence's state costs: KV bytes per token for an
    attention model, a fixed state per sequence for a recurrent one."""
    if isinstance(c, FalconMambaConfig):
        state = c.state_bytes_per_sequence(itemsize)
        return [
            ("layers / hidden / d_inner / state", f"{c.num_hidden_layers} / {c.hidden_size} / {c.intermediate_size} / {c.state_size}"),
            ("position", "none (recurrent state)"),
            ("context", f"no positional limit (engine default {c.max_position_embeddings})"),
            ("state per sequence", f"{state:,} bytes, whatever the length (no KV cache)"),
        ]  # fmt: skip
    kv_bytes = c.kv_cache_bytes_per_token(itemsize)
    mha_bytes = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * itemsize
    rows = [
        ("layers / hidden / heads / kv heads", f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} / {c.kv_heads}"),
        ("position", "ALiBi" if c.alibi else f"rotary theta={c.rope_theta:g}" + (f", {c.rope_scaling_type} x{c.rope_scaling_factor:g}" if c.rope_scaling_type else "")),
        ("context (max_position_embeddings)", str(c.max_position_embeddings)),
        ("KV cache per token", f"{kv_bytes:,} bytes" + (f" ({mha_bytes // kv_bytes}x smaller than full MHA)" if mha_bytes > kv_bytes else "")),
    ]  # fmt: skip
    if isinstance(c, FalconH1Config):  # a Mamba-2 state beside the attention KV
        state = c.state_bytes_per_sequence(itemsize)
        rows += [
            ("mamba heads / d_head / groups / state", f"{c.mamba_n_heads} / {c.mamba_d_head} / {c.mamba_n_groups} / {c.mamba_d_state}"),
            ("state per sequence", f"{state:,} bytes, whatever the length (plus the KV cache)"),
        ]  # fmt: skip
    return rows


def cmd_convert(args: argparse.Namespace, out: Out) -> int:
    from falconet.convert import convert_hf_to_gguf

    progress, close = progress_bar("convert")
    try:
        convert_hf_to_gguf(args.model, args.out, args.qtype, progress, overwrite=args.overwrite,
                           output_type=args.output_tensor_type,
                           embedding_type=args.token_embedding_type)  # fmt: skip
    finally:
        close()
    out(f"wrote {args.out} ({args.qtype})\n")
    return 0
