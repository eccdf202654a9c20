"""Sampling: per-request settings, logits processors and a batched sampler.

Logits processors are plain functions on float32 logits of shape (B, V), one row per
sequence. Each returns new logits and matches the Hugging Face transformers processor
of the same name exactly (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`, min_tokens_to_keep=1).
Presence/frequency penalties have no HF counterpart and follow OpenAI/vLLM.

Every processor takes its parameter as a scalar or as one value per row (a sequence or
a 1-D tensor), so a batch can mix requests; rows whose value means "off" are untouched.
Per-row values are read on the CPU in float64 (they are tiny) so thresholds round
exactly as HF's Python-float arithmetic does.

A request's `logit_bias` (OpenAI's: token id -> bias in [-100, 100]) is added to the raw
logits of its row first, before everything else, as vLLM applies it.

Users may add their own processors (`SamplingParams.logits_processors`, Python API only,
as in vLLM): functions (generated token ids, (V,) logits) -> (V,) logits, applied to the
raw logits before the built-in ones. A row the sampler cannot pick from (NaN scores, or
every token at -inf) raises GenerationError, so the engine ends that sequence alone.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from falconet.errors import GenerationError
from falconet.request_rules import (
    LOGIT_BIAS_ALLOWED,
    LOGITS_PROCESSORS_ALLOWED,
    RULES,
    STOP_ALLOWED,
    STOP_TOKEN_IDS_ALLOWED,
    is_int,
    logit_bias_pairs,
    must_be,
    stop_strings,
)

RowParam = float | Sequence[float] | torch.Tensor
# (token ids generated so far, (V,) float32 logits) -> (V,) logits, as vLLM's processors.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Defaults give greedy decoding of 64 tokens."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax after penalties)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt + generated; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = fresh randomness per run
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; 0 = chosen token only; k = also top-k
    # vLLM's prompt_logprobs: None = off; k = each prompt token's logprob (from the
    # prefill's own logits) and the top-k alternatives at its position
    prompt_logprobs: int | None = None
    # {token id: bias} added to the raw logits; kept as (id, bias) pairs sorted by id
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Python API only (not over HTTP): run on the raw logits, in order, before penalties.
    logits_processors: tuple[LogitsProcessor, ...] = ()

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> GenerationError:
            return GenerationError(f"'{field}' {must_be(allowed, getattr(self, field))}")

        def set_(field: str, value: object) -> None:
            object.__setattr__(self, field, value)  # frozen: normalise once, here

        for field, rule in RULES.items():
            value = getattr(self, field)
            if value is None and rule.optional:
                continue
            if not rule.ok(value):
                raise bad(field, rule.allowed)
            set_(field, rule.kind(value))  # numpy scalars and int temperatures become plain
        if self.prompt_logprobs is not None:
            if not RULES["logprobs"].ok(self.prompt_logprobs):
                raise bad("prompt_logprobs", RULES["logprobs"].allowed)
            set_("prompt_logprobs", int(self.prompt_logprobs))
        stop = stop_strings(self.stop)
        if stop is None:
            raise bad("stop", STOP_ALLOWED)
        set_("stop", stop)
        ids = (self.stop_token_ids,) if is_int(self.stop_token_ids) else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(is_int(i) and i >= 0 for i in ids):
            raise bad("stop_token_ids", STOP_TOKEN_IDS_ALLOWED)
        set_("stop_token_ids", tuple(int(i) for i in ids))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "true or false")
        bias = self.logit_bias
        try:  # (id, bias) pairs, as kept here, are taken back too
            bias = dict(bias) if isinstance(bias, (list, tuple)) else bias
        except (TypeError, ValueError):
            bias = None
        if (pairs := logit_bias_pairs(bias)) is None:
            raise bad("logit_bias", LOGIT_BIAS_ALLOWED)
        set_("logit_bias", pairs)
        procs = self.logits_processors
        if not isinstance(procs, (list, tuple)) or not all(callable(f) for f in procs):
            raise bad("logits_processors", LOGITS_PROCESSORS_ALLOWED)
        set_("logits_processors", tuple(procs))

    def check_vocab(self, vocab_size: int) -> None:
        """Raises GenerationError when a token id the params name lies outside the
        vocabulary (the rules above cannot know the model)."""
        if self.logit_bias and self.logit_bias[-1][0] >= vocab_size:
            raise GenerationError(
                f"'logit_bias' has token id {self.logit_bias[-1][0]}, outside this model's "
                f"vocabulary [0, {vocab_size})"
            )

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the scaled logits overflow to inf/nan; like vLLM, sample greedily.
        return self.temperature < GREEDY_BELOW


# --- logits processors -------------------------------------------------------------


def _rows(value: RowParam, logits: torch.Tensor) -> torch.Tensor:
    """A parameter as a float64 CPU tensor of shape (B,), broadcasting a scalar."""
    t = torch.as_tensor(value, dtype=torch.float64, device="cpu")
    if t.dim() == 0:
        return t.expand(logits.shape[0])
    if t.shape != (logits.shape[0],):
        raise GenerationError(
            f"per-row parameter has shape {tuple(t.shape)}; expected ({logits.shape[0]},)"
        )
    return t


def _col(t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) CPU values -> (B, 1) in the logits' dtype and device, ready to broadcast."""
    return t.to(device=logits.device, dtype=logits.dtype).unsqueeze(1)


