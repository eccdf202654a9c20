"""Sampling: processors match Hugging Face exactly; the sampler is seeded per row."""

from __future__ import annotations

import math

import pytest
import torch

from falconet.errors import GenerationError
from falconet.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)

lp = pytest.importorskip("transformers.generation.logits_process")

B, V = 4, 97
SEEDS = (0, 1, 2)


def random_logits(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(B, V, generator=g) * 3
    if kind == "ties":  # few distinct values, so many scores tie at every threshold
        return torch.randint(-3, 3, (B, V), generator=g).float()
    if kind == "peaked":  # one token holds nearly all the mass
        x = torch.randn(B, V, generator=g)
        x[:, 5] += 40.0
        return x
    raise ValueError(kind)


KINDS = ("normal", "ties", "peaked")
NO_IDS = torch.zeros(B, 0, dtype=torch.long)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    # Bit-exact, with -inf in the same places.
    assert torch.equal(a, b), (a - b).abs().nan_to_num().max()


# --- processors against transformers ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 1.3, 5.0])
def test_temperature_matches_hf(kind, seed, t):
    x = random_logits(kind, seed)
    assert_same(apply_temperature(x, t), lp.TemperatureLogitsWarper(t)(NO_IDS, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 5, 40, V, V + 50])
def test_top_k_matches_hf(kind, seed, k):
    x = random_logits(kind, seed)
    assert_same(apply_top_k(x, k), lp.TopKLogitsWarper(k)(NO_IDS, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_hf(kind, seed, p):
    x = random_logits(kind, seed)
    assert_same(apply_top_p(x, p), lp.TopPLogitsWarper(p)(NO_IDS, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("m", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(kind, seed, m):
    x = random_logits(kind, seed)
    assert_same(apply_min_p(x, m), lp.MinPLogitsWarper(m)(NO_IDS, x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.2, 2.0])
def test_repetition_penalty_matches_hf(kind, seed, penalty):
    x = random_logits(kind, seed)
    g = torch.Generator().manual_seed(100 + seed)
    # Repeated ids within a row, and one id past the vocab that HF ignores.
    ids = torch.randint(0, 12, (B, 30), generator=g)
    ids[0, 0] = V + 3
    want = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone())
    assert_same(apply_repetition_penalty(x, ids, penalty), want)
    assert_same(apply_repetition_penalty(x, ids.tolist(), penalty), want)
    mask = torch.zeros(B, V, dtype=torch.bool)
    for i in range(B):
        mask[i, ids[i][ids[i] < V]] = True
    assert_same(apply_repetition_penalty(x, mask, penalty), want)


def test_repetition_penalty_applies_once_per_distinct_token():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    out = apply_repetition_penalty(x, [[0, 0, 0, 1, 1, 3]], 2.0)
    # 2 / 2, -2 * 2, untouched, 0 / 2
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.0]]


# --- per-row parameters ------------------------------------------------------------

PER_ROW = [
    (apply_temperature, [0.5, 1.0, 2.0, 0.0]),
    (apply_top_k, [0, 1, 7, V + 10]),
    (apply_top_p, [1.0, 0.3, 0.9, 0.5]),
    (apply_min_p, [0.0, 0.05, 0.5, 1.0]),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("fn", "values"), PER_ROW)
def test_per_row_params_equal_row_by_row(kind, fn, values):
    x = random_logits(kind, 3)
    dtype = torch.long if fn is apply_top_k else torch.float64
    batched = fn(x, torch.tensor(values, dtype=dtype))
    for i, v in enumerate(values):
        assert_same(batched[i : i + 1], fn(x[i : i + 1], v))
    assert_same(fn(x, values), batched)  # a plain list works too


def test_per_row_off_rows_untouched():
    x = random_logits("normal", 4)
    out = apply_top_p(apply_top_k(x, [0, 3, 0, 3]), [1.0, 1.0, 0.5, 0.5])
    assert_same(out[0], x[0])
    assert torch.isinf(out[1]).sum() == V - 3
    assert torch.isinf(out[2]).any()


def test_per_row_repetition_penalty():
    x = random_logits("normal", 5)
    ids = [[1, 2, 2], [3], [], [4, 4, 5, 90]]
    penalties = [1.5, 1.0, 2.0, 0.8]
    batched = apply_repetition_penalty(x, ids, torch.tensor(penalties))
    for i, p in enumerate(penalties):
        row = lp.RepetitionPenaltyLogitsProcessor(p)(torch.tensor([ids[i]]).long(), x[i : i + 1])
        assert_same(batched[i : i + 1], row)


def test_per_row_param_of_wrong_length_raises():
    with pytest.raises(GenerationError, match="expected \\(4,\\)"):
        apply_top_p(random_logits("normal", 0), [0.5, 0.5])


def test_presence_frequency_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 1]])
    out = apply_presence_frequency(x, counts, [0.5, 0.0], [0.25, -1.0])
    assert out.tolist() == [
        [1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0],
        [1.0 + 2.0, 2.0, 3.0, 4.0 + 1.0],
    ]
    assert_same(apply_presence_frequency(x, counts, 0.0, 0.0), x)


