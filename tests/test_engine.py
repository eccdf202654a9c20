"""The continuous-batching engine: packed paged attention against the dense forward,
batch invariance, chunked prefill, cancellation, the bounded queue, threads and asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import falconet
from falconet.engine import Engine, QueueFull
from falconet.errors import GenerationError
from falconet.sampling import SamplingParams
from tests.conftest import VARIANTS

GREEDY = SamplingParams(max_tokens=6, logprobs=20)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _drain(engine: Engine, streams) -> list[list]:
    """Drive an engine that was not started until every stream ended; deltas per stream."""
    out = [[] for _ in streams]
    while engine.step():
        pass
    for i, s in enumerate(streams):
        out[i] = list(s)
    return out


def _tokens_and_logprobs(deltas) -> tuple[list[int], list[float], list]:
    ids = [t for d in deltas for t in d.token_ids]
    lps = [lp for d in deltas for lp in d.logprobs]
    return ids, [lp.logprob for lp in lps], [lp.top for lp in lps]


def batch_and_alone(llm, vocab: int) -> tuple[list, list]:
    """Five prompts of different lengths run each alone, then together with neighbours
    joining mid-way (prefill chunks and decodes share steps): (together, alone), each a
    list of (tokens, log-probs) per prompt."""
    prompts = [_ids(n, vocab, seed=n) for n in (3, 17, 40, 9, 25)]
    params = [SamplingParams(max_tokens=12, logprobs=5, ignore_eos=True)] * len(prompts)

    def engine() -> Engine:
        return Engine.from_llm(llm, max_batch=8, max_context=128, prefill_chunk=16, block_size=8)

    alone = []
    for p, sp in zip(prompts, params, strict=True):
        e = engine()
        alone.append(_tokens_and_logprobs(_drain(e, e.submit([p], [sp]))[0]))
    e = engine()
    streams = e.submit(prompts[:2], params[:2])
    for _ in range(3):  # the first two are decoding when the others arrive
        e.step()
    streams += e.submit(prompts[2:], params[2:])
    return [_tokens_and_logprobs(d) for d in _drain(e, streams)], alone


@pytest.fixture(scope="module")
def default_llm():
    return falconet.load()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_paged_forward_matches_dense_logits(hf_checkpoints, variant):
    """Chunked prefill (chunks of 8) and decode through the paged cache give the tokens and
    log-probs of the dense path with its static cache (itself checked against transformers,
    dynamic RoPE's per-step rescaling included) at every step."""
    llm = falconet.load(hf_checkpoints[variant][1], dtype="float32")
    prompt = _ids(29, llm.config.vocab_size, seed=1)  # > max_position_embeddings for rope variants
    engine = Engine.from_llm(llm, max_context=64, prefill_chunk=8, prefill_budget=8, block_size=4)
    [stream] = engine.submit([prompt], [GREEDY])
    ids, lps, tops = _tokens_and_logprobs(_drain(engine, [stream])[0])
    [ref] = llm.complete([prompt], GREEDY)
    assert ids == ref.token_ids and len(ids) == GREEDY.max_tokens
    ref_lps = torch.tensor([lp.logprob for lp in ref.logprobs])
    assert torch.allclose(torch.tensor(lps), ref_lps, atol=1e-4, rtol=0)
    assert [[t for t, _ in top] for top in tops] == [[t for t, _ in lp.top] for lp in ref.logprobs]


@pytest.mark.parametrize("variant", ["7b", "40b", "rw", "default", "default-q8_0", "default-q4_0"])
def test_batching_never_changes_a_sequence(hf_checkpoints, default_llm, variant):
    """Each sequence's tokens and log-probs (bit for bit) are those it gets alone, with
    neighbours of other lengths joining mid-way so prefill chunks and decodes share steps.
    Quantized layers are row-invariant by construction (their own kernels)."""
    if variant.startswith("default-"):
        llm = falconet.load(quant=variant.split("-")[1])
    else:
        llm = default_llm if variant == "default" else falconet.load(hf_checkpoints[variant][1])
    together, alone = batch_and_alone(llm, llm.config.vocab_size)
    assert together == alone


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(default_llm):
    e = Engine.from_llm(default_llm, max_context=256, prefill_chunk=16, prefill_budget=16)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    [running] = e.submit([_ids(5, 8192, 0)], [params])
    e.step()  # prefilled, first token out
    [long] = e.submit([_ids(120, 8192, 1)], [SamplingParams(max_tokens=2)])
    steps = 0
    while long.completion_tokens == 0:
        e.step()
        steps += 1
    assert steps == 8  # ceil(120 / 16) chunks, one per step
    assert running.completion_tokens == 1 + steps  # a token every step meanwhile
    _drain(e, [running, long])


def test_kv_blocks_follow_actual_lengths_and_return_when_done(default_llm):
    e = Engine.from_llm(default_llm, max_context=128, block_size=4)
    lengths = (3, 10, 21)
    streams = e.submit(
        [_ids(n, 8192, n) for n in lengths], [SamplingParams(max_tokens=20, ignore_eos=True)] * 3
    )
    for n_steps in range(1, 6):
        e.step()
        cached = [n + n_steps - 1 for n in lengths]  # the last sampled token is not cached yet
        assert e.stats().kv_blocks_used == sum(-(-c // 4) for c in cached)
    _drain(e, streams)
    assert e.stats().kv_blocks_used == 0 and e.stats().running == 0


def test_cancel_frees_the_slot_at_the_next_step(default_llm):
    e = Engine.from_llm(default_llm, max_context=128)
    keep, drop = e.submit(
        [_ids(4, 8192, 1), _ids(6, 8192, 2)], [SamplingParams(max_tokens=30, ignore_eos=True)] * 2
    )
    for _ in range(3):
        e.step()
    drop.cancel()
    drop.cancel()  # idempotent
    e.step()
    assert e.stats().running == 1
    deltas = list(drop)  # the cancelled stream ends without a finish reason
    assert len(deltas) == 3 and all(d.finish_reason is None for d in deltas)
    assert _drain(e, [keep])[0][-1].finish_reason == "length"
    assert e.stats().kv_blocks_used == 0


def test_queue_full_raises_with_retry_after_and_queued_work_completes(default_llm):
    e = Engine.from_llm(default_llm, max_batch=1, max_queue=1, max_context=128)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    first = e.submit([[1, 2, 3]], [sp])
    second = e.submit([[4, 5, 6]], [sp])
    with pytest.raises(QueueFull) as err:
        e.submit([[7, 8]], [sp])
    assert err.value.retry_after >= 1 and "busy" in str(err.value)
    with pytest.raises(QueueFull):  # all or nothing: n=2 does not half-fit
        e.submit([[7], [8]], [sp, sp])
    done = _drain(e, first + second)
    assert [d[-1].finish_reason for d in done] == ["length", "length"]
    assert e.submit([[7, 8]], [sp])


@pytest.mark.parametrize(
    "prompt, max_tokens, needles",
    [
        (list(range(1, 61)), 10, ["60 tokens", "max_tokens is 10", "context of 64"]),
        ([], 4, ["empty"]),
        ([1, 99999], 4, ["outside [0, 8192)"]),
        ([-1], 4, ["outside"]),
    ],
)
def test_bad_submissions_are_clear_errors(default_llm, prompt, max_tokens, needles):
    e = Engine.from_llm(default_llm, max_context=64)
    with pytest.raises(GenerationError) as err:
        e.submit([prompt], [SamplingParams(max_tokens=max_tokens)])
    assert all(n in str(err.value) for n in needles), str(err.value)
    assert e.stats().queued == 0


def test_engine_arguments_are_checked(default_llm):
    for kw in ({"max_batch": 0}, {"max_queue": -1}, {"prefill_chunk": 0}, {"max_context": 1}):
        with pytest.raises(GenerationError):
            Engine.from_llm(default_llm, **kw)


def test_threaded_engine_serves_concurrent_submitters(default_llm):
    e = Engine.from_llm(default_llm, max_batch=8, max_context=128)
    prompts = [default_llm.tokenizer.encode(t) for t in ("The king", "And he said", "Behold")]
    sp = SamplingParams(max_tokens=16)
    e.start()
    try:
        alone = [e.generate([p], [sp])[0].text for p in prompts]
        results: dict[int, str] = {}

        def worker(i: int) -> None:
            results[i] = e.generate([prompts[i % 3]], [sp])[0].text

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(9)] == [alone[i % 3] for i in range(9)]
    finally:
        e.shutdown()
    assert not e.alive


def test_async_streams_and_shutdown_ends_running_streams(default_llm):
    e = Engine.from_llm(default_llm, max_context=256)
    expected = e.generate([[1, 2, 3]], [SamplingParams(max_tokens=8)])[0].text  # driven here
    e.start()

    async def main() -> tuple[str, list]:
        loop = asyncio.get_running_loop()
        [short] = e.submit([[1, 2, 3]], [SamplingParams(max_tokens=8)], loop=loop)
        text = "".join([d.text async for d in short])
        [long] = e.submit([[4, 5]], [SamplingParams(max_tokens=250, ignore_eos=True)], loop=loop)
        deltas = []
        async for d in long:
            deltas.append(d)
            if len(deltas) == 2:
                await loop.run_in_executor(None, e.shutdown)
        return text, deltas

    text, deltas = asyncio.run(main())
    assert text == expected
    assert deltas[-1].finish_reason == "error" and "shut down" in deltas[-1].error
    with pytest.raises(GenerationError):
        e.submit([[1]], [SamplingParams()])
