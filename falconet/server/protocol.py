"""Requests of the OpenAI-compatible server: JSON bodies -> validated generation requests.

Validation is by hand, field by field, so that every error names the field the way the
OpenAI API does (`param`) and says what values it takes. The ranges are the ones
`SamplingParams` enforces (OpenAI's where OpenAI has one); SamplingParams still runs
last, as a second guard. Fields the server cannot honour (`echo`, `suffix`, `best_of`,
`tools`, ...) are refused with 400 instead of being silently ignored; fields that do not
change the output (`user`, `metadata`, ...) are ignored, as unknown fields are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from falconet.errors import FalconetError
from falconet.sampling import MAX_LOGPROBS, SamplingParams
from falconet.tokenizer import FALLBACK_CHAT_STOP, Tokenizer

MAX_N = 16  # choices per request (n)
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_STOP = 8  # stop strings per request (OpenAI allows 4; vLLM has no cap)
MAX_BODY_BYTES = 4 * 2**20
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_RANGE = (-(2**63), 2**63)  # int64, as vLLM bounds it; seed + i stays a valid seed

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    """An error the server answers with OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# --- JSON bodies ---------------------------------------------------------------------


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from e
    if not text.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise bad("the request body is JSON nested too deeply") from e
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, not {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_text(value: str, param: str) -> str:
    """A JSON string that is real text: "\\ud800" escapes decode to lone surrogates,
    which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"'{param}' contains an invalid unicode escape (a lone surrogate)", param) from e
    return value


def get_int(
    body: dict, name: str, default: int | None, lo: int, hi: int | None = None
) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        v = int(v)  # 16.0 is 16, as Python clients sometimes send
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise bad(f"'{name}' must be {allowed}; got {_show(v)}", name)
    return v


def get_number(body: dict, name: str, default: float, allowed: str, ok) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not ok(v):  # NaN and inf fail every `ok`
        raise bad(f"'{name}' must be {allowed}; got {_show(v)}", name)
    return float(v)


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false; got {_show(v)}", name)
    return v


def check_model(body: dict, model_name: str) -> None:
    """`model` may be left out; when given it must be the served model."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(f"'model' must be a string; got {_show(model)}", "model")
    if model != model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            "model",
            "model_not_found",
        )


# Fields that would change the output in ways this server does not implement, with the
# values that mean "off" (those are accepted).
_UNSUPPORTED_COMMON = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "min_tokens": (None, 0),
    "prompt_logprobs": (None,),
    "use_beam_search": (None, False),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}
_UNSUPPORTED_COMPLETION = {"echo": (None, False), "suffix": (None, "")}
_UNSUPPORTED_CHAT = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}


def reject_unsupported(body: dict, table: dict[str, tuple]) -> None:
    for name, off in {**_UNSUPPORTED_COMMON, **table}.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in off):
            raise bad(f"'{name}' is not supported by this server; leave it out", name)


# --- generation requests -------------------------------------------------------------


@dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request.

    `prompts` and `params` have one entry per choice, prompt-major (choice i*n + j is
    prompt i's j-th sample, OpenAI's order); `prompt_lengths` one per distinct prompt.
    """

    prompts: list[list[int]]
    params: list[SamplingParams]
    prompt_lengths: list[int]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token when logprobs are asked for, else None


def _sampling_kwargs(body: dict) -> dict[str, Any]:
    """SamplingParams fields shared by both endpoints (everything but max_tokens,
    logprobs and seed). Unset values are OpenAI's defaults: temperature 1, top_p 1."""
    top_k = get_int(body, "top_k", 0, -1)
    kw: dict[str, Any] = {
        "temperature": get_number(body, "temperature", 1.0, "a number >= 0 (0 = greedy)",
                                  lambda v: 0 <= v < math.inf),
        "top_p": get_number(body, "top_p", 1.0, "a number in (0, 1]", lambda v: 0 < v <= 1),
        "top_k": 0 if top_k == -1 else top_k,  # vLLM's -1 means off, as 0 does here
        "min_p": get_number(body, "min_p", 0.0, "a number in [0, 1]", lambda v: 0 <= v <= 1),
        "repetition_penalty": get_number(body, "repetition_penalty", 1.0, "a number > 0 (1 = off)",
                                         lambda v: 0 < v < math.inf),
        "presence_penalty": get_number(body, "presence_penalty", 0.0, "a number in [-2, 2]",
                                       lambda v: -2 <= v <= 2),
        "frequency_penalty": get_number(body, "frequency_penalty", 0.0, "a number in [-2, 2]",
                                        lambda v: -2 <= v <= 2),
        "ignore_eos": get_bool(body, "ignore_eos", False),
    }  # fmt: skip
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"'stop' must be a non-empty string or an array of them; got {_show(stop)}",
                  "stop")  # fmt: skip
    if len(stop) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings; got {len(stop)}", "stop")
    kw["stop"] = tuple(check_text(s, "stop") for s in stop)
    ids = body.get("stop_token_ids")
    if ids is None:
        ids = []
    if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
        raise bad(f"'stop_token_ids' must be an array of token ids (integers >= 0); got "
                  f"{_show(ids)}", "stop_token_ids")  # fmt: skip
    kw["stop_token_ids"] = tuple(ids)
    return kw


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object; got {_show(options)}", "stream_options")
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be true or false",
                  "stream_options.include_usage")  # fmt: skip
    return stream, include


