"""Tokenizer tests against a tiny byte-level BPE trained here, with HF transformers as reference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from falconet.errors import TokenizerError
from falconet.tokenizer import StreamDecoder, Tokenizer

# Falcon's special tokens, in Falcon's order: <|endoftext|> is id 11 there and here.
SPECIALS = [
    ">>TITLE<<",
    ">>ABSTRACT<<",
    ">>INTRODUCTION<<",
    ">>SUMMARY<<",
    ">>COMMENT<<",
    ">>ANSWER<<",
    ">>QUESTION<<",
    ">>DOMAIN<<",
    ">>PREFIX<<",
    ">>SUFFIX<<",
    ">>MIDDLE<<",
    "<|endoftext|>",
]
EOS = "<|endoftext|>"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Falcon models run on your own hardware.",
    "User: What is the capital of France?\nFalcon: The capital of France is Paris.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "Emoji: 😀 😀 🎉 🎉 👩‍👩‍👧 family, 🚀 launch, ❤️ love, 🇫🇷 flag.",
    "def main():\n    return 42  # code with    spaces\t\ttabs",
    "Ünïcödé àccents, naïve café, Straße, Ελληνικά, русский текст.",
]

CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{{ messages | tojson }}{{ eos_token }}"
)

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\t\tand\nnew\n\nlines\r\n",
    "     ",
    "東京は日本の首都です",
    "emoji 👩‍👩‍👧 family 🎉🚀",
    "🦀 crab not in the corpus",
    ">>TITLE<<A title>>ABSTRACT<<text<|endoftext|>",
    "mixed 中文 and English 🇫🇷 with <|endoftext|> inside",
    "e\u0301 combining, \u200b zero width, \U0001f9d1\u200d\U0001f4bb",
    "a" * 100,
]


def _train(texts: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 20, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    _train(CORPUS).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return folder


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), eos_token=EOS)


def _copy_dir(src: Path, dst: Path, config: dict | None = None) -> Path:
    dst.mkdir(exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# -- ids <-> text ---------------------------------------------------------------------


def test_special_ids_and_vocab(tok: Tokenizer, hf: PreTrainedTokenizerFast) -> None:
    assert tok.vocab_size == len(hf) == 400
    assert tok.eos_token_id == 11 == hf.eos_token_id
    assert tok.eos_token_ids == (11,)
    assert tok.bos_token_id is None
    assert tok.special_token_ids == frozenset(range(12))
    assert tok.id_to_token(0) == ">>TITLE<<"
    assert tok.token_to_id("<|endoftext|>") == 11
    assert tok.token_to_id("no such token") is None


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tok: Tokenizer, hf: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # Falcon's tokenizer adds no BOS: plain text round-trips exactly.
    assert tok.decode(ids) == text


def test_special_tokens_encode_to_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode(">>QUESTION<<hi<|endoftext|>")
    assert ids[0] == 6 and ids[-1] == 11
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_random_id_sequences_decode_like_hf(tok: Tokenizer, hf: PreTrainedTokenizerFast) -> None:
    # Arbitrary ids split multibyte characters anywhere; the U+FFFD placement must match too.
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        for skip in (False, True):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_add_bos_token_matches_hf(model_dir: Path, tmp_path: Path) -> None:
    config = {"bos_token": ">>TITLE<<", "eos_token": EOS, "add_bos_token": True}
    folder = _copy_dir(model_dir, tmp_path, config)
    tok = Tokenizer.from_dir(folder)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **config)
    assert tok.bos_token_id == 0
    for text in ["hello", "", "東京"]:
        assert tok.encode(text) == hf.encode(text)
        assert tok.encode(text)[0] == 0
        assert tok.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        )


def test_generation_config_eos_union(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_dir(model_dir, tmp_path, {"eos_token": {"content": EOS, "special": True}})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 11]}))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_id == 11
    assert tok.eos_token_ids == (11, 5)


def test_from_file_and_constructor(model_dir: Path) -> None:
    tok = Tokenizer.from_file(model_dir / "tokenizer.json", eos_token_ids=[11], bos_token_id=11)
    assert tok.eos_token_id == 11 and tok.bos_token_id == 11
    assert tok.eos_token == EOS
    backend = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok2 = Tokenizer(backend, eos_token_ids=(11, 11, 3))
    assert tok2.eos_token_ids == (11, 3)
    assert tok2.encode("Hello 東京") == tok.encode("Hello 東京")


# -- streaming ------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.add(i) for i in ids]
    return pieces, dec.flush()


def _random_text(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF), (0x3040, 0x30FF)]
    out = []
    for _ in range(rng.randrange(1, 25)):
        if rng.random() < 0.05:
            out.append(rng.choice(SPECIALS))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _stream_cases() -> list[str]:
    rng = random.Random(1234)
    return TEXTS + CORPUS + [_random_text(rng) for _ in range(150)]


@pytest.mark.parametrize("skip", [False, True])
def test_stream_pieces_add_up_to_decode(tok: Tokenizer, skip: bool) -> None:
    for text in _stream_cases():
        ids = tok.encode(text)
        pieces, tail = _stream(tok, ids, skip)
        assert all(isinstance(p, str) for p in pieces)
        # Valid input text: no piece may carry a replacement char from split bytes.
        assert not any("\ufffd" in p for p in pieces), text
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), text
        # The stream ends on a whole character, so nothing is left to flush.
        assert tail == ""


@pytest.mark.parametrize("skip", [False, True])
def test_stream_of_random_ids_adds_up(tok: Tokenizer, skip: bool) -> None:
    # Random ids are mostly invalid UTF-8: the held-back tail logic must still add up.
    rng = random.Random(7)
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        pieces, tail = _stream(tok, ids, skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_sentencepiece_style_byte_fallback() -> None:
    # GGUF llama-style vocabularies spell rare bytes as <0xXX> tokens; their ByteFallback
    # decoder turns a whole run into U+FFFDs if one byte is bad, and Strip/Metaspace drop
    # the first token's leading space: both are traps for a window-based stream decoder.
    bpe = RustTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    bpe.train_from_iterator(["hello world 東京 the quick brown fox 😀"] * 20, trainer=trainer)
    tok = Tokenizer(bpe, eos_token_ids=[2], bos_token_id=1)
    assert len(tok.byte_fallback_ids) == 256
    rng = random.Random(3)
    for _ in range(150):
        text_ids = tok.encode(_random_text(rng).replace(">>", ""))
        random_ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        for ids in (text_ids, random_ids):
            for skip in (False, True):
                pieces, tail = _stream(tok, ids, skip)
                assert "".join(pieces) + tail == tok.decode(ids, skip), ids


def test_stream_holds_back_split_emoji(tok: Tokenizer) -> None:
    ids = tok.encode("🦀")
    assert len(ids) > 1  # not in the corpus: several byte tokens
    pieces, tail = _stream(tok, ids, skip=False)
    assert pieces == [""] * (len(ids) - 1) + ["🦀"]
    assert tail == ""


def test_stream_emits_ascii_promptly(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox")
    pieces, _ = _stream(tok, ids, skip=False)
    assert pieces == [tok.decode([i]) for i in ids]


def test_stream_ending_mid_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🦀")[:-1]
    assert tok.decode(ids).endswith("\ufffd")
    for skip in (False, True):
        pieces, tail = _stream(tok, ids, skip)
        # The space shares a token with the crab's first bytes yet is already final.
        assert "".join(pieces) == "ok "
        assert tail == "\ufffd"
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_stream_invalid_bytes_in_the_middle(tok: Tokenizer) -> None:
    crab = tok.encode("🦀")
    ids = tok.encode("a") + crab[:-1] + tok.encode(" b東京") + crab[1:] + tok.encode("c")
    expected = tok.decode(ids)
    assert "\ufffd" in expected
    pieces, tail = _stream(tok, ids, skip=False)
    assert "".join(pieces) + tail == expected


def test_stream_emits_cjk_before_the_run_ends(tok: Tokenizer) -> None:
    # In this vocabulary CJK tokens straddle characters ("東" ends inside the token that
    # starts "京"), so no token boundary is clean; whole characters must still flow out.
    text = "東京は日本の首都です。北京是中国的首都。"
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids, skip=False)
    assert sum(1 for p in pieces if p) > len(ids) // 2
    assert all(p and "\ufffd" not in p for p in pieces if p)
    assert "".join(pieces) + tail == text


def test_stream_window_stays_small(tok: Tokenizer) -> None:
    # O(1) per token: with character boundaries around, the window never grows with the
    # length of the stream (a peek at the private window, the one thing worth pinning).
    dec = StreamDecoder(tok)
    ids = tok.encode(" ".join(CORPUS[:2] + CORPUS[3:]) * 5)
    out = []
    for i in ids:
        out.append(dec.add(i))
        assert len(dec._ids) <= 8
    assert "".join(out) + dec.flush() == tok.decode(ids)


# -- chat templates -------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "  Hi <b>there</b> 😀 "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "東京?"},
]


def test_chat_template_matches_hf(model_dir: Path, tmp_path: Path) -> None:
    config = {"bos_token": ">>TITLE<<", "eos_token": EOS, "chat_template": CHATML}
    folder = _copy_dir(model_dir, tmp_path, config)
    tok = Tokenizer.from_dir(folder)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **config)
    for gen in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert ours.startswith(">>TITLE<<<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert '"content": "  Hi <b>there</b> 😀 "' in ours  # tojson neither escapes nor ascii-fies


def test_chat_template_list_form_picks_default(model_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}{{ m.content }}|{% endfor %}"},
    ]
    folder = _copy_dir(model_dir, tmp_path, {"chat_template": templates})
    assert Tokenizer.from_dir(folder).apply_chat_template(MESSAGES) == (
        "You are helpful.|  Hi <b>there</b> 😀 |Hello!|東京?|"
    )


def test_fallback_falcon_instruct_format(tok: Tokenizer) -> None:
    assert tok.chat_template is None
    assert tok.apply_chat_template(MESSAGES) == (
        "You are helpful.\nUser:   Hi <b>there</b> 😀 \nFalcon: Hello!\nUser: 東京?\nFalcon:"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "User: Hi\nFalcon:"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
        == "User: Hi\n"
    )


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{{ raise_exception('no system messages') }}", "no system messages"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{% set x = messages.append(1) %}", "unsafe"),
        ("{% for m in messages %}", "Unexpected end of template"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ],
)
def test_hostile_or_broken_templates(
    model_dir: Path, tmp_path: Path, template: str, needle: str
) -> None:
    folder = _copy_dir(model_dir, tmp_path, {"chat_template": template})
    tok = Tokenizer.from_dir(folder)
    with pytest.raises(TokenizerError, match=needle) as info:
        tok.apply_chat_template(MESSAGES)
    assert "tokenizer_config.json" in str(info.value)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ({"role": "user", "content": "hi"}, "must be a list"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] has role None"),
        # "tool" is a role since issue 14 (tool calling); OpenAI's old "function" is not
        (
            [{"role": "user", "content": "a"}, {"role": "function", "content": "b"}],
            r"messages\[1\]",
        ),
        (
            [{"role": "user", "content": "a", "tool_calls": []}],
            r"tool_calls must be a list on an "
            "assistant",
        ),
        ([{"role": "user", "content": 3}], r"messages\[0\] content must be a string, got int"),
        ([{"role": "user"}], r"content must be a string, got NoneType"),
    ],
)
def test_malformed_messages(tok: Tokenizer, messages: object, needle: str) -> None:
    with pytest.raises(TokenizerError, match=needle):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


# -- bad files ------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "not valid JSON"),  # truncated: first half of a real file
        (b"\x00\xff garbage", "not valid JSON"),
        (b"not json at all", "not valid JSON"),
        (b'{"version": "1.0", "model": {"type": "nope"}}', "not a tokenizers file"),
    ],
)
def test_bad_tokenizer_json(
    model_dir: Path, tmp_path: Path, content: bytes | None, needle: str
) -> None:
    real = (model_dir / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(
        real[: len(real) // 2] if content is None else content
    )
    with pytest.raises(TokenizerError, match=needle) as info:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json" in str(info.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_bad_optional_json(model_dir: Path, tmp_path: Path, name: str) -> None:
    folder = _copy_dir(model_dir, tmp_path)
    (folder / name).write_text('{"eos_token": ')
    with pytest.raises(TokenizerError, match=f"{name} is not valid JSON"):
        Tokenizer.from_dir(folder)
