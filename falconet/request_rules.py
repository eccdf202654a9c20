"""The request rules: one table for every face that takes sampling settings.

`SamplingParams` (sampling.py) checks it; the OpenAI API and the RAG query route build
their pydantic fields (and /openapi.json its bounds) from it; the CLI's flags end in
SamplingParams. Messages come from `must_be`, so each face says the same words about the
same value.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass

from falconet.errors import GenerationError


def is_int(x: object) -> bool:
    # bool is an int subclass; `top_k=True` is a bug in the caller, not k=1.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_STOP_STRINGS = 16  # OpenAI takes 4 and vLLM has no cap; each one costs a scan per token
MAX_STOP_LENGTH = 256  # characters per stop string
# torch.Generator.manual_seed takes any signed or unsigned 64-bit int (two's complement:
# -1 and 2**64 - 1 are one seed), which covers OpenAI's and vLLM's int64 seeds.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# top_k is an index: it must fit torch's int64. Any k past the vocabulary keeps every
# token (apply_top_k clamps it to V), as vLLM does.
TOP_K_MAX = 2**63 - 1
# The sampler works in float32. A temperature or repetition penalty outside float32's
# normal range [1.2e-38, 3.4e38] becomes inf, 0 or a subnormal there, and dividing logits
# by it gives inf and then NaN probabilities; these round bounds stay well inside it.
# (Within them a product can still overflow float32 -- a logit of 10 over a penalty of
# 1e-37 -- and the sampler recomputes such a row in float64; see Sampler.sample.)
SCALE_MIN, SCALE_MAX = 1e-37, 1e37


@dataclass(frozen=True)
class Rule:
    """A numeric sampling field: its type, its bounds, and the range as told to users.
    Float fields must also be finite; `None` is allowed only where `optional`."""

    kind: type  # int or float
    allowed: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    optional: bool = False  # None means off

    def ok(self, value: object) -> bool:
        if self.kind is int:
            if not is_int(value):
                return False
        elif not is_real(value) or not finite(value):  # NaN fails every comparison too
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def bounds(self) -> dict[str, float]:
        """The bounds as pydantic `Field` arguments (ge, gt, le)."""
        return {k: v for k in ("ge", "gt", "le") if (v := getattr(self, k)) is not None}


RULES: dict[str, Rule] = {
    "max_tokens": Rule(int, "an integer >= 1", ge=1),
    "temperature": Rule(float, f"a number in [0, {SCALE_MAX:g}] (0 = greedy)", ge=0,
                        le=SCALE_MAX),
    "top_k": Rule(int, "an integer in [0, 2**63) (0 = off; beyond the vocabulary = all)",
                  ge=0, le=TOP_K_MAX),
    "top_p": Rule(float, "a number in (0, 1] (1 = off)", gt=0, le=1),
    "min_p": Rule(float, "a number in [0, 1] (0 = off)", ge=0, le=1),
    "repetition_penalty": Rule(float, f"a number in [{SCALE_MIN:g}, {SCALE_MAX:g}] (1 = off)",
                               ge=SCALE_MIN, le=SCALE_MAX),
    # OpenAI's bounds for its two penalties: subtracted, never divided by, so a tiny or
    # subnormal value is harmless (it rounds towards 0 in float32).
    "presence_penalty": Rule(float, "a number in [-2, 2] (0 = off)", ge=-2, le=2),
    "frequency_penalty": Rule(float, "a number in [-2, 2] (0 = off)", ge=-2, le=2),
    "seed": Rule(int, "an integer in [-2**63, 2**64)", ge=SEED_MIN, le=SEED_MAX, optional=True),
    "logprobs": Rule(int, f"an integer in [0, {MAX_LOGPROBS}]", ge=0, le=MAX_LOGPROBS,
                     optional=True),
}  # fmt: skip
STOP_ALLOWED = (
    f"a string or a list of at most {MAX_STOP_STRINGS} strings, each 1 to {MAX_STOP_LENGTH} "
    "characters long"
)
STOP_TOKEN_IDS_ALLOWED = "a list of token ids (integers >= 0)"
# OpenAI's bias range: -100 bans a token and +100 all but forces it. Each entry costs a
# scattered add per step; the cap bounds that and the body that validates it.
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100, 100
MAX_LOGIT_BIAS = 1024
LOGIT_BIAS_ALLOWED = (
    f'an object mapping token ids (as strings, such as "42") to numbers in '
    f"[{LOGIT_BIAS_MIN}, {LOGIT_BIAS_MAX}], at most {MAX_LOGIT_BIAS} of them"
)
LOGITS_PROCESSORS_ALLOWED = "a list of callables (token ids so far, logits) -> logits"


def finite(x: numbers.Real) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def show(value: object) -> str:
    """A value as the user wrote it (JSON), cut short."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def must_be(allowed: str, value: object) -> str:
    """The tail of every message about a value outside its rule."""
    return f"must be {allowed}; got {show(value)}"


def stop_strings(stop: object) -> tuple[str, ...] | None:
    """`stop` (one string or a list of them) as a tuple, or None when it breaks the rule."""
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS:
        return None
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop):
        return None
    return tuple(stop)


def logit_bias_pairs(bias: object) -> tuple[tuple[int, float], ...] | None:
    """`bias` ({token id: bias}, ids as ints or as decimal strings, the JSON form) as
    (id, bias) pairs sorted by id, or None when it breaks the rule."""
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        return None
    pairs = {}
    for key, value in bias.items():
        # at most 10 digits: no int() of a thousand-digit key, and every id fits int64
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
            key = int(key)
        if not (is_int(key) and key >= 0 and is_real(value) and finite(value)):
            return None
        if key in pairs:  # "5" and "05"
            return None
        if not LOGIT_BIAS_MIN <= value <= LOGIT_BIAS_MAX:
            return None
        pairs[int(key)] = float(value)
    return tuple(sorted(pairs.items()))


def seed_for_choice(seed: int, j: int) -> int:
    """The seed of choice j of a seeded request: seed + j, wrapped into torch's 64-bit
    seed space, so every allowed seed has successors."""
    s = seed + j
    return s - 2**64 if s > SEED_MAX else s


# Answer lengths when a request names none. Each face's default is its cap or what the
# model's context leaves after the prompt, whichever is less, so no default is ever larger
# than the context (falconet-tiny holds 256 tokens). OpenAI's /v1/chat/completions has no
# cap (absent = up to the context); its /v1/completions has 16.
CHAT_MAX_TOKENS = 256  # `falconet chat`, per reply
RAG_MAX_TOKENS = 128  # `falconet rag ask` and POST /v1/rag/query
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def default_max_tokens(cap: int | None, context: int, prompt_tokens: int) -> int:
    """The answer length a face uses when none was asked for: min(cap, context -
    prompt_tokens), cap None meaning the whole rest of the context. Raises
    GenerationError only when the prompt itself leaves no room for one token."""
    room = context - prompt_tokens
    if room < 1:
        raise GenerationError(
            f"the prompt has {prompt_tokens} tokens, which leaves no room to answer in the "
            f"model's {context}-token context; shorten it"
        )
    return room if cap is None else min(cap, room)
