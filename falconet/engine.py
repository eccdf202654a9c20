"""The engine: continuous batching over a paged KV cache, driven by one background thread.

Faces (the HTTP server, RAG, batch jobs) `submit` prompts and read `Delta`s from the
returned `Stream`s; the engine thread runs one model step at a time:

    admit      waiting sequences join the running set while a batch slot and enough
               KV blocks for their whole budget (prompt + max_tokens) are free, so a
               running sequence never has to be preempted;
    schedule   every decoding sequence contributes its last token, and prefilling
               sequences the next fixed-size chunk of their prompt, up to a per-step
               prefill budget -- a long prompt is spread over several steps and never
               freezes the streams already running;
    forward    all those tokens packed into one row (paged.PackedStep), under the
               row-invariant Linear, so a sequence's logits do not depend on its
               neighbours: batching never changes a result;
    sample     per sequence (own sampler, own seeded generator), then text with stop
               strings held back, and a Delta to its stream; finished or cancelled
               sequences give their blocks back at once.

A sequence's chunk boundaries are multiples of `prefill_chunk` from the start of its
prompt whatever the load, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from falconet.cache import _available_memory
from falconet.errors import FalconetError, GenerationError
from falconet.generate import Completion, SequenceText
from falconet.linear import batch_invariant
from falconet.model import Falcon
from falconet.paged import PackedStep, PagedKVCache, Segment
from falconet.sampling import Sampler, SamplingParams, TokenLogprobs
from falconet.tokenizer import Tokenizer

log = logging.getLogger("falconet.engine")

# Share of free memory the KV pool may claim when it is sized automatically.
KV_MEMORY_SHARE = 0.5


class QueueFull(FalconetError):
    """The engine's waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Delta:
    """What a stream yields after each step that produced a token for it."""

    text: str  # new text: valid UTF-8, stop strings removed; may be "" (held back)
    token_ids: list[int]  # tokens since the previous Delta, a final eos/stop token included
    logprobs: list[TokenLogprobs]  # one per token when params.logprobs is set, else []
    finish_reason: str | None  # None while running; "stop" | "length" | "error"
    error: str | None = None


@dataclass
class EngineStats:
    queued: int
    running: int
    max_batch: int
    max_queue: int
    kv_blocks_used: int
    kv_blocks_total: int


_END = object()


class Stream:
    """The output of one submitted sequence. Iterate it (blocking, or `async for` when
    submitted with an event loop); `cancel()` ends it and frees its slot."""

    def __init__(self, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cancelled = False
        self._loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop is not None else queue.SimpleQueue()
        )
        self._engine: Engine | None = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._engine is not None:
                self._engine._wake()

    def _push(self, item: object) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def __iter__(self) -> Iterator[Delta]:
        if self._loop is not None:
            raise GenerationError("this stream was submitted with an event loop; use `async for`")
        while (item := self._queue.get()) is not _END:
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._loop is None:
            raise GenerationError("this stream was submitted without an event loop; iterate it")
        while (item := await self._queue.get()) is not _END:
            yield item


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    stream: Stream
    text: SequenceText
    stop_ids: frozenset[int]
    reserve: int  # KV blocks held for prompt + max_tokens
    table: list[int] = field(default_factory=list)  # block table
    cached: int = 0  # tokens in the KV cache
    generated: int = 0
    last_token: int = -1
    sampler: Sampler | None = None
    started: float = 0.0

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)


