"""Speculative decoding (falconet/engine/speculative.py): greedy output identical to plain
decoding, sampled output distributed as plain sampling (a chi-square test against the
model's own probabilities), the draft-model mode, and where speculation stays off."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.engine.speculative import (
    PAUSE_STEPS,
    NgramIndex,
    PromptLookup,
    first_budget,
    next_budget,
    pause_step,
)
from falconet.errors import GenerationError
from falconet.sampling import Sampler, SamplingParams
from tests.conftest import (
    CORPUS,
    build_falcon_mamba_hf_model,
    build_hf_model,
    build_llama_hf_model,
    memorize,
    save_hf_model,
)

VOCAB = 448  # the tiny models' vocabulary

# Architectures: Falcon-7B (multi-query, parallel attention), Falcon-40B (grouped KV,
# two norms), Falcon-RW (ALiBi: the bias mask per verified row) and Falcon3 (Llama, GQA).
ARCHITECTURES = {
    "falcon_7b": lambda: build_hf_model("7b"),
    "falcon_40b": lambda: build_hf_model("40b"),
    "falcon_rw_alibi": lambda: build_hf_model("rw"),
    "falcon3_llama": lambda: build_llama_hf_model("falcon3_shape"),
}


def _random(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(12, VOCAB, (n,), generator=g).tolist()  # no special tokens


SPAN = _random(12, torch.Generator().manual_seed(3))  # what the tiny models learn to repeat


@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory) -> dict[str, falconet.LLM]:
    """Each architecture trained a little to continue SPAN over and over, so prompts that
    hold part of it are answered by copying (a random model rarely copies)."""
    return {
        name: falconet.load(
            save_hf_model(memorize(build(), SPAN * 4, steps=20), tmp_path_factory.mktemp(name)),
            dtype="float32",
        )
        for name, build in ARCHITECTURES.items()
    }


def copy_prompts(count: int, tokenizer) -> list[list[int]]:
    """Prompts with repeated n-grams, so prompt lookup has something to propose: SPAN
    from various points, a random span repeated, and passages of text."""
    g = torch.Generator().manual_seed(15)
    text = tokenizer.encode(CORPUS[:2000])
    prompts = []
    for i in range(count):
        if i % 3 == 0:
            start = i % len(SPAN)
            prompts.append(_random(i % 5, g) + (SPAN * 3)[start : start + 14 + i % 11])
        elif i % 3 == 1:
            span = _random(4 + i % 9, g)
            prompts.append(span * (2 + i % 3) + _random(i % 4, g))
        else:
            start = int(torch.randint(0, len(text) - 120, (1,), generator=g))
            passage = text[start : start + 40 + i]
            prompts.append(passage + _random(3, g) + passage[: 5 + i % 7])
    return prompts


def _ban_token(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """A user's logits processor: speculation stays off for the request that has it."""
    logits[40] = -float("inf")
    return logits


def mixed_params(prompts: list[list[int]], stops: dict[int, int]) -> list[SamplingParams]:
    """Greedy requests with every rule that shapes p: penalties (which count the drafts
    accepted before a position), logit_bias, stop tokens (`stops`: prompt index -> a
    token it generates), logprobs, max_tokens that cut a draft short, and a logits
    processor (no speculation)."""
    out = []
    for i, p in enumerate(prompts):
        kind = i % 6
        kw: dict = dict(max_tokens=(16, 5, 20, 14, 10, 2)[kind], ignore_eos=True)
        if kind == 1:
            kw.update(repetition_penalty=1.3, logprobs=3)
        elif kind == 2:
            kw.update(presence_penalty=0.5, frequency_penalty=0.3, logit_bias={p[1]: 3.0})
        elif kind == 3:
            kw.update(stop_token_ids=(stops.get(i, 0),), logprobs=0)
        elif kind == 4:
            kw.update(logits_processors=(_ban_token,))
        out.append(SamplingParams(**kw))
    return out


