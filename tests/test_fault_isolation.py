"""One request never hurts another: a sequence whose processing fails (its logits
processors, its sampling, its forward) ends alone with its own error, and the sequences
beside it produce, bit for bit, what they produce alone. Values that would break the
sampler's float32 arithmetic are refused by the one rules table (request_rules.RULES) or
computed safely.

The accepted values that used to give NaN probabilities, and so ended every sequence of
the step, were found by trying a grid of the rules' extreme values with the sampler as it
was: a repetition penalty near its lower bound (1e-37 on logits of +-90; 1e-35 with a
temperature of 1e-5 on this tiny model's logits of +-5) turns a seen token's logit into
+inf in float32, and softmax(+inf) is NaN; top_k = 2**63 - 1 overflowed int64 in topk.
Those rows are now recomputed in float64, and k is clamped to the vocabulary.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import falconet
from falconet.cli import main as cli_main
from falconet.engine import Engine
from falconet.errors import GenerationError
from falconet.request_rules import RULES, SCALE_MAX, SCALE_MIN, TOP_K_MAX
from falconet.sampling import Sampler, SamplingParams, apply_top_k
from tests.conftest import build_hf_model, save_hf_model
from tests.server_tools import ServerProcess, metric

T = 120
GREEDY = SamplingParams(max_tokens=16, logprobs=3, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_falcon(tmp_path_factory):
    return save_hf_model(build_hf_model("7b"), tmp_path_factory.mktemp("fault_isolation"))


@pytest.fixture(scope="module")
def llm(tiny_falcon):
    return falconet.load(tiny_falcon, dtype="float32")


# --- the rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", TOP_K_MAX + 1),  # 9223372036854775808: overflows int64
        ("repetition_penalty", 1e-39),  # subnormal in float32
        ("repetition_penalty", 0.0),
        ("repetition_penalty", SCALE_MAX * 10),
        ("temperature", 1e39),  # inf in float32
        ("temperature", math.inf),
        ("min_p", math.nan),
    ],
)
def test_values_float32_cannot_hold_are_refused(field, value):
    with pytest.raises(
        GenerationError, match=re.escape(f"'{field}' must be {RULES[field].allowed}")
    ):
        SamplingParams(**{field: value})


def test_the_extremes_the_rules_allow_are_accepted():
    p = SamplingParams(top_k=TOP_K_MAX, repetition_penalty=SCALE_MIN, temperature=SCALE_MAX)
    assert (p.top_k, p.repetition_penalty, p.temperature) == (TOP_K_MAX, SCALE_MIN, SCALE_MAX)
    assert SamplingParams(repetition_penalty=SCALE_MAX).repetition_penalty == SCALE_MAX


def test_top_k_past_the_vocabulary_keeps_every_token():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for k in (50, 51, 2**40, TOP_K_MAX):
        assert torch.equal(apply_top_k(x, k), x)
    assert torch.equal(apply_top_k(x, [TOP_K_MAX, 0, 7]), torch.cat([x[:2], apply_top_k(x[2:], 7)]))


def test_logits_processors_must_be_callables():
    with pytest.raises(GenerationError, match="'logits_processors' must be a list of callables"):
        SamplingParams(logits_processors=[42])
    with pytest.raises(GenerationError, match="'logits_processors' must be a list of callables"):
        SamplingParams(logits_processors=abs)
    assert SamplingParams(logits_processors=[abs]).logits_processors == (abs,)


# --- the sampler at the edges of the rules ---------------------------------------------

EDGES = {
    "repetition_penalty": [SCALE_MIN, 1e-30, 1.0, 1e30, SCALE_MAX],
    "temperature": [0.0, 1e-5, 0.8, SCALE_MAX],
    "top_p": [1e-300, 0.5, 1.0],
    "min_p": [0.0, 0.5, 1.0],
    "frequency_penalty": [-2.0, 2.0],
}


def test_every_combination_of_extremes_samples_a_token():
    """The grid that found the NaN cases: every combination of the rules' extreme values,
    over logits with a wide range and prompts that have seen most tokens, samples a valid
    token at every step. Before, 54 of these 360 combinations raised in multinomial with
    top_k off, and every sampled one raised in topk with top_k = 2**63 - 1."""
    V = 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 30  # logits of +-90: overflow at 1e-37
    prompt = torch.randint(0, V, (48,), generator=g).tolist()
    for values in itertools.product(*EDGES.values()):
        params = SamplingParams(max_tokens=8, seed=1, top_k=TOP_K_MAX,
                                **dict(zip(EDGES, values, strict=True)))  # fmt: skip
        sampler = Sampler([params], [prompt], V)
        for step in range(4):
            token = sampler.sample(logits[step : step + 1])
            assert 0 <= int(token) < V, values
            sampler.update(token)


def test_a_float32_overflow_is_sampled_as_float64_would():
    """repetition_penalty 1e-37 with temperature 1e-5: the seen token's logits become
    +inf in float32. In float64 the largest seen positive logit dominates by e**(1e41),
    so every seed draws it (greedy picks it too)."""
    logits = torch.tensor([[5.0, 2.0, -1.0, 4.0, 9.0]])  # token 4 is the largest but unseen
    for seed in range(5):
        params = SamplingParams(repetition_penalty=SCALE_MIN, temperature=1e-5, seed=seed)
        assert int(Sampler([params], [[1, 2, 3]], 5).sample(logits)) == 3
    greedy = SamplingParams(repetition_penalty=SCALE_MIN)
    assert int(Sampler([greedy], [[1, 2, 3]], 5).sample(logits)) == 3


def test_a_processor_forcing_tokens_with_inf_shares_the_mass_among_them():
    def force(ids, logits):
        logits[[1, 3]] = math.inf
        return logits

    drawn = set()
    for seed in range(40):
        params = SamplingParams(temperature=1.0, seed=seed, logits_processors=[force])
        drawn.add(int(Sampler([params], [[0]], 6).sample(torch.zeros(1, 6))))
    assert drawn == {1, 3}


# --- the engine: poisoned sequences beside three greedy ones ---------------------------


class RaisesAt:
    """A constraint that fails mid-way: it raises at its n-th call."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise ValueError(f"constraint broke at call {self.n}")
        return logits


