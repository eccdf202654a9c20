"""Users, collections and sign-in sessions of a multi-user `falconet serve`, in one SQLite
file (`<state dir>/users.sqlite3`, WAL, synchronous=FULL).

An API key is `fnk_<key id>_<secret>`: the key id (16 hex digits, not secret) finds the
user's row, and the secret (64 hex digits, 256 random bits) is checked against
`scrypt(secret, salt)` with a per-user random salt, compared with `hmac.compare_digest`.
Only the hash is stored: a key is shown once, by `users add` or the admin route.

A session token (the UI's cookie) is 256 random bits; it is stored as its sha256 (a fast
hash is enough for a random secret of that size: there is nothing to brute-force), with its
expiry. Its CSRF token is derived from it (HMAC), so it needs no storage.

A collection is a set of documents with its own store folder, named `<name>-<random id>`:
a collection removed and created again under the same name starts empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from falconet.durable import connect_wal
from falconet.errors import AccessError

USERS_FILE = "users.sqlite3"
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # OWASP's minimum for scrypt; ~16 MiB
KEY_RE = re.compile(r"fnk_([0-9a-f]{16})_([0-9a-f]{64})")
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
COLLECTION_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_SESSION_S = 30 * 24 * 3600
_VERIFIED_CACHE = 1024  # keys whose scrypt check passed, kept per process (see _verified)


class NotFound(AccessError):
    """No such user or collection."""


class Exists(AccessError):
    """A user or collection of that name exists already."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, admin INTEGER NOT NULL, key_id TEXT NOT NULL UNIQUE,
    key_salt BLOB NOT NULL, key_hash BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, folder TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    PRIMARY KEY (user, collection));
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 BLOB PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created REAL NOT NULL, expires REAL NOT NULL);
"""


@dataclass(frozen=True)
class User:
    name: str
    admin: bool
    created: float
    collections: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"name": self.name, "admin": self.admin, "collections": list(self.collections),
                "created": self.created}  # fmt: skip


@dataclass(frozen=True)
class Collection:
    name: str
    folder: str  # the store folder's name under the RAG store's collections/
    created: float
    members: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"name": self.name, "members": list(self.members), "created": self.created}


def check_user_name(name: object) -> str:
    if not isinstance(name, str) or not USER_RE.fullmatch(name):
        raise AccessError(f"user name {_show(name)} is not valid: 1 to 64 letters, digits, "
                          "'.', '_', '@' or '-', starting with a letter or digit")  # fmt: skip
    return name


def check_collection_name(name: object) -> str:
    if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
        raise AccessError(f"collection name {_show(name)} is not valid: 1 to 63 lower-case "
                          "letters, digits, '_' or '-', starting with a letter or digit")  # fmt: skip
    return name


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode("ascii"), salt=salt, **SCRYPT)


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: derived, so a page can be given it and the server can
    check it without storing it."""
    return hmac.new(session_token.encode(), b"falconet-csrf", hashlib.sha256).hexdigest()


