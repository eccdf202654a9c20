"""Generation: stop strings, stop tokens, streaming, seeds, logprobs, finish reasons."""

from __future__ import annotations

import pytest
import torch

import falconet
from falconet.errors import GenerationError
from falconet.generate import StopStringFilter

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_7b):
    return falconet.load(tiny_7b, dtype="float32")


def test_stream_joins_to_generate(llm):
    full = llm.generate(PROMPT, max_tokens=24, ignore_eos=True)
    pieces = list(llm.stream(PROMPT, max_tokens=24, ignore_eos=True))
    assert "".join(pieces) == full
    assert len(pieces) > 1


def _boundary_stop_string(llm, ids, text):
    """A 2-char stop string whose first char ends one token and second starts the next,
    and whose first occurrence in `text` is at that token boundary."""
    for k in range(1, len(ids)):
        head = llm.tokenizer.decode(ids[:k], skip_special_tokens=True)
        if (
            not head
            or head.endswith("\ufffd")
            or not text.startswith(head)
            or len(text) <= len(head)
        ):
            continue
        stop = text[len(head) - 1 : len(head) + 1]
        if "\ufffd" not in stop and text.find(stop) == len(head) - 1:
            return stop, len(head) - 1
    raise AssertionError("no usable token boundary in the generated text")


