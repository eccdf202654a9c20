"""The web app's conversations, kept per user (falconet/access/conversations.py):

    GET    /v1/conversations                  the caller's, newest first
    POST   /v1/conversations                  {"title", "rag", "collection"} -> a new one
    GET    /v1/conversations/{id}             one, with its messages
    PATCH  /v1/conversations/{id}             {"title", "rag", "collection"}
    DELETE /v1/conversations/{id}
    POST   /v1/conversations/{id}/messages    {"role", "content", "sources", "stopped"}

Multi-user mode only (they belong to users); the gate has already checked the session
and, for the state-changing ones, the CSRF token. Another user's id and an id that never
existed both get 404, so ids cannot be probed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from falconet.access.conversations import (
    MAX_MESSAGE_CHARS,
    MAX_TITLE_CHARS,
    ROLES,
    ConversationDB,
    ConversationNotFound,
    Message,
)
from falconet.access.users import COLLECTION_RE
from falconet.errors import AccessError
from falconet.server.fields import APIError, Flag, checked
from falconet.server.gate import Access, Identity

MAX_SOURCES = 100  # an answer's numbered sources (the RAG routes' MAX_K)

Title = Annotated[
    str | None, Field(strict=True, max_length=MAX_TITLE_CHARS),
    checked(f"a string of at most {MAX_TITLE_CHARS} characters"),
]  # fmt: skip
CollectionChoice = Annotated[
    str | None, Field(strict=True, pattern=f"^{COLLECTION_RE.pattern}$"),
    checked("one of your collections' names"),
]  # fmt: skip
Role = Annotated[
    str, Field(strict=True, pattern=f"^({'|'.join(ROLES)})$"),
    checked(f"one of {', '.join(ROLES)}", null_is_default=False),
]  # fmt: skip
Content = Annotated[
    str, Field(strict=True, max_length=MAX_MESSAGE_CHARS),
    checked(f"a string of at most {MAX_MESSAGE_CHARS} characters", null_is_default=False),
]  # fmt: skip
Sources = Annotated[
    list[dict[str, Any]] | None, Field(max_length=MAX_SOURCES),
    checked(f"a list of at most {MAX_SOURCES} source objects"),
]  # fmt: skip


class ConversationFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Title = None
    rag: Flag = None
    collection: CollectionChoice = None


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: Content
    sources: Sources = None
    stopped: Flag = False


async def _call(fn: Callable, *args: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args)
    except ConversationNotFound as e:
        raise APIError(404, str(e), "id", code="conversation_not_found") from e
    except AccessError as e:
        raise APIError(400, str(e)) from e


def register_conversation_routes(app: FastAPI, access: Access) -> None:
    conversations = ConversationDB(access.db) if access.multi_user else None

    def owner(request: Request) -> str:
        if conversations is None:
            raise APIError(404, "conversations are kept per user: start the server with "
                           "--state-dir DIR holding users (`falconet users add`)",
                           code="users_disabled")  # fmt: skip
        identity: Identity = request.state.identity
        if not identity.is_user:
            raise APIError(403, "conversations belong to users; sign in with a user's key",
                           code="user_only")  # fmt: skip
        return identity.name

    def check_collection(user: str, name: str | None) -> None:
        if name is not None and access.db.member_collection(user, name) is None:
            raise APIError(404, f"no collection {name!r} among yours", "collection",
                           code="collection_not_found")  # fmt: skip

    @app.get("/v1/conversations")
    async def list_conversations(request: Request) -> Response:
        user = owner(request)
        found = await _call(conversations.list, user)
        return JSONResponse({"object": "list", "data": [c.as_dict() for c in found]})

    @app.post("/v1/conversations")
    async def create(request: Request, body: ConversationFields) -> Response:
        user = owner(request)

        def make():
            check_collection(user, body.collection)
            return conversations.create(user, body.title or "", body.rag is not False,
                                        body.collection)  # fmt: skip

        return JSONResponse((await _call(make)).as_dict(messages=True))

    @app.get("/v1/conversations/{cid}")
    async def read(request: Request, cid: str) -> Response:
        user = owner(request)
        found = await _call(conversations.get, user, cid)
        return JSONResponse(found.as_dict(messages=True))

    @app.patch("/v1/conversations/{cid}")
    async def update(request: Request, cid: str, body: ConversationFields) -> Response:
        user = owner(request)

        def change():
            check_collection(user, body.collection)
            return conversations.update(user, cid, body.title, body.rag, body.collection)

        return JSONResponse((await _call(change)).as_dict(messages=True))

    @app.delete("/v1/conversations/{cid}")
    async def delete(request: Request, cid: str) -> Response:
        user = owner(request)
        await _call(conversations.delete, user, cid)
        return JSONResponse({"deleted": cid})

    @app.post("/v1/conversations/{cid}/messages")
    async def add_message(request: Request, cid: str, body: NewMessage) -> Response:
        user = owner(request)
        message = Message(body.role, body.content, body.sources, bool(body.stopped))
        added = await _call(conversations.append, user, cid, message)
        return JSONResponse(added.as_dict())
