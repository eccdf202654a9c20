"""The server's wire protocol: the request bodies as pydantic models, their fields built
from fields.py's validators (where the OpenAI-shaped errors and body parsing live too).

FastAPI validates every JSON body against its model, so /openapi.json describes the API
as it really is. The sampling fields take their types and bounds from the one table in
`falconet.request_rules.RULES`; each field turns whatever pydantic finds wrong with its value
into one message that says what the field takes ("'top_p' must be a number in (0, 1]
(1 = off); got 1.5"), and the app's RequestValidationError handler answers it as a 400
with the field in `param`, as the OpenAI API does. Bodies are read and parsed before
FastAPI sees them (`JSONBodyRoute`), so an oversized, non-UTF-8 or malformed body gets
its own message rather than pydantic's.

JSON has one number type: an integer field takes 16.0 as 16, as Python clients send it;
`null` means the field's default; `bool` is never a number; an integer of more digits
than Python converts (4300) is read as an `OversizedInt`, which every field refuses by
name. Fields the engine cannot honour (`best_of`, `functions`, ...) are declared so that
a value other than their "off" value is refused rather than silently ignored; fields
that do not change the output (`user`, `metadata`, ...) are ignored, as unknown fields
are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    StrictInt,
    WrapValidator,
    field_validator,
    model_validator,
)

from falconet.request_rules import (
    COMPLETION_MAX_TOKENS,
    must_be,
    show,
)
from falconet.server.fields import (
    Choices,
    Flag,
    LogitBias,
    Name,
    Stop,
    StopTokenIds,
    TopK,
    check_text,
    checked,
    field_error,
    ruled,
    unsupported,
)


class _Object(BaseModel):
    """A nested JSON object: anything else is refused in the field's own words."""

    shape: ClassVar[str] = "an object"

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise field_error(must_be(cls.shape, data))
        return data


# --- structured output ---------------------------------------------------------------
# What a request may ask its output to follow (compiled by falconet/constraints.py). The
# sizes bound the work of compiling a grammar in the request's worker thread; llguidance's
# own limits (grammar size, lexer fuel) bound what a short but hostile grammar costs.

MAX_GRAMMAR_CHARS = 65536  # a schema (as compact JSON), a regex or a grammar
MAX_CHOICES = 256  # strings in guided_choice
SCHEMA_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for json_schema.name
_GRAMMAR_TEXT = f"a non-empty string of at most {MAX_GRAMMAR_CHARS} characters"
_SCHEMA = f"a JSON schema (an object) of at most {MAX_GRAMMAR_CHARS} characters as JSON"
_CHOICES = f"an array of 1 to {MAX_CHOICES} strings"
# the fields that constrain the output, in the order they are declared below
GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar")  # fmt: skip


