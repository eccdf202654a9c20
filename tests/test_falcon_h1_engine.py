"""Falcon-H1 through the one engine: each sequence holds KV blocks for its attention and
one SSM slot for its Mamba-2 heads (engine/hybrid.py). Greedy tokens equal transformers'
generate (32 tokens); a sequence computes the same bits alone or in a crowd; chunked
prefill equals one shot; cancel and finish give back both kinds of state; admission
waits for whichever runs out first; a forward that fails mid-way is retried without
advancing anyone's state twice."""

from __future__ import annotations

import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.engine.hybrid import HybridPool
from falconet.sampling import SamplingParams
from tests.conftest import (
    FALCON_H1_VARIANTS,
    build_falcon_h1_hf_model,
    hf_greedy,
    save_hf_model,
)
from tests.test_engine import _drain, _ids, _tokens_and_logprobs, batch_and_alone
from tests.test_falcon_mamba_engine import FailsMidForward

GREEDY = SamplingParams(max_tokens=10, logprobs=5, ignore_eos=True)
# The decode step does not clamp dt (as transformers), so every variant's greedy
# continuation is transformers' generate, the clamped one included.
VARIANTS = list(FALCON_H1_VARIANTS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, falconet.LLM]]:
    """variant -> (HF model, falconet LLM loaded from its saved folder)."""
    out = {}
    for variant in VARIANTS:
        hf = build_falcon_h1_hf_model(variant)
        folder = save_hf_model(hf, tmp_path_factory.mktemp(variant))
        out[variant] = (hf, falconet.load(folder, dtype="float32"))
    return out


@pytest.fixture(scope="module")
def llm(checkpoints) -> falconet.LLM:
    return checkpoints["gate_then_norm"][1]


def _engine(llm, **kw) -> Engine:
    kw = {"max_batch": 8, "max_context": 128, "prefill_chunk": 8, "prefill_budget": 16,
          "block_size": 4, **kw}  # fmt: skip
    return Engine.from_llm(llm, **kw)


def _run(engine: Engine, prompts, params) -> list[tuple]:
    streams = engine.submit(prompts, params)
    return [_tokens_and_logprobs(d) for d in _drain(engine, streams)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_transformers_generate(checkpoints, variant):
    hf, llm = checkpoints[variant]
    prompts = [_ids(n, llm.config.vocab_size, seed=n) for n in (1, 6, 23)]
    engine = _engine(llm)  # the 23-token prompt is prefilled in chunks of 8 (SSD chunks of 5)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    outs = _run(engine, prompts, [params] * len(prompts))
    for prompt, (ids, _, _) in zip(prompts, outs, strict=True):
        assert ids == hf_greedy(hf, prompt, 32)


@pytest.mark.parametrize("variant", ["norm_then_gate", "no_norm_tied"])
def test_score_equals_transformers_logits(checkpoints, variant):
    hf, llm = checkpoints[variant]
    prompt = _ids(30, llm.config.vocab_size, seed=4)
    [ours] = _engine(llm).score([prompt])  # chunks of 8 carry KV and SSM state across
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-4


def test_engine_holds_kv_blocks_and_ssm_slots(llm):
    engine = _engine(llm, max_batch=3)
    assert isinstance(engine.pool, HybridPool)
    blocks, slots = engine.pool.capacity
    assert slots == 3 and blocks * 4 >= 3 * 128  # a slot and a whole context per batch place
    assert engine.pool.units_for(9) == (3, 1)


def test_batching_never_changes_a_sequence(llm):
    """Five prompts of different lengths, neighbours joining mid-way, prefill chunks and
    decodes sharing steps: every token and log-prob bit for bit as alone."""
    together, alone = batch_and_alone(llm, llm.config.vocab_size)
    assert together == alone


def test_chunked_prefill_equals_one_shot(llm):
    """Chunks change where the SSD scan splits (its chunks count from each call's start,
    as transformers'), so the state is equal to rounding, not bit for bit: the same
    tokens and log-probs within 1e-5."""
    prompt = _ids(45, llm.config.vocab_size, seed=3)
    one_shot = _run(_engine(llm, prefill_chunk=64, prefill_budget=64), [prompt], [GREEDY])[0]
    for chunk in (1, 7, 16):
        [chunked] = _run(
            _engine(llm, prefill_chunk=chunk, prefill_budget=chunk), [prompt], [GREEDY]
        )
        assert chunked[0] == one_shot[0], chunk
        assert torch.allclose(torch.tensor(chunked[1]), torch.tensor(one_shot[1]), atol=1e-5)


def test_engine_equals_the_dense_cached_forward(llm):
    """The packed step (paged KV + slots) against the model's own dense forward with its
    H1State, decode by decode."""
    prompt = _ids(19, llm.config.vocab_size, seed=9)
    [(ids, lps, _)] = _run(_engine(llm, prefill_chunk=64), [prompt], [GREEDY])
    model = llm.model
    state = model.new_state(1, 64)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), state)[0, -1]
        dense = []
        for _ in range(GREEDY.max_tokens):
            dense.append(int(logits.argmax()))
            logits = model(torch.tensor([[dense[-1]]]), state)[0, -1]
    assert ids == dense


