"""How the server reads a request body and checks each field: OpenAI-shaped errors
(`APIError`, `bad`), the body parsed before FastAPI sees it (`JSONBodyRoute`: oversized,
non-UTF-8, malformed and integer-overflowing bodies get their own message), and the
validators every field is built from (`checked`, `ruled`, `unsupported`), which turn
whatever pydantic finds wrong with a value into one message in the field's own words.
The request bodies themselves are in protocol.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    StrictInt,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from falconet.request_rules import (
    LOGIT_BIAS_ALLOWED,
    LOGIT_BIAS_MAX,
    LOGIT_BIAS_MIN,
    RULES,
    STOP_ALLOWED,
    STOP_TOKEN_IDS_ALLOWED,
    logit_bias_pairs,
    must_be,
    show,
    stop_strings,
)

MAX_N = 16  # choices per request (n)
MAX_BODY_BYTES = 4 * 2**20
# A body that announces more than this is refused without reading it; up to this, an
# oversized body is read to its end first so the client sees the 413 rather than a reset.
DRAIN_LIMIT = 64 * 2**20

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}  # fmt: skip


# --- errors --------------------------------------------------------------------------


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


_FIELD_ERROR = "falconet"  # the pydantic error type of every message written here


def _field_error(message: str) -> PydanticCustomError:
    """`message` follows the field's name: "'top_p' " + message."""
    return PydanticCustomError(_FIELD_ERROR, message)


def field_error(message: str) -> PydanticCustomError:
    """For validators written beside other routes: `message` follows the field's name."""
    return _field_error(message)


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first of pydantic's errors as an OpenAI 400 naming the field
    (`messages[0].role`: list indices in brackets, nested fields after dots)."""
    first = dict(errors[0]) if errors else {}
    param = ""
    for part in first.get("loc", ()):
        if part == "body":
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    msg = first.get("msg", "is invalid")
    if first.get("type") == _FIELD_ERROR:
        message = f"'{param}' {msg}" if param else f"the request body {msg}"
    elif first.get("type") == "missing":
        message = f"'{param}' is required"
    elif first.get("type") == "extra_forbidden":
        message = f"'{param}' is not a field of this request; leave it out"
    else:  # pydantic's own words, for anything the fields below do not phrase themselves
        message = f"'{param}': {msg}" if param else f"invalid request: {msg}"
    return bad(message, param or None)


def parse_model(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """`data` validated as `model`, for bodies read by hand; errors as `validation_error`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from e


# --- JSON bodies ---------------------------------------------------------------------


class OversizedInt:
    """A JSON integer of more digits than Python converts to an int (its `int_max_str_digits`
    guard against quadratic-time conversion): kept as a marker that no field accepts, so
    the 400 names the field that held it."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _int_or_oversized(literal: str) -> int | OversizedInt:
    limit = sys.get_int_max_str_digits()
    digits = len(literal.lstrip("-"))
    return OversizedInt(digits) if limit and digits > limit else int(literal)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer past the digit limit: parsed again, marking it
        return json.loads(text, parse_int=_int_or_oversized)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON") from e
    if not text.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        data = _loads(text)
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
    return "an array" if isinstance(value, list) else "an object"


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body read up to `limit` bytes (413 beyond it), as a JSON object."""
    return parse_json_object(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes; a 413 beyond that."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes; send less")
    length = request.headers.get("content-length")
    announced = int(length) if length is not None and length.isdigit() else None
    if announced is not None and announced > DRAIN_LIMIT:
        too_big.headers["Connection"] = "close"
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            too_big.headers["Connection"] = "close"
            raise too_big
    if size > limit:
        raise too_big
    return b"".join(chunks)


class _ParsedRequest(Request):
    """The request with its body already read, parsed and validated. It says
    `application/json` whatever the client sent (curl -d sends form-urlencoded), so
    FastAPI takes the body rather than refusing the content type; its `json()` is the
    validated model, which FastAPI's own validation passes through unchanged."""

    def __init__(self, request: Request, raw: bytes, data: Any) -> None:
        headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
        scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
        super().__init__(scope, request.receive)
        self._raw, self._data = raw, data

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._data


