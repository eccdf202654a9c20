"""Grammar processors (falconet/constraints.py) in the engine, on falconet-tiny: the mask
allows exactly what llguidance allows, the end-of-sequence token only where the grammar
accepts, a processor shared by two sequences still gives each a valid output, and a
model vocabulary wider than the tokenizer's never lets the extra ids through."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

import falconet
from falconet.constraints import Grammar
from falconet.engine import Engine
from falconet.errors import GrammarError
from falconet.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return falconet.load()


@pytest.fixture(scope="module")
def engine(llm):
    return Engine.from_llm(llm, max_batch=4)


def test_eos_only_where_the_grammar_accepts(llm):
    tok = llm.tokenizer
    (eos,) = tok.eos_token_ids
    proc = Grammar.compile("regex", "ab|abcd", tok).processor()
    V = llm.model.config.vocab_size

    def allowed(ids: list[int]) -> set[int]:
        return set(torch.nonzero(proc(ids, torch.zeros(V)) == 0).flatten().tolist())

    start = allowed([])
    assert eos not in start and start  # nothing matched yet
    assert all(tok.decode([t]) in ("a", "ab", "abc", "abcd") for t in start)
    a = tok.encode("a")
    assert eos not in allowed(a)
    ab = tok.encode("ab")
    at_ab = allowed(ab)
    assert eos in at_ab  # "ab" is a whole match; "abcd" could go on
    assert all(t == eos or tok.decode([t]) in ("c", "cd") for t in at_ab)
    assert allowed(tok.encode("abcd")) == {eos}  # nothing else can follow


def test_schema_through_the_engine(llm, engine):
    schema = {"type": "object", "properties": {"tag": {"enum": ["x", "y"]}, "n": {
        "type": "integer", "minimum": 1, "maximum": 99}}, "required": ["tag", "n"],
        "additionalProperties": False}  # fmt: skip
    grammar = Grammar.compile("json_schema", schema, llm.tokenizer)
    prompt = llm.tokenizer.encode("Data:")
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s,
                             logits_processors=(grammar.processor(),)) for s in range(3)]  # fmt: skip
    for out in engine.generate([prompt] * 3, params):
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema)
        assert out.token_ids[-1] in llm.tokenizer.eos_token_ids


def test_a_shared_processor_starts_over_for_each_sequence(llm, engine):
    """Two sequences interleaved in one batch through the same processor."""
    proc = Grammar.compile("regex", r"[a-z]{2,6}-[0-9]{2}", llm.tokenizer).processor()
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=7, logits_processors=(proc,))
    prompts = [llm.tokenizer.encode("Code:"), llm.tokenizer.encode("Another code:")]
    for out in engine.generate(prompts, [params, params]):
        assert out.finish_reason == "stop"
        assert re.fullmatch(r"[a-z]{2,6}-[0-9]{2}", out.text), out.text


def test_ids_past_the_tokenizer_are_never_allowed(llm):
    proc = Grammar.compile("choice", ["yes", "no"], llm.tokenizer).processor()
    V = llm.tokenizer.vocab_size
    out = proc([], torch.zeros(V + 64))  # a padded embedding, as many checkpoints have
    assert out.shape == (V + 64,)
    assert bool((out[V:] == -math.inf).all())
    assert {llm.tokenizer.decode([t]) for t in torch.nonzero(out == 0).flatten().tolist()} <= {
        "yes", "no", "y", "ye", "n", "es", "o"}  # fmt: skip


def test_a_token_outside_the_grammar_is_an_error(llm):
    proc = Grammar.compile("regex", "[0-9]+", llm.tokenizer).processor()
    with pytest.raises(GrammarError, match="left the grammar"):
        proc(llm.tokenizer.encode("abc"), torch.zeros(llm.model.config.vocab_size))


@pytest.mark.parametrize(
    "kind,spec,words",
    [
        ("json_schema", {"type": "intger"}, "intger"),
        ("json_schema", {"type": "array", "uniqueItems": True}, "uniqueItems"),
        ("regex", "[a-", "unclosed character class"),
        ("grammar", "start: foo", "foo"),
        ("grammar", "root ::= (", "grammar"),
    ],
)
def test_what_cannot_be_enforced_says_why(llm, kind, spec, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        Grammar.compile(kind, spec, llm.tokenizer)