def stop_tokens(llm, prompts: list[list[int]]) -> dict[int, int]:
    """For the prompts whose requests stop on a token: the 8th token greedy decoding
    gives them, so the stop is hit, often inside a verify step's accepted drafts."""
    at = list(range(3, len(prompts), 6))
    probe = engine(llm, speculative=None).generate(
        [prompts[i] for i in at], [SamplingParams(max_tokens=8, ignore_eos=True)] * len(at)
    )
    return {i: c.token_ids[-1] for i, c in zip(at, probe, strict=True)}


def engine(llm, **kw) -> Engine:
    return Engine.from_llm(
        llm, max_batch=16, max_queue=256, max_context=160, block_size=8, prefill_chunk=16, **kw
    )


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_output_is_plain_decoding_with_drafts_accepted(tiny_llms, arch):
    """50 prompts decoded 16 at a time (prefill chunks, verify steps and plain decodes
    share forwards): every completion -- tokens, text, finish reason, logprobs bit for
    bit -- equals plain decoding's, and the drafts were in fact accepted."""
    llm = tiny_llms[arch]
    prompts = copy_prompts(50, llm.tokenizer)
    params = mixed_params(prompts, stop_tokens(llm, prompts))
    plain = engine(llm, speculative=None).generate(prompts, params)
    spec_engine = engine(llm)
    assert spec_engine.speculative == "prompt_lookup"
    spec = spec_engine.generate(prompts, params)
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b == a, f"prompt {i}"
    stats = spec_engine.stats()
    assert stats.accepted_draft_tokens > 100
    assert stats.draft_tokens > stats.accepted_draft_tokens  # rejections were rolled back
    assert all(c.finish_reason == "stop" for c in spec[3::6])