# --- sampler -----------------------------------------------------------------------


def test_greedy_is_argmax():
    x = random_logits("normal", 6)
    sampler = Sampler([SamplingParams()] * B, [[]] * B, V)
    assert_same(sampler.sample(x), x.argmax(-1))


def test_greedy_ignores_warpers_and_uses_penalties():
    x = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    params = SamplingParams(top_k=1, repetition_penalty=10.0)
    sampler = Sampler([params], [[0]], 4)
    assert sampler.sample(x).tolist() == [1]  # 5 / 10 < 4
    sampler.update(torch.tensor([1]))
    assert sampler.sample(x).tolist() == [2]  # 4 / 10 < 1 too now


def test_sampler_process_logits_matches_hf_chain():
    x = random_logits("normal", 7)
    prompt = [[1, 2, 3], [4], [5, 5], []]
    params = SamplingParams(
        temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3
    )
    sampler = Sampler([params] * B, prompt, V)
    sampler.update(torch.tensor([6, 7, 8, 9]))
    want = x.clone()
    for i in range(B):
        ids = torch.tensor([prompt[i] + [6 + i]])
        row = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, want[i : i + 1].clone())
        for proc in (
            lp.TemperatureLogitsWarper(0.8),
            lp.TopKLogitsWarper(20),
            lp.TopPLogitsWarper(0.9),
            lp.MinPLogitsWarper(0.05),
        ):
            row = proc(ids, row)
        want[i] = row[0]
    assert_same(sampler.process_logits(x), want)


def test_sampler_presence_frequency_counts_generated_only():
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)
    sampler = Sampler([params], [[0, 1]], 4)
    for t in (2, 2, 3):
        sampler.update(torch.tensor([t]))
    out = sampler.process_logits(torch.zeros(1, 4))
    assert out.tolist() == [[0.0, 0.0, -2.0, -1.5]]


def run(sampler: Sampler, logits: torch.Tensor, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        tokens = sampler.sample(logits)
        sampler.update(tokens)
        out.append(tokens.tolist())
    return [list(col) for col in zip(*out, strict=True)]  # per row


def test_seeded_row_independent_of_batch():
    x = random_logits("normal", 8)[:3]
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    alone = run(Sampler([mine], [[1]], V), x[1:2], 12)[0]
    others = [SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=2.0)]
    batch = Sampler([others[0], mine, others[1]], [[2], [1], [3]], V)
    assert run(batch, x, 12)[1] == alone
    assert run(Sampler([mine], [[1]], V), x[1:2], 12)[0] == alone  # and reproducible
    assert len(set(alone)) > 1  # really sampled


def test_select_and_concat_keep_generator_streams():
    x = random_logits("normal", 9)[:3]
    params = [SamplingParams(temperature=1.0, seed=s, frequency_penalty=0.3) for s in (7, 8, 9)]
    alone = run(Sampler([params[1]], [[]], V), x[1:2], 10)[0]
    batch = Sampler(params, [[]] * 3, V)
    first = run(batch, x, 4)[1]
    sub = batch.select([1])
    assert first + run(sub, x[1:2], 6)[0] == alone
    # A newcomer with penalties off joins; the seeded row keeps its stream and state.
    alone2 = run(Sampler([params[2]], [[]], V), x[2:3], 10)[0]
    batch = Sampler([params[2]], [[]], V)
    head = run(batch, x[2:3], 5)[0]
    joined = Sampler.concat([Sampler([SamplingParams(temperature=1.0)], [[]], V), batch])
    assert head + run(joined, x[1:3], 5)[1] == alone2


def test_unseeded_runs_differ():
    x = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=1.0)]
    a = run(Sampler(params, [[]], 1000), x, 20)
    b = run(Sampler(params, [[]], 1000), x, 20)
    assert a != b


def test_empirical_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n_rows, steps = 200, 100  # 20k draws
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(n_rows)]
    sampler = Sampler(params, [[]] * n_rows, 4)
    x = probs.log().expand(n_rows, 4)
    tokens = torch.cat([sampler.sample(x) for _ in range(steps)])
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    assert torch.allclose(freq, probs.double(), atol=0.015), freq  # ~5 sigma

    # top_k=2 renormalises over the two likeliest tokens: 3/7 and 4/7.
    params = [SamplingParams(temperature=1.0, top_k=2, seed=i) for i in range(n_rows)]
    sampler = Sampler(params, [[]] * n_rows, 4)
    tokens = torch.cat([sampler.sample(x) for _ in range(steps)])
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    want = torch.tensor([0.0, 0.0, 3 / 7, 4 / 7], dtype=torch.float64)
    assert torch.allclose(freq, want, atol=0.015), freq


