"""Falcon's tokenizer in GGUF metadata, both ways.

A GGUF file carries a byte-level BPE tokenizer the way llama.cpp's converter writes it
(`_set_vocab_gpt2` + `gguf.SpecialVocab`):

    tokenizer.ggml.model        "gpt2" (byte-level BPE)
    tokenizer.ggml.pre          the pre-tokenizer, by llama.cpp's name: "falcon", "gpt-2"
                                or "falcon3"
    tokenizer.ggml.tokens       one string per id, padded to the model's vocab_size with
                                "[PAD{id}]" tokens of type UNUSED
    tokenizer.ggml.token_type   NORMAL, CONTROL (special added tokens), USER_DEFINED, UNUSED
    tokenizer.ggml.merges       "left right", in rank order
    tokenizer.ggml.bos_token_id / eos_token_id / padding_token_id, add_bos_token / add_eos_token
    tokenizer.chat_template

Reading rebuilds a `tokenizers` BPE with the same vocabulary, merges, added tokens and
pre-tokenizer, so it encodes and decodes exactly as the tokenizer.json it came from.
Only the pre-tokenizers below can be represented: llama.cpp knows a pre-tokenizer by
name only, and these are the ones Falcon checkpoints (and `falconet train`) use.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from falconet.errors import CheckpointError


class VocabSource(Protocol):
    """What writing needs of a tokenizer (falconet.tokenizer.Tokenizer has it)."""

    backend: tokenizers.Tokenizer
    source: str
    chat_template: str | None

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


class TokenIds(Protocol):
    """What writing needs of a model config: its size and special token ids."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: Sequence[int]
    pad_token_id: int | None


# gguf.TokenType values (llama.cpp's llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TYPES = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS = "tokenizer.ggml.bos_token_id"
KEY_EOS = "tokenizer.ggml.eos_token_id"
KEY_PAD = "tokenizer.ggml.padding_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# The keys read back: key -> (value kind, required).
METADATA = {
    KEY_MODEL: ("str", True),
    KEY_PRE: ("str", False),
    KEY_TOKENS: ("str[]", True),
    KEY_TYPES: ("int[]", False),
    KEY_MERGES: ("str[]", False),
    KEY_BOS: ("int", False),
    KEY_EOS: ("int", False),
    KEY_ADD_BOS: ("bool", False),
    KEY_ADD_EOS: ("bool", False),
    KEY_CHAT_TEMPLATE: ("str", False),
}


def _falcon_pre() -> pre_tokenizers.PreTokenizer:
    """Falcon's tokenizer.json pre-tokenizer (tiiuae/falcon-7b, -40b, -180b, Falcon2):
    punctuation runs, then GPT-2's byte-level regex, then digit runs cut in threes."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation("contiguous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated", invert=False),
        ]
    )


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level regex alone (the tokenizers `falconet train` writes)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# Llama 3's split regex in the `tokenizers` (Rust regex) spelling of its tokenizer.json:
# contractions, letter runs with one leading non-letter, digits in runs of at most three,
# symbol runs with an optional leading space and trailing newlines, newline runs, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _falcon3_pre() -> pre_tokenizers.PreTokenizer:
    """Falcon3's tokenizer.json pre-tokenizer (tiiuae/Falcon3-*): Llama 3's split regex,
    then the byte-level alphabet without GPT-2's regex (docs/design.md, GGUF)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


@dataclass(frozen=True)
class PreTokenizer:
    """What a tokenizer.ggml.pre name means to llama.cpp, in `tokenizers` terms."""

    make: Callable[[], pre_tokenizers.PreTokenizer]
    # llama.cpp emits a pre-token that is itself in the vocabulary as that one token,
    # without merging (BPE's ignore_merges); it does so for its llama3-family names.
    ignore_merges: bool = False


# llama.cpp's tokenizer.ggml.pre name -> the same pre-tokenizer in `tokenizers`.
PRE_TOKENIZERS = {
    "falcon": PreTokenizer(_falcon_pre),
    "gpt-2": PreTokenizer(_gpt2_pre),
    "falcon3": PreTokenizer(_falcon3_pre, ignore_merges=True),
}


def _as_json(pre: pre_tokenizers.PreTokenizer) -> dict[str, Any]:
    probe = tokenizers.Tokenizer(models.BPE())
    probe.pre_tokenizer = pre
    return json.loads(probe.to_str())["pre_tokenizer"]


def pre_tokenizer_name(tokenizer: VocabSource) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; CheckpointError if it has none.

    Also checks the rest of the pipeline is what a GGUF byte-level BPE implies.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r} is not BPE")
    if model.get("byte_fallback"):
        problems.append("the byte_fallback BPE option has no GGUF equivalent")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("subword prefixes/suffixes have no GGUF equivalent")
    if spec.get("normalizer") is not None:
        problems.append("a normalizer has no GGUF equivalent")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append("the decoder is not ByteLevel")
    name = next(
        (
            n
            for n, pre in PRE_TOKENIZERS.items()
            if spec.get("pre_tokenizer") == _as_json(pre.make())
        ),
        None,
    )
    if name is None:
        problems.append(
            "the pre-tokenizer is not Falcon's, Falcon3's or GPT-2's byte-level one "
            "(llama.cpp knows pre-tokenizers by name only)"
        )
    elif not problems and bool(model.get("ignore_merges")) != PRE_TOKENIZERS[name].ignore_merges:
        added = {t["id"] for t in spec.get("added_tokens") or []}
        problems.extend(_ignore_merges_matters(model, added, name))
    if problems:
        raise CheckpointError(
            f"{tokenizer.source}: this tokenizer cannot be written to GGUF: " + "; ".join(problems)
        )
    return name


