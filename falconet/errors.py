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


class StoreUnavailableError(RagError):
    """A store on a database server that cannot be reached or dropped the connection: the
    request may succeed when tried again (the server answers 503)."""


class LoaderError(FalconetError):
    """A document that cannot be read (unsupported, unreadable, too big, binary, encrypted,
    empty): raised by `documents.py` for every face that reads files (rag, train)."""


class LimitError(LoaderError):
    """A document over one of the per-document limits (file size, chunks, tokens).

    `setting` is the limit's name as the CLI flag spells it without dashes: "max_file_mb"
    is `--max-file-mb` for `falconet rag`, `--rag-max-file-mb` for `falconet serve`."""

    def __init__(self, problem: str, setting: str) -> None:
        self.problem = problem
        self.setting = setting
        super().__init__(self.message())

    def flag(self, prefix: str = "") -> str:
        return "--" + prefix + self.setting.replace("_", "-")

    def message(self, flag_prefix: str = "") -> str:
        """The message naming the flag that raises the limit (the server's: prefix "rag-")."""
        return f"{self.problem}; raise {self.flag(flag_prefix)}"


class IngestCancelled(RagError):
    """An ingestion stopped on request (its client went away); the document it was on is
    not stored."""


class GrammarError(GenerationError):
    """A structured-output request (JSON schema, regex, grammar) that cannot be enforced,
    or a sequence whose output can no longer follow its grammar."""


class BatchError(FalconetError):
    """A batch job that cannot run: unreadable input or template, a ledger that belongs
    to another job, an output file changed behind the ledger's back."""


class AccessError(FalconetError):
    """A users, collections, sessions or audit-log problem: a bad name, an unknown user, a
    state folder that cannot be used, an audit log that does not verify."""


class AdapterError(FalconetError):
    """A LoRA adapter folder that cannot be used with this model (missing or malformed
    adapter_config.json, a PEFT method other than LoRA, tensors that do not fit the base),
    or a request naming an adapter that is not loaded."""