class ReturnsAt:
    """A processor that returns `make(logits)` from its n-th call on."""

    def __init__(self, n: int, make) -> None:
        self.n, self.make, self.calls = n, make, 0

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.make(logits) if self.calls >= self.n else logits


class FailsOnToken:
    """The real model, whose packed forward raises when a given token is among its
    inputs: a kernel fault that one sequence's input triggers, which no real input of
    this engine can (every prompt is checked before it runs)."""

    def __init__(self, model, token: int) -> None:
        self._model, self.token = model, token

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def forward_packed(self, ids, step, rows):
        if bool((ids == self.token).any()):
            raise RuntimeError(f"kernel fault on token {self.token}")
        return self._model.forward_packed(ids, step, rows)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(12, vocab, (n,), generator=g).tolist() for n in (5, 11, 8)]


def _engine(llm, model=None) -> Engine:
    # prefill chunks of 4: a long prompt is prefilled over several steps while others decode
    return Engine(model or llm.model, llm.tokenizer, llm.eos_ids, max_batch=8, max_context=96,
                  prefill_chunk=4, prefill_budget=8, block_size=4)  # fmt: skip


def _run(engine: Engine, prompts, params) -> list[list]:
    streams = engine.submit(prompts, params)
    while engine.step():
        pass
    return [list(s) for s in streams]


def _output(deltas) -> tuple[list[int], list, str | None, str | None]:
    """Tokens, logprobs (TokenLogprobs, compared exactly), finish reason, error."""
    ids = [t for d in deltas for t in d.token_ids]
    lps = [lp for d in deltas for lp in d.logprobs]
    return ids, lps, deltas[-1].finish_reason, deltas[-1].error


def _nan(logits):
    return torch.full_like(logits, math.nan)


def _no_token(logits):
    return torch.full_like(logits, -math.inf)


# name -> (the poison's params, tokens it delivers before failing, its error's words)
POISONS = {
    "a constraint raising at its 5th call": (
        SamplingParams(max_tokens=16, logits_processors=[RaisesAt(5)]),
        4,
        "logits processor 0 (RaisesAt) failed: ValueError: constraint broke at call 5",
    ),
    "a sampled constraint raising at its 3rd call": (
        SamplingParams(max_tokens=16, temperature=0.9, seed=3, logits_processors=[RaisesAt(3)]),
        2,
        "constraint broke at call 3",
    ),
    "a processor returning NaN": (
        SamplingParams(max_tokens=16, logits_processors=[ReturnsAt(3, _nan)]),
        2,
        "GenerationError: the next-token scores hold NaN",
    ),
    "a processor ruling out every token": (
        SamplingParams(max_tokens=16, temperature=0.7, logits_processors=[ReturnsAt(2, _no_token)]),
        1,
        "no token is left to pick",
    ),
    "a processor returning the wrong shape": (
        SamplingParams(max_tokens=16, logits_processors=[lambda ids, x: x[:-1]]),
        0,
        "it must return a tensor of shape (448,)",
    ),
    "a processor returning a list": (
        SamplingParams(max_tokens=16, logits_processors=[lambda ids, x: x.tolist()]),
        0,
        "returned list",
    ),
}