def test_logprobs_from_raw_logits():
    x = random_logits("normal", 10)
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(logprobs=0, temperature=2.0, top_k=2),
        SamplingParams(),
        SamplingParams(logprobs=20, repetition_penalty=3.0),
    ]
    sampler = Sampler(params, [[0, 1]] * B, V)
    tokens = sampler.sample(x)
    got = sampler.logprobs(x, tokens)
    want = torch.log_softmax(x, dim=-1)
    assert got[2] is None
    for i, k in ((0, 3), (1, 0), (3, 20)):
        r = got[i]
        assert r.token == tokens[i].item()
        assert r.logprob == pytest.approx(want[i, tokens[i]].item(), abs=0)
        assert len(r.top) == k
        ids = [t for t, _ in r.top]
        assert ids == want[i].argsort(descending=True)[:k].tolist()
        assert [v for _, v in r.top] == [want[i, t].item() for t in ids]
    every = sampler.logprobs(x, tokens, k=5)
    assert all(len(r.top) == 5 for r in every)


# --- validation --------------------------------------------------------------------

BAD = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("top_k", -1),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("seed", 1.0),
    ("seed", True),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["x"] * 17),
    ("stop", ["x" * 257]),
    ("stop", [3]),
    ("stop", None),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("logit_bias", {5: 100.5}),
    ("logit_bias", {5: -101}),
    ("logit_bias", {5: float("nan")}),
    ("logit_bias", {5: True}),
    ("logit_bias", {-1: 1}),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 1, "05": 2}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
    ("logit_bias", [5, 1]),
    ("logit_bias", None),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_params_raise(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


def test_params_normalised():
    p = SamplingParams(
        temperature=1, stop="###", stop_token_ids=[2, 11], seed=-1, logprobs=0, top_p=1
    )
    assert p.stop == ("###",) and p.stop_token_ids == (2, 11)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert not p.greedy and SamplingParams().greedy
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    # torch.Generator takes signed or unsigned 64-bit seeds; -1 and 2**64 - 1 are one seed.
    x = torch.zeros(2, 50)
    edge = [SamplingParams(temperature=1.0, seed=s) for s in (-1, 2**64 - 1)]
    assert run(Sampler(edge, [[]] * 2, 50), x, 8) == [run(Sampler(edge, [[]] * 2, 50), x, 8)[1]] * 2
    with pytest.raises(GenerationError, match="2 sampling params for 1 prompts"):
        Sampler([p, p], [[]], 4)


def test_logit_bias_is_added_to_the_raw_logits_first():
    x = random_logits("normal", 11)[:3]
    plain = SamplingParams(temperature=0.7, repetition_penalty=1.3)
    biased = SamplingParams(temperature=0.7, repetition_penalty=1.3, logit_bias={"3": 2.5, 7: -4})
    assert biased.logit_bias == ((3, 2.5), (7, -4.0))  # JSON's string ids become ints
    prompts = [[3, 9]] * 3
    got = Sampler([plain, biased, plain], prompts, V).process_logits(x)
    shifted = x.clone()
    shifted[1, 3] += 2.5
    shifted[1, 7] -= 4
    # the bias goes in before the penalties and warpers, as vLLM applies it
    want = Sampler([plain] * 3, prompts, V).process_logits(shifted)
    assert_same(got, want)
    # logprobs describe the model: the raw logits, before the bias
    tokens = torch.tensor([0, 3, 0])
    [_, lp, _] = Sampler([plain, biased, plain], prompts, V).logprobs(x, tokens, k=2)
    assert lp.logprob == torch.log_softmax(x[1], -1)[3].item()


def test_logit_bias_bans_and_forces_tokens():
    x = random_logits("normal", 12)[:1]
    top = int(x[0].argmax())
    banned = SamplingParams(logit_bias={top: -100})
    assert run(Sampler([banned], [[]], V), x, 1)[0][0] != top
    forced = SamplingParams(temperature=1.0, seed=3, logit_bias={5: 100})
    assert set(run(Sampler([forced], [[]], V), torch.zeros(1, V), 20)[0]) == {5}


def test_logit_bias_row_is_independent_of_batch():
    x = random_logits("normal", 13)[:3]
    mine = SamplingParams(temperature=1.0, seed=4, logit_bias={1: 3.0, 2: -1.5, 9: 0.5})
    alone = run(Sampler([mine], [[1]], V), x[1:2], 12)[0]
    others = [SamplingParams(temperature=0.5, seed=1, logit_bias={1: -100}), SamplingParams()]
    batch = Sampler([others[0], mine, others[1]], [[2], [1], [3]], V)
    assert run(batch, x, 12)[1] == alone
    alone_logits = Sampler([mine], [[1]], V).process_logits(x[1:2])
    batch_logits = Sampler([others[0], mine, others[1]], [[2], [1], [3]], V).process_logits(x)
    assert torch.equal(batch_logits[1:2], alone_logits)  # bit for bit
    # and it travels with its row when the batch is reshaped
    assert torch.equal(batch.select([1]).process_logits(x[1:2]), alone_logits)


def test_logit_bias_outside_the_vocabulary_raises():
    with pytest.raises(GenerationError, match=rf"'logit_bias' has token id {V}, outside"):
        Sampler([SamplingParams(logit_bias={V: 1})], [[]], V)