class AccessDB:
    """The users file. Safe to share between threads: each thread has its own connection."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not create and not self.path.is_file():
            raise AccessError(f"{self.path}: no users file; create the first user with "
                              "`falconet users add NAME --admin --state-dir DIR`")  # fmt: skip
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise AccessError(f"cannot create the state folder {self.path.parent}: "
                                  f"{e.strerror or e}") from e  # fmt: skip
        self._local = threading.local()
        self._lock = threading.Lock()
        # hmac(process secret, presented key) -> the stored hash it was checked against
        self._verified: OrderedDict[bytes, bytes] = OrderedDict()
        self._pepper = secrets.token_bytes(32)
        self._db().executescript(_SCHEMA)  # idempotent; executescript commits by itself

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = connect_wal(self.path, foreign_keys=True)
            except sqlite3.DatabaseError as e:
                raise AccessError(f"{self.path}: not a falconet users file ({e})") from e
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, for tables kept beside the users (conversations.py)."""
        return self._db()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on an error)."""
        return self._write()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- users ----------------------------------------------------------------------

    def user_count(self) -> int:
        return self._db().execute("SELECT count(*) FROM users").fetchone()[0]

    def add_user(self, name: str, admin: bool = False) -> str:
        """Creates the user; returns its API key (shown once, stored only as a hash)."""
        check_user_name(name)
        key_id, secret, salt = secrets.token_hex(8), secrets.token_hex(32), secrets.token_bytes(16)
        digest = _scrypt(secret, salt)
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Exists(f"user {name!r} exists already; remove it first")
            db.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)",
                       (name, int(admin), key_id, salt, digest, time.time()))  # fmt: skip
        return f"fnk_{key_id}_{secret}"

    def remove_user(self, name: str) -> None:
        with self._write() as db:
            row = db.execute("SELECT admin FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no user {name!r}")
            admins = db.execute("SELECT count(*) FROM users WHERE admin = 1").fetchone()[0]
            others = db.execute("SELECT count(*) FROM users").fetchone()[0] - 1
            if row[0] and admins == 1 and others:
                raise AccessError(f"{name!r} is the last admin; make another admin first")
            db.execute("DELETE FROM users WHERE name = ?", (name,))  # sessions, memberships go

    def user(self, name: str) -> User | None:
        row = self._db().execute("SELECT name, admin, created FROM users WHERE name = ?",
                                 (name,)).fetchone()  # fmt: skip
        return None if row is None else self._user(row)

    def _user(self, row: tuple) -> User:
        names = self._db().execute(
            "SELECT collection FROM members WHERE user = ? ORDER BY collection", (row[0],)
        )
        return User(row[0], bool(row[1]), row[2], tuple(n for (n,) in names))

    def users(self) -> list[User]:
        rows = self._db().execute("SELECT name, admin, created FROM users ORDER BY name")
        return [self._user(r) for r in rows.fetchall()]

    def authenticate_key(self, key: str) -> User | None:
        """The user whose API key this is, or None. The scrypt check runs once per key and
        process: a key that passed is remembered (as an HMAC under a per-process secret)
        against the stored hash it matched, so a removed user or a new key is seen at once."""
        m = KEY_RE.fullmatch(key)
        if m is None:
            return None
        row = (
            self._db()
            .execute(
                "SELECT name, admin, created, key_salt, key_hash FROM users WHERE key_id = ?",
                (m.group(1),),
            )
            .fetchone()
        )
        if row is None:
            return None
        tag = hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()
        with self._lock:
            known = self._verified.get(tag)
        if known is None or not hmac.compare_digest(known, row[4]):
            if not hmac.compare_digest(_scrypt(m.group(2), row[3]), row[4]):
                return None
            with self._lock:
                self._verified[tag] = row[4]
                if len(self._verified) > _VERIFIED_CACHE:
                    self._verified.popitem(last=False)
        return self._user(row[:3])

    # -- collections ----------------------------------------------------------------

    def add_collection(self, name: str) -> Collection:
        check_collection_name(name)
        folder, now = f"{name}-{secrets.token_hex(4)}", time.time()
        with self._write() as db:
            if db.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                raise Exists(f"collection {name!r} exists already")
            db.execute("INSERT INTO collections VALUES (?, ?, ?)", (name, folder, now))
        return Collection(name, folder, now)

    def remove_collection(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no collection {name!r}")

    def collection(self, name: str) -> Collection | None:
        row = self._db().execute("SELECT name, folder, created FROM collections WHERE name = ?",
                                 (name,)).fetchone()  # fmt: skip
        return None if row is None else self._collection(row)

    def _collection(self, row: tuple) -> Collection:
        names = self._db().execute(
            "SELECT user FROM members WHERE collection = ? ORDER BY user", (row[0],)
        )
        return Collection(row[0], row[1], row[2], tuple(n for (n,) in names))

    def collections(self) -> list[Collection]:
        rows = self._db().execute("SELECT name, folder, created FROM collections ORDER BY name")
        return [self._collection(r) for r in rows.fetchall()]

    def grant(self, user: str, collection: str) -> None:
        """Makes `user` a member of `collection` (a no-op if it is one already)."""
        with self._write() as db:
            self._need(db, user, collection)
            db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (user, collection))

    def revoke(self, user: str, collection: str) -> None:
        with self._write() as db:
            self._need(db, user, collection)
            db.execute("DELETE FROM members WHERE user = ? AND collection = ?",
                       (user, collection))  # fmt: skip

    @staticmethod
    def _need(db: sqlite3.Connection, user: str, collection: str) -> None:
        if not db.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone():
            raise NotFound(f"no user {user!r}")
        if not db.execute("SELECT 1 FROM collections WHERE name = ?", (collection,)).fetchone():
            raise NotFound(f"no collection {collection!r}")

    def member_collection(self, user: str, name: str) -> Collection | None:
        """`name` if `user` belongs to it; None for one that does not exist and for one the
        user is not in alike (the caller answers both with the same 404)."""
        row = self._db().execute(
            "SELECT c.name, c.folder, c.created FROM collections c JOIN members m "
            "ON m.collection = c.name WHERE m.user = ? AND c.name = ?", (user, name)
        ).fetchone()  # fmt: skip
        return None if row is None else Collection(*row)

    # -- sessions -------------------------------------------------------------------

    def create_session(self, user: str, ttl_s: float) -> tuple[str, float]:
        """(token, expiry as a Unix time) of a new session for `user`."""
        token, now = secrets.token_urlsafe(32), time.time()
        expires = now + min(ttl_s, MAX_SESSION_S)
        digest = hashlib.sha256(token.encode()).digest()
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))  # tidy as we go
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (digest, user, now, expires))
        return token, expires

    def session_user(self, token: str) -> tuple[User, float] | None:
        """(user, expiry) of a live session, or None for an unknown or expired one."""
        if not token or len(token) > 128:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        row = self._db().execute(
            "SELECT u.name, u.admin, u.created, s.expires FROM sessions s JOIN users u "
            "ON u.name = s.user WHERE s.token_sha256 = ?", (digest,)
        ).fetchone()  # fmt: skip
        if row is None or row[3] <= time.time():
            return None
        return self._user(row[:3]), row[3]

    def end_session(self, token: str) -> None:
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        with self._write() as db:
            db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (digest,))
