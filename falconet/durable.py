"""Durable file writes: temp file -> fsync -> rename -> fsync(dir).

A reader (or a process restarted after SIGKILL) sees either the old file or the whole
new one, never a torn write. Folders are published the same way: filled under a
temporary name beside the target, then renamed into place. SQLite files that several
threads and processes write are opened one way (`connect_wal`).
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 entries; published files get the usual umask modes.
_UMASK = _umask()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) for a temp file beside `path`, then make it `path` durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def publish_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; on success it replaces `target`.

    On any error the temp folder is removed, so no half-written `target` is left.
    Every file written inside should already be fsynced (atomic_write does that).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    # What a process killed mid-publish left behind: its temp folder, or the previous
    # version it had moved aside.
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if old.exists():
        shutil.rmtree(old)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        fsync_dir(tmp)
        if target.exists():
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def connect_wal(path: Path, foreign_keys: bool = False) -> sqlite3.Connection:
    """An SQLite connection for a file several threads and processes write: autocommit
    (transactions are explicit), WAL so readers never block the writer, synchronous=FULL so
    a committed transaction survives a power cut, 30 s of waiting on another writer's lock.
    Raises sqlite3.DatabaseError when the file is not a database."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if foreign_keys:
            db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        db.close()
        raise
    return db
