"""Structured output for the OpenAI routes: a request's response_format or guided_*
field (checked in protocol.py) compiled into a grammar over the served tokenizer
(falconet/constraints.py), and one grammar processor per choice."""

from __future__ import annotations

from dataclasses import replace

from falconet.constraints import Grammar
from falconet.errors import GrammarError
from falconet.server.protocol import ChatCompletionRequest, CompletionRequest, bad
from falconet.tokenizer import Tokenizer


def request_grammar(
    body: CompletionRequest | ChatCompletionRequest, tokenizer: Tokenizer
) -> Grammar | None:
    """The grammar `body` asks its output to follow, or None; a 400 naming the field
    when it cannot be enforced (an invalid schema, regex or grammar)."""
    guide = body.guide()
    if guide is None:
        return None
    kind, spec, field = guide
    where = "response_format.json_schema.schema" if kind == "json_schema" and (
        field == "response_format") else field  # fmt: skip
    try:
        return Grammar.compile(kind, spec, tokenizer, f"'{where}'")  # type: ignore[arg-type]
    except GrammarError as e:
        raise bad(str(e), field) from e


def constrain(params: list, grammar: Grammar | None) -> list:
    """`params` (one SamplingParams per choice), each with its own grammar processor
    ahead of any other logits processor."""
    if grammar is None:
        return params
    return [replace(p, logits_processors=(grammar.processor(), *p.logits_processors))
            for p in params]  # fmt: skip
