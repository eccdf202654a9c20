"""The Engine: continuous batching over a per-sequence state pool, for every face.

Faces (the CLI and `LLM`, the HTTP server, RAG) `submit` prompts and read `Delta`s from
the returned `Stream`s. Each `step()` asks the scheduler for a plan (scheduler.py: who
runs, how many tokens each feeds), has the runner execute it (runner.py: one packed
forward, per-sequence sampling; the model's state lives in the pool its class names:
paged KV blocks, or SSM slots for a recurrent model, state.py), then turns tokens into text with stop strings held back
and hands a Delta to each stream; finished or cancelled sequences give their state back
at once. A background thread (`start()`) runs steps for the server; without it the
caller drives the engine itself (`generate`, `iterate`, `score`), so the CLI and the
Python API run exactly the code the server runs.

Prefix cache (`prefix_cache=True`, prefix.py): before each plan the waiting sequences
that may be admitted look up their prompt's cached prefix; one that finds it is priced
at the blocks it does not share with running sequences, admitted, handed the cached
blocks and starts its prefill after them. Results stay bit for bit those without the
cache. A pool that cannot share a prefix (a recurrent state) runs without, saying why in
the log.

Speculative decoding (`speculative=`, speculative.py; prompt lookup by default): a
decoding sequence feeds drafted tokens after its last one and may gain several tokens a
step, each delivered as its own Delta, exactly as plain decoding would have delivered
them (greedy: the same tokens; sampled: the same distribution). A model that cannot
roll its state back (a recurrent state) runs without, saying why in the log.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass

import torch

from falconet.engine.hybrid import HybridPool
from falconet.engine.paged import PagedKVCache
from falconet.engine.runner import Failed, ModelRunner, Sampled, SequenceState, describe
from falconet.engine.scheduler import Budget, StepPlan, Units, add_units, schedule
from falconet.engine.speculative import DEFAULT_DRAFT_TOKENS, make_drafter
from falconet.engine.state import SSMSlotPool
from falconet.errors import FalconetError, GenerationError
from falconet.generate import Completion, SequenceText
from falconet.nn.cache import available_memory
from falconet.nn.linear import batch_invariant
from falconet.nn.lora import LoRALayers
from falconet.sampling import SamplingParams, TokenLogprobs
from falconet.tokenizer import Tokenizer

log = logging.getLogger("falconet.engine")

# Share of free memory the state pool (KV blocks, SSM slots) may claim when it is sized
# automatically.
KV_MEMORY_SHARE = 0.5


# The pools a model class may name as its `state_pool` (engine/state.py).
POOLS: dict[str, type[PagedKVCache] | type[SSMSlotPool] | type[HybridPool]] = {
    "paged_kv": PagedKVCache,
    "ssm_slots": SSMSlotPool,
    "kv_and_ssm": HybridPool,
}


def pool_for(model) -> type[PagedKVCache] | type[SSMSlotPool] | type[HybridPool]:
    """The pool class `model` keeps its per-sequence state in."""
    name = getattr(model, "state_pool", "paged_kv")
    if name not in POOLS:
        raise GenerationError(f"the engine has no state pool {name!r}")
    return POOLS[name]


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
    prompt_logits: torch.Tensor | None = None  # fp32 (prompt_len, V), when asked for
    # params.prompt_logprobs: prompt tokens 1.. (token 0 has no logprob), on the Delta
    # that ends the prefill (the first token's, or the only one when nothing is generated)
    prompt_logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    queued: int
    running: int
    max_batch: int
    max_queue: int
    kv_blocks_used: int  # attention KV blocks (0 for a recurrent model)
    kv_blocks_total: int
    ssm_slots_used: int  # recurrent state slots (0 for an attention model)
    ssm_slots_total: int
    prefix_cache: bool  # the prefix cache is on
    prefix_cached_blocks: int  # KV blocks holding a cached prefix (held or idle)
    prefix_query_tokens: int  # prompt tokens of admitted sequences that looked for a prefix
    prefix_hit_tokens: int  # of those, found cached and not computed
    draft_tokens: int = 0  # tokens drafted for speculative decoding since the start
    accepted_draft_tokens: int = 0  # of those, accepted by the model

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up prompt tokens found in the prefix cache (0 before any)."""
        return (
            self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
        )


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

    def _drain(self) -> list:
        """What is queued now, without waiting (a caller-driven engine)."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except (queue.Empty, asyncio.QueueEmpty):
                return items

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
class _Sequence(SequenceState):
    stream: Stream | None = None
    text: SequenceText | None = None
    stop_ids: frozenset[int] = frozenset()
    generated: int = 0
    started: float = 0.0


class Engine:
    def __init__(
        self,
        model,
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
        prefix_cache: bool = True,
        speculative: str | None = "prompt_lookup",
        draft_model=None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        adapters: LoRALayers | None = None,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("prefill_chunk", prefill_chunk),
            ("block_size", block_size),
            ("draft_tokens", draft_tokens),
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
        self.pool = pool_for(model).for_engine(
            model,
            max_batch=max_batch,
            max_context=self.max_context,
            block_size=block_size,
            kv_cache_tokens=kv_cache_tokens,
            available=available_memory(model.device),
            memory_share=KV_MEMORY_SHARE,
        )
        self.prefix_cache = False
        self.prefix_cache_off: str | None = None  # why it stayed off although asked for
        if prefix_cache:
            self.prefix_cache_off = self.pool.enable_prefix_cache(prefill_chunk)
            self.prefix_cache = self.prefix_cache_off is None
            if self.prefix_cache_off is not None:
                log.info("prefix cache off for this model: %s", self.prefix_cache_off)
        drafter, self.speculative_off = make_drafter(
            speculative, model, self.pool, draft_model, draft_tokens,
            max_batch=max_batch, max_context=self.max_context, block_size=block_size,
            available=available_memory(model.device), memory_share=KV_MEMORY_SHARE,
        )  # fmt: skip
        self.speculative = speculative if drafter is not None else None
        if self.speculative_off is not None:
            log.info("speculative decoding off for this model: %s", self.speculative_off)
        self.adapters = adapters  # LoRA adapters a sequence may name (submit's `adapter`)
        self.runner = ModelRunner(model, self.pool, drafter, adapters)
        self._step_lock = threading.Lock()  # one step at a time, whoever drives
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._seconds_per_request = 1.0  # moving average, for Retry-After
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_llm(cls, llm, **kwargs) -> Engine:
        """An engine for an `LLM`, with its speculative settings and LoRA adapters unless
        told others."""
        kwargs.setdefault("adapters", llm.adapters)
        if "speculative" not in kwargs:
            kwargs["speculative"] = llm.speculative
            kwargs.setdefault("draft_model", llm.draft.model if llm.draft else None)
            kwargs.setdefault("draft_tokens", llm.draft_tokens)
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
        *,
        prompt_logits: bool = False,
        generate: bool = True,
        adapter: str | None = None,
    ) -> list[Stream]:
        """Queue sequences (all or none); returns one Stream each.

        Raises GenerationError for a prompt that cannot run (empty, ids outside the
        vocabulary, prompt + max_tokens beyond the context) and QueueFull when the
        waiting queue cannot take them all. With `prompt_logits` the Delta that ends the
        prefill carries the logits of every prompt position. With `generate=False` the
        prompts are only prefilled (max_tokens is not used): one Delta each, finish
        reason "length", carrying what `params.prompt_logprobs` and `prompt_logits` ask
        for (OpenAI's `max_tokens: 0` with `echo`). `adapter` names the LoRA adapter
        (one of `adapters`) every prompt runs with; None: the base model."""
        if not prompts or len(prompts) != len(params):
            raise GenerationError("submit: need one SamplingParams per prompt, at least one")
        seqs = [
            self._new_sequence(p, sp, loop, prompt_logits, generate, adapter)
            for p, sp in zip(prompts, params, strict=True)
        ]
        return self._enqueue(seqs)

    def _enqueue(self, seqs: list[_Sequence]) -> list[Stream]:
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

    def iterate(self, stream: Stream) -> Iterator[Delta]:
        """A stream's Deltas; an engine that was not started is driven here, in the
        caller's thread. Leaving the loop early cancels the sequence."""
        try:
            if self.alive:
                yield from stream
                return
            while True:
                for item in stream._drain():
                    if item is _END:
                        return
                    yield item
                if not self.step():
                    raise GenerationError("the engine has nothing to run for this stream")
        finally:
            stream.cancel()

    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None = None
    ) -> list[Completion]:
        """Submit and wait: the whole completion of every prompt (for batch jobs). An
        engine that was not started is driven here, in the caller's thread."""
        streams = self.submit(prompts, params, adapter=adapter)
        out = []
        try:
            for stream, p in zip(streams, params, strict=True):
                text, ids, lps, finish = "", [], [], "length"
                for d in self.iterate(stream):
                    if d.finish_reason == "error":
                        raise GenerationError(f"generation failed: {d.error}")
                    text, finish = text + d.text, d.finish_reason or finish
                    ids += d.token_ids
                    lps += d.logprobs
                logprobs = lps if p.logprobs is not None else None
                out.append(Completion(text, ids, finish, stream.prompt_tokens, logprobs))
        finally:  # after an error, the prompts not yet read give their slots back
            for stream in streams:
                stream.cancel()
        return out

    def score(self, prompts: list[list[int]], adapter: str | None = None) -> list[torch.Tensor]:
        """Next-token logits at every position of each prompt, fp32 (len(prompt), V):
        the prompts are prefilled like any other and nothing is generated (perplexity,
        `LLM.logits`)."""
        if not prompts:
            raise GenerationError("score: need at least one prompt")
        seqs = [self._new_sequence(p, None, None, True, adapter=adapter) for p in prompts]
        out = []
        for stream in self._enqueue(seqs):
            logits = None
            for d in self.iterate(stream):
                if d.finish_reason == "error":
                    raise GenerationError(f"scoring failed: {d.error}")
                logits = d.prompt_logits if d.prompt_logits is not None else logits
            out.append(logits)
        return out

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                queued=len(self._waiting),
                running=len(self._running),
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                **asdict(self.pool.usage()),
                draft_tokens=self.runner.drafted,
                accepted_draft_tokens=self.runner.accepted,
            )

    def _new_sequence(
        self,
        prompt: list[int],
        params: SamplingParams | None,
        loop: asyncio.AbstractEventLoop | None,
        prompt_logits: bool = False,
        generates: bool = True,
        adapter: str | None = None,
    ) -> _Sequence:
        """The one place a prompt is checked, for every face. `params` None: scored only
        (`score`), with nothing to return but the logits."""
        vocab = self.model.config.vocab_size
        if params is None:
            params, generates = SamplingParams(), False
        elif not isinstance(params, SamplingParams):
            raise GenerationError("submit: params must be SamplingParams")
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise GenerationError("the prompt must be a list of int token ids")
        if not prompt:
            raise GenerationError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"the prompt has a token id outside [0, {vocab})")
        if generates:
            params.check_vocab(vocab)
        max_tokens = params.max_tokens if generates else 0
        total = len(prompt) + max_tokens
        if total > self.max_context:
            if not generates:
                raise GenerationError(
                    f"the text has {len(prompt)} tokens, more than this engine's context of "
                    f"{self.max_context} tokens"
                )
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: "
                f"{total} is more than this model's context of {self.max_context} tokens; "
                "shorten the prompt or lower max_tokens"
            )
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            loaded = ", ".join(self.adapters.names) if self.adapters else "none"
            raise GenerationError(f"no LoRA adapter named {adapter!r} is loaded (loaded: {loaded})")
        reserve = self.pool.units_for(total)  # GenerationError when it can never fit
        stream = Stream(len(prompt), loop)
        stream._engine = self
        if not generates:
            return _Sequence(
                list(prompt), params, reserve, prompt_logits, False, stream=stream, adapter=adapter
            )
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        text = SequenceText(self.tokenizer, params.stop)
        return _Sequence(
            list(prompt), params, reserve, prompt_logits, True,
            stream=stream, text=text, stop_ids=frozenset(stop_ids), adapter=adapter,
        )  # fmt: skip

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _retry_after(self, waiting: int) -> int:
        rounds = (waiting + 1) / self.max_batch
        return max(1, min(60, math.ceil(rounds * self._seconds_per_request)))

    # ---- a step ---------------------------------------------------------------------
    def step(self) -> bool:
        """Plan, run one forward, deliver tokens. False when there was nothing to run.
        The engine thread calls this in a loop; without `start()` a caller may drive the
        engine itself (the CLI, `LLM`, batch jobs, tests)."""
        with self._step_lock:
            with self._lock:
                self._drop_cancelled()
                budget = Budget(
                    self.max_batch, self._free_units(), self.prefill_chunk, self.prefill_budget
                )
                candidates = self._price_waiting()
                plan = schedule(self._running, self._waiting, budget)
                for seq in plan.admitted:
                    self._waiting.popleft()
                    self.pool.attach(seq)  # its cached prefix, priced above
                    seq.started = time.monotonic()
                    self._running.append(seq)
                for seq in candidates[len(plan.admitted) :]:
                    seq.cached = 0  # priced but left waiting: priced again next step
                if not plan:
                    return False
            try:
                with torch.inference_mode(), batch_invariant():
                    results = self.runner.execute(plan.work)
            except Exception as e:  # the runner fails sequences, not steps: a bug if here
                log.exception("engine step failed")
                with self._lock:
                    for w in plan.work:
                        self._finish(w.seq, Delta("", [], [], "error", describe(e)))
                return True
            self._deliver(plan, results)
            return True

    def _deliver(self, plan: StepPlan, results: list[Sampled | Failed]) -> None:
        for r in results:  # first, so a failed sequence is not also reported done below
            if isinstance(r, Failed):
                with self._lock:
                    self._finish(r.seq, Delta("", [], [], "error", r.error))
        for w in plan.work:  # prompts scored only: done once the prefill is
            seq = w.seq
            if not seq.generates and seq.cached >= seq.prompt_len and seq in self._running:
                with self._lock:
                    self._finish(seq, Delta("", [], [], "length", **self._prompt_results(seq)))
        for s in results:
            if isinstance(s, Failed) or s.seq not in self._running:
                continue  # failed, or ended by an earlier token of a verify step
            try:
                delta = self._text(s.seq, s.token, s.logprobs)
            except Exception as e:  # detokenizing this sequence's token: it alone ends
                log.warning("detokenizing failed for one sequence: %s", describe(e))
                delta = Delta("", [], [], "error", describe(e))
            if delta.finish_reason is not None:
                with self._lock:
                    self._finish(s.seq, delta)
            else:
                s.seq.stream._push(delta)

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

    def _free_units(self) -> Units:
        """Units admission may promise: what the pool can hand out, less what running
        sequences may still take (their budget less what they hold), so a running
        sequence is never preempted."""
        free = self.pool.available
        for seq in self._running:
            free = add_units(free, add_units(seq.units, self.pool.held(seq), -1), -1)
        return free

    def _price_waiting(self) -> list[_Sequence]:
        """Price the waiting sequences this step may admit: a cached prefix that running
        sequences hold costs them nothing, and their prefill would start after it. Only
        `attach` at admission takes the blocks; the pool does not change in between."""
        room = max(0, self.max_batch - len(self._running))
        candidates = list(itertools.islice(self._waiting, room))
        for seq in candidates:
            seq.cached, shared = self.pool.lookup(seq)
            seq.reserve = add_units(seq.units, shared, -1)
        return candidates

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.stream.cancelled]:
            self._finish(seq, None)
        if any(s.stream.cancelled for s in self._waiting):
            for seq in [s for s in self._waiting if s.stream.cancelled]:
                seq.stream._push(_END)
            self._waiting = deque(s for s in self._waiting if not s.stream.cancelled)

    def _finish(self, seq: _Sequence, last: Delta | None) -> None:
        """Remove a running (or waiting) sequence, free its state, end its stream."""
        if seq in self._running:
            self._running.remove(seq)
            self.runner.release(seq)
            elapsed = time.monotonic() - seq.started
            self._seconds_per_request += 0.2 * (elapsed - self._seconds_per_request)
        if last is not None:
            seq.stream._push(last)
        seq.stream._push(_END)

    def _text(self, seq: _Sequence, token: int, lps: list[TokenLogprobs]) -> Delta:
        """A sampled token -> the Delta for its stream: finish reason (stop token, stop
        string, max_tokens) and the text it adds."""
        seq.generated += 1
        seq.stream.completion_tokens = seq.generated
        by_token = token in seq.stop_ids
        finish = "stop" if by_token else None
        if finish is None and seq.generated >= seq.params.max_tokens:
            finish = "length"
        text, finish = seq.text.add(token, by_token, finish)
        prompt = self._prompt_results(seq) if seq.generated == 1 else {}
        return Delta(text, [token], lps, finish, **prompt)

    @staticmethod
    def _prompt_results(seq: _Sequence) -> dict:
        """What the prefill kept for the Delta that ends it: Delta's keyword arguments."""
        out: dict = {}
        if seq.want_prompt_logits:
            out["prompt_logits"] = torch.cat(seq.prompt_logits)
        if seq.params.prompt_logprobs is not None:
            out["prompt_logprobs"] = seq.prompt_logprobs
        return out