def _fresh(params: SamplingParams) -> SamplingParams:
    """The same poison with new processor objects (they count their calls)."""
    procs = [
        type(p)(p.n) if isinstance(p, RaisesAt)
        else ReturnsAt(p.n, p.make) if isinstance(p, ReturnsAt)
        else p
        for p in params.logits_processors
    ]  # fmt: skip
    return SamplingParams(**{**params.__dict__, "logits_processors": procs})


@pytest.mark.parametrize("name", list(POISONS))
def test_a_failing_sequence_ends_alone_and_the_others_are_unchanged(llm, name):
    poison, delivered, words = POISONS[name]
    prompts = _prompts(llm.config.vocab_size)
    engine = _engine(llm)
    solo = [_output(_run(engine, [p], [GREEDY])[0]) for p in prompts]
    assert all(s[2] == "length" for s in solo)

    # all four decode side by side; the poison fails mid-way through
    batch = [prompts[0], [20, 21, 22], *prompts[1:]]
    outs = _run(engine, batch, [GREEDY, _fresh(poison), GREEDY, GREEDY])
    ids, _, finish, error = _output(outs[1])
    assert finish == "error" and words in error, error
    assert len(ids) == delivered
    assert [_output(o) for i, o in enumerate(outs) if i != 1] == solo
    assert engine.pool.used == 0  # the failed one gave its back
    assert [_output(_run(engine, [p], [GREEDY])[0]) for p in prompts] == solo  # still serves


def test_a_forward_that_fails_for_one_sequence_is_retried_without_it(llm):
    """The poison's prompt holds a token that makes the packed forward raise; its prefill
    runs over several steps while the others decode. Each failed step is retried in
    halves: the poison alone fails, the others lose nothing."""
    prompts = _prompts(llm.config.vocab_size)
    solo = [_output(_run(_engine(llm), [p], [GREEDY])[0]) for p in prompts]
    used = {t for p in prompts for t in p} | {t for s in solo for t in s[0]}
    bad = min(set(range(12, llm.config.vocab_size)) - used)
    engine = _engine(llm, FailsOnToken(llm.model, bad))
    assert [_output(_run(engine, [p], [GREEDY])[0]) for p in prompts] == solo

    poison = [30, 31, 32, 33, 34, 35, 36, 37, 38, bad, 40]  # its 3rd chunk fails
    outs = _run(engine, [prompts[0], prompts[1], poison, prompts[2]], [GREEDY] * 4)
    ids, _, finish, error = _output(outs[2])
    assert (finish, error, ids) == ("error", f"RuntimeError: kernel fault on token {bad}", [])
    assert [_output(o) for i, o in enumerate(outs) if i != 2] == solo
    assert engine.pool.used == 0


