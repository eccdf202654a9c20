"""Tokenizer: text <-> ids, chat templates and streaming detokenization.

The tokenization itself is the Rust `tokenizers` library, the one behind Hugging Face
fast tokenizers, so ids match `transformers.PreTrainedTokenizerFast` exactly for the
same `tokenizer.json`. This file adds what a Falcon folder spreads over several small
JSON files (special tokens, eos ids, the chat template) and two things generation needs:

- `Tokenizer.apply_chat_template` renders the model's jinja chat template the way HF
  does (sandboxed), or falls back to the "User: ...\\nFalcon:" format that
  falcon-7b/40b-instruct were tuned on when the folder has no template;
- `StreamDecoder` turns a stream of ids into text pieces that are always whole
  characters and add up exactly to `decode(all_ids)`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

from falconet.errors import TokenizerError

__all__ = ["StreamDecoder", "Tokenizer"]

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Tool calls are written in these tags (Falcon3-Instruct's format; falconet/tools.py).
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Without a chat template, chats use the Falcon-instruct format ("User: ...\nFalcon:", see
# `Tokenizer.apply_chat_template`); the model would go on to write the user's next turn,
# so that turn ends a reply (the CLI's chat and the server's /v1/chat/completions).
FALLBACK_CHAT_STOP = "\nUser:"

# Exceptions a broken or hostile chat template can raise while rendering. Templates are
# untrusted code from a model repo, so all of these become a TokenizerError.
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError)


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    """Parse one JSON object file of the folder; None when it is optional and absent."""
    if not path.is_file():
        if required:
            raise TokenizerError(
                f"{path.name} not found in {path.parent}; copy it from the model's Hugging Face "
                "repository into that folder"
            )
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"{path} cannot be read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(
            f"{path} is not valid JSON ({e}); the file may be truncated or corrupt, "
            "download it again"
        ) from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """bos_token/eos_token are a string or, in newer configs, an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    """generation_config's eos_token_id is an int or a list of ints."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value: Any, source: str) -> str | None:
    """A template is a string, or a list of {name, template} dicts where "default" wins (HF)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(
            f"{source} has several chat templates {sorted(map(str, named))} but none named "
            "'default'; name the one to use 'default'"
        )
    raise TokenizerError(f"{source} has a chat_template that is neither a string nor a list")


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    # The Rust binding raises plain Exception for every parse error, so nothing narrower works.
    except Exception as e:
        _read_json(path, required=True)  # a missing file or bad JSON gets its own message
        raise TokenizerError(
            f"{path} is JSON but not a tokenizers file ({e}); it must be the tokenizer.json "
            "saved by Hugging Face tokenizers"
        ) from e


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment HF uses, so output matches byte for byte.

    The sandbox blocks attribute access to Python internals (`__class__`, ...) and the
    immutable variant blocks mutating lists and dicts passed in.
    """

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson HTML-escapes "<" and ">", which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if m.get("role") not in CHAT_ROLES:
            raise TokenizerError(
                f"messages[{i}] has role {m.get('role')!r}; it must be one of {', '.join(CHAT_ROLES)}"
            )
        # Shallow copies: the template sees plain dicts, never the caller's objects.
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise TokenizerError(f"messages[{i}] tool_calls must be a list on an assistant message")
        if calls and m.get("content") is None:  # OpenAI's null content beside tool calls
            m["content"] = ""
        if not isinstance(m.get("content"), str):
            raise TokenizerError(
                f"messages[{i}] content must be a string, got {type(m.get('content')).__name__}"
            )
        chat.append(m)
    return chat


def _fallback_chat(chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The Falcon-instruct format (see `Tokenizer.apply_chat_template`); tools, tool
    calls and tool results are written as Falcon3-Instruct's template writes them."""
    prefix = {"system": "", "user": "User: ", "assistant": "Falcon: ", "tool": "Tool: "}
    text = FALLBACK_TOOLS.format(tools=json.dumps(tools, ensure_ascii=False)) if tools else ""
    for m in chat:
        content = m["content"]
        if m.get("tool_calls"):
            calls = json.dumps(m["tool_calls"], ensure_ascii=False)
            content += f"{TOOL_CALL_OPEN}\n{calls}\n{TOOL_CALL_CLOSE}"
        text += f"{prefix[m['role']]}{content}\n"
    return text


