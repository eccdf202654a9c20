"""Sign-in and administration routes of a multi-user `falconet serve --state-dir DIR`.

    POST   /v1/auth/session           {"api_key"} -> a session cookie (HttpOnly,
                                      SameSite=Strict) and the session's CSRF token
    GET    /v1/auth/session           who is signed in (and the CSRF token again)
    DELETE /v1/auth/session           sign out
    GET    /v1/admin/users            admins only, from here down
    POST   /v1/admin/users            {"name", "admin", "collections"} -> its one-time API key
    DELETE /v1/admin/users/{name}
    GET    /v1/admin/collections
    POST   /v1/admin/collections      {"name", "members"}
    DELETE /v1/admin/collections/{name}
    PUT    /v1/admin/collections/{name}/members/{user}
    DELETE /v1/admin/collections/{name}/members/{user}

In single-user mode (no users when the server started) they answer 404 saying how to
create the first user. The CLI (`falconet users`, `falconet collections`) does the same
work on the same file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from falconet.access.users import COLLECTION_RE, USER_RE, Exists, NotFound, csrf_token
from falconet.errors import AccessError
from falconet.server.fields import APIError, Flag, checked
from falconet.server.gate import SESSION_COOKIE, Access, Identity

MAX_LIST = 64  # collections or members named in one request

UserName = Annotated[
    str,
    Field(strict=True, pattern=f"^{USER_RE.pattern}$"),
    checked("a user name: 1 to 64 letters, digits, '.', '_', '@' or '-'", null_is_default=False),
]
CollectionName = Annotated[
    str,
    Field(strict=True, pattern=f"^{COLLECTION_RE.pattern}$"),
    checked(
        "a collection name: 1 to 63 lower-case letters, digits, '_' or '-'", null_is_default=False
    ),  # fmt: skip
]
Key = Annotated[
    str,
    Field(strict=True, min_length=1, max_length=256),
    checked("your API key as a string (fnk_...)", null_is_default=False),
]


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: Key = Field(description="the key `falconet users add` printed")


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: UserName
    admin: Flag = False
    collections: Annotated[list[CollectionName], Field(max_length=MAX_LIST)] = []


class NewCollection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: CollectionName
    members: Annotated[list[UserName], Field(max_length=MAX_LIST)] = []


def _no_users() -> APIError:
    return APIError(404, "this server has no users (single-user mode): create the first with "
                    "`falconet users add NAME --admin --state-dir DIR` and restart it with "
                    "--state-dir DIR", code="users_disabled")  # fmt: skip


async def _call(fn: Callable, *args: Any) -> Any:
    """A users-file call in a worker thread, its errors as HTTP statuses."""
    try:
        return await run_in_threadpool(fn, *args)
    except NotFound as e:
        raise APIError(404, str(e), code="not_found") from e
    except Exists as e:
        raise APIError(409, str(e), code="exists") from e
    except AccessError as e:
        raise APIError(400, str(e)) from e


def _session_json(identity: Identity, collections: list[str]) -> dict[str, Any]:
    out = {"user": identity.name, "admin": identity.admin, "collections": collections,
           "via": identity.via}  # fmt: skip
    if identity.session is not None:
        out["csrf_token"] = csrf_token(identity.session)
    return out


def register_account_routes(app: FastAPI, access: Access) -> None:
    db = access.db

    def need_users() -> None:
        if not access.multi_user:
            raise _no_users()

    def need_admin(request: Request) -> None:
        need_users()
        identity: Identity = request.state.identity
        if not identity.admin:
            raise APIError(403, "only an admin may manage users and collections",
                           code="admin_only")  # fmt: skip

    @app.post("/v1/auth/session")
    async def sign_in(request: Request, body: SignIn) -> Response:
        need_users()
        user = await run_in_threadpool(db.authenticate_key, body.api_key)
        if user is None:
            raise APIError(401, "wrong or revoked API key", "api_key", code="invalid_api_key")
        request.state.audit["user"] = user.name  # the gate saw nobody: sign-in is open
        ttl = access.session_hours * 3600
        token, expires = await _call(db.create_session, user.name, ttl)
        identity = Identity.of(user, "session", token)
        out = {**_session_json(identity, list(user.collections)), "expires_at": int(expires)}
        response = JSONResponse(out, headers={"Cache-Control": "no-store"})
        response.set_cookie(SESSION_COOKIE, token, max_age=int(ttl), path="/", httponly=True,
                            samesite="strict",
                            secure=request.url.scheme == "https")  # fmt: skip
        return response

    @app.get("/v1/auth/session")
    async def whoami(request: Request) -> Response:
        need_users()
        identity: Identity = request.state.identity
        names: list[str] = []
        if identity.is_user:
            user = await _call(db.user, identity.name)
            names = list(user.collections) if user else []
        return JSONResponse(_session_json(identity, names), headers={"Cache-Control": "no-store"})

    @app.delete("/v1/auth/session")
    async def sign_out(request: Request) -> Response:
        need_users()
        identity: Identity = request.state.identity
        if identity.session is None:
            raise APIError(400, "this request is not signed in with a session cookie")
        await _call(db.end_session, identity.session)
        response = JSONResponse({"signed_out": identity.name})
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.get("/v1/admin/users")
    async def list_users(request: Request) -> Response:
        need_admin(request)
        users = await _call(db.users)
        return JSONResponse({"object": "list", "data": [u.as_dict() for u in users]})

    @app.post("/v1/admin/users")
    async def add_user(request: Request, body: NewUser) -> Response:
        need_admin(request)

        def add() -> str:
            for c in body.collections:  # all checked before the user is created
                if db.collection(c) is None:
                    raise NotFound(f"no collection {c!r}")
            key = db.add_user(body.name, body.admin)
            for c in body.collections:
                db.grant(body.name, c)
            return key

        key = await _call(add)
        user = await _call(db.user, body.name)
        return JSONResponse({**user.as_dict(), "api_key": key},
                            headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.delete("/v1/admin/users/{name}")
    async def remove_user(request: Request, name: str) -> Response:
        need_admin(request)
        await _call(db.remove_user, name)
        return JSONResponse({"removed": name})

    @app.get("/v1/admin/collections")
    async def list_collections(request: Request) -> Response:
        need_admin(request)
        found = await _call(db.collections)
        return JSONResponse({"object": "list", "data": [c.as_dict() for c in found]})

    @app.post("/v1/admin/collections")
    async def add_collection(request: Request, body: NewCollection) -> Response:
        need_admin(request)

        def add():
            for u in body.members:
                if db.user(u) is None:
                    raise NotFound(f"no user {u!r}")
            db.add_collection(body.name)
            for u in body.members:
                db.grant(u, body.name)
            return db.collection(body.name)

        return JSONResponse((await _call(add)).as_dict())

    @app.delete("/v1/admin/collections/{name}")
    async def remove_collection(request: Request, name: str) -> Response:
        need_admin(request)
        await _call(db.remove_collection, name)
        return JSONResponse({"removed": name})

    @app.put("/v1/admin/collections/{name}/members/{user}")
    async def grant(request: Request, name: str, user: str) -> Response:
        need_admin(request)
        await _call(db.grant, user, name)
        return JSONResponse((await _call(db.collection, name)).as_dict())

    @app.delete("/v1/admin/collections/{name}/members/{user}")
    async def revoke(request: Request, name: str, user: str) -> Response:
        need_admin(request)
        await _call(db.revoke, user, name)
        return JSONResponse((await _call(db.collection, name)).as_dict())
