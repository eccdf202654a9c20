"""POST /v1/embeddings: OpenAI's embeddings API over the RAG embedder.

The embedder is the one the RAG routes use (all-MiniLM-L6-v2, packaged, by default;
`--embedding-model DIR` for another sentence-transformers folder), loaded on first use
and shared with them one call at a time (`SharedEmbedder`). `input` is a string, a list
of strings, a list of token ids or a list of those, as OpenAI takes it; token ids are in
the embedding model's own vocabulary (see /tokenize for the served LLM's). Each input is
read whole: one longer than the model's `max_seq_length` (special tokens included) is
refused rather than silently cut, as OpenAI and vLLM refuse it. Vectors are unit length
(cosine = dot product); `encoding_format: "base64"` sends each as little-endian float32
bytes, which the official client asks for by default and decodes with numpy.
`usage.prompt_tokens` counts the tokens the model read, special tokens included.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, StrictInt

from falconet.errors import RagError
from falconet.request_rules import must_be
from falconet.server.fields import APIError, Name, bad, check_text, checked, field_error

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
EMBED_CALL = 16  # inputs per call to the shared embedder: RAG queries wait for one call at most

_INPUT_ALLOWED = (
    f"a non-empty string, an array of up to {MAX_INPUTS} of them, an array of token ids, or an "
    "array of those"
)


def _inputs(value: Any) -> list[str] | list[list[int]]:
    """`input` as a list of texts or a list of token-id lists, each one non-empty."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        value = [value]
    if not value or len(value) > MAX_INPUTS:
        raise field_error(must_be(_INPUT_ALLOWED, value))
    for item in value:
        if not item:  # "" or []: nothing to embed
            raise field_error(must_be(_INPUT_ALLOWED, value))
        if isinstance(item, str):
            check_text(item)
    return value


EmbeddingInput = Annotated[
    str | list[str] | list[StrictInt] | list[list[StrictInt]],
    checked(_INPUT_ALLOWED, null_is_default=False, then=_inputs),
]
EncodingFormat = Annotated[Literal["float", "base64"] | None, checked('"float" or "base64"')]
Dimensions = Annotated[
    int | None, Field(strict=True, ge=1), checked("an integer >= 1", integral=True)
]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    input: EmbeddingInput = Field(description="what to embed: text or token ids, one or a list")
    model: Name = Field(None, description="the embedding model's name; may be left out")
    encoding_format: EncodingFormat = Field(
        "float", description="base64: little-endian float32 bytes"
    )
    dimensions: Dimensions = Field(
        None, description="only the model's own dimension (no shortened embeddings)"
    )


def _check_lengths(ids: list[list[int]], max_tokens: int) -> None:
    for i, seq in enumerate(ids):
        if len(seq) > max_tokens:
            raise bad(
                f"'input[{i}]' has {len(seq)} tokens (special tokens included); this embedding "
                f"model reads at most {max_tokens}; split the text",
                "input",
                "context_length_exceeded",
            )


def _tokens(embedder: Any, inputs: list[str] | list[list[int]]) -> list[list[int]]:
    """The token ids the model reads for each input: texts tokenized, client ids framed
    with the model's special tokens after their range is checked."""
    if isinstance(inputs[0], str):
        return embedder.tokenize(inputs)
    for i, seq in enumerate(inputs):
        outside = [t for t in seq if not 0 <= t < embedder.vocab_size]
        if outside:
            raise bad(f"'input[{i}]' has token id {outside[0]}, outside the embedding model's "
                      f"vocabulary [0, {embedder.vocab_size})", "input")  # fmt: skip
    return [embedder.with_special_tokens(seq) for seq in inputs]


def _vector(v: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def create_embeddings(body: EmbeddingRequest, door: Any) -> dict[str, Any]:
    """The answer to `body` (run in a worker thread): `door` is the shared embedder's
    door (`EmbedderDoor`), taken once to check and tokenize, then once per EMBED_CALL
    inputs."""

    def prepare(embedder: Any) -> tuple[str, list[list[int]]]:
        names = (embedder.name, embedder.name.split("/")[-1])
        if body.model is not None and body.model not in names:
            raise APIError(404, f"the model {body.model!r} does not exist; this server embeds "
                           f"with {embedder.name!r}", "model", "model_not_found")  # fmt: skip
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise bad(f"'dimensions' {body.dimensions} is not supported: {embedder.name} makes "
                      f"{embedder.dim}-dimensional vectors only; leave 'dimensions' out",
                      "dimensions")  # fmt: skip
        ids = _tokens(embedder, body.input)
        _check_lengths(ids, embedder.max_seq_length)
        return embedder.name, ids

    try:
        name, ids = door.call(prepare)
        vectors = [
            door.call(lambda e, part=ids[i : i + EMBED_CALL]: e.embed_tokens(part))
            for i in range(0, len(ids), EMBED_CALL)
        ]
    except RagError as e:  # the model folder cannot be loaded: the server's problem
        raise APIError(503, f"the embedding model is unavailable: {e}",
                       code="embedding_model_unavailable") from e  # fmt: skip
    matrix = np.concatenate(vectors)
    encoding = body.encoding_format
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(v, encoding)}
        for i, v in enumerate(matrix)
    ]
    tokens = sum(len(seq) for seq in ids)
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