def test_cancel_and_finish_return_blocks_and_slot(llm):
    engine = _engine(llm)
    prompts = [_ids(20, llm.config.vocab_size, seed=s) for s in (1, 2)]
    streams = engine.submit(prompts, [SamplingParams(max_tokens=50, ignore_eos=True)] * 2)
    engine.step()
    stats = engine.stats()
    assert stats.ssm_slots_used == 2 and stats.kv_blocks_used == 2 * 2  # 8 tokens each, blocks of 4
    streams[0].cancel()
    engine.step()
    stats = engine.stats()
    assert stats.ssm_slots_used == 1 and stats.running == 1 and stats.kv_blocks_used == 4
    streams[1].cancel()
    engine.step()
    assert engine.pool.used == (0, 0) and engine.stats().running == 0
    # a slot taken again starts from zeros: the same output as on a fresh engine
    assert _run(engine, [prompts[0]], [GREEDY]) == _run(_engine(llm), [prompts[0]], [GREEDY])


def test_admission_waits_for_a_slot_or_for_blocks(llm):
    prompts = [_ids(n, llm.config.vocab_size, seed=n) for n in (4, 9, 2, 13, 6, 11)]
    alone = [_run(_engine(llm), [p], [GREEDY])[0] for p in prompts]
    # two slots, blocks for everyone: slots limit
    engine = _engine(llm, max_batch=2)
    streams = engine.submit(prompts, [GREEDY] * len(prompts))
    while engine.step():
        stats = engine.stats()
        assert stats.ssm_slots_used == stats.running <= 2
    assert [_tokens_and_logprobs(list(s)) for s in streams] == alone
    # eight slots, KV for 32 tokens: blocks limit (each needs prompt + 10 tokens)
    engine = _engine(llm, kv_cache_tokens=32)
    assert engine.pool.capacity == (8, 8)
    streams = engine.submit(prompts, [GREEDY] * len(prompts))
    most = 0
    while engine.step():
        most = max(most, engine.stats().running)
        assert engine.stats().kv_blocks_used <= 8
    assert 1 < most < len(prompts)
    assert [_tokens_and_logprobs(list(s)) for s in streams] == alone
    assert engine.pool.used == (0, 0)


def test_a_retried_forward_leaves_the_others_bit_identical(llm):
    vocab = llm.config.vocab_size
    prompts = [_ids(n, vocab, seed=10 + n) for n in (5, 11, 8)]
    # the chunking of the failing engine (the SSD scan's splits follow it)
    alone = [_run(_engine(llm, prefill_chunk=4, prefill_budget=8), [p], [GREEDY])[0]
             for p in prompts]  # fmt: skip
    used = {t for p in prompts for t in p} | {t for a in alone for t in a[0]}
    bad = min(set(range(12, vocab)) - used)
    engine = Engine(FailsMidForward(llm.model, bad), llm.tokenizer, llm.eos_ids, max_batch=8,
                    max_context=96, prefill_chunk=4, prefill_budget=8, block_size=4)  # fmt: skip
    poison = [30, 31, 32, 33, 34, 35, 36, 37, 38, bad, 40]  # its 3rd chunk fails
    streams = engine.submit([prompts[0], prompts[1], poison, prompts[2]], [GREEDY] * 4)
    outs = _drain(engine, streams)
    assert outs[2][-1].finish_reason == "error" and "kernel fault" in outs[2][-1].error
    assert [_tokens_and_logprobs(o) for i, o in enumerate(outs) if i != 2] == alone
    assert engine.pool.used == (0, 0)


def test_slot_size_is_the_config_state_and_kv_follows_length(llm):
    config = llm.config
    short, long = _engine(llm, max_context=32), _engine(llm, max_context=1024)
    per_slot = config.state_bytes_per_sequence(4)
    assert short.pool.slot_bytes() == long.pool.slot_bytes() == per_slot
    conv, ssm = config.ssm_state_shapes()
    assert per_slot == config.num_hidden_layers * 4 * (
        config.conv_dim * (config.mamba_d_conv - 1)
        + config.mamba_n_heads * config.mamba_d_head * config.mamba_d_state
    )
    assert long.pool.ssm.ssm.shape[2:] == ssm and long.pool.ssm.conv.shape[2:] == conv
    K, D = config.kv_heads, config.head_dim
    assert long.pool.token_bytes() == 2 * config.num_hidden_layers * K * D * 4


# ---- the server's context comes from the config ----------------------------------------


def test_server_context_is_the_config_unless_max_context_says_less(checkpoints):
    import httpx

    from tests.server_tools import ServerProcess

    folder = checkpoints["gate_then_norm"][1].path  # max_position_embeddings 256
    for flags, context in (((), 256), (("--max-context", "100"), 100)):
        server = ServerProcess("--model", str(folder), *flags).wait_ready()
        try:
            card = httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"][0]
            assert card["max_model_len"] == context
            # a prompt + max_tokens beyond it is the client's error, named
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": [5] * (context - 4), "max_tokens": 8})  # fmt: skip
            assert r.status_code == 400 and f"maximum context length is {context}" in r.text
        finally:
            server.stop()
    more = ServerProcess("--model", str(folder), "--max-context", "300")
    assert more.proc.wait(timeout=120) != 0
    more.stop()
    assert any("more than the model's context of 256" in line for line in more.lines)
