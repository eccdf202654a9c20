"""The two ways the benchmarks time falconet, both on one loaded `LLM` so they share its
weights and run in alternation with the anchors (bench_generate.py, bench_quant.py).

- direct: `falconet.models.dense.prefill` into a static `KVCache`, then one
  `decode_step` per greedy token. Before issue 11 the CLI and `LLM` ran this path; now
  it is the tests' oracle, and here the baseline the public API must keep up with. The
  recurrent models (Falcon-Mamba, Falcon-H1), which hold a state rather than a KV cache,
  run their own dense forward instead: `model(ids, state, last_only=True)` on a
  `model.new_state(...)`, then one `model(token, state)` per greedy token.
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
from falconet.models.falcon_h1 import FalconH1
from falconet.models.falcon_mamba import FalconMamba
from falconet.nn.cache import KVCache


class DirectRunner:
    def __init__(self, llm: LLM, ids: list[int], decode: int) -> None:
        self.model, self.D = llm.model, decode
        self.ids = torch.tensor([ids], device=self.model.device)
        self.recurrent = isinstance(self.model, FalconMamba | FalconH1)

    def new_cache(self):
        """A KVCache, or the recurrent model's state, for the prompt and D tokens."""
        model, n = self.model, self.ids.shape[1] + self.D
        if isinstance(model, FalconH1):
            return model.new_state(1, n)
        if isinstance(model, FalconMamba):
            return model.new_state(1)
        return KVCache(model.config, 1, n, model.compute_dtype, model.device)

    def prefill(self, cache) -> torch.Tensor:
        """The prompt into `cache`; the first greedy token (1,)."""
        ids = self.ids
        if self.recurrent:
            return self.model(ids, cache, last_only=True)[:, -1].argmax(-1)
        return prefill(self.model, ids, torch.ones_like(ids, dtype=torch.bool), cache).argmax(-1)

    def step(self, tok: torch.Tensor, cache) -> torch.Tensor:
        """One decode step: token (1,) in, the next greedy token (1,) out."""
        if self.recurrent:
            return self.model(tok[:, None], cache)[:, -1].argmax(-1)
        return decode_step(self.model, tok, cache).argmax(-1)

    def run(self) -> tuple[float, float, list[int]]:
        with torch.inference_mode():
            cache = self.new_cache()
            t0 = time.perf_counter()
            tok = self.prefill(cache)
            t1 = time.perf_counter()
            tokens = [int(tok)]
            for _ in range(self.D):
                tok = self.step(tok, cache)
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