def _seen_mask(
    token_ids: torch.Tensor | Sequence[Sequence[int]], logits: torch.Tensor
) -> torch.Tensor:
    B, V = logits.shape
    if isinstance(token_ids, torch.Tensor) and token_ids.dtype == torch.bool:
        return token_ids.to(logits.device)
    # One spare column absorbs ids >= V, which HF clamps and then drops.
    mask = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    for i, ids in enumerate(token_ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=logits.device).reshape(-1)
        mask[i, ids.clamp(max=V)] = True
    return mask[:, :V]


def apply_repetition_penalty(
    logits: torch.Tensor,
    token_ids_per_row: torch.Tensor | Sequence[Sequence[int]],
    penalty: RowParam,
) -> torch.Tensor:
    """HF's repetition penalty: each distinct seen token's score s becomes s * p if s < 0,
    else s / p. `token_ids_per_row` is a (B, L) id tensor, B id lists of any length, or a
    bool (B, V) mask of seen tokens; ids >= V are ignored."""
    p = _rows(penalty, logits)
    if bool((p == 1).all()):
        return logits
    p = _col(p, logits)
    seen = _seen_mask(token_ids_per_row, logits)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: RowParam, frequency: RowParam
) -> torch.Tensor:
    """OpenAI/vLLM penalties: logits -= frequency * count + presence * (count > 0), where
    `counts` (B, V) counts each token among the generated (not prompt) tokens."""
    pres, freq = _rows(presence, logits), _rows(frequency, logits)
    if bool((pres == 0).all() and (freq == 0).all()):
        return logits
    counts = counts.to(logits.device)
    # Two subtractions, in vLLM's order, so results round as vLLM's do.
    logits = logits - _col(freq, logits) * counts.to(logits.dtype)
    return logits - _col(pres, logits) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: RowParam) -> torch.Tensor:
    """HF's temperature: logits / t. Rows with t == 0 (greedy) are left as they are."""
    t = _rows(temperature, logits)
    if bool(((t == 0) | (t == 1)).all()):
        return logits
    return logits / _col(torch.where(t == 0, 1.0, t), logits)


