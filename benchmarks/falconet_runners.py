"""The two ways the benchmarks time falconet, both on one loaded `LLM` so they share its
weights and run in alternation with the anchors (bench_generate.py, bench_quant.py).

- direct: `falconet.models.dense.prefill` into a static `KVCache`, then one
  `decode_step` per greedy token. Before issue 11 the CLI and `LLM` ran this path; now
  it is the tests' oracle, and here the baseline the public API must keep up with.
- API: what `LLM.stream` runs -- `LLM.engine()`'s `submit` and caller-driven `iterate`
  (the scheduler, the paged KV cache, the packed forward under `batch_invariant`, the
  sampler, the detokenizer) -- with greedy `SamplingParams(ignore_eos=True)`. The
  token ids are read from the engine's Deltas rather than `LLM.stream`'s text pieces:
  the benchmark tokenizer decodes most of the random model's ids to "", and text
  pieces do not map one to one onto tokens anyway.

Each `run()` returns (prefill seconds, decode seconds, the D + 1 greedy token ids):
prefill up to the first token, decode the D tokens after it.
"""

from __future__ import annotations

import time

import torch

from falconet import LLM, GenerationError, SamplingParams
from falconet.models.dense import decode_step, prefill
from falconet.nn.cache import KVCache


class DirectRunner:
    def __init__(self, llm: LLM, ids: list[int], decode: int) -> None:
        self.model, self.D = llm.model, decode
        self.ids = torch.tensor([ids], device=self.model.device)

    def run(self) -> tuple[float, float, list[int]]:
        model, ids = self.model, self.ids
        with torch.inference_mode():
            cache = KVCache(
                model.config, 1, ids.shape[1] + self.D, model.compute_dtype, model.device
            )
            t0 = time.perf_counter()
            logits = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), cache)
            t1 = time.perf_counter()
            tok = logits.argmax(-1)
            tokens = [int(tok)]
            for _ in range(self.D):
                tok = decode_step(model, tok, cache).argmax(-1)
                tokens.append(int(tok))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens


class APIRunner:
    def __init__(self, llm: LLM, ids: list[int], decode: int) -> None:
        self.ids, self.D = list(ids), decode
        self.params = SamplingParams(max_tokens=decode + 1, temperature=0.0, ignore_eos=True)
        # LLM caches its engine; building it here (KV pool, runner) keeps that out of the
        # first timed run, as loading the model is kept out of the direct path's.
        self.engine = llm.engine(len(ids) + decode + 1)

    def run(self) -> tuple[float, float, list[int]]:
        engine = self.engine
        tokens: list[int] = []
        t0 = time.perf_counter()
        [stream] = engine.submit([self.ids], [self.params])
        t1 = t0
        for delta in engine.iterate(stream):
            if delta.finish_reason == "error":
                raise GenerationError(f"generation failed: {delta.error}")
            if delta.token_ids and not tokens:
                t1 = time.perf_counter()
            tokens += delta.token_ids
        t2 = time.perf_counter()
        if len(tokens) != self.D + 1:
            raise GenerationError(f"the engine gave {len(tokens)} tokens, not {self.D + 1}")
        return t1 - t0, t2 - t1, tokens
