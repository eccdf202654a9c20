"""`falconet convert`: a Hugging Face folder written as a llama.cpp GGUF file.

The model side (models/checkpoint.py) writes the tensors and the architecture's
metadata; the tokenizer's keys come from the folder's tokenizer (falconet.tokenizer),
which lives above the models layer, so the two meet here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from falconet.models.card import read_licence
from falconet.models.checkpoint import write_hf_as_gguf
from falconet.models.registry import ModelConfig
from falconet.tokenizer import Tokenizer
from falconet.weights.gguf import WRITE_TYPES
from falconet.weights.gguf_vocab import vocab_metadata

__all__ = ["WRITE_TYPES", "convert_hf_to_gguf"]


def convert_hf_to_gguf(
    folder: str | Path,
    out: str | Path,
    qtype: str = "f16",
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    output_type: str | None = None,
    embedding_type: str | None = None,
) -> None:
    """Write the HF folder `folder` (Falcon, llama for Falcon3, or Falcon-H1) as a GGUF
    file `out` that llama.cpp runs: qtype f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1,
    llama.cpp's K-quant mixes (q4_k_m, q5_k_m, q6_k, q4_k_s, q5_k_s, q3_k_s/m/l, q2_k:
    the file llama-quantize writes from the float weights, byte for byte), or llama.cpp's
    ternary tq1_0 / tq2_0 (for BitNet checkpoints: Falcon-E, Falcon3-1.58bit).
    progress(done_bytes, total_bytes) is called as tensors are written; an existing
    `out` is replaced only with overwrite=True. The model card's licence (README.md front
    matter) is written as general.license*. output_type / embedding_type: the output
    head's / the token embeddings' type, as llama-quantize's --output-tensor-type /
    --token-embedding-type (e.g. q8_0 for a ternary file, whose converter default F16
    head is most of what a decode step reads)."""
    folder = Path(folder).expanduser()

    def vocab(config: ModelConfig) -> dict[str, Any]:
        # The declared licence travels into the file (general.license*), as llama.cpp's
        # converter does, so `falconet info` on the GGUF names it too.
        licence = read_licence(folder).gguf_metadata()
        return {**licence, **vocab_metadata(Tokenizer.from_dir(folder), config)}

    write_hf_as_gguf(folder, out, qtype, vocab, progress, overwrite, output_type, embedding_type)
