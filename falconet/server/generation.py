"""From a validated request body to the engine's work: prompts as token ids, the
context checks, and one `SamplingParams` per choice.

The bodies' fields are already checked against `falconet.request_rules.RULES`
(server/protocol.py); what is left needs the served model: its name, tokenizer,
vocabulary and context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from falconet.errors import FalconetError
from falconet.request_rules import (
    COMPLETION_MAX_TOKENS,
    RULES,
    default_max_tokens,
    must_be,
    seed_for_choice,
)
from falconet.sampling import SamplingParams
from falconet.server.fields import APIError, bad
from falconet.server.guided import constrain, request_grammar, tool_grammar
from falconet.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    prompt_items,
)
from falconet.tokenizer import FALLBACK_CHAT_STOP, Tokenizer


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
    generate: bool = True  # False: max_tokens 0, the prompts are only scored
    # /v1/completions with echo: the text each distinct prompt is echoed as
    echo_texts: list[str] | None = None
    prompt_logprobs: int | None = None  # vLLM's field: alternatives per prompt token
    tool_calls: bool = False  # read tool calls out of the answers (chat with tools)
    adapter: str | None = None  # the LoRA adapter the request's model id names, None: the base


def check_model(model: str | None, model_name: str, adapters: tuple[str, ...] = ()) -> str | None:
    """`model` may be left out (the base model); when given it must be the served model
    or one of the LoRA adapters served beside it. Returns the adapter it names, if any."""
    if model is None or model == model_name:
        return None
    if model in adapters:
        return model
    served = ", ".join(repr(m) for m in (model_name, *adapters))
    raise APIError(
        404,
        f"the model {model!r} does not exist; this server serves {served}",
        "model",
        "model_not_found",
    )


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad_ids = [t for t in ids if not 0 <= t < vocab_size]
    if bad_ids:
        raise bad(f"'{param}' has token id {bad_ids[0]}, outside this model's vocabulary "
                  f"[0, {vocab_size})", param)  # fmt: skip
    return list(ids)


def check_context(
    lengths: list[int], max_tokens: int | None, max_context: int, prompt_param: str
) -> None:
    for n in lengths:
        if max_tokens == 0:  # scored only: the prompt may fill the context
            if n > max_context:
                raise bad(
                    f"this model's maximum context length is {max_context} tokens and the "
                    f"prompt has {n} tokens; shorten the prompt",
                    prompt_param,
                    "context_length_exceeded",
                )
            continue
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
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    extra_stop: tuple[str, ...],
    max_context: int,
    prompt_logprobs: int | None = None,
    default_cap: int | None = None,
) -> GenerationRequest:
    """Shared tail of both endpoints: one SamplingParams per choice (max_tokens None =
    the route's default: `default_cap` or the rest of the context, whichever is less, per
    prompt; 0 = score the prompt only)."""
    kw: dict[str, Any] = body.sampling_kwargs()
    kw["stop"] += tuple(s for s in extra_stop if s not in kw["stop"])
    kw["prompt_logprobs"] = prompt_logprobs
    all_prompts, params = [], []
    try:
        for ids in prompts:
            if max_tokens is None:  # check_context made sure the prompt leaves room
                budget = default_max_tokens(default_cap, max_context, len(ids))
            else:  # max_tokens 0 generates nothing (not submitted as such)
                budget = max(max_tokens, 1)
            for j in range(body.n):
                # choice j of a seeded request draws from seed + j: n samples that differ,
                # and the same n samples for the same request
                seed = None if body.seed is None else seed_for_choice(body.seed, j)
                params.append(SamplingParams(max_tokens=budget, seed=seed, logprobs=logprobs, **kw))
                all_prompts.append(ids)
    except FalconetError as e:  # a second guard; the body's fields obey the same rules
        raise bad(str(e)) from e
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return GenerationRequest(all_prompts, params, [len(p) for p in prompts], body.n,
                             body.stream, include_usage, logprobs,
                             generate=max_tokens != 0)  # fmt: skip


def completion_prompts(prompt: Any, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """`prompt` (a string, token ids, or a list of either; shapes checked by
    CompletionRequest) as token ids, one list per prompt."""
    out = []
    for item in prompt_items(prompt):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        else:
            ids = check_token_ids(item, vocab_size, "prompt")
        if not ids:
            raise bad("'prompt' is empty (no tokens); send some text", "prompt")
        out.append(ids)
    return out


def parse_completion(
    body: CompletionRequest, tokenizer: Tokenizer, vocab_size: int, max_context: int,
    model_name: str, adapters: tuple[str, ...] = (),
) -> GenerationRequest:  # fmt: skip
    adapter = check_model(body.model, model_name, adapters)
    max_tokens = body.requested_max_tokens()
    k = body.prompt_logprobs_k()
    if max_tokens == 0 and not body.echo and k is None:
        # the rule's own words: only echo or prompt_logprobs give 0 tokens a meaning
        raise bad(f"'max_tokens' {must_be(RULES['max_tokens'].allowed, 0)}", "max_tokens")
    prompts = completion_prompts(body.prompt, tokenizer, vocab_size)
    check_context([len(p) for p in prompts], max_tokens, max_context, "prompt")
    req = _build(body, prompts, max_tokens, body.logprobs, (), max_context, k,
                 default_cap=COMPLETION_MAX_TOKENS)  # fmt: skip
    if body.echo:
        # vLLM echoes a text prompt as sent and token ids as they decode
        req.echo_texts = [
            item if isinstance(item, str) else tokenizer.decode(ids)
            for item, ids in zip(prompt_items(body.prompt), prompts, strict=True)
        ]
    # as vLLM: echo with logprobs fills the prompt_logprobs field too
    shown = body.prompt_logprobs
    req.prompt_logprobs = shown if shown is not None else (body.logprobs if body.echo else None)
    req.params = constrain(req.params, request_grammar(body, tokenizer))
    req.adapter = adapter
    return req


def chat_prompt(
    tokenizer: Tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None
) -> list[int]:
    """The same prompt `LLM.chat_prompt` builds: the chat template, then the tokens
    without special tokens added (the template writes its own)."""
    try:
        text = tokenizer.apply_chat_template(
            [m.as_dict() for m in messages], add_generation_prompt=True, tools=tools
        )
    except FalconetError as e:
        raise bad(str(e), "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


def parse_chat(
    body: ChatCompletionRequest,
    tokenizer: Tokenizer,
    max_context: int,
    model_name: str,
    adapters: tuple[str, ...] = (),
) -> GenerationRequest:
    adapter = check_model(body.model, model_name, adapters)
    max_tokens = body.requested_max_tokens()
    mode = body.tool_mode()  # with "none" the tools are not offered at all
    tools = None if mode == "none" else [t.model_dump(exclude_none=True) for t in body.tools]
    ids = chat_prompt(tokenizer, body.messages, tools)
    if not ids:
        raise bad("the messages make an empty prompt", "messages")
    check_context([len(ids)], max_tokens, max_context, "messages")
    # Without a chat template the model was tuned on "User: ...\nFalcon:" turns and
    # would go on to write the user's next one; that turn ends the reply (as in the CLI).
    extra_stop = (FALLBACK_CHAT_STOP,) if tokenizer.chat_template is None else ()
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    req = _build(body, [ids], max_tokens, logprobs, extra_stop, max_context)
    grammar = request_grammar(body, tokenizer) if mode == "none" else tool_grammar(body, tokenizer)
    req.params = constrain(req.params, grammar)
    req.tool_calls = mode != "none"
    req.adapter = adapter
    return req
