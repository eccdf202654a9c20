"""Structured output for the OpenAI routes: a request's response_format or guided_*
field (checked in protocol.py) compiled into a grammar over the served tokenizer
(falconet/constraints.py), and one grammar processor per choice."""

from __future__ import annotations

from dataclasses import replace

from falconet.constraints import Grammar
from falconet.errors import GrammarError
from falconet.server.fields import bad
from falconet.server.protocol import ChatCompletionRequest, CompletionRequest
from falconet.tokenizer import Tokenizer
from falconet.tools import Function, tool_call_grammar


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


def tool_grammar(body: ChatCompletionRequest, tokenizer: Tokenizer) -> Grammar | None:
    """With tool_choice "required" or a named function, the grammar of an answer that is
    only calls (to that function), arguments following the functions' schemas."""
    mode = body.tool_mode()
    if mode not in ("required", "named"):
        return None
    chosen = [
        (i, t) for i, t in enumerate(body.tools or [])
        if mode == "required" or t.function.name == body.tool_choice.function.name  # type: ignore[union-attr]
    ]  # fmt: skip
    functions = [Function(t.function.name, t.function.parameters) for _, t in chosen]
    try:
        return tool_call_grammar(functions, bool(body.parallel_tool_calls), tokenizer)
    except GrammarError as e:
        # Which function's schema? Each alone, so the 400 names the one llguidance refuses
        # (only now: compiling up to 128 schemas one by one costs seconds).
        for i, tool in chosen:
            if tool.function.parameters is None:
                continue
            where = f"tools[{i}].function.parameters"
            try:
                Grammar.compile("json_schema", tool.function.parameters, tokenizer, f"'{where}'")
            except GrammarError as alone:
                raise bad(str(alone), where) from alone
        raise bad(str(e), "tools") from e  # the calls' grammar as a whole hit a limit


def constrain(params: list, grammar: Grammar | None) -> list:
    """`params` (one SamplingParams per choice), each with its own grammar processor
    ahead of any other logits processor."""
    if grammar is None:
        return params
    return [replace(p, logits_processors=(grammar.processor(), *p.logits_processors))
            for p in params]  # fmt: skip
