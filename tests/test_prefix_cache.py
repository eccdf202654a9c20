"""The prefix cache (engine/prefix.py): sequences that share a prompt prefix share its KV
blocks, and every output is bit for bit the output without the cache -- on every
attention architecture; blocks are counted once, idle cached blocks are evicted least
recently used first, a cancelled sharer leaves the others whole, admission never
over-promises; recurrent models run without it. And the server: 8 requests sharing a
200-token prefix through the official openai client, on and off."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.engine.hybrid import HybridPool
from falconet.engine.paged import PagedKVCache
from falconet.engine.state import SSMSlotPool
from falconet.sampling import SamplingParams
from tests.conftest import build_falcon_mamba_hf_model, build_llama_hf_model, save_hf_model

PARAMS = SamplingParams(max_tokens=5, logprobs=4, ignore_eos=True)
BLOCK, CHUNK = 4, 8  # hits are multiples of lcm(4, 8) = 8 tokens


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _engine(llm, prefix_cache: bool = True, **kw) -> Engine:
    kw = {"max_context": 64, "prefill_chunk": CHUNK, "prefill_budget": 16, "block_size": BLOCK,
          **kw}  # fmt: skip
    return Engine.from_llm(llm, prefix_cache=prefix_cache, **kw)


def _outputs(completions) -> list[tuple]:
    """Token ids, log-probs and top alternatives, compared exactly (floats with ==)."""
    return [(c.token_ids, [(lp.logprob, lp.top) for lp in c.logprobs]) for c in completions]


def _prompts(vocab: int) -> list[list[int]]:
    """8 prompts sharing a 40-token prefix (suffixes of 1..9 tokens), 2 sharing only its
    first 21 tokens, 1 unrelated."""
    shared = _ids(40, vocab, seed=1)
    prompts = [shared + _ids(n, vocab, seed=10 + n) for n in (3, 1, 9, 5, 2, 7, 4, 6)]
    prompts += [shared[:21] + _ids(n, vocab, seed=30 + n) for n in (12, 20)]
    return prompts + [_ids(33, vocab, seed=50)]


def _first_then_rest(engine: Engine, prompts: list[list[int]]) -> list[tuple]:
    """The first prompt alone (its blocks are then cached), then the rest together."""
    first = engine.generate(prompts[:1], [PARAMS])
    return _outputs(first + engine.generate(prompts[1:], [PARAMS] * (len(prompts) - 1)))


@pytest.fixture(scope="module")
def default_llm():
    return falconet.load()


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    return {
        v: save_hf_model(build_llama_hf_model(v), tmp_path_factory.mktemp(v))
        for v in ("falcon3_shape", "gqa2_head_dim", "rope_llama3")
    }


ARCHS = [
    *(f"falcon:{v}" for v in ("rw", "7b", "40b", "11b", "7b_rope_linear", "mha_rotary_bias")),
    *(f"llama:{v}" for v in ("falcon3_shape", "gqa2_head_dim", "rope_llama3")),
    "default",
    "default-q4_0",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_are_bit_identical_with_and_without_the_cache(
    arch, hf_checkpoints, llama_folders, default_llm
):
    if arch == "default":
        llm = default_llm
    elif arch == "default-q4_0":
        llm = falconet.load(quant="q4_0")
    else:
        family, variant = arch.split(":")
        folders = {v: f for v, (_, f) in hf_checkpoints.items()} if family == "falcon" else {}
        llm = falconet.load((folders or llama_folders)[variant], dtype="float32")
    prompts = _prompts(llm.config.vocab_size)
    off, on = _engine(llm, prefix_cache=False), _engine(llm)
    assert on.prefix_cache and not off.prefix_cache
    assert _first_then_rest(on, prompts) == _first_then_rest(off, prompts)
    stats = on.stats()
    # 7 x 40 tokens (5 chunks of 8) of the shared prefix, 2 x 16 of its first 21, the
    # unrelated prompt none; every admitted prompt looked
    assert stats.prefix_hit_tokens == 7 * 40 + 2 * 16
    assert stats.prefix_query_tokens == sum(map(len, prompts))
    assert off.stats().prefix_hit_tokens == 0 and off.stats().prefix_cached_blocks == 0


def test_shared_blocks_are_held_once_and_come_back_when_all_are_done(default_llm):
    e = _engine(default_llm)
    prompt = _ids(40, 8192, seed=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    [a] = e.submit([prompt + [1, 2]], [params])
    while a.completion_tokens == 0:
        e.step()
    assert e.stats().kv_blocks_used == 11  # 42 prompt tokens + 1 sampled, not yet cached
    assert e.stats().prefix_cached_blocks == 10  # its five full chunks of 8
    b, c = e.submit([prompt + [3], prompt + [4, 5, 6]], [params] * 2)
    e.step()  # both start after the 40 cached tokens, sharing A's first 10 blocks
    assert e.stats().prefix_hit_tokens == 80
    # A's 11 (43 tokens), B's and C's own last block: the shared 10 held once
    assert e.stats().kv_blocks_used == 11 + 1 + 1
    for s in (a, b, c):
        s.cancel()
    e.step()
    stats = e.stats()
    assert stats.kv_blocks_used == 0 and stats.running == 0
    assert stats.prefix_cached_blocks == 10  # idle, kept for the next sharer


def test_idle_cached_blocks_are_evicted_least_recently_used_first(default_llm):
    # 16 blocks of 4 tokens
    e = _engine(default_llm, kv_cache_tokens=64)
    ref = _engine(default_llm, prefix_cache=False, kv_cache_tokens=64)
    a = _ids(24, 8192, seed=3)  # 3 chunks: 6 cacheable blocks
    # 48 prompt tokens + 4 generated ones fed back: 13 blocks, 10 free -> evicts 3
    other = _ids(48, 8192, seed=4)
    first = _outputs(e.generate([a], [PARAMS]))
    assert e.stats().prefix_cached_blocks == 6 and e.stats().kv_blocks_used == 0
    assert _outputs(e.generate([other], [PARAMS])) == _outputs(ref.generate([other], [PARAMS]))
    # A's last three blocks went first; its head (3 blocks) is still cached, beside the
    # other prompt's 12, and gives a hit of 8 tokens (12 cut to a multiple of the chunk)
    assert e.stats().prefix_cached_blocks == 3 + 12
    hits = e.stats().prefix_hit_tokens
    assert _outputs(e.generate([a], [PARAMS])) == first
    assert e.stats().prefix_hit_tokens == hits + 8


def test_cancelling_a_sharer_leaves_the_others_bit_identical(default_llm):
    prompt = _ids(32, 8192, seed=5)
    prompts = [prompt + [7], prompt + [8, 9], prompt + [10]]
    params = SamplingParams(max_tokens=12, logprobs=3, ignore_eos=True)
    ref = _outputs(_engine(default_llm, prefix_cache=False).generate(prompts, [params] * 3))
    e = _engine(default_llm)
    e.generate(prompts[:1], [SamplingParams(max_tokens=1)])  # caches the 32 shared tokens
    streams = e.submit(prompts, [params] * 3)
    for _ in range(3):
        e.step()
    assert e.stats().running == 3 and e.stats().prefix_hit_tokens == 3 * 32
    streams[1].cancel()  # holds the shared blocks with the other two
    while e.step():
        pass
    for i in (0, 2):
        deltas = list(streams[i])
        ids = [t for d in deltas for t in d.token_ids]
        assert (ids, [(lp.logprob, lp.top) for d in deltas for lp in d.logprobs]) == ref[i]
    assert e.stats().kv_blocks_used == 0


def test_a_shared_prefix_costs_no_new_blocks_at_admission(default_llm):
    # 16 blocks: A takes 10 (32 + 8 tokens); B (36 + 8 -> 11 blocks) fits beside it only
    # because it shares A's 8 prompt blocks; without the cache it waits for A
    params = SamplingParams(max_tokens=8, logprobs=2, ignore_eos=True)
    a = _ids(32, 8192, seed=6)  # four full chunks: all 8 prompt blocks cached
    b = a + [11, 12, 13, 14]
    runs = {}
    for cache in (False, True):
        e = _engine(default_llm, prefix_cache=cache, kv_cache_tokens=64)
        [sa] = e.submit([a], [params])
        e.step()  # A prefilled its first chunks and is running
        while sa.completion_tokens == 0:
            e.step()
        [sb] = e.submit([b], [params])
        e.step()
        together = e.stats().running
        while e.step():
            pass
        runs[cache] = together, [list(sa), list(sb)]
        assert e.stats().kv_blocks_used == 0
    assert runs[False][0] == 1 and runs[True][0] == 2  # admitted at once only when shared

    def tokens(deltas):
        lps = [lp.logprob for d in deltas for lp in d.logprobs]
        return [t for d in deltas for t in d.token_ids], lps

    assert [tokens(d) for d in runs[True][1]] == [tokens(d) for d in runs[False][1]]


def test_idle_cached_blocks_count_as_free_at_admission(default_llm):
    e = _engine(default_llm, kv_cache_tokens=64)
    e.generate([_ids(48, 8192, seed=8)], [PARAMS])  # leaves 12 cached blocks idle
    assert e.stats().prefix_cached_blocks == 12
    whole = _ids(56, 8192, seed=9)  # 56 + 5 tokens: 16 blocks, the whole pool
    ref = _engine(default_llm, prefix_cache=False, kv_cache_tokens=64)
    assert _outputs(e.generate([whole], [PARAMS])) == _outputs(ref.generate([whole], [PARAMS]))


def test_prompt_logits_are_computed_not_looked_up(default_llm):
    e = _engine(default_llm)
    prompt = _ids(40, 8192, seed=10)
    e.generate([prompt], [PARAMS])  # its prefix is cached
    looked = e.stats().prefix_query_tokens
    [logits] = e.score([prompt])
    [ref] = _engine(default_llm, prefix_cache=False).score([prompt])
    assert torch.equal(logits, ref)
    assert e.stats().prefix_query_tokens == looked  # scoring does not even look


def test_prompt_logprobs_are_computed_not_looked_up(default_llm):
    """vLLM's prompt_logprobs (and echo + logprobs) need every prompt position's logits:
    such a request prefills in full even when its prefix is cached."""
    e = _engine(default_llm)
    prompt = _ids(40, 8192, seed=10)
    e.generate([prompt], [PARAMS])  # its prefix is cached
    looked = e.stats().prefix_query_tokens
    asking = SamplingParams(max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    [ours] = list(e.iterate(e.submit([prompt], [asking])[0]))[:1]
    off = _engine(default_llm, prefix_cache=False)
    [ref] = list(off.iterate(off.submit([prompt], [asking])[0]))[:1]
    assert ours.prompt_logprobs == ref.prompt_logprobs and len(ours.prompt_logprobs) == 39
    assert e.stats().prefix_query_tokens == looked


def test_models_that_cannot_share_a_prefix_run_without(hf_checkpoints, tmp_path, caplog):
    # dynamic NTK RoPE rotates keys by the whole prompt's length
    llm = falconet.load(hf_checkpoints["7b_rope_dynamic"][1], dtype="float32")
    with caplog.at_level(logging.INFO, logger="falconet.engine"):
        assert not _engine(llm).prefix_cache
    assert "prefix cache off for this model: dynamic RoPE" in caplog.text
    # recurrent state: Falcon-Mamba's slots, Falcon-H1's KV blocks + slots
    slots = SSMSlotPool(2, (6, 3), (6, 5), 3)
    assert "not checkpointed" in slots.enable_prefix_cache(CHUNK)
    kv = PagedKVCache(llm.config, 8, BLOCK)
    assert "not checkpointed" in HybridPool(kv, slots).enable_prefix_cache(CHUNK)
    assert kv.prefix is None
    mamba = falconet.load(save_hf_model(build_falcon_mamba_hf_model("conv4_tied"), tmp_path))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="falconet.engine"):
        e = _engine(mamba)
    assert not e.prefix_cache and "recurrent (SSM) state" in caplog.text
    assert "not checkpointed" in e.prefix_cache_off  # what `falconet serve` prints
    prompt = _ids(40, mamba.config.vocab_size, seed=11)
    first, again = _outputs(e.generate([prompt], [PARAMS]) + e.generate([prompt], [PARAMS]))
    assert first == again and e.stats().prefix_hit_tokens == 0


# ---- the server ------------------------------------------------------------------------


def test_server_shares_a_200_token_prefix_and_answers_the_same_with_and_without():
    """8 requests sharing a 200-token prefix (the first alone, then 7 at once), through the
    official openai client: the same text and log-probs with --no-prefix-cache, and the
    metrics show the hits and the cached blocks."""
    import concurrent.futures

    import openai

    from tests.server_tools import ServerProcess, metric

    shared = _ids(200, 8192, seed=12)
    prompts = [shared + _ids(8 + i, 8192, seed=100 + i) for i in range(8)]
    answers = {}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        server = ServerProcess(flag).wait_ready()
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

            def ask(prompt, client=client):
                r = client.completions.create(model="falconet-tiny", prompt=prompt, max_tokens=6,
                                              temperature=0, logprobs=2)  # fmt: skip
                return r.choices[0].text, r.choices[0].logprobs.token_logprobs

            out = [ask(prompts[0])]
            with concurrent.futures.ThreadPoolExecutor(7) as pool:
                out += list(pool.map(ask, prompts[1:]))
            answers[flag] = out
            text = httpx.get(f"{server.url}/metrics", timeout=30).text
            on = flag == "--prefix-cache"
            assert any(f"prefix cache {'on' if on else 'off'}" in line for line in server.lines)
        finally:
            server.stop()
        hits = metric(text, "falconet_prefix_cache_hit_tokens")
        if on:
            # the server feeds chunks of 128: each of the 7 finds the first 128 tokens
            assert hits == 7 * 128
            assert metric(text, "falconet_prefix_cache_query_tokens") == sum(map(len, prompts))
            assert metric(text, "falconet_prefix_cache_hit_rate") == pytest.approx(
                hits / sum(map(len, prompts))
            )
            assert metric(text, "falconet_prefix_cache_blocks") == 128 // 16
        else:
            assert hits == 0 and metric(text, "falconet_prefix_cache_blocks") == 0
    assert answers["--prefix-cache"] == answers["--no-prefix-cache"]
