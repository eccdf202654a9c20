"""Prompt logprobs in the engine (`SamplingParams.prompt_logprobs`, `submit(generate=False)`):
the prefill's own logits, turned into each prompt token's log-probability, rank and top-k
alternatives chunk by chunk, equal `LLM.logits` for the same tokens, alone or in a batch,
whatever the prefill chunk; max_tokens 0 (nothing generated) gives the same numbers."""

from __future__ import annotations

import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.errors import GenerationError
from falconet.sampling import SamplingParams, prompt_logprobs
from tests.conftest import TINY_HF_MODELS, save_hf_model

K = 4
# One tiny model per kind of state: KV blocks (Falcon, Falcon3), KV + SSM (Falcon-H1).
ARCHS = [("falcon", "7b"), ("llama", "falcon3_shape"), ("falcon_h1", "gate_then_norm")]


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def llm(request, tmp_path_factory):
    arch, variant = request.param
    build, _ = TINY_HF_MODELS[arch]
    folder = save_hf_model(build(variant), tmp_path_factory.mktemp(arch))
    return falconet.load(folder, dtype="float32")


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _reference(llm, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(llm.logits(ids), dim=-1)  # (len(ids), V)


def _check(lps, ids: list[int], ref: torch.Tensor) -> None:
    assert [lp.token for lp in lps] == ids[1:]  # token 0 has nothing before it
    for i, lp in enumerate(lps):
        row = ref[i]
        assert abs(lp.logprob - row[ids[i + 1]].item()) <= 1e-5
        assert lp.rank == int((row > row[ids[i + 1]]).sum()) + 1
        top = torch.topk(row, K)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("chunk", [4, 128])
def test_prompt_logprobs_equal_llm_logits(llm, chunk):
    vocab = llm.config.vocab_size
    prompts = [_ids(n, vocab, seed=n) for n in (13, 2, 30)]
    e = Engine.from_llm(llm, max_batch=4, max_context=64, prefill_chunk=chunk, block_size=8)
    params = SamplingParams(max_tokens=3, prompt_logprobs=K, logprobs=0, ignore_eos=True)
    # generating and scoring-only sequences side by side, with one that asks for nothing
    streams = e.submit(prompts, [params] * 3)
    scored = e.submit(prompts, [params] * 3, generate=False)
    [plain] = e.submit([prompts[0]], [SamplingParams(max_tokens=3, ignore_eos=True)])
    deltas = [list(e.iterate(s)) for s in [*streams, *scored, plain]]
    for ids, gen, only in zip(prompts, deltas[:3], deltas[3:6], strict=True):
        ref = _reference(llm, ids)
        _check(gen[0].prompt_logprobs, ids, ref)
        assert all(d.prompt_logprobs is None for d in gen[1:])
        assert len(gen) == 3 and sum(len(d.token_ids) for d in gen) == 3
        # the first generated token's logprob comes from the last prompt row
        first = gen[0].logprobs[0]
        assert abs(first.logprob - ref[-1, first.token].item()) <= 1e-5
        assert [(d.text, d.token_ids, d.finish_reason) for d in only] == [("", [], "length")]
        assert only[0].prompt_logprobs == gen[0].prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[6])


def test_scoring_only_may_fill_the_context(llm):
    e = Engine.from_llm(llm, max_batch=2, max_context=16, prefill_chunk=8, block_size=8)
    ids = _ids(16, llm.config.vocab_size, seed=3)
    [s] = e.submit([ids], [SamplingParams(prompt_logprobs=0)], generate=False)
    [d] = list(e.iterate(s))
    assert len(d.prompt_logprobs) == 15 and all(lp.top == () for lp in d.prompt_logprobs)
    with pytest.raises(GenerationError, match="context"):
        e.submit([ids], [SamplingParams(max_tokens=1, prompt_logprobs=0)])


@pytest.mark.parametrize("k", [-1, 21, 1.5, True, "3"])
def test_prompt_logprobs_setting_is_checked(k):
    with pytest.raises(GenerationError, match="'prompt_logprobs' must be an integer in"):
        SamplingParams(prompt_logprobs=k)


def test_rank_counts_only_strictly_better_tokens():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    a, b = prompt_logprobs(logits, [2, 3], 2)
    assert (a.rank, b.rank) == (1, 1)  # ties do not push a token down, as in vLLM
    assert [t for t, _ in a.top] == [1, 2] and len(b.top) == 2
    [c] = prompt_logprobs(logits, [3], 0)
    assert c.rank == 3 and c.top == ()