def test_a_request_alone_and_in_a_crowd_gets_the_same_tokens(tiny_llms):
    """Drafts depend on the sequence alone, so a seeded sampled request draws the same
    tokens whatever shares its steps."""
    llm = tiny_llms["falcon_7b"]
    prompts = copy_prompts(4, llm.tokenizer)
    params = [SamplingParams(max_tokens=14, temperature=1.5, seed=i, ignore_eos=True)
              for i in range(4)]  # fmt: skip
    crowd = engine(llm).generate(prompts, params)
    alone = [engine(llm).generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert crowd == alone


# ---- sampling: the same distribution ------------------------------------------------


def chi_square_p(observed: Counter, expected: dict, n: int) -> float:
    """Pearson's test of counts against probabilities; cells expecting under 5 counts
    are pooled. The p-value from the regularized upper incomplete gamma function."""
    cells, pooled_o, pooled_e = [], 0.0, 0.0
    for key, p in expected.items():
        if p * n >= 5:
            cells.append((observed.get(key, 0), p * n))
        else:
            pooled_o, pooled_e = pooled_o + observed.get(key, 0), pooled_e + p * n
    assert sum(observed.values()) == n and set(observed) <= set(expected)
    if pooled_e > 0:
        cells.append((pooled_o, pooled_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def expected_pairs(llm, prompt: list[int], params: SamplingParams) -> dict:
    """P(first two tokens) under plain sampling: p1(t1) p2(t2 | t1), each the sampler's
    processed distribution (the second with t1 counted by the repetition penalty)."""
    out = {}
    first = Sampler([params], [prompt], VOCAB)
    p1 = torch.softmax(first.process_logits(llm.logits(prompt)[-1:]), -1)[0]
    for t1 in torch.nonzero(p1).flatten().tolist():
        s = Sampler([params], [prompt], VOCAB)
        s.update(torch.tensor([t1]))
        p2 = torch.softmax(s.process_logits(llm.logits(prompt + [t1])[-1:]), -1)[0]
        for t2 in torch.nonzero(p2).flatten().tolist():
            out[(t1, t2)] = float(p1[t1] * p2[t2])
    return out


def test_sampled_tokens_follow_the_plain_distribution(tiny_llms):
    """1000 seeded samples of the first two tokens with speculation on -- the second
    comes from a verify step: the draft accepted, or a token resampled without it --
    against the exact distribution plain sampling draws from (`Sampler.sample`: the
    softmax of the processed logits, here with temperature, top-k, top-p and a
    repetition penalty that counts the first token), by Pearson's chi-square test. The
    prompt leaves the model unsure whether to copy, so both branches run many times.
    Fixed seeds: the same counts every run."""
    llm = tiny_llms["falcon_7b"]  # trained to repeat SPAN
    g = torch.Generator().manual_seed(7)
    prompt = _random(6, g) + SPAN[:8] + _random(3, g) + SPAN[:4]
    params = SamplingParams(max_tokens=3, temperature=4.0, top_k=3, top_p=0.999,
                            repetition_penalty=1.05, ignore_eos=True)  # fmt: skip
    expected = expected_pairs(llm, prompt, params)
    assert len(expected) == 9 and max(expected.values()) < 0.8
    n = 1000
    seeded = [replace(params, seed=i) for i in range(n)]
    e = Engine.from_llm(llm, max_batch=64, max_queue=n, max_context=64)
    counts = Counter(tuple(c.token_ids[:2]) for c in e.generate([prompt] * n, seeded))
    assert chi_square_p(counts, expected, n) > 1e-3
    stats = e.stats()
    assert 200 < stats.accepted_draft_tokens < stats.draft_tokens - 150


def test_a_wrong_draft_is_never_emitted_when_the_model_rules_it_out(tiny_llms):
    """top_k=1 at temperature 1: p is a point mass, so every verified token must be the
    model's argmax whatever was drafted -- the output is greedy decoding's."""
    llm = tiny_llms["falcon_7b"]
    prompts = [SPAN * 2 + SPAN[:k] + _random(2, torch.Generator().manual_seed(k)) for k in range(8)]
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_k=1, seed=5, ignore_eos=True)
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    e = engine(llm)
    assert [c.token_ids for c in e.generate(prompts, [sampled] * 8)] == [
        c.token_ids for c in engine(llm, speculative=None).generate(prompts, [greedy] * 8)
    ]
    assert e.stats().accepted_draft_tokens > 0


# ---- draft model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_and_draft(tmp_path_factory, tiny_llms) -> tuple[falconet.LLM, falconet.LLM]:
    """The tiny Falcon-7B and a smaller model (1 layer, hidden 32) of the same vocabulary
    trained on SPAN with its last token changed: its greedy drafts are mostly right, and
    wrong at that token."""
    llm = tiny_llms["falcon_7b"]
    almost = SPAN[:-1] + [SPAN[0]]
    small = memorize(build_hf_model("7b", seed=2, num_hidden_layers=1, hidden_size=32),
                     almost * 4, steps=30)  # fmt: skip
    folder = save_hf_model(small, tmp_path_factory.mktemp("draft"))
    return llm, falconet.load(folder, dtype="float32")


def test_draft_model_greedy_output_is_plain_decoding(target_and_draft):
    llm, draft = target_and_draft
    g = torch.Generator().manual_seed(9)
    prompts = [SPAN * 2 + SPAN[: k % 10] for k in range(6)] + [_random(7 + k, g) for k in range(6)]
    params = mixed_params(prompts, stop_tokens(llm, prompts))
    plain = engine(llm, speculative=None).generate(prompts, params)
    e = engine(llm, speculative="draft_model", draft_model=draft.model, draft_tokens=5)
    assert e.speculative == "draft_model"
    assert e.generate(prompts, params) == plain
    stats = e.stats()
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens
    # every finished sequence gave its draft KV blocks back
    assert e.runner.drafter.pool.used == 0


def test_llm_set_speculative_checks_the_draft(target_and_draft):
    llm, draft = target_and_draft
    greedy = dict(max_tokens=16, ignore_eos=True)
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    plain = llm.generate(prompt, **greedy)
    llm.set_speculative(True, draft)
    try:
        assert llm.engine().speculative == "draft_model"
        assert llm.generate(prompt, **greedy) == plain
        assert "".join(llm.stream(prompt, **greedy)) == plain
        with pytest.raises(GenerationError, match="turn it on"):
            llm.set_speculative(False, draft)
    finally:
        llm.set_speculative(True)
    other = falconet.LLM(draft.model, _other_tokenizer())
    with pytest.raises(GenerationError, match="another tokenizer"):
        llm.set_speculative(True, other)
    with pytest.raises(GenerationError, match="draft_model"):
        engine(llm, draft_model=draft.model)  # a draft model with prompt lookup
    with pytest.raises(GenerationError, match="speculative must be"):
        engine(llm, speculative="medusa")


def _other_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from falconet.tokenizer import Tokenizer

    vocab = {f"t{i}": i for i in range(300)}
    return Tokenizer(Backend(models.WordLevel(vocab, unk_token="t0")))


# ---- where speculation stays off ----------------------------------------------------


def test_recurrent_and_dynamic_rope_models_run_without_speculation(tmp_path, hf_checkpoints):
    mamba = falconet.load(save_hf_model(build_falcon_mamba_hf_model("conv4_tied"), tmp_path / "m"))
    e = Engine.from_llm(mamba, max_batch=2, max_context=64)
    assert e.speculative is None and "recurrent" in e.speculative_off
    [c] = e.generate([[5, 6, 7, 5, 6, 7, 5, 6]], [SamplingParams(max_tokens=8, ignore_eos=True)])
    assert len(c.token_ids) == 8 and e.stats().draft_tokens == 0
    dyn = falconet.load(hf_checkpoints["7b_rope_dynamic"][1])
    e = Engine.from_llm(dyn, max_batch=2, max_context=64)
    assert e.speculative is None and "dynamic RoPE" in e.speculative_off
    with pytest.raises(GenerationError, match="attention model"):
        target = falconet.load(hf_checkpoints["7b"][1])
        Engine.from_llm(target, speculative="draft_model", draft_model=mamba.model)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    index = NgramIndex()
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 8, 2, 3]
    index.extend(tokens, [])
    assert index.propose(3) == [5, 6, 7]  # "2 3" last occurred before "5 6 7"
    index.extend(tokens, [4])  # "2 3 4" (n = 3) first
    assert index.propose(2) == [9, 1]
    index.extend(tokens, [4, 77])  # never seen: nothing to propose
    assert index.propose(4) == []
    index.extend(tokens, [4, 77, 6])  # n = 1 fallback: what followed the latest 6
    assert index.propose(8) == [7, 8, 2, 3, 4, 77, 6]


def test_draft_length_grows_on_success_and_pauses_on_failure():
    drafter = PromptLookup(num_tokens=8)
    budget = first_budget(8)
    assert budget == 4
    budget = next_budget(budget, 4, 4, drafter)  # all accepted: +2
    assert budget == 6
    assert next_budget(8, 8, 8, drafter) == 8  # capped
    budget = next_budget(budget, 6, 2, drafter)  # some rejected: -1
    assert budget == 5
    assert next_budget(1, 1, 1, drafter) == 3
    budget = next_budget(1, 1, 0, drafter)  # the single draft failed: pause
    steps = 0
    while budget < 1:
        budget, steps = pause_step(budget), steps + 1
    assert budget == 1 and steps == PAUSE_STEPS + 1


# ---- CLI ----------------------------------------------------------------------------


def test_cli_speculative_flags(tiny_7b, tmp_path):
    draft = save_hf_model(build_hf_model("7b", seed=4, num_hidden_layers=1), tmp_path / "d")
    base = [sys.executable, "-m", "falconet", "generate", "the word was with the word was",
            "--model", str(tiny_7b), "--max-tokens", "12", "--ignore-eos"]  # fmt: skip
    outs = [
        subprocess.run(base + flags, capture_output=True, text=True, timeout=300)
        for flags in ([], ["--no-speculative"], ["--draft", str(draft)])
    ]
    assert [o.returncode for o in outs] == [0, 0, 0], [o.stderr for o in outs]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    bad = subprocess.run(base + ["--no-speculative", "--draft", str(draft)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "drop --no-speculative" in bad.stderr