# Falcon3-Instruct's words for offering tools, for models without a chat template.
FALLBACK_TOOLS = (
    "You have access to the following functions. For each function call, return a JSON "
    f"list inside {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags.\n\n<tools>{{tools}}</tools>\n\n"
    f"Function calls look like this:\n{TOOL_CALL_OPEN}\n"
    '[{{"name": "function_name", "arguments": {{"arg1": "value1"}}}}]\n'
    f"{TOOL_CALL_CLOSE}\nIf no function call is needed, answer normally.\n"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one model.

    Build it with `Tokenizer.from_dir(folder)` for a Hugging Face folder, or construct it
    from a `tokenizers.Tokenizer` directly (the GGUF loader does this from metadata). The
    constructor takes ownership of `backend`: it turns off any padding/truncation stored
    in tokenizer.json (HF does too when called without padding/truncation) and, when
    `add_bos_token`/`add_eos_token` is given, replaces the post-processor the way
    transformers does for a tokenizer_config.json that sets either flag.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        source: str = "tokenizer",
    ) -> None:
        self.backend = backend
        backend.no_padding()
        backend.no_truncation()
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.source = source
        # Strings the chat template sees; default to the tokens behind the ids.
        self.bos_token = bos_token if bos_token is not None else self._token_or_none(bos_token_id)
        self.eos_token = (
            eos_token if eos_token is not None else self._token_or_none(self.eos_token_id)
        )
        self._compiled_template: jinja2.Template | None = None
        added = backend.get_added_tokens_decoder().items()
        self._special_ids = frozenset(
            {i for i, tok in added if tok.special}
            | set(self._eos_token_ids)
            | ({bos_token_id} if bos_token_id is not None else set())
        )
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, **kwargs: Any) -> Tokenizer:
        """Load a bare tokenizer.json; `kwargs` go to the constructor (eos ids, template...)."""
        path = Path(tokenizer_json)
        kwargs.setdefault("source", str(path))
        return cls(_load_backend(path), **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder.

        tokenizer.json is required. tokenizer_config.json (chat_template, bos/eos tokens,
        add_bos_token), chat_template.jinja, special_tokens_map.json and
        generation_config.json (eos_token_id, an int or a list) are read when present.
        """
        folder = Path(path)
        backend = _load_backend(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json", required=False) or {}
        special = _read_json(folder / "special_tokens_map.json", required=False) or {}
        generation = _read_json(folder / "generation_config.json", required=False) or {}
        bos_token = _token_content(config.get("bos_token", special.get("bos_token")))
        eos_token = _token_content(config.get("eos_token", special.get("eos_token")))
        # A token the configs name but the vocabulary lacks is dropped: HF would append it
        # as a new id the model has no embedding for, which the model can never emit anyway.
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        eos_ids = [eos_id] if eos_id is not None else []
        eos_ids += _as_id_list(generation.get("eos_token_id"))
        bos_id = backend.token_to_id(bos_token) if bos_token else None
        if bos_id is None:
            bos_ids = _as_id_list(generation.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None

        # Newer transformers save the template beside the config; that file wins, as in HF.
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), jinja_file
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_file} cannot be read as UTF-8 text ({e})") from e
        else:
            source = folder / "tokenizer_config.json"
            template = _pick_chat_template(config.get("chat_template"), str(source))

        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token_id=bos_id,
            chat_template=template,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            add_eos_token=add_eos if isinstance(add_eos, bool) else None,
            source=str(source),
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # Same template transformers builds in `update_post_processor`; a flag whose token
        # is unknown is ignored there too.
        bos, eos = self._token_or_none(self._bos_token_id), self._token_or_none(self.eos_token_id)
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
        pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
        special = [(bos, self._bos_token_id)] if add_bos else []
        special += [(eos, self.eos_token_id)] if add_eos else []
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def _token_or_none(self, i: int | None) -> str | None:
        return None if i is None else self.backend.id_to_token(i)

    # -- ids <-> text ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids (as in HF)."""
        # The batch call lets go of the GIL while the Rust code works, and the "fast" one
        # skips the character offsets (never used here): half the time for a long text,
        # and the shortest stretches holding the GIL, which matters to a server that
        # tokenizes a 4 MiB prompt in a worker thread beside its event loop.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return encode([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. No clean_up_tokenization_spaces: transformers 5 skips it for BPE."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what `len(hf_tokenizer)` returns)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: tokenizer config's eos first, then generation_config's."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special, plus bos and eos."""
        return self._special_ids

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the <0xXX> byte tokens of sentencepiece-style BPE (empty for byte-level BPE)."""
        if not getattr(self.backend.model, "byte_fallback", False):
            return frozenset()
        ids = (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    # -- chat -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render a conversation into the prompt text the model was tuned on.

        `messages` is a list of {"role": "system"|"user"|"assistant", "content": str}.
        With a chat template (tokenizer_config.json or chat_template.jinja) the result is
        what `transformers` renders for the same template. Without one, the Falcon-instruct
        format that tiiuae/falcon-7b-instruct was tuned on is used::

            {system content}\\n            (each system message, as is)
            User: {user content}\\n
            Falcon: {assistant content}\\n
            Falcon:                        (only with add_generation_prompt; no newline)

        Messages are written in the order given (a system message normally comes first).
        `tools` (OpenAI's tool objects) go to the template as HF passes them; without a
        template they are offered in Falcon3-Instruct's words, ahead of the messages,
        and "tool" messages are written as "Tool: ..." lines.
        """
        chat = _check_messages(messages)
        if self.chat_template is None:
            text = _fallback_chat(chat, tools)
            return text + "Falcon:" if add_generation_prompt else text

        variables: dict[str, Any] = {
            "messages": chat,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools or None,
            "documents": None,
        }
        # HF passes only the special tokens that are set, so an unset one stays undefined.
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(self.chat_template)
            return self._compiled_template.render(**variables)
        except _TEMPLATE_ERRORS as e:
            raise TokenizerError(
                f"the chat template from {self.source} failed: {type(e).__name__}: {e}"
            ) from e


class StreamDecoder:
    """Turn token ids, one at a time, into text pieces for streaming.

    Every piece is whole characters: a trailing run of U+FFFD in the decoded text may be
    the bytes of a character split over several byte-level BPE tokens (an emoji, most
    CJK), so it is held back until a later token completes it. The pieces plus `flush()`
    add up exactly to `tokenizer.decode(all_ids)`.

    Decoding one token at a time would be wrong: decode(a + b) != decode(a) + decode(b)
    in general. Instead a small window of recent ids is decoded (the prefix/read-offset
    technique of TGI and vLLM) and diffed against the text already emitted from it.
    The window restarts each time its text ends on a whole character, so the cost per
    token is O(1); only a run of tokens that each end mid-character (no boundary to
    restart at) widens it, and only for that run.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: starts at the last piece that ended cleanly
        self._read = 0  # _ids[:_read] ends on a character boundary and is fully emitted
        self._emitted = 0  # characters of decode(_ids) emitted so far
        self._text_len = 0  # len(decode(_ids))
        self._byte_ids = tokenizer.byte_fallback_ids
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._group_start: int | None = None  # where the current run of <0xXX> tokens began

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes ("" while a character is incomplete)."""
        token_id = int(token_id)
        # The ByteFallback decoder turns a whole run of <0xXX> tokens into U+FFFDs if any
        # byte in it is invalid, so a run's text is final only once a text token ends it
        # (a skipped special token does not: the decoder never sees it).
        if token_id in self._byte_ids:
            if self._group_start is None:
                self._group_start = self._text_len
        elif token_id not in self._skipped_ids:
            self._group_start = None
        self._ids.append(token_id)
        text = self._decode(self._ids)
        self._text_len = len(text)
        # Characters before the trailing U+FFFD run are final: UTF-8 resynchronizes at
        # every lead byte, so bytes appended later cannot change how they decode.
        stable = len(text.rstrip("\ufffd"))
        if self._group_start is not None:
            stable = min(stable, self._group_start)
        piece = text[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        if stable == len(text):
            self._restart()
        return piece

    def _restart(self) -> None:
        """At a character boundary, drop the window's tokens that are no longer needed.

        The new window starts at the first token of the piece just emitted: decoders
        treat a window's first token as the start of the text (Metaspace and Strip drop
        its leading space), so it must be text already emitted. If those tokens decode
        to nothing (skipped special tokens), the window is kept as it is.
        """
        tail = self._ids[self._read :]
        tail_len = len(self._decode(tail))
        if tail_len == 0:
            self._read = len(self._ids)
            return
        self._ids, self._read = tail, len(tail)
        self._emitted = self._text_len = tail_len
        if self._group_start is not None:  # a byte run with no text yet starts here
            self._group_start = tail_len

    def flush(self) -> str:
        """Return whatever is held back at the end of the stream, invalid bytes included.

        If the stream stopped mid-character this is the replacement character that
        `decode` gives for it, so the pieces still add up to `decode(all_ids)`.
        """
        piece = self._decode(self._ids)[self._emitted :]
        self._ids, self._read, self._emitted, self._text_len = [], 0, 0, 0
        self._group_start = None
        return piece
