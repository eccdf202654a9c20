"""Falcon-Mamba through the one engine: its recurrent state lives in SSM slots (one per
running sequence, engine/state.py) instead of KV blocks. Greedy tokens equal
transformers' generate; a sequence computes the same bits alone or in a crowd, in chunks
or in one piece; cancel and finish give the slot back; admission waits for a slot; a
forward that fails mid-way is retried without advancing anyone's state twice; a slot's
size does not depend on the prompt's length."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import falconet
from falconet.engine import Engine
from falconet.engine.state import SSMSlotPool
from falconet.sampling import SamplingParams
from tests.conftest import (
    FALCON_MAMBA_VARIANTS,
    assert_cli_error,
    build_falcon_mamba_hf_model,
    hf_greedy,
    save_hf_model,
)
from tests.test_engine import _drain, _ids, _tokens_and_logprobs, batch_and_alone

GREEDY = SamplingParams(max_tokens=10, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[object, falconet.LLM]]:
    """variant -> (HF model, falconet LLM loaded from its saved folder)."""
    out = {}
    for variant in FALCON_MAMBA_VARIANTS:
        hf = build_falcon_mamba_hf_model(variant)
        folder = save_hf_model(hf, tmp_path_factory.mktemp(variant))
        out[variant] = (hf, falconet.load(folder, dtype="float32"))
    return out


@pytest.fixture(scope="module")
def llm(checkpoints) -> falconet.LLM:
    return checkpoints["conv4_tied"][1]


def _engine(llm, **kw) -> Engine:
    kw = {"max_batch": 8, "max_context": 128, "prefill_chunk": 8, "prefill_budget": 16, **kw}
    return Engine.from_llm(llm, **kw)


def _run(engine: Engine, prompts, params) -> list[tuple]:
    streams = engine.submit(prompts, params)
    return [_tokens_and_logprobs(d) for d in _drain(engine, streams)]


@pytest.mark.parametrize("variant", list(FALCON_MAMBA_VARIANTS))
def test_greedy_tokens_equal_transformers_generate(checkpoints, variant):
    hf, llm = checkpoints[variant]
    prompts = [_ids(n, llm.config.vocab_size, seed=n) for n in (1, 5, 23)]
    engine = _engine(llm)  # the 23-token prompt is prefilled in chunks of 8
    outs = _run(engine, prompts, [GREEDY] * len(prompts))
    for prompt, (ids, _, _) in zip(prompts, outs, strict=True):
        assert ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_engine_uses_ssm_slots_not_kv_blocks(llm):
    engine = _engine(llm)
    assert isinstance(engine.pool, SSMSlotPool) and engine.pool.capacity == 8


def test_batching_never_changes_a_sequence(llm):
    """Five prompts of different lengths, neighbours joining mid-way, prefill chunks and
    decodes sharing steps: every token and log-prob bit for bit as alone."""
    together, alone = batch_and_alone(llm, llm.config.vocab_size)
    assert together == alone


def test_chunked_prefill_equals_one_shot(llm):
    prompt = _ids(45, llm.config.vocab_size, seed=3)
    one_shot = _run(_engine(llm, prefill_chunk=64, prefill_budget=64), [prompt], [GREEDY])
    for chunk in (1, 7, 16):
        chunked = _run(_engine(llm, prefill_chunk=chunk, prefill_budget=chunk), [prompt], [GREEDY])
        assert chunked == one_shot, chunk


def test_score_equals_transformers_logits(checkpoints):
    hf, llm = checkpoints["conv3_bias_untied"]
    prompt = _ids(30, llm.config.vocab_size, seed=4)
    [ours] = _engine(llm).score([prompt])  # chunks of 8 carry the state across
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-4


def test_cancel_and_finish_return_the_slot(llm):
    engine = _engine(llm)
    prompts = [_ids(20, llm.config.vocab_size, seed=s) for s in (1, 2)]
    streams = engine.submit(prompts, [SamplingParams(max_tokens=50, ignore_eos=True)] * 2)
    engine.step()
    assert engine.stats().ssm_slots_used == 2  # one slot each, whatever the length
    streams[0].cancel()
    engine.step()
    assert engine.stats().ssm_slots_used == 1 and engine.stats().running == 1
    streams[1].cancel()
    engine.step()
    assert engine.stats().ssm_slots_used == 0 and engine.stats().running == 0
    # a slot taken again starts from zeros: the same output as on a fresh engine
    again = _run(engine, [prompts[0]], [GREEDY])
    assert again == _run(_engine(llm), [prompts[0]], [GREEDY])


def test_admission_waits_for_a_slot(llm):
    """Six prompts, two slots: at most two run at once, the others wait (no error), and
    each gets what it gets alone."""
    prompts = [_ids(n, llm.config.vocab_size, seed=n) for n in (4, 9, 2, 13, 6, 11)]
    alone = [_run(_engine(llm), [p], [GREEDY])[0] for p in prompts]
    engine = _engine(llm, max_batch=2)
    assert engine.pool.capacity == 2
    streams = engine.submit(prompts, [GREEDY] * len(prompts))
    while engine.step():
        stats = engine.stats()
        assert stats.ssm_slots_used == stats.running <= 2
    assert stats.queued == 0
    assert [_tokens_and_logprobs(list(s)) for s in streams] == alone
    assert engine.stats().ssm_slots_used == 0


class FailsMidForward:
    """The real model, whose packed forward raises *after* running in full when a given
    token is among its inputs: every sequence of the step has had its state advanced,
    so only a restore before the retry keeps the innocent sequences right."""

    def __init__(self, model, token: int) -> None:
        self._model, self.token = model, token

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def forward_packed(self, ids, step, rows):
        logits = self._model.forward_packed(ids, step, rows)
        if bool((ids == self.token).any()):
            raise RuntimeError(f"kernel fault on token {self.token}")
        return logits


def test_a_retried_forward_leaves_the_others_bit_identical(llm):
    vocab = llm.config.vocab_size
    prompts = [_ids(n, vocab, seed=10 + n) for n in (5, 11, 8)]
    alone = [_run(_engine(llm), [p], [GREEDY])[0] for p in prompts]
    used = {t for p in prompts for t in p} | {t for a in alone for t in a[0]}
    bad = min(set(range(12, vocab)) - used)
    engine = Engine(FailsMidForward(llm.model, bad), llm.tokenizer, llm.eos_ids, max_batch=8,
                    max_context=96, prefill_chunk=4, prefill_budget=8)  # fmt: skip
    poison = [30, 31, 32, 33, 34, 35, 36, 37, 38, bad, 40]  # its 3rd chunk fails
    streams = engine.submit([prompts[0], prompts[1], poison, prompts[2]], [GREEDY] * 4)
    outs = _drain(engine, streams)
    assert outs[2][-1].finish_reason == "error" and "kernel fault" in outs[2][-1].error
    others = [_tokens_and_logprobs(o) for i, o in enumerate(outs) if i != 2]
    assert others == alone
    assert engine.pool.used == 0


def test_slot_memory_does_not_grow_with_the_prompt(llm):
    config = llm.config
    short, long = _engine(llm, max_context=32), _engine(llm, max_context=4096)
    per_slot = config.state_bytes_per_sequence(4)  # fp32 conv inputs, fp32 SSM state
    assert short.pool.slot_bytes() == long.pool.slot_bytes() == per_slot
    assert short.pool.conv.shape == long.pool.conv.shape
    before = (long.pool.conv.data_ptr(), long.pool.ssm.data_ptr(), long.pool.ssm.shape)
    _run(long, [_ids(600, config.vocab_size, seed=6)], [SamplingParams(max_tokens=2)])
    assert (long.pool.conv.data_ptr(), long.pool.ssm.data_ptr(), long.pool.ssm.shape) == before


# ---- GGUF (llama.cpp's mamba; tests/test_gguf_mamba.py has the details) -------------------


def test_converted_gguf_runs_in_the_engine_as_the_folder(llm, tmp_path):
    out = tmp_path / "o.gguf"
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "convert", str(llm.path), str(out), "--type", "f32"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    from_gguf = falconet.load(out)
    prompts = [_ids(n, llm.config.vocab_size, seed=n) for n in (11, 4)]
    params = [GREEDY] * len(prompts)
    assert _run(_engine(from_gguf), prompts, params) == _run(_engine(llm), prompts, params)


def test_a_classic_mamba_gguf_is_refused(tmp_path):
    from gguf import GGUFWriter

    from falconet.weights.gguf import GGUFError

    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(path, "mamba")  # no mamba.ssm.dt_b_c_rms: llama.cpp reads classic Mamba
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="classic Mamba .* falconet runs Falcon-Mamba only"):
        falconet.load(path)


def test_convert_of_what_llama_cpp_cannot_run_is_a_clear_cli_error(checkpoints, tmp_path):
    folder = checkpoints["conv3_bias_untied"][1].path  # in_proj / out_proj biases
    res = subprocess.run(
        [sys.executable, "-m", "falconet", "convert", str(folder), str(tmp_path / "o.gguf")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert_cli_error(res, "in_proj and out_proj have biases (llama.cpp's mamba has none)")
    assert not (tmp_path / "o.gguf").exists()