def test_a_processor_sees_the_tokens_generated_so_far(llm):
    """A processor that changes nothing changes no token, and is called once per token
    with the ids generated before it (vLLM's signature)."""
    seen = []

    def record(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(ids)
        ids.append(-1)  # its own copy: the sampler's state is not touched
        return logits

    prompt = _prompts(llm.config.vocab_size)[0]
    engine = _engine(llm)
    [solo] = _run(engine, [prompt], [GREEDY])
    watched = SamplingParams(**{**GREEDY.__dict__, "logits_processors": [record]})
    [out] = _run(engine, [prompt], [watched])
    ids = _output(solo)[0]
    assert _output(out) == _output(solo)
    assert seen == [ids[:n] + [-1] for n in range(len(ids))]


def test_llm_generate_raises_the_processor_error(llm):
    with pytest.raises(GenerationError, match="constraint broke at call 2"):
        llm.generate("The quick", max_tokens=8, logits_processors=[RaisesAt(2)])
    assert llm.generate("The quick", max_tokens=4) == llm.generate("The quick", max_tokens=4)


# --- the server: a table of poison requests while three greedy streams run ------------

MODEL = "fault-isolation"
STREAM_TOKENS = 600  # long enough that the poisons are all answered while these run
STREAM_PROMPTS = ["The quick brown fox", "Falcon models run", "In the beginning was"]

# name -> (body fields, outcome): "400" refused up front; "ok" computed safely
SERVER_POISONS = {
    "top_k past int64": ({"top_k": TOP_K_MAX + 1}, "400 top_k"),
    "subnormal repetition_penalty": (
        {"repetition_penalty": 1e-39, "temperature": 0.8},
        "400 repetition_penalty",
    ),
    "repetition_penalty 0": ({"repetition_penalty": 0}, "400 repetition_penalty"),
    "temperature float32 cannot hold": ({"temperature": 1e39}, "400 temperature"),
    "top_p NaN": ({"top_p": math.nan}, "400 top_p"),
    "min_p inf": ({"min_p": math.inf}, "400 min_p"),
    "presence_penalty -inf": ({"presence_penalty": -math.inf}, "400 presence_penalty"),
    # accepted values that ended every running sequence before: NaN probabilities from a
    # float32 overflow, or top_k overflowing int64; now computed safely
    "top_k 2**63 - 1 sampled": ({"top_k": TOP_K_MAX, "temperature": 1.0, "seed": 0}, "ok"),
    "repetition_penalty 1e-37, temperature 1e-5": (
        {"repetition_penalty": SCALE_MIN, "temperature": 1e-5, "seed": 1},
        "ok",
    ),
    "repetition_penalty 1e-35, temperature 1e-5, top_p and min_p": (
        {"repetition_penalty": 1e-35, "temperature": 1e-5, "top_p": 0.5, "min_p": 0.5},
        "ok",
    ),
    "every extreme at once": (
        {
            "repetition_penalty": SCALE_MIN,
            "temperature": 1e-5,
            "top_p": 1e-300,
            "min_p": 1,
            "frequency_penalty": 2,
            "presence_penalty": -2,
            "top_k": TOP_K_MAX,
        },
        "ok",
    ),  # fmt: skip
    "a logits processor over HTTP (ignored: Python API only)": (
        {"logits_processors": ["os.system"]},
        "ok",
    ),
    "the largest temperature and penalty": (
        {"repetition_penalty": SCALE_MAX, "temperature": SCALE_MAX, "seed": 2},
        "ok",
    ),
}


@pytest.fixture(scope="module")
def server(tiny_falcon):
    with ServerProcess("--model", str(tiny_falcon), "--served-model-name", MODEL,
                       env={"OMP_NUM_THREADS": "1"}) as proc:  # fmt: skip
        yield proc


def _stream_body(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0, "logprobs": 2}


def _solo(client: openai.OpenAI, prompt: str) -> tuple[str, list, list]:
    r = client.completions.create(model=MODEL, **_stream_body(prompt),
                                  extra_body={"ignore_eos": True})  # fmt: skip
    c = r.choices[0]
    return c.text, c.logprobs.token_logprobs, c.logprobs.top_logprobs


def _post_poison(http: httpx.Client, body: dict, stream: bool) -> httpx.Response:
    content = json.dumps({"prompt": "The lazy dog", "max_tokens": 6, "stream": stream, **body})
    # json.dumps writes NaN and Infinity, which Python's JSON reader takes: the field
    # rules, not the parser, must refuse them
    return http.post("/v1/completions", content=content,
                     headers={"Content-Type": "application/json"})  # fmt: skip


def _check_poison(name: str, r: httpx.Response, outcome: str, stream: bool) -> None:
    if outcome.startswith("400"):
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == outcome.split()[1]
        assert err["message"].startswith(f"'{err['param']}' must be ")
        return
    assert r.status_code == 200, (name, r.text)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert all("error" not in e for e in events), (name, events)
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    else:
        finish = [c["finish_reason"] for c in r.json()["choices"]]
    assert finish in (["length"], ["stop"]), (name, r.text)


def test_poison_requests_never_touch_the_streams_beside_them(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=T, max_retries=0)
    solo = [_solo(client, p) for p in STREAM_PROMPTS]

    streams = [
        client.completions.create(
            model=MODEL, stream=True, **_stream_body(p), extra_body={"ignore_eos": True}
        )
        for p in STREAM_PROMPTS
    ]
    chunks = [[next(iter(s))] for s in streams]  # each has its first token: all running
    # all poisons at once, so they are answered while the streams run (checked below)
    cases = [(name, body, outcome, stream) for name, (body, outcome) in SERVER_POISONS.items()
             for stream in (False, True)]  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=T) as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: _post_poison(http, case[1], case[3]), cases))
    for (name, _, outcome, stream), r in zip(cases, answers, strict=True):
        _check_poison(name, r, outcome, stream)
    running = metric(httpx.get(f"{server.url}/metrics", timeout=T).text,
                     "falconet_sequences_running")  # fmt: skip
    assert running == 3, "the streams ended before the poisons were all sent; raise STREAM_TOKENS"

    for s, got in zip(streams, chunks, strict=True):
        got += list(s)
    for got, (text, token_lps, top_lps) in zip(chunks, solo, strict=True):
        assert [c.choices[0].finish_reason for c in got if c.choices[0].finish_reason] == ["length"]
        assert "".join(c.choices[0].text for c in got) == text
        lps = [c.choices[0].logprobs for c in got if c.choices[0].logprobs is not None]
        assert [x for lp in lps for x in lp.token_logprobs] == token_lps
        assert [x for lp in lps for x in lp.top_logprobs] == top_lps


def test_cli_refuses_the_same_values(capsys):
    for flags in (["--top-k", str(TOP_K_MAX + 1)], ["--repetition-penalty", "1e-39"]):
        assert cli_main(["generate", "x", *flags]) == 2
        assert capsys.readouterr().err.startswith(
            f"falconet: error: '{flags[0][2:].replace('-', '_')}' must be "
        )