def apply_top_k(logits: torch.Tensor, top_k: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """HF's top-k: drop scores below the k-th largest (ties with it survive). k = 0 is off;
    k past the vocabulary keeps every token."""
    # Clamped while still float64: a k near 2**63 would overflow int64 in `.long()`.
    k = _rows(top_k, logits).clamp(max=logits.shape[-1]).long()
    if bool((k == 0).all()):
        return logits
    top = torch.topk(logits, int(k.max()), dim=-1).values
    kth = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1).to(logits.device))
    remove = (logits < kth) & (k > 0).unsqueeze(1).to(logits.device)
    return logits.masked_fill(remove, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: RowParam) -> torch.Tensor:
    """HF's top-p (nucleus): keep the smallest set of top tokens whose probability reaches
    p, and always the top token. p = 1 is off (HF's generate skips the warper then too)."""
    p = _rows(top_p, logits)
    if bool((p >= 1).all()):
        return logits
    # HF sorts ascending and drops the low tail whose cumulative mass is <= 1 - p; the
    # threshold is formed in float64 and rounded to float32, as HF's Python float is.
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= _col(1 - p, logits)
    remove_sorted[:, -1:] = False  # min_tokens_to_keep=1
    remove_sorted &= (p < 1).unsqueeze(1).to(logits.device)
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: RowParam) -> torch.Tensor:
    """HF's min-p: drop tokens whose probability is below min_p * (top probability).
    The top token always survives (min_p <= 1), so HF's min_tokens_to_keep is implied."""
    m = _rows(min_p, logits)
    if bool((m == 0).all()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < _col(m, logits) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


# --- sampler -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the top alternatives, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None  # 1 + tokens more likely than `token`, where computed


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Each target's log-probability under the row before it, with its rank in the
    vocabulary and the top-k alternatives: row i of the (n, V) `logits` scores
    `targets[i]` (n >= len(targets)). Raw logits, fp32 log_softmax, as `Sampler.logprobs`."""
    m = len(targets)
    logp = torch.log_softmax(logits[:m].float(), dim=-1)  # (m, V)
    ids = torch.tensor(list(targets), dtype=torch.long, device=logp.device).view(-1, 1)
    chosen = logp.gather(1, ids)  # (m, 1)
    # Ties with the chosen token do not push it down, as in vLLM's rank.
    ranks = (logp > chosen).sum(dim=-1) + 1
    top_lp, top_ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()  # one device sync for all
    return [
        TokenLogprobs(int(t), chosen_l[i], tuple(zip(top_ids_l[i], top_lp_l[i], strict=True)),
                      ranks_l[i])
        for i, t in enumerate(targets)
    ]  # fmt: skip


class Sampler:
    """Picks the next token for each row of a batch, one `SamplingParams` per row.

    Built once per batch (as mlx-lm's `make_sampler`). Each row owns a `torch.Generator`,
    so a seeded row draws the same tokens whatever else is in the batch. Penalty state
    (tokens seen in prompt + output, counts of output tokens) lives here; call `update`
    with the tokens actually appended. `select` and `concat` reshape the batch as
    sequences finish or join, carrying generators and state along.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(params) != len(prompt_ids):
            raise GenerationError(f"{len(params)} sampling params for {len(prompt_ids)} prompts")
        device = torch.device(device)
        for p in params:
            p.check_vocab(vocab_size)
        generators = []
        for p in params:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else secrets.randbits(64))
            generators.append(g)
        B, V = len(params), vocab_size
        seen = counts = None
        if any(p.repetition_penalty != 1 for p in params):
            seen = _seen_mask(prompt_ids, torch.empty(B, V, device=device))
        if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
            counts = torch.zeros(B, V, dtype=torch.int32, device=device)
        self._setup(params, generators, seen, counts, vocab_size, device)

    def _setup(
        self,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        seen: torch.Tensor | None,
        counts: torch.Tensor | None,
        vocab_size: int,
        device: torch.device,
        outputs: Sequence[list[int]] | None = None,
    ) -> None:
        self.params: tuple[SamplingParams, ...] = tuple(params)
        self.vocab_size = vocab_size
        self.device = device
        self._generators: list[torch.Generator] = list(generators)
        self._seen: torch.Tensor | None = seen  # (B, V) bool, prompt + generated
        self._counts: torch.Tensor | None = counts  # (B, V) int32, generated only
        # Generated ids per row, for the user's logits processors (kept only if there are).
        self._has_processors = any(p.logits_processors for p in params)
        # (row, token ids, biases) of the rows with a logit_bias
        self._bias = [
            (i, torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=device),
             torch.tensor([b for _, b in p.logit_bias], dtype=torch.float32, device=device))
            for i, p in enumerate(params) if p.logit_bias
        ]  # fmt: skip
        self._outputs: list[list[int]] = (
            [list(o) for o in outputs] if outputs is not None else [[] for _ in params]
        )

        def col(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=torch.float64)

        self._rep, self._pres, self._freq = map(
            col, ("repetition_penalty", "presence_penalty", "frequency_penalty")
        )
        self._sampled = [i for i, p in enumerate(params) if not p.greedy]
        self._sampled_idx = torch.tensor(self._sampled, dtype=torch.long, device=device)
        # Warper settings for the sampled rows only; greedy rows skip the warpers.
        self._temp, self._top_k, self._top_p, self._min_p = (
            col(name)[self._sampled] for name in ("temperature", "top_k", "top_p", "min_p")
        )

    def __len__(self) -> int:
        return len(self.params)

    def generator(self, row: int) -> torch.Generator:
        """Row `row`'s random stream (speculative verification draws from it too)."""
        return self._generators[row]

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The user's logits processors, then penalties for every row, then temperature/
        top-k/top-p/min-p for sampled rows (HF's order). Greedy rows come back penalised
        only, ready for argmax."""
        # processors and softmax in float32 even for bf16 models
        return self._penalise_and_warp(self._apply_processors(self._apply_bias(logits.float())))

    def _apply_bias(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's logit_bias added to its logits (a copy: the raw logits also give
        the logprobs). Row by row, so a row's sums do not depend on the batch."""
        if not self._bias:
            return logits
        logits = logits.clone()
        for i, ids, bias in self._bias:
            logits[i, ids] += bias.to(logits.dtype)
        return logits

    def _apply_processors(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._has_processors:
            return logits
        rows = []
        for i, p in enumerate(self.params):
            # A copy: processors often write in place, and the raw logits also give the
            # logprobs.
            row = logits[i].clone()
            for j, fn in enumerate(p.logits_processors):
                name = getattr(fn, "__qualname__", type(fn).__qualname__)
                try:
                    out = fn(list(self._outputs[i]), row)
                except Exception as e:  # the user's code: say whose it was
                    raise GenerationError(
                        f"logits processor {j} ({name}) failed: {type(e).__name__}: {e}"
                    ) from e
                if not isinstance(out, torch.Tensor) or out.shape != row.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise GenerationError(
                        f"logits processor {j} ({name}) returned {got}; it must return "
                        f"a tensor of shape {tuple(row.shape)}"
                    )
                row = out.to(device=logits.device, dtype=logits.dtype)
            rows.append(row)
        return torch.stack(rows)

    def _penalise_and_warp(self, logits: torch.Tensor) -> torch.Tensor:
        if self._seen is not None:
            logits = apply_repetition_penalty(logits, self._seen, self._rep)
        if self._counts is not None:
            logits = apply_presence_frequency(logits, self._counts, self._pres, self._freq)
        if not self._sampled:
            return logits
        x = logits[self._sampled_idx]
        x = apply_temperature(x, self._temp)
        x = apply_top_k(x, self._top_k)
        x = apply_top_p(x, self._top_p)
        x = apply_min_p(x, self._min_p)
        return logits.index_copy(0, self._sampled_idx, x)

    def _rows_to_redo(self, processed: torch.Tensor) -> list[bool]:
        """Which rows must be recomputed in float64 (+inf somewhere, or no token left:
        float32 may have overflowed). Raises GenerationError for NaN, which no setting
        the rules allow can produce: it came from the model or a logits processor."""
        # The usual step: nothing to redo when every row's maximum is finite -- a NaN or
        # +inf anywhere becomes its row's maximum, a row of -inf has -inf for one, and
        # -inf elsewhere (masked tokens) is fine. One reduction, no temporaries the
        # size of the vocabulary (isfinite's eq + abs + ne + all took ~0.45 ms per
        # step at a 131k vocabulary).
        if bool(processed.amax(dim=-1).isfinite().all()):
            return [False] * len(self)
        nan, posinf, empty = torch.stack(
            [
                processed.isnan().any(dim=-1),
                processed.isposinf().any(dim=-1),
                (processed == -math.inf).all(dim=-1),
            ]
        ).tolist()  # one device sync for all rows
        for i, bad in enumerate(nan):
            if bad:
                raise GenerationError(
                    f"the next-token scores{self._row(i)} hold NaN; the model or a logits "
                    "processor produced it"
                )
        return [p or e for p, e in zip(posinf, empty, strict=True)]

    def _row(self, i: int) -> str:
        return f" (row {i})" if len(self) > 1 else ""

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) token ids: argmax for greedy rows, a draw for the rest.
        Raises GenerationError when a row has no token to pick (NaN scores, or every
        token at -inf)."""
        base = self._apply_processors(self._apply_bias(logits.float()))
        processed = self._penalise_and_warp(base)
        redo = self._rows_to_redo(processed)
        tokens = processed.argmax(dim=-1)
        if self._sampled:
            probs = torch.softmax(processed[self._sampled_idx], dim=-1)
            # One draw per row from that row's own generator: batch-independent seeding.
            draws = [
                torch.multinomial(probs[j], 1, generator=self._generators[i])
                if not redo[i]
                else tokens[i : i + 1]  # drawn in float64 below
                for j, i in enumerate(self._sampled)
            ]
            tokens = tokens.index_copy(0, self._sampled_idx, torch.cat(draws))
        if any(redo):
            tokens = self._sample_in_float64(base, tokens, redo)
        return tokens

    def _sample_in_float64(
        self, base: torch.Tensor, tokens: torch.Tensor, redo: list[bool]
    ) -> torch.Tensor:
        """Rows where float32 overflowed, so that HF's softmax would give NaN (a logit of
        10 over a repetition penalty of 1e-37, then a temperature of 1e-5): recomputed
        in float64, where every setting the rules allow stays finite. Scores still +inf
        there were forced by a logits processor: those tokens share the mass equally."""
        wide = self._penalise_and_warp(base.double())
        sampled = set(self._sampled)
        tokens = tokens.clone()
        for i in (i for i, r in enumerate(redo) if r):
            row = wide[i]
            forced = row.isposinf()
            if bool(forced.any()):
                row = torch.zeros_like(row).masked_fill(~forced, -math.inf)
            elif bool((row == -math.inf).all()):
                raise GenerationError(
                    f"no token is left to pick{self._row(i)}: logits processors or "
                    "penalties put every token at -inf"
                )
            if i in sampled:
                pick = torch.multinomial(row.softmax(-1), 1, generator=self._generators[i])
            else:
                pick = row.argmax().view(1)
            tokens[i] = pick.to(tokens.device)[0]
        return tokens

    def update(self, tokens: torch.Tensor) -> None:
        """Record the (B,) tokens appended to each row, for the penalties."""
        tokens = tokens.to(self.device).long()
        rows = torch.arange(len(self), device=self.device)
        if self._seen is not None:
            self._seen[rows, tokens] = True
        if self._counts is not None:
            self._counts[rows, tokens] += 1
        if self._has_processors:
            for out, t in zip(self._outputs, tokens.tolist(), strict=True):
                out.append(t)

    def logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, k: int | None = None
    ) -> list[TokenLogprobs | None]:
        """Log-probabilities from log_softmax of the RAW model logits, before penalties,
        temperature and filtering (vLLM's default, `raw_logprobs`), so they describe the
        model rather than the sampling settings. With k=None each row uses its own
        `logprobs` setting and rows with None get None; an int k applies to every row."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        ks = [k if k is not None else p.logprobs for p in self.params]
        k_max = min(max((x for x in ks if x is not None), default=0), logp.shape[-1])
        chosen = logp.gather(1, tokens.to(logp.device).long().view(-1, 1)).squeeze(1)
        top_lp, top_ids = torch.topk(logp, k_max, dim=-1)
        chosen_l, tokens_l = chosen.tolist(), tokens.tolist()
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()  # one device sync for all
        out: list[TokenLogprobs | None] = []
        for i, ki in enumerate(ks):
            if ki is None:
                out.append(None)
                continue
            top = tuple(zip(top_ids_l[i][:ki], top_lp_l[i][:ki], strict=True))
            out.append(TokenLogprobs(int(tokens_l[i]), chosen_l[i], top))
        return out

    def select(self, indices: Sequence[int] | torch.Tensor) -> Sampler:
        """A sampler for the given rows, in that order. It shares those rows' generators
        (so their random streams continue), hence stop using this sampler afterwards."""
        idx = [int(i) for i in indices]
        at = torch.tensor(idx, dtype=torch.long, device=self.device)
        new = object.__new__(Sampler)
        new._setup(
            [self.params[i] for i in idx],
            [self._generators[i] for i in idx],
            None if self._seen is None else self._seen[at],
            None if self._counts is None else self._counts[at],
            self.vocab_size,
            self.device,
            [self._outputs[i] for i in idx],
        )
        return new

    @staticmethod
    def concat(samplers: Sequence[Sampler]) -> Sampler:
        """One sampler whose rows are those of `samplers`, in order (rows joining a batch).
        A sampler that tracks no penalty state has rows with penalties off, so zeros
        stand in for its state."""
        if not samplers:
            raise GenerationError("Sampler.concat needs at least one sampler")
        first = samplers[0]
        if any(s.vocab_size != first.vocab_size or s.device != first.device for s in samplers):
            raise GenerationError("Sampler.concat needs samplers of one vocab size and device")

        def cat(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            parts = [getattr(s, name) for s in samplers]
            if all(p is None for p in parts):
                return None
            V, dev = first.vocab_size, first.device
            return torch.cat(
                [
                    torch.zeros(len(s), V, dtype=dtype, device=dev) if p is None else p
                    for p, s in zip(parts, samplers, strict=True)
                ]
            )

        new = object.__new__(Sampler)
        new._setup(
            [p for s in samplers for p in s.params],
            [g for s in samplers for g in s._generators],
            cat("_seen", torch.bool),
            cat("_counts", torch.int32),
            first.vocab_size,
            first.device,
            [o for s in samplers for o in s._outputs],
        )
        return new
