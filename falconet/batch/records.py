"""Batch input: JSON Lines files read from a byte offset, and each line made a record.

An input is one `.jsonl` file or a folder of them (read in name order; names starting
with "." are skipped, so a writer can fill `.part` files and rename them in). Reading
resumes where the ledger says the previous run stopped (`Cursor`: byte offset and line
number per file), so a restarted job neither re-reads nor skips a line.

A line counts once it ends with a newline. With `follow` a last line without one is a
line still being written: it is left for the next look. Without `follow` the input is
complete, and an unterminated last line is read as it is (a file saved without a final
newline; a truncated one is then a record that is not JSON, and says so).

Every line becomes a `Record` or a `Rejected` with the reason: a line over the size limit
(read past in blocks, never held whole), not UTF-8, not JSON, JSON that is not an object,
a record without its key field. Blank lines are not records.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falconet.errors import BatchError

INPUT_SUFFIX = ".jsonl"
READ_BLOCK = 1 << 16
EXCERPT_CHARS = 200  # of a rejected line, kept in its reject


@dataclass(frozen=True)
class Cursor:
    """How far one input file has been read: the byte after the last line taken, and
    that line's number (1-based; 0 before any)."""

    offset: int = 0
    lines: int = 0


@dataclass(frozen=True)
class Line:
    """One line of an input file, without its newline. `data` is None for a line over
    the size limit (only its size and hash were taken)."""

    source: str  # the file's name, relative to the input folder (or its own name)
    number: int
    data: bytes | None
    size: int
    sha256: str
    terminated: bool  # ended with a newline (False: the last line of a complete file)
    end: Cursor  # where reading goes on after this line


@dataclass(frozen=True)
class Record:
    key: str
    fields: dict[str, Any]
    where: str  # "records.jsonl:17"
    text: str  # the record as canonical JSON (what the ledger keeps while it is pending)


@dataclass(frozen=True)
class Rejected:
    key: str
    where: str
    reason: str
    excerpt: str  # the start of the line or record, for the rejects file


def canonical_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def content_key(fields: dict[str, Any]) -> str:
    """A record's key when no key field is named: the sha256 of its canonical JSON, so
    the same record with other whitespace or key order is the same record."""
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def input_files(path: Path) -> dict[str, Path]:
    """name -> file of an input: the file itself, or a folder's `*.jsonl` files."""
    if path.is_dir():
        return {
            p.name: p
            for p in sorted(path.iterdir())
            if p.suffix == INPUT_SUFFIX and not p.name.startswith(".") and p.is_file()
        }
    if path.is_file():
        return {path.name: path}
    raise BatchError(f"{path}: no such input file or folder")


def read_lines(
    path: Path,
    name: str,
    start: Cursor,
    max_bytes: int,
    follow: bool,
    limit: int,
) -> list[Line]:
    """Up to `limit` lines of `path` from `start`. Raises BatchError when the file is
    shorter than `start` (it was truncated or replaced: reading on would skip or repeat
    lines)."""
    lines: list[Line] = []
    try:
        f = path.open("rb")
    except OSError as e:
        raise BatchError(f"cannot read the input {path}: {e.strerror}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < start.offset:
            raise BatchError(
                f"{path} is {size} bytes, but {start.offset} bytes of it were already read: "
                "an input file may only grow; write new records to a new file"
            )
        f.seek(start.offset)
        offset, number = start.offset, start.lines
        while len(lines) < limit:
            head = f.readline(max_bytes + 1)
            if not head:
                break
            size, tail, digest = len(head), head, None
            if not head.endswith(b"\n") and size > max_bytes:
                # Past the limit: hash the rest of the line block by block, keep none of it.
                digest = hashlib.sha256(head)
                while not tail.endswith(b"\n") and (tail := f.readline(READ_BLOCK)):
                    digest.update(tail)
                    size += len(tail)
            terminated = tail.endswith(b"\n")
            if not terminated and follow:
                break  # a line still being written
            content = size - terminated
            data = head[:content] if digest is None else None
            number += 1
            offset += size
            sha = hashlib.sha256(data).hexdigest() if data is not None else digest.hexdigest()
            lines.append(Line(name, number, data, content, sha, terminated, Cursor(offset, number)))
    return lines


def parse(line: Line, key_field: str | None, max_bytes: int) -> Record | Rejected | None:
    """The record a line holds, or why it holds none; None for a blank line."""
    where = f"{line.source}:{line.number}"

    def reject(reason: str, excerpt: str = "") -> Rejected:
        return Rejected(line.sha256, where, reason, excerpt[:EXCERPT_CHARS])

    if line.data is None:
        return reject(
            f"the record is {line.size} bytes, over the limit of {max_bytes} (--max-record-bytes)"
        )
    try:
        text = line.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return reject(f"the line is not UTF-8 text (at byte offset {e.start})")
    if not text.strip():
        return None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        cut = "" if line.terminated else "; the file's last line has no newline: truncated?"
        return reject(f"invalid JSON: {e.msg} (column {e.colno}){cut}", text)
    except RecursionError:
        return reject("invalid JSON: nested too deeply", text)
    if not isinstance(fields, dict):
        return reject(f"the record is a JSON {_json_kind(fields)}, not an object", text)
    if key_field is None:
        return Record(content_key(fields), fields, where, canonical_json(fields))
    if key_field not in fields:
        return reject(f"the record has no field {key_field!r} (--key)", text)
    key = fields[key_field]
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        return reject(
            f"the key field {key_field!r} is a JSON {_json_kind(key)}; a key is a string "
            "or an integer",
            text,
        )
    return Record(str(key), fields, where, canonical_json(fields))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def unread_lines(files: dict[str, Path], cursors: dict[str, Cursor]) -> int:
    """Lines not yet read in `files` (a last line without a newline counts): the total
    a progress bar's ETA is measured against."""
    count = 0
    for name, path in files.items():
        start = cursors.get(name, Cursor()).offset
        last = b"\n"
        with path.open("rb") as f:
            f.seek(start)
            while block := f.read(1 << 20):
                count += block.count(b"\n")
                last = block[-1:]
        count += last != b"\n"
    return count
