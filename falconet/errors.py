"""Typed errors. Each message names the problem and what the user can do about it.

Library code raises these; only the CLI and the server turn them into exit codes or
HTTP statuses.
"""

from __future__ import annotations


class FalconetError(Exception):
    """Base class for every error falconet raises on purpose."""


class ConfigError(FalconetError):
    """A config.json that is not a supported, self-consistent Falcon config."""


class CheckpointError(FalconetError):
    """Weights that are missing, truncated, mis-shaped or not a Falcon checkpoint."""


class TokenizerError(FalconetError):
    """A tokenizer file that is missing or cannot be read."""


class GenerationError(FalconetError):
    """Bad generation arguments (sampling values, a prompt longer than the context)."""


class RagError(FalconetError):
    """A retrieval (RAG) problem: a store or an embedder that cannot be used."""


class LoaderError(FalconetError):
    """A document that cannot be read (unsupported, unreadable, too big, binary, encrypted,
    empty): raised by `documents.py` for every face that reads files (rag, train)."""