def _schema(value: Any) -> dict[str, Any] | None:
    """A JSON schema: an object, or (vLLM's guided_json) a string holding one."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise field_error(must_be(_SCHEMA, value)) from None
    if not isinstance(value, dict):
        raise field_error(must_be(_SCHEMA, value))
    if len(json.dumps(value, separators=(",", ":"))) > MAX_GRAMMAR_CHARS:
        raise field_error(f"is longer than {MAX_GRAMMAR_CHARS} characters as JSON; send a "
                           "smaller schema")  # fmt: skip
    return value


def _grammar_text(value: str) -> str:
    if not value or len(value) > MAX_GRAMMAR_CHARS:
        raise field_error(must_be(_GRAMMAR_TEXT, value))
    return check_text(value)


def _choices(value: list[str]) -> list[str]:
    if not 0 < len(value) <= MAX_CHOICES:
        raise field_error(must_be(_CHOICES, value))
    if sum(len(c) for c in value) > MAX_GRAMMAR_CHARS:
        raise field_error(f"holds more than {MAX_GRAMMAR_CHARS} characters; send fewer")
    return [check_text(c) for c in value]


Schema = Annotated[Any, BeforeValidator(_schema)]
GrammarText = Annotated[str | None, Field(strict=True), checked(_GRAMMAR_TEXT, then=_grammar_text)]
ChoiceList = Annotated[list[str] | None, Field(strict=True), checked(_CHOICES, then=_choices)]


class JSONSchemaFormat(_Object):
    """response_format's json_schema: OpenAI's {name, description, schema, strict}."""

    shape = 'an object such as {"name": "answer", "schema": {"type": "object"}}'

    name: Annotated[
        str,
        Field(strict=True, pattern=SCHEMA_NAME),
        checked("1 to 64 letters, digits, '_' or '-'", null_is_default=False),
    ]
    description: Name = None
    # `schema` is a BaseModel method's name, hence the alias; absent = any JSON value
    json_schema: Schema = Field(None, alias="schema")
    strict: Flag = None  # the schema is always enforced


class ResponseFormat(_Object):
    shape = '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}'

    type: Annotated[
        Literal["text", "json_object", "json_schema"],
        checked("one of text, json_object, json_schema", null_is_default=False),
    ]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error(
                "needs 'json_schema' when (and only when) 'type' is \"json_schema\"; got "
                f"type {show(self.type)}"
            )
        return self


def _one_guide(value: Any, info: Any) -> Any:
    """A constraint field is set at most once per request, and never with ignore_eos
    (the grammar ends the output with the end-of-sequence token)."""
    if value is None or (isinstance(value, ResponseFormat) and value.type == "text"):
        return value
    earlier = [f for f in GUIDED_FIELDS if f != info.field_name and info.data.get(f) is not None]
    earlier = [f for f in earlier if not (f == "response_format"
                                          and info.data[f].type == "text")]  # fmt: skip
    if earlier:
        raise field_error(f"cannot be combined with '{earlier[0]}'; send one constraint")
    if info.data.get("ignore_eos"):
        raise field_error("cannot be combined with 'ignore_eos': the output ends with the "
                           "end-of-sequence token once the grammar is complete")  # fmt: skip
    return value


# --- request bodies ------------------------------------------------------------------


class SamplingFields(BaseModel):
    """The sampling fields every generating route takes (OpenAI's defaults)."""

    temperature: ruled("temperature") = Field(1.0, description="0 = greedy")
    top_p: ruled("top_p") = Field(1.0, description="nucleus sampling; 1 = off")
    top_k: TopK = Field(0, description="0 = off (-1 too, as in vLLM)")
    min_p: ruled("min_p") = Field(0.0, description="0 = off")
    repetition_penalty: ruled("repetition_penalty") = Field(
        1.0, description="HF/CTRL style, over prompt and output; 1 = off"
    )
    presence_penalty: ruled("presence_penalty") = Field(0.0, description="OpenAI's; 0 = off")
    frequency_penalty: ruled("frequency_penalty") = Field(0.0, description="OpenAI's; 0 = off")
    seed: ruled("seed") = Field(None, description="choice j of a seeded request uses seed + j")
    stop: Stop = Field((), description="strings that end generation (not in the output)")
    stop_token_ids: StopTokenIds = Field((), description="token ids that end generation")
    ignore_eos: Flag = Field(False, description="generate past the end-of-sequence token")
    logit_bias: LogitBias = Field(
        default_factory=dict,
        description="token id (a string) -> bias in [-100, 100], added to the logits",
    )

    def sampling_kwargs(self) -> dict[str, Any]:
        """SamplingParams arguments, but for max_tokens, seed and logprobs."""
        return {name: getattr(self, name) for name in SamplingFields.model_fields if name != "seed"}


class StreamOptions(_Object):
    shape = 'an object such as {"include_usage": true}'

    include_usage: Flag = Field(False, description="end the stream with a usage chunk")


class _OpenAIRequest(SamplingFields):
    """What /v1/completions and /v1/chat/completions share."""

    model: Name = Field(None, description="the served model's id; may be left out")
    max_completion_tokens: ruled("max_tokens") = Field(
        None, description="the newer name of max_tokens; wins when both are set"
    )
    n: Choices = Field(1, description="choices per prompt")
    stream: Flag = Field(False, description="send server-sent events as tokens arrive")
    stream_options: StreamOptions | None = None
    # Structured output (OpenAI's response_format; vLLM's guided_* extras).
    response_format: ResponseFormat | None = Field(
        None,
        description='{"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name", "schema"}}: the output parses as JSON and follows the schema',
    )
    guided_json: Schema = Field(None, description="vLLM's: a JSON schema the output follows")
    guided_regex: GrammarText = Field(None, description="vLLM's: a regex the output matches")
    guided_choice: ChoiceList = Field(None, description="vLLM's: the output is one of these")
    guided_grammar: GrammarText = Field(
        None, description="vLLM's: a Lark or GBNF grammar the output follows"
    )
    # Fields that would change the output in ways this server does not implement.
    best_of: unsupported(1)
    min_tokens: unsupported(0)
    prompt_logprobs: unsupported()
    use_beam_search: unsupported(False)

    @field_validator(*GUIDED_FIELDS)
    @classmethod
    def _one_constraint(cls, value: Any, info: Any) -> Any:
        return _one_guide(value, info)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: Any) -> Any:
        if value is not None and not info.data.get("stream"):
            raise field_error("is only allowed when 'stream' is true")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def guide(self) -> tuple[str, Any, str] | None:
        """The constraint asked for, as (grammar kind, spec, field), or None."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return "json_object", None, "response_format"
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.json_schema  # type: ignore[union-attr]
            return "json_schema", {} if schema is None else schema, "response_format"
        for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"),
                           ("choice", "guided_choice"), ("grammar", "guided_grammar")):  # fmt: skip
            if getattr(self, name) is not None:
                return kind, getattr(self, name), name
        return None


_PROMPT_ALLOWED = "a non-empty string, an array of token ids, or an array of those"


def _prompt_shape(value: Any) -> Any:
    if isinstance(value, str):
        return check_text(value)
    if not value:
        raise field_error(must_be(_PROMPT_ALLOWED, value))
    # Any number of prompts: the engine queues what it cannot run at once, and the
    # server refuses only what its batch and queue together could never hold.
    for item in prompt_items(value):
        if isinstance(item, str):
            check_text(item)
    return value


def prompt_items(prompt: str | list) -> list:
    """A checked `prompt` as a list with one item (text or token ids) per prompt."""
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt


def _max_tokens_zero(value: Any, handler: Callable[[Any], Any]) -> Any:
    # 0 passes here and is checked with the fields it needs (echo, prompt_logprobs) by
    # server/generation.py; the schema keeps the rule's bound for generating requests
    if value == 0 and not isinstance(value, bool):
        return 0
    if value is None:  # OpenAI's null: the default
        return None
    return handler(value)


Prompt = Annotated[
    str | list[StrictInt] | list[str | list[StrictInt]],
    checked(_PROMPT_ALLOWED, null_is_default=False, then=_prompt_shape),
]


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions."""

    prompt: Prompt = Field(
        description="the text to continue, its token ids, or a list of either (a batch)"
    )
    # Absent (or null) is OpenAI's 16, or what the context leaves after the prompt if that
    # is less (server/generation.py); the schema shows the 16.
    max_tokens: Annotated[ruled("max_tokens"), WrapValidator(_max_tokens_zero)] = Field(
        None,
        description=f"tokens to generate (default: {COMPLETION_MAX_TOKENS}, or what the "
        "context leaves after the prompt); 0 with echo or prompt_logprobs scores the prompt only",
        json_schema_extra={"default": COMPLETION_MAX_TOKENS},
    )
    logprobs: ruled("logprobs") = Field(
        None,
        description="log-probabilities of the chosen token and this many alternatives "
        "(of the prompt's tokens too, with echo)",
    )
    echo: Flag = Field(False, description="return the prompt before the completion")
    prompt_logprobs: ruled("logprobs") = Field(
        None,
        description="vLLM's: each prompt token's log-probability, rank and this many "
        "alternatives (not with stream)",
    )
    suffix: unsupported("")

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: Any) -> int | None:
        if value is not None and info.data.get("stream"):
            raise field_error("is not available with 'stream': true (vLLM's rule)")
        return value

    def prompt_logprobs_k(self) -> int | None:
        """Alternatives per prompt token the engine must find: vLLM's prompt_logprobs,
        or `logprobs` when the prompt is echoed (its tokens get logprobs too)."""
        ks = [self.prompt_logprobs, self.logprobs if self.echo else None]
        return max((k for k in ks if k is not None), default=None)


