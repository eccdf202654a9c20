"""The web app's conversations, kept per user on the server, in the users file
(`<state dir>/users.sqlite3`) next to the users they belong to.

A conversation belongs to exactly one user (a foreign key on users(name) with ON DELETE
CASCADE: removing a user removes their conversations, so a new user given the same name
later starts with none). Its id is 128 random bits; every read and write names the owner
as well as the id, so another user's id, guessed or leaked, finds nothing.

The page writes a turn after it has streamed it (the question, then the answer with its
sources), so what is kept is what the user saw, a stopped answer included.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from falconet.access.users import AccessDB
from falconet.errors import AccessError

CONVERSATION_ID_RE = re.compile(r"[0-9a-f]{32}")
ROLES = ("user", "assistant")
MAX_TITLE_CHARS = 200
MAX_MESSAGE_CHARS = 64 * 1024  # a question or an answer; the model's context is far smaller
MAX_SOURCES_BYTES = 256 * 1024  # an answer's sources as JSON (k <= 100 passages)
MAX_CONVERSATIONS = 1000  # per user
MAX_MESSAGES = 1000  # per conversation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    title TEXT NOT NULL, rag INTEGER NOT NULL, collection TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated);
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, sources TEXT,
    stopped INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (conversation, seq));
"""


class ConversationNotFound(AccessError):
    """No conversation of that id among the caller's."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    sources: list[dict[str, Any]] | None = None  # an answer's numbered sources
    stopped: bool = False  # the user stopped the answer before its end
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "sources": self.sources,
                "stopped": self.stopped, "created": self.created}  # fmt: skip


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    rag: bool  # answers come from the user's documents
    collection: str | None
    created: float
    updated: float
    messages: list[Message] = field(default_factory=list)

    def as_dict(self, messages: bool = False) -> dict[str, Any]:
        out = {"id": self.id, "title": self.title, "rag": self.rag,
               "collection": self.collection, "created": self.created,
               "updated": self.updated}  # fmt: skip
        if messages:
            out["messages"] = [m.as_dict() for m in self.messages]
        return out


def _check_title(title: str) -> str:
    title = " ".join(title.split())
    if len(title) > MAX_TITLE_CHARS:
        raise AccessError(f"a conversation title is at most {MAX_TITLE_CHARS} characters")
    return title or "New conversation"


class ConversationDB:
    """The conversations tables of a users file (`AccessDB`), sharing its per-thread
    connections."""

    def __init__(self, users: AccessDB) -> None:
        self.users = users
        self.users.connection().executescript(_SCHEMA)  # idempotent

    def _row(self, user: str, conversation_id: str) -> tuple | None:
        if not CONVERSATION_ID_RE.fullmatch(conversation_id):
            return None
        return self.users.connection().execute(
            "SELECT id, title, rag, collection, created, updated FROM conversations "
            "WHERE id = ? AND user = ?", (conversation_id, user)).fetchone()  # fmt: skip

    def _found(self, user: str, conversation_id: str) -> tuple:
        row = self._row(user, conversation_id)
        if row is None:  # another user's and a made-up id read the same
            raise ConversationNotFound(f"no conversation {conversation_id[:40]!r} among yours")
        return row

    def list(self, user: str) -> list[Conversation]:
        rows = self.users.connection().execute(
            "SELECT id, title, rag, collection, created, updated FROM conversations "
            "WHERE user = ? ORDER BY updated DESC", (user,)).fetchall()  # fmt: skip
        return [Conversation(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]

    def create(self, user: str, title: str = "", rag: bool = True,
               collection: str | None = None) -> Conversation:  # fmt: skip
        title = _check_title(title)
        now = time.time()
        cid = secrets.token_hex(16)
        with self.users.transaction() as db:
            count = db.execute("SELECT count(*) FROM conversations WHERE user = ?",
                               (user,)).fetchone()[0]  # fmt: skip
            if count >= MAX_CONVERSATIONS:
                raise AccessError(f"you have {count} conversations, the most kept per user; "
                                  "delete some first")  # fmt: skip
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (cid, user, title, int(rag), collection, now, now))  # fmt: skip
        return Conversation(cid, title, rag, collection, now, now)

    def get(self, user: str, conversation_id: str) -> Conversation:
        r = self._found(user, conversation_id)
        rows = self.users.connection().execute(
            "SELECT role, content, sources, stopped, created FROM messages "
            "WHERE conversation = ? ORDER BY seq", (r[0],)).fetchall()  # fmt: skip
        messages = [Message(m[0], m[1], None if m[2] is None else json.loads(m[2]), bool(m[3]),
                            m[4]) for m in rows]  # fmt: skip
        return Conversation(r[0], r[1], bool(r[2]), r[3], r[4], r[5], messages)

    def update(self, user: str, conversation_id: str, title: str | None = None,
               rag: bool | None = None, collection: str | None = None) -> Conversation:  # fmt: skip
        with self.users.transaction() as db:
            r = self._found(user, conversation_id)
            new_title = r[1] if title is None else _check_title(title)
            new_rag = r[2] if rag is None else int(rag)
            new_collection = r[3] if collection is None else collection
            db.execute("UPDATE conversations SET title = ?, rag = ?, collection = ?, updated = ? "
                       "WHERE id = ? AND user = ?", (new_title, new_rag, new_collection,
                                                     time.time(), r[0], user))  # fmt: skip
        return self.get(user, conversation_id)

    def delete(self, user: str, conversation_id: str) -> None:
        with self.users.transaction() as db:
            r = self._found(user, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ? AND user = ?", (r[0], user))

    def append(self, user: str, conversation_id: str, message: Message) -> Message:
        if message.role not in ROLES:
            raise AccessError(f"a message's role is one of {', '.join(ROLES)}")
        if len(message.content) > MAX_MESSAGE_CHARS:
            raise AccessError(f"a message is at most {MAX_MESSAGE_CHARS} characters")
        sources = None if message.sources is None else json.dumps(message.sources)
        if sources is not None and len(sources) > MAX_SOURCES_BYTES:
            raise AccessError(f"an answer's sources are at most {MAX_SOURCES_BYTES} bytes of JSON")
        now = time.time()
        with self.users.transaction() as db:
            r = self._found(user, conversation_id)
            seq = db.execute("SELECT count(*) FROM messages WHERE conversation = ?",
                             (r[0],)).fetchone()[0]  # fmt: skip
            if seq >= MAX_MESSAGES:
                raise AccessError(f"a conversation holds at most {MAX_MESSAGES} messages; start "
                                  "a new one")  # fmt: skip
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (r[0], seq, message.role, message.content, sources,
                        int(message.stopped), now))  # fmt: skip
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, r[0]))
        return Message(message.role, message.content, message.sources, message.stopped, now)
