"""The request gate every request passes: who is asking, may they, and the record of it.

    security headers   on every response (CSP without inline scripts, nosniff, no framing)
    authentication     single-user mode: the optional --api-key, as before users existed;
                       multi-user mode (users defined at startup): a user's API key as
                       `Authorization: Bearer`, or the sign-in session cookie; --api-key
                       still admits API clients, as a user of no collection
    CSRF               a cookie-authenticated POST/PUT/PATCH/DELETE must carry the session's
                       token in X-CSRF-Token (a header no other site can set without a CORS
                       preflight, which this server never grants) and, when the browser
                       sends Origin or Sec-Fetch-Site, come from this server's own origin
    rate limit         a token bucket per user (per client address before sign-in): 429
                       with Retry-After
    audit              one hash-chained record per request (falconet/access/audit.py),
                       committed before the response's last byte is sent
    metrics            every answered request counted by endpoint and status

Pure ASGI (not BaseHTTPMiddleware, which breaks disconnect detection). Routes read the
caller as `request.state.identity` and add to the audit record through
`request.state.audit` (documents, model, collection).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser

from falconet.access.audit import AuditLog, utc_now
from falconet.access.users import AccessDB, User, csrf_token
from falconet.server import SESSION_HOURS
from falconet.server import metrics as metrics_mod
from falconet.server.fields import APIError
from falconet.server.webapp import is_web_path

log = logging.getLogger("falconet.server")

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings",
          "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/metrics",
          "/openapi.json")  # fmt: skip
OPEN_ROUTES = ("/health",)  # answered without a key (load balancers probe it)
# The web app's page and files (webapp.py) are open too: the sign-in form is among them.
SIGN_IN = "/v1/auth/session"  # POST: open, it is where a key becomes a session
SESSION_COOKIE = "falconet_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_RATE_LIMIT = 600  # requests per minute per user in multi-user mode
CLIENT_GONE = 499  # the audit status of an answer cut off before its end

# No inline scripts or styles, nothing from elsewhere, never inside another site's frame.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")  # fmt: skip
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
PROMPT_FIELDS = ("prompt", "messages", "query", "input")  # what the audit hashes, in order


@dataclass(frozen=True)
class Identity:
    """Who a request comes from. `name` None: nobody signed in (an open route)."""

    name: str | None
    admin: bool = False
    via: str = "local"  # local (single-user mode), api-key (--api-key), key, session
    session: str | None = None  # the session token, when via == "session"

    @classmethod
    def of(cls, user: User, via: str, session: str | None = None) -> Identity:
        return cls(user.name, user.admin, via, session)

    @property
    def is_user(self) -> bool:
        return self.via in ("key", "session")


@dataclass
class Access:
    """What the gate and the account routes share: the users file (None: single-user
    mode), the audit log, and the limits. `multi_user` is fixed when the server starts."""

    db: AccessDB | None = None
    audit: AuditLog | None = None
    audit_prompts: bool = False
    rate_limit: int | None = None  # per minute per user; None: 600 with users, else off
    session_hours: float = SESSION_HOURS

    def __post_init__(self) -> None:
        self.multi_user = self.db is not None and self.db.user_count() > 0
        if self.rate_limit is None:
            self.rate_limit = DEFAULT_RATE_LIMIT if self.multi_user else 0


class RateLimiter:
    """A token bucket per caller: `per_minute` requests at once, refilled evenly."""

    def __init__(self, per_minute: int) -> None:
        self.burst = per_minute
        self.refill = per_minute / 60.0  # tokens per second
        self.buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, who: str, now: float) -> float:
        tokens, then = self.buckets.get(who, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.refill)

    def wait(self, who: str) -> float:
        """Seconds until `who` has a request left (0: now), taking nothing."""
        tokens = self._tokens(who, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.refill

    def take(self, who: str) -> float:
        """0 when `who` may go on (one request taken); else the seconds until it may."""
        now = time.monotonic()
        tokens = self._tokens(who, now)
        if len(self.buckets) > 10_000:  # forget callers whose buckets are full again
            self.buckets = {k: v for k, v in self.buckets.items()
                            if v[0] + (now - v[1]) * self.refill < self.burst}  # fmt: skip
        if tokens >= 1:
            self.buckets[who] = (tokens - 1, now)
            return 0.0
        self.buckets[who] = (tokens, now)
        return (1 - tokens) / self.refill


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def _bearer(scope: dict) -> bytes | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _forgery(problem: str) -> APIError:
    return APIError(403, f"refused as a possible cross-site request forgery: {problem}",
                    code="csrf_failed")  # fmt: skip


def _own_origin(scope: dict) -> str:
    host = (_header(scope, b"host") or b"").decode("latin-1")
    return f"{scope.get('scheme', 'http')}://{host}"


def _cross_site(scope: dict) -> str | None:
    """Why a request that a browser says comes from another site is refused, or None."""
    site = _header(scope, b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return f"a {site.decode('latin-1')} request may not use this server's sessions"
    origin = _header(scope, b"origin")
    if origin is not None and origin.decode("latin-1") != _own_origin(scope):
        return "the request comes from another origin"
    return None


def _csrf_problem(scope: dict, session: str) -> str | None:
    """Why a cookie-authenticated state-changing request is refused, or None."""
    problem = _cross_site(scope)
    if problem is not None:
        return problem
    token = _header(scope, CSRF_HEADER.lower().encode())
    if token is None:
        return f"send the session's CSRF token (from sign-in) in the {CSRF_HEADER} header"
    if not hmac.compare_digest(token, csrf_token(session).encode()):
        return f"the {CSRF_HEADER} header does not match this session"
    return None


class Gate:
    def __init__(
        self, app: Any, metrics: metrics_mod.Metrics, api_key: str | None, access: Access,
        max_body_bytes: int,
    ) -> None:  # fmt: skip
        self.app = app
        self.metrics = metrics
        self.key = api_key.encode("utf-8") if api_key else None
        self.access = access
        self.limiter = RateLimiter(access.rate_limit) if access.rate_limit else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["arrived"] = time.perf_counter()
        state["audit"] = {}
        path = scope["path"]
        endpoint = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/")
                                                else "other")  # fmt: skip
        status = [500]  # an exception before any response is answered with a 500
        started = [False]
        audit = self.access.audit
        entry = {"time": utc_now(), "method": scope["method"], "route": path} if audit else None
        kind = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        body = bytearray() if audit and kind in (b"application/json", b"") else None
        limit = self.max_body_bytes

        async def receive_copied() -> dict:
            message = await receive()
            # beyond max_body_bytes the route answers 413 and nothing more is kept
            if body is not None and message["type"] == "http.request" and len(body) <= limit:
                body.extend(message.get("body", b""))
            return message

        async def send_marked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()),
                                                  *SECURITY_HEADERS]}  # fmt: skip
            elif entry is not None and not message.get("more_body", False):
                await run_in_threadpool(self._log, entry, state, status[0], body)
            await send(message)

        try:
            try:
                identity = await self._admit(scope)
            except APIError as err:
                response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
                await response(scope, receive_copied, send_marked)
            else:
                state["identity"] = identity
                await self.app(scope, receive_copied, send_marked)
        finally:
            self.metrics.count_request(endpoint, status[0])
            if entry is not None and "status" not in entry:  # its last byte was never sent
                # (rare: the client left mid-answer, or the server is stopping) logged here,
                # on the event loop, as the request may be cancelled at any await
                self._log(entry, state, CLIENT_GONE if started[0] else status[0], body)

    async def _admit(self, scope: dict) -> Identity | None:
        """The caller, or an APIError (401, 403 for CSRF, 429)."""
        path, method = scope["path"], scope["method"]
        if not self.access.multi_user:
            identity: Identity | None = Identity(None)
            if self.key is not None and path not in OPEN_ROUTES and not is_web_path(path):
                token = _bearer(scope)
                if token is None or not hmac.compare_digest(token, self.key):
                    raise _unauthorized("missing or wrong API key; send it as "
                                        "'Authorization: Bearer KEY'")  # fmt: skip
            who = "local"
        elif path in OPEN_ROUTES or is_web_path(path) or (path == SIGN_IN and method == "POST"):
            identity, who = None, "ip:" + str((scope.get("client") or ("?",))[0])
            problem = _cross_site(scope) if path == SIGN_IN else None
            if problem is not None:  # another site signing a browser in as someone else
                raise _forgery(problem)
        else:
            identity = await self._identify_limited(scope, method)
            who = "user:" + str(identity.name)
        if self.limiter is not None and path not in OPEN_ROUTES:
            wait = self.limiter.take(who)
            if wait > 0:
                raise self._too_many(wait, "per user")
        return identity

    async def _identify_limited(self, scope: dict, method: str) -> Identity:
        """`_identify`, with failures charged to the client's address: once its bucket is
        empty, that address gets 429 before any key is checked, so wrong keys cannot make
        the server run scrypt without end."""
        if self.limiter is None:
            return await self._identify(scope, method)
        address = "ip:" + str((scope.get("client") or ("?",))[0])
        wait = self.limiter.wait(address)
        if wait > 0:
            raise self._too_many(wait, "per client address for sign-ins and failed keys")
        try:
            return await self._identify(scope, method)
        except APIError as e:
            if e.status == 401:
                self.limiter.take(address)
            raise

    def _too_many(self, wait: float, per: str) -> APIError:
        seconds = max(1, math.ceil(wait))
        return APIError(429, f"too many requests: at most {self.access.rate_limit} per minute "
                        f"{per}; retry in {seconds} s", code="rate_limited",
                        headers={"Retry-After": str(seconds)})  # fmt: skip

    async def _identify(self, scope: dict, method: str) -> Identity:
        db = self.access.db
        token = _bearer(scope)
        if token is not None:
            if self.key is not None and hmac.compare_digest(token, self.key):
                return Identity("api-key", via="api-key")
            user = await run_in_threadpool(db.authenticate_key, token.decode("latin-1"))
            if user is None:
                raise _unauthorized("wrong or revoked API key")
            return Identity.of(user, "key")
        cookie = cookie_parser((_header(scope, b"cookie") or b"").decode("latin-1"))
        session = cookie.get(SESSION_COOKIE)
        if not session:
            raise _unauthorized("sign in first: send 'Authorization: Bearer KEY', or POST "
                                f"your key to {SIGN_IN} for a session cookie")  # fmt: skip
        found = await run_in_threadpool(db.session_user, session)
        if found is None:
            raise _unauthorized(f"the session is unknown or has expired; sign in again at "
                                f"{SIGN_IN}")  # fmt: skip
        if method not in SAFE_METHODS:
            problem = _csrf_problem(scope, session)
            if problem is not None:
                raise _forgery(problem)
        return Identity.of(found[0], "session", session)

    def _log(self, entry: dict, state: dict, status: int, body: bytearray | None) -> None:
        """Completes and appends the request's audit record (in a worker thread)."""
        identity = state.get("identity")
        info = state.get("audit", {})
        entry["status"] = status
        entry["user"] = info.get("user") or (None if identity is None else identity.name or "local")
        entry["collection"] = info.get("collection")
        entry["documents"] = info.get("documents", [])
        data = _json_object(body)
        model = info.get("model") or data.get("model")
        entry["model"] = model if isinstance(model, str) else None
        prompt = _prompt_text(data)
        if prompt is not None:
            entry["prompt_sha256"] = hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest()
            entry["prompt_chars"] = len(prompt)
            if self.access.audit_prompts:
                entry["prompt"] = prompt
        try:
            self.access.audit.append(entry)
        except Exception:  # the disk's fault; the request was answered, the log says why
            log.exception("could not write the audit record of %s %s", entry["method"],
                          entry["route"])  # fmt: skip


def _json_object(body: bytearray | None) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _prompt_text(data: dict) -> str | None:
    """The prompt of a request body as the audit hashes it: a string as it is, anything else
    (chat messages, token ids, a list of prompts) as canonical JSON."""
    for name in PROMPT_FIELDS:
        value = data.get(name)
        if value is not None:
            if isinstance(value, str):
                return value
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return None