# OpenAI's newer `developer` role is a system message.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
              "tool": "tool"}  # fmt: skip
_TEXT_PART = '{"type": "text", "text": ...}'
MAX_TOOLS = 128  # OpenAI's limit on tools per request (and here on calls per message)
_FUNCTION_NAME = "1 to 64 letters, digits, '_' or '-'"


class TextPart(_Object):
    shape = _TEXT_PART

    type: Literal["text"]
    text: str


def _joined(content: str | list[TextPart]) -> str:
    if isinstance(content, list):  # vLLM joins text parts with newlines
        content = "\n".join(part.text for part in content)
    return check_text(content)


Role = Annotated[
    Literal["system", "developer", "user", "assistant", "tool"],
    checked("one of system, user, assistant, tool (or developer)", null_is_default=False),
]
_CONTENT = f"a string or an array of {_TEXT_PART} parts"
Content = Annotated[str | list[TextPart], checked(_CONTENT, null_is_default=False, then=_joined)]
FunctionName = Annotated[
    str, Field(strict=True, pattern=SCHEMA_NAME), checked(_FUNCTION_NAME, null_is_default=False)
]
Function = Annotated[Literal["function"], checked('"function"', null_is_default=False)]
Text = Annotated[
    str, Field(strict=True), checked("a string", null_is_default=False, then=check_text)
]