def test_stop_string_split_across_tokens_is_cut_and_not_leaked(llm):
    out = llm.complete([PROMPT], max_tokens=24, ignore_eos=True)[0]
    stop, at = _boundary_stop_string(llm, out.token_ids, out.text)
    expected = out.text[:at]
    res = llm.complete([PROMPT], max_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert res.text == expected
    assert res.finish_reason == "stop"
    assert len(res.token_ids) < len(out.token_ids)
    pieces = list(llm.stream(PROMPT, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(pieces) == expected


def test_stop_filter_holds_back_prefixes():
    f = StopStringFilter(("lo w", "END"))
    assert f.push("Hel") == "He"  # "l" could start "lo w"
    assert f.push("l") == "l"
    assert f.push("o") == ""
    assert f.push(" wor") == ""
    assert f.stopped
    g = StopStringFilter(("END",))
    assert g.push("aE") == "a"
    assert g.push("N") == ""
    assert g.push("x") == "ENx"
    assert g.flush() == ""
    h = StopStringFilter(("END",))
    assert h.push("xE") == "x"
    assert h.flush() == "E"  # a held prefix that never completed is released at the end


def test_stop_token_id_ends_with_stop_and_is_not_in_text(llm):
    first = llm.complete([PROMPT], max_tokens=5, ignore_eos=True)[0]
    tok = first.token_ids[2]
    res = llm.complete([PROMPT], max_tokens=5, ignore_eos=True, stop_token_ids=[tok])[0]
    assert res.finish_reason == "stop"
    assert res.token_ids == first.token_ids[:3]
    assert res.text == llm.tokenizer.decode(first.token_ids[:2], skip_special_tokens=True)


def test_eos_stops_unless_ignored(llm):
    first = llm.complete([PROMPT], max_tokens=6, ignore_eos=True)[0]
    # make the model's own third token the eos by declaring it one
    llm2 = falconet.LLM(llm.model, llm.tokenizer)
    llm2.eos_ids = (first.token_ids[2],)
    res = llm2.complete([PROMPT], max_tokens=6)[0]
    assert (res.finish_reason, len(res.token_ids)) == ("stop", 3)
    res = llm2.complete([PROMPT], max_tokens=6, ignore_eos=True)[0]
    assert (res.finish_reason, res.token_ids) == ("length", first.token_ids)


def test_max_tokens_gives_length(llm):
    res = llm.complete([PROMPT], max_tokens=7, ignore_eos=True)[0]
    assert res.finish_reason == "length"
    assert res.completion_tokens == 7
    assert res.prompt_tokens == len(llm.tokenizer.encode(PROMPT))


def test_seed_reproducible_and_seeds_differ(llm):
    kw = dict(max_tokens=16, temperature=1.5, ignore_eos=True)
    a = llm.complete([PROMPT], seed=1234, **kw)[0].token_ids
    b = llm.complete([PROMPT], seed=1234, **kw)[0].token_ids
    c = llm.complete([PROMPT], seed=99, **kw)[0].token_ids
    assert a == b
    assert a != c


def test_seeded_row_same_in_batch_and_alone(llm):
    kw = dict(max_tokens=10, temperature=1.0, ignore_eos=True, seed=5)
    alone = llm.complete([PROMPT], **kw)[0].token_ids
    batch = llm.complete(["Other text", PROMPT, "x"], **kw)
    assert batch[1].token_ids == alone


def test_logprobs_are_log_softmax_of_model_logits(llm):
    res = llm.complete([PROMPT], max_tokens=4, ignore_eos=True, logprobs=3)[0]
    prompt_ids = llm.tokenizer.encode(PROMPT)
    logits = llm.logits(prompt_ids + res.token_ids)
    for i, lp in enumerate(res.logprobs):
        ref = torch.log_softmax(logits[len(prompt_ids) - 1 + i], dim=-1)
        assert lp.token == res.token_ids[i]
        assert lp.logprob == pytest.approx(ref[lp.token].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


def test_top_k_one_equals_greedy(llm):
    greedy = llm.complete([PROMPT], max_tokens=8, ignore_eos=True)[0].token_ids
    sampled = llm.complete(
        [PROMPT], max_tokens=8, ignore_eos=True, temperature=1.0, top_k=1, seed=3
    )[0]
    assert sampled.token_ids == greedy


@pytest.mark.parametrize(
    "prompt, kw",
    [
        ("", {}),
        ([], {}),
        ([10**9], {}),
        ([-1], {}),
        ("x", {"max_tokens": 0}),
        ("x", {"temperature": -0.5}),
        ("x", {"top_p": 0.0}),
        ("x", {"stop": [""]}),
        (3.5, {}),
    ],
)
def test_bad_generation_input_raises_typed_error(llm, prompt, kw):
    with pytest.raises(GenerationError):
        llm.complete([prompt], **kw)


def test_logits_rejects_bad_ids(llm):
    with pytest.raises(GenerationError):
        llm.logits([])
    with pytest.raises(GenerationError):
        llm.logits([llm.config.vocab_size])


def test_streaming_does_not_leak_inference_mode(llm):
    it = llm.stream(PROMPT, max_tokens=4, ignore_eos=True)
    next(it)
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(2, requires_grad=True)
    assert (x * 2).sum().requires_grad
    list(it)


def test_complete_rejects_a_bare_string(llm):
    with pytest.raises(GenerationError, match="list of prompts"):
        llm.complete("hello")


@pytest.mark.parametrize("bad", [[1.7, 2.2], [[1, 2], [3, 4]], "hello", torch.tensor([1.0, 2.0])])
def test_logits_rejects_non_integer_ids(llm, bad):
    with pytest.raises(GenerationError):
        llm.logits(bad)


def test_tiny_temperature_is_greedy(llm):
    greedy = llm.complete([PROMPT], max_tokens=6, ignore_eos=True)[0].token_ids
    tiny = llm.complete([PROMPT], max_tokens=6, ignore_eos=True, temperature=1e-40, seed=1)[0]
    assert tiny.token_ids == greedy


def test_kv_cache_larger_than_memory_is_a_clear_error(llm):
    with pytest.raises(GenerationError, match="KV cache"):
        llm.complete([PROMPT], max_tokens=10**12)


def test_sampling_params_object_and_keywords_agree(llm):
    from falconet.sampling import SamplingParams

    p = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    a = llm.complete([PROMPT], p)[0].token_ids
    b = llm.complete([PROMPT], max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)[0].token_ids
    assert a == b
    assert "".join(llm.stream(PROMPT, params=p)) == llm.tokenizer.decode(
        a, skip_special_tokens=True
    )
    with pytest.raises(GenerationError, match="not both"):
        llm.complete([PROMPT], p, max_tokens=3)
