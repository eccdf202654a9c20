"""Prompt logprobs over HTTP: `/v1/completions` with `echo`, `logprobs`, vLLM's
`prompt_logprobs` and `max_tokens: 0`, against real `falconet serve --dtype float32`
processes for three architectures (Falcon, Falcon3, Falcon-H1), driven by the official
`openai` client and raw httpx. Every prompt logprob equals `LLM.logits` for the same
tokens; an lm-evaluation-harness `local-completions` loglikelihood request is answered
as the harness reads it."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

import falconet
from falconet.generate import TokenStrings
from tests.conftest import TINY_HF_MODELS, save_hf_model
from tests.server_tools import ServerProcess, sse_events

T = 120  # client timeout: only there so a broken server cannot hang the suite
TOL = 1e-5  # fp32 on both sides
ARCHS = [("falcon", "7b"), ("llama", "falcon3_shape"), ("falcon_h1", "gate_then_norm")]
PROMPT = "The falcon flies over the river at dawn"
CONTINUATIONS = [" and sees", " fish", " over the hills"]
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """arch -> (server, LLM on the same folder); the servers start together."""
    out = {}
    for arch, variant in ARCHS:
        build, _ = TINY_HF_MODELS[arch]
        folder = save_hf_model(build(variant), tmp_path_factory.mktemp(arch))
        proc = ServerProcess("--model", str(folder), "--dtype", "float32", "--max-batch", "4",
                             "--served-model-name", arch, env=ENV)  # fmt: skip
        out[arch] = (proc, folder)
    try:
        for arch, (proc, folder) in out.items():
            out[arch] = (proc.wait_ready(), falconet.load(folder, dtype="float32"))
        yield out
    finally:
        for proc, _ in out.values():
            if isinstance(proc, ServerProcess):
                proc.stop()


@pytest.fixture(params=[a for a, _ in ARCHS])
def arch(request) -> str:
    return request.param


def _client(server: ServerProcess) -> openai.OpenAI:
    return server.openai_client(T)


def _post(server: ServerProcess, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=T)
    assert r.status_code == 200, r.text
    return r.json()


def _reference(llm, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(llm.logits(ids), dim=-1)


def _assert_echo_logprobs(lp: dict, llm, ids: list[int], k: int) -> None:
    """The legacy logprobs object of an echoed prompt (its first len(ids) entries)."""
    ref = _reference(llm, ids)
    texts = TokenStrings(llm.tokenizer)  # how logprobs write a token (bytes:\\x.. when partial)
    strings = [texts.text(t) for t in ids]
    assert lp["tokens"][: len(ids)] == strings
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]].item()) <= TOL
        assert lp["text_offset"][i] == lp["text_offset"][i - 1] + len(strings[i - 1])
        # the top-k by text (ids that read alike keep the likeliest: the tiny models have
        # ids past the tokenizer's vocabulary, which all read ""), then the prompt's own
        want: dict[str, float] = {}
        top = torch.topk(ref[i - 1], k)
        for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            want.setdefault(texts.text(t), v)
        want.setdefault(strings[i], ref[i - 1, ids[i]].item())
        top = lp["top_logprobs"][i]
        assert top.keys() == want.keys()
        assert list(top.values()) == pytest.approx(list(want.values()), abs=TOL)


def test_echo_with_max_tokens_0_is_the_prompt_and_its_logprobs(served, arch):
    server, llm = served[arch]
    ids = llm.tokenizer.encode(PROMPT)
    r = _client(server).completions.create(
        model=arch, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3, temperature=0
    )
    [choice] = r.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids)
    _assert_echo_logprobs(lp, llm, ids, 3)
    # vLLM fills its prompt_logprobs field too when the prompt is echoed with logprobs
    plp = choice.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        assert plp[i][str(ids[i])]["logprob"] == lp["token_logprobs"][i]


def test_echo_then_the_completion(served, arch):
    """max_tokens 1 and 5, text and token-id prompts: the prompt, then exactly what the
    same request without echo generates, the logprobs of both in one object."""
    server, llm = served[arch]
    ids = llm.tokenizer.encode(PROMPT)
    client = _client(server)
    for prompt in (PROMPT, ids):
        for max_tokens in (1, 5):
            kw = dict(model=arch, prompt=prompt, max_tokens=max_tokens, logprobs=2,
                      temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
            plain = client.completions.create(**kw).choices[0]
            echoed = client.completions.create(**kw, echo=True).choices[0]
            assert echoed.text == llm.tokenizer.decode(ids) + plain.text
            lp, gen = echoed.logprobs.model_dump(), plain.logprobs.model_dump()
            assert len(lp["tokens"]) == len(ids) + max_tokens
            _assert_echo_logprobs(lp, llm, ids, 2)
            assert lp["tokens"][len(ids) :] == gen["tokens"]
            assert lp["token_logprobs"][len(ids) :] == gen["token_logprobs"]
            assert lp["top_logprobs"][len(ids) :] == gen["top_logprobs"]
            # the completion's offsets continue from the prompt's text
            shift = sum(len(t) for t in lp["tokens"][: len(ids)])
            assert lp["text_offset"][len(ids) :] == [o + shift for o in gen["text_offset"]]


def test_vllm_prompt_logprobs_field(served, arch):
    """vLLM's extra: {token id: {logprob, rank, decoded_token}}, the prompt's own token
    first, its rank in the whole vocabulary; without echo the text is the completion."""
    server, llm = served[arch]
    ids = llm.tokenizer.encode(PROMPT)
    ref = _reference(llm, ids)
    for max_tokens in (0, 2):
        body = {"prompt": ids, "max_tokens": max_tokens, "prompt_logprobs": 2, "temperature": 0}
        [choice] = _post(server, body)["choices"]
        assert choice["logprobs"] is None
        assert (choice["text"] == "") == (max_tokens == 0)
        plp = choice["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        for i in range(1, len(ids)):
            row = ref[i - 1]
            entries = list(plp[i].items())
            token, own = entries[0]
            assert token == str(ids[i])
            assert abs(own["logprob"] - row[ids[i]].item()) <= TOL
            assert own["rank"] == int((row > row[ids[i]]).sum()) + 1
            assert own["decoded_token"] == llm.tokenizer.decode([ids[i]])
            top = torch.topk(row, 2)
            ranked = zip(top.indices.tolist(), top.values.tolist(), strict=True)
            for rank, (t, v) in enumerate(ranked, 1):
                assert plp[i][str(t)]["rank"] == (own["rank"] if t == ids[i] else rank)
                assert abs(plp[i][str(t)]["logprob"] - v) <= TOL
            assert len(entries) == (2 if own["rank"] <= 2 else 3)


def test_batched_prompts_beyond_16_are_queued(served):
    """20 prompts (x n=2) on a server that runs 4 at once: all answered, in order, each
    as it is alone."""
    server, llm = served["falcon"]
    prompts = [llm.tokenizer.encode(PROMPT)[: 2 + i % 7] for i in range(20)]
    body = {"prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 1, "n": 2}
    choices = _post(server, body)["choices"]
    assert [c["index"] for c in choices] == list(range(40))
    for i, ids in enumerate(prompts):
        for c in choices[2 * i : 2 * i + 2]:
            assert c["text"] == llm.tokenizer.decode(ids)
            _assert_echo_logprobs(c["logprobs"], llm, ids, 1)
    strings = ["a", PROMPT, "the river"]
    choices = _post(server, {"prompt": strings, "echo": True, "max_tokens": 0})["choices"]
    assert [c["text"] for c in choices] == strings and all(c["logprobs"] is None for c in choices)


def test_streamed_echo_matches_the_whole_answer(served, arch):
    server, llm = served[arch]
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    [whole] = _post(server, body)["choices"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      timeout=T) as r:  # fmt: skip
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[0]["text"].startswith(PROMPT)  # the prompt comes first, at once
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        joined = [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]]
        assert joined == whole["logprobs"][key], key
    [zero] = [e["choices"][0] for e in sse_events(
        httpx.post(f"{server.url}/v1/completions", timeout=T,
                   json={**body, "stream": True, "max_tokens": 0}).text.splitlines()
    )[:-1]]  # fmt: skip
    assert zero["text"] == PROMPT and zero["finish_reason"] == "length"
    assert zero["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:-4]


def _harness_loglikelihood(response: dict, ctxlens: list[int], drop_last: bool) -> list:
    """What lm-evaluation-harness's local-completions model does with the answer: per
    choice (sorted by index), the sum of the continuation's token_logprobs (the entries
    from ctxlen, less the generated token's when one was generated) and whether each
    was the most likely token of its top_logprobs."""
    out = []
    choices = sorted(response["choices"], key=lambda c: c["index"])
    for choice, ctxlen in zip(choices, ctxlens, strict=True):
        end = -1 if drop_last else None
        values = choice["logprobs"]["token_logprobs"][ctxlen:end]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:end]
        greedy = all(v == max(top.values()) for v, top in zip(values, tops, strict=True))
        out.append((sum(values), greedy))
    return out


@pytest.mark.parametrize("max_tokens", [1, 0], ids=["harness-max_tokens-1", "max_tokens-0"])
def test_lm_eval_harness_loglikelihood_request(served, max_tokens):
    """The harness's request as it sends it (tokenized context + continuation per
    request, batched; temperature 0, logprobs 1, echo, seed 1234, max_tokens 1), parsed
    as it parses it: the continuation's log-likelihood equals LLM.logits' sum."""
    server, llm = served["llama"]
    # its remote tokenizer: GET /tokenizer_info must name eos_token; /tokenize then works
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=T).json()
    assert info["eos_token"] == llm.tokenizer.eos_token and "chat_template" in info
    tok = _post(server, {"prompt": PROMPT, "add_special_tokens": False}, "/tokenize")
    assert tok["tokens"] == llm.tokenizer.encode(PROMPT, add_special_tokens=False)

    context = llm.tokenizer.encode(PROMPT)
    requests = [context + llm.tokenizer.encode(c, add_special_tokens=False) for c in CONTINUATIONS]
    body = {"model": "llama", "prompt": requests, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    got = _harness_loglikelihood(_post(server, body), [len(context)] * 3, max_tokens == 1)
    for ids, (loglikelihood, greedy) in zip(requests, got, strict=True):
        ref = _reference(llm, ids)
        rows = range(len(context) - 1, len(ids) - 1)
        want = sum(ref[i, ids[i + 1]].item() for i in rows)
        assert abs(loglikelihood - want) <= TOL * len(rows)
        assert greedy == all(int(ref[i].argmax()) == ids[i + 1] for i in rows)