def _at_most_tools(value: Any) -> Any:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise field_error(must_be(f"an array of at most {MAX_TOOLS} tools", value))
    return value


class FunctionCall(_Object):
    shape = '{"name": ..., "arguments": "<JSON text>"}'

    name: FunctionName
    arguments: Text


class AssistantToolCall(_Object):
    """A call an earlier assistant message made (OpenAI's message.tool_calls[])."""

    shape = '{"id": ..., "type": "function", "function": {"name", "arguments"}}'

    id: Text
    type: Function
    function: FunctionCall

    def as_dict(self) -> dict[str, Any]:
        """As chat templates take it: arguments as an object where they are JSON text
        of one (templates write `arguments | tojson`), as vLLM passes them."""
        try:
            args: Any = json.loads(self.function.arguments)
        except (json.JSONDecodeError, RecursionError):
            args = self.function.arguments
        if not isinstance(args, dict):
            args = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": args}}  # fmt: skip


class ChatMessage(_Object):
    """One message of a conversation."""

    shape = "an object with role and content"

    role: Role
    tool_calls: Annotated[
        list[AssistantToolCall] | None, BeforeValidator(lambda v: v if v is None else
                                                        _at_most_tools(v))
    ] = Field(None, description="an assistant message's calls")  # fmt: skip
    tool_call_id: Annotated[
        str | None, Field(strict=True), checked("a string", null_is_default=False)
    ] = Field(None, validate_default=True, description="a tool message: the call it answers")
    content: Content | None = Field(
        None, validate_default=True,
        description="text; an array of text parts is joined with newlines",
    )  # fmt: skip

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, value: str | None, info: Any) -> str | None:
        if (value is None) == (info.data.get("role") == "tool"):
            raise field_error("is required on a tool message, and only there")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | None, info: Any) -> str | None:
        if value is None and not info.data.get("tool_calls"):
            raise field_error(must_be(_CONTENT + " (null only beside tool_calls)", value))
        return value

    @field_validator("tool_calls")
    @classmethod
    def _only_assistants_call(cls, value: list | None, info: Any) -> list | None:
        if value is not None and info.data.get("role") != "assistant":
            raise field_error("is only allowed on an assistant message")
        return value

    def as_dict(self) -> dict[str, Any]:
        """The message as the tokenizer's chat template takes it."""
        message: dict[str, Any] = {"role": CHAT_ROLES[self.role], "content": self.content}
        if self.tool_calls is not None:
            message["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _messages(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise field_error(must_be("a non-empty array of {role, content} objects", value))
    return value


Messages = Annotated[list[ChatMessage], BeforeValidator(_messages)]


class FunctionDef(_Object):
    shape = 'an object such as {"name": "get_weather", "parameters": {"type": "object"}}'

    name: FunctionName
    description: Name = None
    parameters: Schema = None  # a JSON schema; absent = any object
    strict: Flag = None  # the schema is always enforced where the call is constrained


class Tool(_Object):
    shape = '{"type": "function", "function": {"name": ..., "parameters": ...}}'

    type: Function
    function: FunctionDef


class FunctionRef(_Object):
    shape = '{"name": ...}'

    name: FunctionName


class NamedToolChoice(_Object):
    shape = '{"type": "function", "function": {"name": ...}}'

    type: Function
    function: FunctionRef


_TOOL_CHOICE = 'none, auto, required or {"type": "function", "function": {"name": ...}}'


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, dict) or value in ("none", "auto", "required"):
        return value
    raise field_error(must_be(_TOOL_CHOICE, value))