class JSONBodyRoute(APIRoute):
    """A route with a body model gets its body read (up to the app's
    `state.max_body_bytes`), parsed and validated here, before FastAPI sees it. Parsing
    and validating run in the app's `state.workers` threads: a 4 MiB body takes tens of
    milliseconds (a list of a million token ids far longer), which the event loop must
    not spend."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle
        model = getattr(self.body_field.field_info, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            model = None

        def parse(raw: bytes) -> Any:
            data = parse_json_object(raw)
            return data if model is None else parse_model(model, data)

        async def read_then_handle(request: Request) -> Response:
            raw = await read_body(request, request.app.state.max_body_bytes)
            data = await request.app.state.workers.run(parse, raw)
            return await handle(_ParsedRequest(request, raw, data))

        return read_then_handle


# --- fields --------------------------------------------------------------------------


def check_text(value: str) -> str:
    """A JSON string that is real text: "\\ud800" escapes decode to lone surrogates,
    which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _field_error("contains an invalid unicode escape (a lone surrogate)") from e
    return value


def checked(
    allowed: str,
    *,
    integral: bool = False,
    null_is_default: bool = True,
    then: Callable[[Any], Any] | None = None,
) -> WrapValidator:
    """One error per field, in the field's own words: pydantic's errors about the value
    become "must be <allowed>; got <value>". `then` checks or converts the valid value."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        if value is None and null_is_default:
            raise PydanticUseDefault
        if isinstance(value, OversizedInt):
            raise _field_error(f"must be {allowed}; got an integer of {value.digits} digits")
        given = value
        if integral and isinstance(value, float) and value.is_integer():
            value = int(value)  # 16.0 is 16
        try:
            value = handler(value)
        except (ValidationError, TypeError):
            # TypeError: some pydantic-core versions look an unhashable value (a list, an
            # object) up in a Literal's table and let the lookup's error out
            raise _field_error(must_be(allowed, given)) from None
        return value if then is None else then(value)

    return WrapValidator(validate)


def ruled(name: str) -> Any:
    """A field typed and bounded by `falconet.request_rules.RULES[name]`."""
    rule = RULES[name]
    finite = {} if rule.kind is int else {"allow_inf_nan": False}
    number = Field(strict=True, **rule.bounds(), **finite)
    return Annotated[rule.kind | None, number, checked(rule.allowed, integral=rule.kind is int)]


def unsupported(*off: Any) -> Any:
    """A field this server cannot honour: only null and its "off" values are accepted."""

    def validate(value: Any) -> Any:
        if value is None or any(value == v and type(value) is type(v) for v in off):
            return value
        raise _field_error("is not supported by this server; leave it out")

    description = f"Not supported; accepted only as {', '.join(show(v) for v in off)}."
    return Annotated[Any, Field(None, description=description), BeforeValidator(validate)]


def _stop(value: str | list[str]) -> tuple[str, ...]:
    stop = stop_strings(value)
    if stop is None:
        raise _field_error(must_be(STOP_ALLOWED, value))
    return tuple(check_text(s) for s in stop)


def _logit_bias(value: Any) -> Any:
    """Checked whole against the rule, so the message quotes the value as sent."""
    if value is None:
        raise PydanticUseDefault
    if logit_bias_pairs(value) is None:
        raise _field_error(must_be(LOGIT_BIAS_ALLOWED, value))
    return value


def _vllm_top_k(value: Any, handler: Callable[[Any], Any]) -> Any:
    if value is None:  # the default, said here: pydantic takes it only from the outer validator
        raise PydanticUseDefault
    return handler(0 if value == -1 and not isinstance(value, bool) else value)


Flag = Annotated[bool | None, Field(strict=True), checked("true or false")]
Name = Annotated[str | None, Field(strict=True), checked("a string")]
Stop = Annotated[str | list[str] | None, checked(STOP_ALLOWED, then=_stop)]
StopTokenIds = Annotated[
    list[Annotated[StrictInt, Field(ge=0)]] | None, checked(STOP_TOKEN_IDS_ALLOWED, then=tuple)
]
TopK = Annotated[ruled("top_k"), WrapValidator(_vllm_top_k)]  # vLLM's -1 is off, as 0 is
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=LOGIT_BIAS_MIN, le=LOGIT_BIAS_MAX)]] | None,
    BeforeValidator(_logit_bias),
]
Choices = Annotated[
    int | None,
    Field(strict=True, ge=1, le=MAX_N),
    checked(f"an integer in [1, {MAX_N}]", integral=True),
]
