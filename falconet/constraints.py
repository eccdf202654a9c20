"""Structured output: grammars that constrain what a sequence may generate.

A `Grammar` is compiled once per request from what the user asked for (a JSON schema,
"any JSON object", a regular expression, a Lark or GBNF grammar, or a list of choices)
by llguidance, the grammar engine behind guidance and one of vLLM's structured-output
backends. Each sequence then gets its own `GrammarProcessor`: a logits processor
(sampling.py) holding an llguidance matcher that, before every sampling step, takes in
the tokens sampled since its last call and puts every token the grammar does not allow
next at -inf. The end-of-sequence token is allowed only where the grammar accepts, so a
sequence that stops on it has output the grammar derives (a JSON schema's output parses
and validates); a sequence cut short by max_tokens or a stop string does not.

The bridge from falconet's tokenizer to llguidance's is the HF `tokenizers` JSON itself
(`LLTokenizer` reads it, as llguidance's own transformers helper does), so both agree on
the bytes of every token; built once per tokenizer (about a second for a 131k vocabulary).

JSON is written in one canonical layout, `{"a": 1, "b": [2, 3]}` (Python's json.dumps
separators, no other whitespace): free whitespace would let a model pad the output
forever, and this layout is the one most models write anyway. A schema may override it
through llguidance's "x-guidance" key.
"""

from __future__ import annotations

import json
import math
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from falconet.errors import GrammarError
from falconet.tokenizer import Tokenizer

__all__ = ["Grammar", "GrammarProcessor", "GrammarKind"]

GrammarKind = Literal["json_schema", "json_object", "regex", "grammar", "lark", "choice"]
# The JSON layout described above (llguidance's JSON compile options).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}

_WHAT = {
    "json_schema": "a JSON schema llguidance can enforce",
    "json_object": "a JSON object",
    "regex": "a regular expression (Rust regex syntax)",
    "grammar": "a Lark or GBNF grammar",
    "lark": "a Lark grammar (llguidance's syntax)",
    "choice": "a list of strings",
}

_tokenizers: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a broken install: it is a main dependency
        raise GrammarError(
            "structured output needs the llguidance package; pip install llguidance"
        ) from e
    return llguidance


def guidance_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of `tokenizer` (an `LLTokenizer`), built once per tokenizer."""
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
        if cached is not None:
            return cached
        if not tokenizer.eos_token_ids:
            raise GrammarError(
                "structured output ends with the end-of-sequence token, and the tokenizer "
                f"from {tokenizer.source} has none"
            )
        llg = _llguidance()
        built = llg.LLTokenizer(
            tokenizer.backend.to_str(),
            n_vocab=tokenizer.vocab_size,
            eos_token=list(tokenizer.eos_token_ids),
        )
        _tokenizers[tokenizer] = built
        return built


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one request; `processor()` makes one per sequence."""

    kind: GrammarKind
    source: str  # llguidance's grammar definition (JSON text)
    vocab_size: int  # of the tokenizer the grammar is over
    _prototype: Any  # a validated llguidance matcher in its start state

    @classmethod
    def compile(
        cls, kind: GrammarKind, spec: Any, tokenizer: Tokenizer, name: str = "the grammar"
    ) -> Grammar:
        """`spec` as a grammar over `tokenizer`'s tokens: a JSON schema (a dict) for
        "json_schema", ignored for "json_object", a pattern or grammar text for "regex",
        "grammar" and "lark", a list of strings for "choice". Raises GrammarError saying what
        is wrong with `spec`, which its message calls `name`."""
        llg = _llguidance()
        try:
            if kind == "json_schema" or kind == "json_object":
                schema = ANY_OBJECT if kind == "json_object" else spec
                source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            elif kind == "regex":
                source = llg.LLMatcher.grammar_from_regex(spec)
            elif kind == "grammar":  # Lark, or llama.cpp's GBNF converted to Lark
                source = llg.grammar_from("grammar", spec)
            elif kind == "lark":  # with llguidance's extensions (%json), unconverted
                source = llg.LLMatcher.grammar_from_lark(spec)
            elif kind == "choice":
                source = llg.grammar_from("choice", json.dumps(spec))
            else:
                raise GrammarError(f"no grammar kind {kind!r}; use one of {', '.join(_WHAT)}")
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{name} is not {_WHAT[kind]}: {_first_line(e)}") from e
        lltok = guidance_tokenizer(tokenizer)
        problem = llg.LLMatcher.validate_grammar(source, lltok)
        if problem:
            raise GrammarError(f"{name} is not {_WHAT[kind]}: {_first_line(problem)}")
        matcher = llg.LLMatcher(lltok, source, log_level=0)
        # The first mask builds the lexer, the costly part of a hostile regex (seconds,
        # within llguidance's limits): here, in the request's thread, not in the engine's.
        matcher.compute_bitmask()
        if matcher.is_error():  # a limit hit while building
            raise GrammarError(f"{name} cannot be used: {_first_line(matcher.get_error())}")
        return cls(kind, source, lltok.vocab_size, matcher)

    def processor(self) -> GrammarProcessor:
        """A fresh logits processor for one sequence."""
        return GrammarProcessor(self._prototype.deep_copy(), self.vocab_size, self.kind)


MAX_MESSAGE = 300  # characters of llguidance's message passed on


def _first_line(message: object) -> str:
    """llguidance's message on one line, without the excerpt it draws under it (source
    lines, carets) or the parser state it dumps."""
    kept = []
    for line in str(message).split("<state>")[0].splitlines():
        line = line.strip()
        if line and not re.fullmatch(r"\^+|\d+ \|.*", line):
            kept.append(line)
    text = " ".join(kept) or "(no detail)"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class GrammarProcessor:
    """A logits processor (generated ids, (V,) logits) -> logits that allows only the
    tokens the grammar allows next.

    It takes in the tokens generated since its previous call, so it must see every step
    of its sequence (the engine calls it at each one). Made for one sequence; given ids
    that do not extend what it has seen (shared between sequences), it starts over from
    the grammar's start and takes them all, which is right but slower."""

    def __init__(self, matcher: Any, vocab_size: int, kind: GrammarKind = "grammar") -> None:
        self.matcher = matcher
        self.kind = kind
        self._seen: list[int] = []
        # one bit per token, llguidance's layout: token i is bit i % 32 of word i // 32
        self._bitmask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen = len(self._seen)
        if len(ids) < seen or ids[:seen] != self._seen:
            self.matcher.reset()
            self._seen, seen = [], 0
        new = ids[seen:]
        if new and not self.matcher.consume_tokens(new):
            raise GrammarError(f"the output left the grammar: {self._error()}")
        self._seen += new
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot go on: {self._error()}")
        return self.mask(logits)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the last mask forbids at -inf, in place (the
        sampler hands each processor its own copy). Ids past the grammar's tokenizer
        are never allowed (a model's padded vocabulary)."""
        vocab = logits.shape[-1]
        # Inverted words unpack straight into the forbidden tokens: two passes over V.
        forbidden = np.unpackbits((~self._bitmask).view(np.uint8), bitorder="little")
        n = min(vocab, forbidden.shape[0])
        rows = torch.from_numpy(forbidden[:n].view(np.bool_)).to(logits.device)
        logits[:n].masked_fill_(rows, -math.inf)
        logits[n:] = -math.inf
        return logits

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the last mask allows."""
        return self.mask(torch.zeros(vocab)) == 0

    def _error(self) -> str:
        return _first_line(self.matcher.get_error() or self.matcher.stop_reason())