def _ignore_merges_matters(model: dict[str, Any], added: set[int], name: str) -> list[str]:
    """Why the tokenizer's ignore_merges flag, which differs from what llama.cpp does for
    `name`, would change its ids; [] when it cannot: the flag only decides pre-tokens that
    are vocabulary tokens, so it is moot when merging each token's text gives that token.
    Added tokens (ids in `added`) are matched before BPE and never reach it."""
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False)
    for token, i in vocab.items():
        if i in added:
            continue
        pieces = bpe.tokenize(token)
        if len(pieces) != 1 or pieces[0].id != i:
            return [
                f"token {token!r} is not what merging its text gives, so BPE's ignore_merges "
                f"flag changes ids, and llama.cpp's {name!r} pre-tokenizer sets it "
                f"{'on' if PRE_TOKENIZERS[name].ignore_merges else 'off'}"
            ]
    return []


def vocab_metadata(tokenizer: VocabSource, config: TokenIds) -> dict[str, Any]:
    """The tokenizer.* GGUF keys for `tokenizer`, its token list padded to the model's
    vocab_size (llama.cpp requires one token per embedding row)."""
    pre = pre_tokenizer_name(tokenizer)
    backend = tokenizer.backend
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.source}: {tokenizer.vocab_size} tokens but the model has only "
            f"{config.vocab_size} embedding rows"
        )
    added = {i: t.special for i, t in backend.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = backend.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(NORMAL if i not in added else CONTROL if added[i] else USER_DEFINED)
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(
            f"{tokenizer.source}: a token clashes with the '[PAD<id>]' names that pad the "
            "vocabulary to the model's size"
        )
    merges = []
    for m in json.loads(backend.to_str())["model"]["merges"]:
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or not all(pair):
            # Byte-level BPE never has a space inside a merge part (spaces are "Ġ").
            raise CheckpointError(f"{tokenizer.source}: merge {m!r} cannot be written as 'a b'")
        merges.append(f"{pair[0]} {pair[1]}")
    empty = tokenizer.encode("")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    eos = tokenizer.eos_token_id
    if eos is None and config.eos_token_ids:
        eos = config.eos_token_ids[0]
    meta: dict[str, Any] = {
        KEY_MODEL: "gpt2",
        KEY_PRE: pre,
        KEY_TOKENS: tokens,
        KEY_TYPES: types,
        KEY_MERGES: merges,
        # Explicit, since llama.cpp's default for a BPE vocabulary is to add a BOS.
        KEY_ADD_BOS: bool(empty) and empty[0] == bos,
        KEY_ADD_EOS: bool(empty) and empty[-1] == eos,
    }
    for key, value in ((KEY_BOS, bos), (KEY_EOS, eos), (KEY_PAD, config.pad_token_id)):
        if value is not None:
            meta[key] = value
    if tokenizer.chat_template:
        meta[KEY_CHAT_TEMPLATE] = tokenizer.chat_template
    return meta


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """Rebuild the tokenizer from GGUF metadata (`meta`: key -> value, already checked
    for type): the keyword arguments of falconet.tokenizer.Tokenizer, its `backend` a
    `tokenizers.Tokenizer`. Raises CheckpointError naming `source` when it cannot."""

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{source}: {msg}")

    if meta.get(KEY_MODEL) != "gpt2":
        raise fail(
            f"{KEY_MODEL} is {meta.get(KEY_MODEL)!r}; falconet reads byte-level BPE ('gpt2') "
            "vocabularies, which is what Falcon uses"
        )
    # Files converted before llama.cpp recorded a pre-tokenizer are all Falcon's.
    pre = meta.get(KEY_PRE, "falcon")
    if pre not in PRE_TOKENIZERS:
        raise fail(
            f"{KEY_PRE} is {pre!r}; falconet rebuilds the {', '.join(map(repr, PRE_TOKENIZERS))} "
            "pre-tokenizers"
        )
    tokens: list[str] = meta[KEY_TOKENS]
    types: list[int] = meta.get(KEY_TYPES) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise fail(f"{KEY_TYPES} has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != UNUSED}
    if len(vocab) != sum(ty != UNUSED for ty in types):
        raise fail(f"{KEY_TOKENS} holds the same token twice")
    merges = []
    for m in meta.get(KEY_MERGES, []):
        pair = m.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
            raise fail(f"merge {m!r} is not two tokens of the vocabulary")
        merges.append((pair[0], pair[1]))
    try:
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            ignore_merges=PRE_TOKENIZERS[pre].ignore_merges,
        )
    except Exception as e:  # the Rust binding raises plain Exception
        raise fail(f"the vocabulary and merges do not make a BPE tokenizer ({e})") from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = PRE_TOKENIZERS[pre].make()
    backend.decoder = decoders.ByteLevel()
    # Added tokens are matched in the raw text before BPE, as in tokenizer.json.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == CONTROL]  # fmt: skip
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == USER_DEFINED]  # fmt: skip
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    n = len(tokens)
    ids = {k: meta.get(k) for k in (KEY_BOS, KEY_EOS)}
    for key, value in ids.items():
        if value is not None and not 0 <= value < n:
            raise fail(f"{key} {value} is not a token id (the vocabulary has {n})")
    eos, bos = ids[KEY_EOS], ids[KEY_BOS]
    return dict(
        backend=backend,
        eos_token_ids=[eos] if eos is not None else [],
        bos_token_id=bos,
        chat_template=meta.get(KEY_CHAT_TEMPLATE),
        # Only a true flag changes the pipeline; false is what the bare BPE does anyway.
        add_bos_token=True if meta.get(KEY_ADD_BOS) else None,
        add_eos_token=True if meta.get(KEY_ADD_EOS) else None,
        source=source,
    )