class Engine:
    def __init__(
        self,
        model: Falcon,
        tokenizer: Tokenizer,
        eos_ids: tuple[int, ...] = (),
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = 128,
        prefill_budget: int = 256,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("prefill_chunk", prefill_chunk),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise GenerationError(f"max_queue must be an int >= 0, got {max_queue!r}")
        config = model.config
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, frozenset(eos_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = max_context or config.max_position_embeddings
        if self.max_context < 2:
            raise GenerationError(f"max_context must be at least 2 tokens, got {self.max_context}")
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        tokens = kv_cache_tokens or max_batch * self.max_context
        per_token = 2 * config.num_hidden_layers * config.kv_heads * config.head_dim
        per_token *= model.compute_dtype.itemsize
        available = _available_memory(model.device)
        if kv_cache_tokens is None and available is not None:
            tokens = min(tokens, int(available * KV_MEMORY_SHARE) // per_token)
        blocks = -(-tokens // block_size)
        if blocks < -(-self.max_context // block_size) and kv_cache_tokens is None:
            raise GenerationError(
                f"not enough memory for one sequence of {self.max_context} tokens "
                f"({per_token * self.max_context / 2**20:.0f} MiB of KV cache); lower max_context"
            )
        self.cache = PagedKVCache(config, blocks, block_size, model.compute_dtype, model.device)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._reserved = 0  # blocks promised to running sequences
        self._seconds_per_request = 1.0  # moving average, for Retry-After
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_llm(cls, llm, **kwargs) -> Engine:
        return cls(llm.model, llm.tokenizer, llm.eos_ids, **kwargs)

    # ---- the faces' side ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="falconet-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[Stream]:
        """Queue sequences (all or none); returns one Stream each.

        Raises GenerationError for a prompt that cannot run (empty, ids outside the
        vocabulary, prompt + max_tokens beyond the context) and QueueFull when the
        waiting queue cannot take them all."""
        if not prompts or len(prompts) != len(params):
            raise GenerationError("submit: need one SamplingParams per prompt, at least one")
        seqs = [self._new_sequence(p, sp, loop) for p, sp in zip(prompts, params, strict=True)]
        with self._lock:
            if self._stop:
                raise GenerationError("the engine is shutting down")
            waiting = len(self._waiting)
            if waiting + len(self._running) + len(seqs) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is busy: {waiting} requests are waiting (the queue holds "
                    f"{self.max_queue}); retry later",
                    self._retry_after(waiting),
                )
            self._waiting.extend(seqs)
            self._lock.notify_all()
        return [s.stream for s in seqs]

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Submit and wait: the whole completion of every prompt (for batch jobs). An
        engine that was not started is driven here, in the caller's thread."""
        streams = self.submit(prompts, params)
        if not self.alive:
            while self.step():
                pass
        out = []
        for stream, p in zip(streams, params, strict=True):
            text, ids, lps, finish = "", [], [], "length"
            for d in stream:
                if d.finish_reason == "error":
                    raise GenerationError(f"generation failed: {d.error}")
                text, finish = text + d.text, d.finish_reason or finish
                ids += d.token_ids
                lps += d.logprobs
            logprobs = lps if p.logprobs is not None else None
            out.append(Completion(text, ids, finish, stream.prompt_tokens, logprobs))
        return out

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                queued=len(self._waiting),
                running=len(self._running),
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                kv_blocks_used=self.cache.num_blocks - self.cache.free_blocks,
                kv_blocks_total=self.cache.num_blocks,
            )

    def _new_sequence(
        self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None
    ) -> _Sequence:
        vocab = self.model.config.vocab_size
        if not isinstance(params, SamplingParams):
            raise GenerationError("submit: params must be SamplingParams")
        if not prompt:
            raise GenerationError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"the prompt has a token id outside [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_context:
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} is more than this model's context of {self.max_context} tokens; "
                "shorten the prompt or lower max_tokens"
            )
        reserve = self.cache.blocks_for(total)
        if reserve > self.cache.num_blocks:
            raise GenerationError(
                f"the prompt and max_tokens need {total} tokens of KV cache but it holds "
                f"{self.cache.num_blocks * self.cache.block_size}; lower max_tokens"
            )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        stream = Stream(len(prompt), loop)
        stream._engine = self
        text = SequenceText(self.tokenizer, params.stop)
        return _Sequence(list(prompt), params, stream, text, frozenset(stop_ids), reserve)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _retry_after(self, waiting: int) -> int:
        rounds = (waiting + 1) / self.max_batch
        return max(1, min(60, math.ceil(rounds * self._seconds_per_request)))

    # ---- the engine thread -----------------------------------------------------------
    def step(self) -> bool:
        """Admit, run one forward, deliver tokens. False when there was nothing to run.
        The engine thread calls this in a loop; without `start()` a caller may drive the
        engine itself (batch jobs, tests)."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            if not self._running:
                return False
        try:
            with torch.inference_mode(), batch_invariant():
                self._step()
        except Exception as e:  # a failed step ends its sequences, not the engine
            log.exception("engine step failed")
            with self._lock:
                for seq in list(self._running):
                    self._finish(seq, Delta("", [], [], "error", f"{type(e).__name__}: {e}"))
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    break
            if not self.step():
                with self._lock:
                    if not self._stop and not self._waiting:
                        self._lock.wait(timeout=0.5)
        with self._lock:
            for seq in self._running + list(self._waiting):
                self._finish(seq, Delta("", [], [], "error", "the engine shut down"))
            self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.stream.cancelled]:
            self._finish(seq, None)
        if any(s.stream.cancelled for s in self._waiting):
            for seq in [s for s in self._waiting if s.stream.cancelled]:
                seq.stream._push(_END)
            self._waiting = deque(s for s in self._waiting if not s.stream.cancelled)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            if self._reserved + seq.reserve > self.cache.num_blocks:
                break  # first come, first served: wait for blocks rather than overtake
            self._waiting.popleft()
            self._reserved += seq.reserve
            seq.started = time.monotonic()
            self._running.append(seq)

    def _finish(self, seq: _Sequence, last: Delta | None) -> None:
        """Remove a running (or waiting) sequence, free its blocks, end its stream."""
        if seq in self._running:
            self._running.remove(seq)
            self._reserved -= seq.reserve
            self.cache.release(seq.table)
            elapsed = time.monotonic() - seq.started
            self._seconds_per_request += 0.2 * (elapsed - self._seconds_per_request)
        if last is not None:
            seq.stream._push(last)
        seq.stream._push(_END)

    def _step(self) -> None:
        """One forward over every running sequence's next tokens, then sampling."""
        with self._lock:
            running = list(self._running)
        segments, ids, logit_rows, scheduled, sampling = [], [], [], [], []
        budget = self.prefill_budget
        for seq in running:
            if seq.prefilled:
                tokens, rope_len = [seq.last_token], seq.cached + 1
            else:
                tokens = seq.prompt[seq.cached : seq.cached + self.prefill_chunk]
                if len(tokens) > budget:
                    continue
                budget -= len(tokens)
                rope_len = len(seq.prompt)  # a chunked prompt rotates as one forward
            self.cache.grow(seq.table, seq.cached + len(tokens))
            segments.append(Segment(seq.table, seq.cached, len(tokens), rope_len))
            ids += tokens
            scheduled.append((seq, len(tokens)))
            if seq.cached + len(tokens) >= len(seq.prompt):
                logit_rows.append(len(ids) - 1)
                sampling.append(seq)
        device = self.model.device
        step = PackedStep(self.cache, segments, self.model.compute_dtype)
        logits = self.model.forward_packed(
            torch.tensor(ids, device=device),
            step,
            torch.tensor(logit_rows, dtype=torch.long, device=device),
        ).float()
        for seq, n in scheduled:
            seq.cached += n
        for j, seq in enumerate(sampling):
            delta = self._sample(seq, logits[j : j + 1])
            if delta.finish_reason is not None:
                with self._lock:
                    self._finish(seq, delta)
            else:
                seq.stream._push(delta)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> Delta:
        if seq.sampler is None:
            seq.sampler = Sampler(
                [seq.params], [seq.prompt], logits.shape[-1], device=logits.device
            )
        token = seq.sampler.sample(logits)
        lps = []
        if seq.params.logprobs is not None:
            lps = [seq.sampler.logprobs(logits, token)[0]]
        seq.sampler.update(token)
        tok = int(token[0])
        seq.last_token = tok
        seq.generated += 1
        seq.stream.completion_tokens = seq.generated
        by_token = tok in seq.stop_ids
        finish = "stop" if by_token else None
        if finish is None and seq.generated >= seq.params.max_tokens:
            finish = "length"
        text, finish = seq.text.add(tok, by_token, finish)
        return Delta(text, [tok], lps, finish)
