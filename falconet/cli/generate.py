"""`falconet generate` and `falconet chat`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from falconet.cli.common import (
    Out,
    UsageError,
    add_model_flags,
    add_sampling_flags,
    add_speculative_flags,
    add_tp_flag,
    announce,
    load_model,
    sampling_params,
)
from falconet.errors import FalconetError
from falconet.generate import Completion, TokenStrings, completion_logprobs, usage
from falconet.request_rules import CHAT_MAX_TOKENS, RULES, default_max_tokens
from falconet.tokenizer import FALLBACK_CHAT_STOP, Tokenizer


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt")
    add_model_flags(gen)
    add_tp_flag(gen)
    add_sampling_flags(gen, max_tokens=64)
    add_speculative_flags(gen)
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: the choice /v1/completions returns (text, logprobs, "
        "finish_reason) and usage",
    )
    # The range comes from request_rules.RULES and SamplingParams checks it, so the CLI and the
    # server refuse the same values in the same words.
    gen.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="with --json: each token's log-probability and the N likeliest alternatives "
        f"(N {RULES['logprobs'].allowed}; 0 = the chosen token only), from the raw model "
        "distribution",
    )

    chat = sub.add_parser("chat", help="interactive chat (/reset clears history, /exit quits)")
    add_model_flags(chat)
    add_tp_flag(chat)
    add_sampling_flags(chat, max_tokens=None,
                       help=f"reply length (default: up to {CHAT_MAX_TOKENS}, what the model's "
                       "context leaves after the conversation)")  # fmt: skip
    add_speculative_flags(chat)
    chat.add_argument("--system", default=None, help="system prompt")


def cmd_generate(args: argparse.Namespace, out: Out) -> int:
    if args.json and args.stream:
        raise UsageError("--json prints one object when generation ends; drop --stream")
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs needs --json: the log-probabilities are printed in it")
    params = sampling_params(args)  # validate flags before the (slow) load
    llm = load_model(args)
    announce(llm)
    if args.json:
        [completion] = llm.complete([args.prompt], params)
        # json's float repr round-trips, so the logprobs printed are the engine's exactly.
        out(json.dumps(completion_choice(llm.tokenizer, completion)) + "\n")
    elif args.stream:
        for piece in llm.stream(args.prompt, params=params):
            out(piece)
        out("\n")
    else:
        out(llm.complete([args.prompt], params)[0].text + "\n")
    return 0


def completion_choice(tokenizer: Tokenizer, completion: Completion) -> dict[str, Any]:
    """`completion` as /v1/completions answers a one-choice request: the choice, its
    logprobs built by the function the server uses, and the usage beside it."""
    logprobs = None
    if completion.logprobs is not None:
        logprobs, _ = completion_logprobs(TokenStrings(tokenizer), completion.logprobs)
    return {
        "index": 0,
        "text": completion.text,
        "logprobs": logprobs,
        "finish_reason": completion.finish_reason,
        "usage": usage(completion.prompt_tokens, completion.completion_tokens),
    }


def cmd_chat(args: argparse.Namespace, out: Out) -> int:
    import dataclasses

    from falconet.errors import GenerationError

    asked = args.max_tokens  # None: each reply gets what the context leaves, up to a cap
    params = sampling_params(args, fitted=asked is None)
    llm = load_model(args, answering=True)
    context = llm.config.max_position_embeddings
    if asked is not None and asked >= context:
        raise FalconetError(
            f"--max-tokens {asked} leaves no room for the conversation in the "
            f"model's {context}-token context; use a smaller value"
        )
    announce(llm)
    if llm.tokenizer.chat_template is None:
        params = dataclasses.replace(params, stop=(*params.stop, FALLBACK_CHAT_STOP))
    history: list[dict] = []
    out("falconet chat: /reset clears the history, Ctrl-C stops a reply, /exit or Ctrl-D quits\n")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out("\n")
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            out("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids, length = chat_turn(llm, args.system, history, context, asked)
        except GenerationError as e:
            history.pop()
            print(f"falconet: {e}", file=sys.stderr)
            continue
        out("falcon> ")
        reply = ""
        try:
            for piece in llm.stream(ids, params=dataclasses.replace(params, max_tokens=length)):
                reply += piece
                out(piece)
        except KeyboardInterrupt:  # stops this reply, not the session
            out(" [stopped]")
        out("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def chat_turn(
    llm, system: str | None, history: list[dict], context: int, max_tokens: int | None
) -> tuple[list[int], int]:
    """The prompt for the next reply and the reply's length. With max_tokens None, the
    history is trimmed to leave a reply min(CHAT_MAX_TOKENS, context // 2) tokens, and the
    reply gets what the prompt leaves, up to CHAT_MAX_TOKENS; a newest message longer than
    that still gets an answer while it leaves the context any room at all."""
    from falconet.errors import GenerationError

    if max_tokens is not None:
        return fit_history(llm, system, history, context - max_tokens), max_tokens
    try:
        ids = fit_history(llm, system, history, context - min(CHAT_MAX_TOKENS, context // 2))
    except GenerationError:  # only the newest message is left in history
        ids = fit_history(llm, system, history, context - 1, flag_set=False)
    return ids, default_max_tokens(CHAT_MAX_TOKENS, context, len(ids))


def fit_history(
    llm, system: str | None, history: list[dict], budget: int, flag_set: bool = True
) -> list[int]:
    """Prompt ids for the chat so far, dropping the oldest turns (never the system
    prompt or the newest message) to fit `budget` tokens."""
    from falconet.errors import GenerationError

    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = llm.chat_prompt(messages)
        if len(ids) <= budget:
            return ids
        if len(history) <= 1:
            if not flag_set:
                raise GenerationError(
                    f"that message makes a {len(ids)}-token prompt, which leaves no room for "
                    f"a reply in the model's {budget + 1}-token context: send a shorter message"
                )
            raise GenerationError(
                f"that message makes a {len(ids)}-token prompt; with --max-tokens the budget is "
                f"{budget} tokens: send a shorter message or lower --max-tokens"
            )
        del history[: 2 if len(history) > 2 else 1]  # the oldest user+assistant turn
