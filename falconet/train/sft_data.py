"""Fine-tuning data: chat JSONL rendered with the model's chat template, labels on the
assistant's tokens only, packed into rows whose examples never see each other.

A data file holds one example per line, either a conversation in OpenAI's shape

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

or a prompt and its completion, {"prompt": "...", "completion": "..."}, which is the
conversation [user: prompt, assistant: completion]. Each conversation is rendered with
`Tokenizer.apply_chat_template` (the text `falconet chat` and the server send the model)
and tokenized whole; a token is a target when it starts inside an assistant turn, where
a turn is the text the template adds between the conversation up to the turn with a
generation prompt and the conversation including the turn. So the role headers, system
and user text are context, and the assistant's words and its end-of-turn marker are what
is learned. Without a chat template (the Falcon-instruct "User: / Falcon:" format) eos
follows the last assistant turn as a target, so the model learns to stop.

A bad line (not JSON, a missing or unknown role, an empty assistant turn, no assistant
turn, longer than the block) is skipped and reported with its line number; a file with
no usable example is a DataError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from falconet.documents import read_text
from falconet.errors import TokenizerError
from falconet.tokenizer import Tokenizer
from falconet.train.data import DataError

IGNORE = -100  # label of a token that is context, not a target (PyTorch's ignore_index)
INPUTS, LABELS, SEGMENTS = 0, 1, 2  # the three planes of a packed row


@dataclass
class Example:
    line: int
    ids: list[int]  # the rendered conversation's tokens
    targets: list[bool]  # per token: learned (assistant) or context


@dataclass
class SFTData:
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "file:line: why", one per skipped line
    total: int = 0  # non-blank lines read


def _conversation(record: Any) -> list[dict[str, Any]]:
    """The record's messages, checked; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('"prompt" and "completion" must both be strings')
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
    else:
        raise ValueError('expected {"messages": [...]} or {"prompt": ..., "completion": ...}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is not an object")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no role")
        content = m.get("content")
        empty = not isinstance(content, str) or not content.strip()
        if m["role"] == "assistant" and not m.get("tool_calls") and empty:
            raise ValueError(f"messages[{i}] is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn to learn from")
    return messages


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                f"the chat template does not render messages[{i}] after the ones before it "
                "(a conversation's prefix renders differently), so its turn cannot be located"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_example(tokenizer: Tokenizer, messages: list[dict[str, Any]], line: int = 0) -> Example:
    """Tokens and target flags of one conversation (see the module docstring)."""
    text, spans = assistant_spans(tokenizer, messages)
    # as HF's apply_chat_template(tokenize=True): the template writes any bos itself
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    targets = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    if tokenizer.chat_template is None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        targets.append(messages[-1]["role"] == "assistant")
    return Example(line, ids, targets)


def read_sft_file(path: Path, tokenizer: Tokenizer, block_size: int) -> SFTData:
    """The usable examples of one JSONL file; every skipped line is listed with its number
    and reason. An example longer than block_size + 1 tokens is skipped, never cut."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = read_text(path, max_bytes=None).split("\n")  # not splitlines(): U+2028 is text
    data = SFTData([])
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        data.total += 1
        try:
            messages = _conversation(json.loads(line))
            example = encode_example(tokenizer, messages, n)
        except json.JSONDecodeError as e:
            data.skipped.append(f"{path}:{n}: not a JSON line ({e.msg})")
            continue
        except (ValueError, TokenizerError) as e:
            data.skipped.append(f"{path}:{n}: {e}")
            continue
        if not any(example.targets[1:]):
            data.skipped.append(f"{path}:{n}: the assistant turns render to no token")
        elif len(example.ids) - 1 > block_size:
            data.skipped.append(
                f"{path}:{n}: {len(example.ids)} tokens, longer than --block-size {block_size} + 1"
            )
        else:
            data.examples.append(example)
    return data


def read_sft(paths: list[Path], tokenizer: Tokenizer, block_size: int) -> SFTData:
    out = SFTData([])
    for p in paths:
        one = read_sft_file(Path(p), tokenizer, block_size)
        out.examples += one.examples
        out.skipped += one.skipped
        out.total += one.total
    if not out.examples:
        first = f" (first: {out.skipped[0]})" if out.skipped else ""
        raise DataError(
            f"no usable example in {', '.join(map(str, paths))}: {out.total} lines, "
            f"{len(out.skipped)} skipped{first}"
        )
    return out


def split_held_out(examples: list[Example], fraction: float) -> tuple[list, list]:
    """Every k-th example held out (spread over the file, as train/data.py's blocks)."""
    n = len(examples)
    n_val = max(1, round(n * fraction)) if fraction > 0 else 0
    if n_val >= n:
        raise DataError(f"--eval-fraction {fraction} leaves no training example out of {n}")
    held = set(np.linspace(0, n - 1, n_val).round().astype(int).tolist()) if n_val else set()
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def pack(
    examples: list[Example], block_size: int, packing: bool, pad_id: int, every_token: bool = False
) -> np.ndarray:
    """Rows (n_rows, 3, width) int32 of [inputs, labels, segments].

    Each example contributes its tokens but the last as inputs and the next tokens as
    labels (IGNORE where the next token is context, unless `every_token`: then the prompt
    is learned too, as in pretraining), under its own segment number.
    Packing fills a row with examples in file order while they fit (next fit, so the
    rows are a pure function of the data); without packing each row holds one example
    (recurrent models, whose state would run on from one example into the next).
    Padding has segment 0 and IGNORE labels. width = block_size, or the longest example
    when every row holds one.
    """
    pairs = [
        (
            np.asarray(e.ids[:-1], dtype=np.int32),
            np.where(np.asarray(e.targets[1:]) | every_token, e.ids[1:], IGNORE).astype(np.int32),
        )
        for e in examples
    ]
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = block_size
    for pair in pairs:
        if packing and rows and used + len(pair[0]) <= block_size:
            rows[-1].append(pair)
            used += len(pair[0])
        else:
            rows.append([pair])
            used = len(pair[0])
    width = block_size if packing else max(len(p[0]) for p in pairs)
    out = np.zeros((len(rows), 3, width), dtype=np.int32)
    out[:, INPUTS] = pad_id
    out[:, LABELS] = IGNORE
    for r, row in enumerate(rows):
        at = 0
        for seg, (inputs, labels) in enumerate(row, 1):
            out[r, INPUTS, at : at + len(inputs)] = inputs
            out[r, LABELS, at : at + len(inputs)] = labels
            out[r, SEGMENTS, at : at + len(inputs)] = seg
            at += len(inputs)
    return out