def _unique_names(tools: list[Tool] | None) -> list[Tool] | None:
    names = [t.function.name for t in tools or ()]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise field_error(f"names the function {show(twice)} twice; names must be unique")
    return tools


Tools = Annotated[
    list[Tool] | None,
    BeforeValidator(lambda v: v if v is None else _at_most_tools(v)),
    AfterValidator(_unique_names),
]
ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice | None, BeforeValidator(_tool_choice)
]


class ChatCompletionRequest(_OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: Messages = Field(description="the conversation so far")
    max_tokens: ruled("max_tokens") = Field(
        None, description="tokens to generate (default: the rest of the context)"
    )
    logprobs: Flag = Field(False, description="return log-probabilities of the chosen tokens")
    top_logprobs: ruled("logprobs") = Field(None, description="alternatives per token")
    echo: unsupported(False)  # vLLM's chat echo (of the last message) is not served
    tools: Tools = Field(None, description="functions the model may call")
    tool_choice: ToolChoice = Field(
        None, description="none, auto (the default with tools), required, or one named function"
    )
    parallel_tool_calls: Flag = Field(True, description="allow several calls in one answer")
    functions: unsupported([])
    function_call: unsupported("none", "auto")
    audio: unsupported()
    modalities: unsupported(["text"])
    prediction: unsupported()
    web_search_options: unsupported()

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: Any) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise field_error("needs 'logprobs': true")
        return value

    @field_validator("tools")
    @classmethod
    def _tools_alone(cls, value: list[Tool] | None, info: Any) -> list[Tool] | None:
        """Tool calls have their own grammar: no other constraint beside them."""
        guided = [f for f in GUIDED_FIELDS if info.data.get(f) is not None]
        guided = [f for f in guided if not (f == "response_format"
                                            and info.data[f].type == "text")]  # fmt: skip
        if value and guided:
            raise field_error(f"cannot be combined with '{guided[0]}'; send one of them")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: Any, info: Any) -> Any:
        names = [t.function.name for t in info.data.get("tools") or ()]
        if (value == "required" or isinstance(value, NamedToolChoice)) and not names:
            raise field_error("needs 'tools' to choose from")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise field_error(f"names the function {show(value.function.name)}, which is "
                               "not among 'tools'")  # fmt: skip
        return value

    def tool_mode(self) -> str:
        """none, auto, required or named: what the answer may or must be."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class TokenizeRequest(BaseModel):
    """POST /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: Name = None
    prompt: Annotated[str | None, Field(strict=True), checked("a string", then=check_text)] = None
    messages: Messages | None = None
    add_special_tokens: Flag = Field(
        True, description="add the tokenizer's BOS/EOS as a completion prompt gets them"
    )


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model: Name = None
    tokens: Annotated[
        list[StrictInt],
        checked("an array of token ids (integers)", null_is_default=False),
    ]
