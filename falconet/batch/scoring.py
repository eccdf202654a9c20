"""Scoring records: each one's prompt rendered and tokenized, run through the engine with
continuous batching, its text (or its reject) as an `Outcome` for the ledger.

`Scorer` holds what needs the model (the engine, the tokenizer, a compiled schema); the
job loop (job.py) and each Ray worker (ray_job.py) drive one. Results are decided by the
record and the settings alone (a seeded sample takes its seed from the record's key), so
any worker scores a record to the same line.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from falconet.batch.ledger import Admission, Outcome, Pending
from falconet.batch.prompt import PromptTemplate, TemplateFailed
from falconet.constraints import Grammar
from falconet.engine import Engine, Stream
from falconet.errors import BatchError, GenerationError, GrammarError
from falconet.sampling import SamplingParams

SEED_BITS = 63


@dataclass
class InFlight:
    seq: int
    key: str
    source: str
    stream: Stream


class Scorer:
    """The model side of a job: `settings` is a BatchSettings (job.py)."""

    def __init__(self, llm, settings) -> None:
        self.llm, self.settings = llm, settings
        self.template = PromptTemplate(settings.template, settings.template_name)
        self.grammar: Grammar | None = None
        if settings.schema is not None:
            try:
                self.grammar = Grammar.compile(
                    "json_schema", settings.schema, llm.tokenizer, "the --schema"
                )
            except GrammarError as e:
                raise BatchError(str(e)) from e
        settings.params.check_vocab(llm.config.vocab_size)
        self.engine = Engine(
            llm.model,
            llm.tokenizer,
            llm.eos_ids,
            max_batch=settings.max_batch,
            max_queue=2 * settings.max_batch,
            max_context=llm.config.max_position_embeddings,
        )

    def prompt_ids(self, fields: dict[str, Any]) -> list[int]:
        """The record's prompt as token ids; TemplateFailed when it has none that fits."""
        text = self.template.render(fields)
        context = self.engine.max_context
        room = context - self.settings.params.max_tokens
        if len(text) > 64 * context:  # no tokenizer packs 64 characters into a token
            raise TemplateFailed(
                f"the prompt is {len(text)} characters, far over the model's context of "
                f"{context} tokens"
            )
        ids = self.llm.tokenizer.encode(text)
        if not ids:
            raise TemplateFailed("the prompt is empty")
        if len(ids) > room:
            raise TemplateFailed(
                f"the prompt is {len(ids)} tokens; with --max-tokens "
                f"{self.settings.params.max_tokens} the model's context of {context} tokens "
                f"leaves room for {max(room, 0)}"
            )
        return ids

    def submit(self, row: Pending, ids: list[int] | None = None) -> InFlight | Outcome:
        """Start scoring `row` (its prompt `ids` when already made); its reject when its
        prompt cannot be made or submitted."""
        try:
            ids = ids or self.prompt_ids(json.loads(row.record))
            [stream] = self.engine.submit([ids], [self.params(row.key)])
        except (TemplateFailed, GenerationError) as e:
            return reject(row.seq, row.key, row.source, str(e), row.record)
        return InFlight(row.seq, row.key, row.source, stream)

    def params(self, key: str) -> SamplingParams:
        params = self.settings.params
        if params.seed is not None:  # each record its own seed: its sample is its own
            mixed = hashlib.sha256(f"{params.seed}:{key}".encode()).digest()
            params = replace(params, seed=int.from_bytes(mixed[:8], "big") >> (64 - SEED_BITS))
        if self.grammar is not None:
            params = replace(
                params, logits_processors=(self.grammar.processor(), *params.logits_processors)
            )
        return params

    def collect(self, item: InFlight, should_stop: Callable[[], bool]) -> Outcome | None:
        """Read `item`'s stream to its end; None when stopped first."""
        text, tokens, finish, error = "", 0, "length", None
        for delta in self.engine.iterate(item.stream):
            text += delta.text
            tokens += len(delta.token_ids)
            finish = delta.finish_reason or finish
            error = delta.error or error
            if should_stop() and delta.finish_reason is None:
                return None
        if finish == "error":
            return reject(item.seq, item.key, item.source, f"generation failed: {error}")
        result: dict[str, Any] = {
            "key": item.key,
            "source": item.source,
            "text": text,
            "finish_reason": finish,
            "completion_tokens": tokens,
        }
        if self.grammar is not None:
            parsed, reason = self._schema_output(text, finish)
            if reason is not None:
                return reject(item.seq, item.key, item.source, reason, text)
            result["json"] = parsed
        return Outcome(item.seq, "done", json.dumps(result, ensure_ascii=False))

    def _schema_output(self, text: str, finish: str) -> tuple[Any, str | None]:
        if finish != "stop":
            return None, (
                f"schema-invalid output: it reached --max-tokens "
                f"{self.settings.params.max_tokens} before its JSON was complete"
            )
        try:
            return json.loads(text), None
        except json.JSONDecodeError as e:
            return None, f"schema-invalid output: {e.msg} (column {e.colno})"

    def score(self, rows: Sequence[Pending]) -> list[Outcome]:
        """Every row's outcome, in row order: up to twice `max_batch` sequences in flight,
        the engine running `max_batch` of them at once and admitting the next as one ends."""
        window = 2 * self.settings.max_batch
        todo = deque(rows)
        flight: deque[InFlight | Outcome] = deque()
        outcomes = []
        while todo or flight:
            while todo and len(flight) < window:
                flight.append(self.submit(todo.popleft()))
            item = flight.popleft()
            outcomes.append(item if isinstance(item, Outcome) else self.collect(item, _never))
        return outcomes


def _never() -> bool:
    return False


def reject_line(key: str, source: str, reason: str, excerpt: str = "") -> str:
    return json.dumps(
        {"key": key, "source": source, "reason": reason, "excerpt": excerpt[:200]},
        ensure_ascii=False,
    )


def reject(seq: int, key: str, source: str, reason: str, excerpt: str = "") -> Outcome:
    return Outcome(seq, "rejected", reject_line(key, source, reason, excerpt))


def rejected(key: str, source: str, reason: str, excerpt: str) -> Admission:
    return Admission(key, source, "rejected", line=reject_line(key, source, reason, excerpt))