def _max_tokens(body: dict) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens when both are set."""
    for name in ("max_completion_tokens", "max_tokens"):
        v = get_int(body, name, None, 1)
        if v is not None:
            return v
    return None


def _check_context(
    lengths: list[int], max_tokens: int | None, max_context: int, prompt_param: str
) -> None:
    for n in lengths:
        if n >= max_context:
            raise bad(
                f"this model's maximum context length is {max_context} tokens and the prompt "
                f"has {n} tokens, which leaves no room to generate; shorten the prompt",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is not None and n + max_tokens > max_context:
            raise bad(
                f"this model's maximum context length is {max_context} tokens; the prompt has "
                f"{n} tokens and max_tokens is {max_tokens} ({n} + {max_tokens} = "
                f"{n + max_tokens} > {max_context}); lower max_tokens or shorten the prompt",
                "max_tokens",
                "context_length_exceeded",
            )


def _build(
    body: dict,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    extra_stop: tuple[str, ...],
    max_context: int,
) -> GenerationRequest:
    """Shared tail of both endpoints: n, seed, streaming flags and one SamplingParams
    per choice (max_tokens None = the rest of the context, per prompt)."""
    n = get_int(body, "n", 1, 1, MAX_N)
    seed = get_int(body, "seed", None, SEED_RANGE[0])
    if seed is not None and seed >= SEED_RANGE[1]:
        raise bad(f"'seed' must be an integer in [-2**63, 2**63); got {seed}", "seed")
    stream, include_usage = _stream_flags(body)
    kw = _sampling_kwargs(body)
    kw["stop"] += tuple(s for s in extra_stop if s not in kw["stop"])
    all_prompts, params = [], []
    try:
        for ids in prompts:
            budget = max_context - len(ids) if max_tokens is None else max_tokens
            for j in range(n):
                # choice j of a seeded request draws from seed + j: n samples that differ,
                # and the same n samples for the same request
                s = None if seed is None else seed + j
                params.append(SamplingParams(max_tokens=budget, seed=s, logprobs=logprobs, **kw))
                all_prompts.append(ids)
    except FalconetError as e:  # a second guard; the checks above should catch it first
        raise bad(str(e)) from e
    return GenerationRequest(all_prompts, params, [len(p) for p in prompts], n, stream,
                             include_usage, logprobs)  # fmt: skip


def check_token_ids(ids: list, vocab_size: int, param: str) -> list[int]:
    if not all(_is_int(t) for t in ids):
        raise bad(f"'{param}' must hold integer token ids", param)
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad(f"'{param}' has token id {bad_ids[0]}, outside this model's vocabulary "
                  f"[0, {vocab_size})", param)  # fmt: skip
    return list(ids)


def completion_prompts(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """`prompt`: a string, an array of token ids, or an array of either (several prompts)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required: a string or an array of token ids", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad("'prompt' must be a non-empty string, an array of token ids, or an array of "
                  f"those; got {_show(prompt)}", "prompt")  # fmt: skip
    if len(items) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(items)} prompts; at most {MAX_PROMPTS} per request",
                  "prompt")  # fmt: skip
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(check_text(item, "prompt"))
        elif isinstance(item, list):
            ids = check_token_ids(item, vocab_size, "prompt")
        else:
            raise bad(f"'prompt' items must be strings or arrays of token ids; got {_show(item)}",
                      "prompt")  # fmt: skip
        if not ids:
            raise bad("'prompt' is empty (no tokens); send some text", "prompt")
        out.append(ids)
    return out


def parse_completion(
    body: dict, tokenizer: Tokenizer, vocab_size: int, max_context: int, model_name: str
) -> GenerationRequest:
    check_model(body, model_name)
    reject_unsupported(body, _UNSUPPORTED_COMPLETION)
    logprobs = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _max_tokens(body)
    if max_tokens is None:
        max_tokens = COMPLETION_MAX_TOKENS
    prompts = completion_prompts(body, tokenizer, vocab_size)
    _check_context([len(p) for p in prompts], max_tokens, max_context, "prompt")
    return _build(body, prompts, max_tokens, logprobs, (), max_context)


# --- chat ----------------------------------------------------------------------------

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(body: dict) -> list[dict[str, str]]:
    """`messages` as the tokenizer's chat template takes them: role + string content.
    Content given as an array of text parts is joined; OpenAI's newer `developer` role
    is a system message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with role and content", where)
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"'{where}.role' is {_show(role)}; it must be one of system, user, "
                      "assistant (or developer)", f"{where}.role")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):  # fmt: skip
                    raise bad(f"'{where}.content[{j}]' is not a text part; only "
                              '{"type": "text", "text": ...} parts are supported',
                              f"{where}.content")  # fmt: skip
                parts.append(part["text"])
            content = "\n".join(parts)  # vLLM joins text parts with newlines
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or an array of text parts; got "
                      f"{_show(content)}", f"{where}.content")  # fmt: skip
        out.append({"role": _ROLES[role], "content": check_text(content, f"{where}.content")})
    return out


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The same prompt `LLM.chat_prompt` builds: the chat template, then the tokens
    without special tokens added (the template writes its own)."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except FalconetError as e:
        raise bad(str(e), "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


def parse_chat(
    body: dict, tokenizer: Tokenizer, max_context: int, model_name: str
) -> GenerationRequest:
    check_model(body, model_name)
    reject_unsupported(body, _UNSUPPORTED_CHAT)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _max_tokens(body)
    ids = chat_prompt(tokenizer, chat_messages(body))
    if not ids:
        raise bad("the messages make an empty prompt", "messages")
    _check_context([len(ids)], max_tokens, max_context, "messages")
    # Without a chat template the model was tuned on "User: ...\nFalcon:" turns and
    # would go on to write the user's next one; that turn ends the reply (as in the CLI).
    extra_stop = (FALLBACK_CHAT_STOP,) if tokenizer.chat_template is None else ()
    return _build(body, [ids], max_tokens, (top or 0) if want else None, extra_stop, max_context)
