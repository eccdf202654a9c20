"""`falconet serve`: settings, the listening socket, uvicorn and a clean shutdown."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from falconet.errors import AccessError, FalconetError, RagError
from falconet.rag.ingest import DEFAULT_MAX_UPLOAD_MB, IngestLimits
from falconet.server import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, KEEP_ALIVE_S, SESSION_HOURS
from falconet.server.fields import MAX_BODY_BYTES

# Streams still open this long after SIGINT/SIGTERM are cut (uvicorn would wait forever).
GRACEFUL_SHUTDOWN_S = 5
# Where a server over a postgresql:// store keeps uploaded files (relative: to its cwd).
RAG_UPLOADS = ".falconet-rag-uploads"


@dataclass(frozen=True)
class ServerSettings:
    """What `falconet serve` is told; checked before the (slow) model load."""

    model_name: str
    host: str = "127.0.0.1"  # loopback: exposing the server is a decision, not a default
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_context: int | None = None  # None: the model's max_position_embeddings
    prefix_cache: bool = True  # off by itself for models that cannot share a prefix
    max_body_bytes: int = MAX_BODY_BYTES
    rag_store: str | None = None  # None: the /v1/rag/* routes answer 404
    rag_roots: tuple[str, ...] = ()  # server-side paths may be ingested only under these
    rag_uploads: str | None = None  # None: <store folder>/uploads, or RAG_UPLOADS for a URL
    rag_max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    rag_limits: IngestLimits = IngestLimits(flag_prefix="rag-")  # per document ingested
    # a sentence-transformers folder for /v1/embeddings and RAG; None: all-MiniLM-L6-v2
    embedding_model: str | None = None
    timeout_keep_alive: float = KEEP_ALIVE_S  # seconds an idle connection is kept
    timeout_header: float = HEAD_TIMEOUT_S  # seconds a request head may take to arrive
    timeout_body: float = BODY_TIMEOUT_S  # seconds a body may take (+1 s per 16 KiB sent)
    # users, sessions and the audit log live here; None: single-user mode, no audit log
    state_dir: str | None = None
    audit_prompts: bool = False  # the audit log keeps prompt texts, not only their sha256
    rate_limit: int | None = None  # requests/minute/user; None: 600 with users, else off
    session_hours: float = SESSION_HOURS

    def __post_init__(self) -> None:
        for flag, value in (("--timeout-keep-alive", self.timeout_keep_alive),
                            ("--timeout-header", self.timeout_header),
                            ("--timeout-body", self.timeout_body)):  # fmt: skip
            if not (math.isfinite(value) and value > 0):
                raise FalconetError(f"{flag} must be a number of seconds above 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise FalconetError(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        if self.max_batch < 1:
            raise FalconetError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise FalconetError(f"--max-queue must be at least 0, got {self.max_queue}")
        if self.max_context is not None and self.max_context < 2:
            raise FalconetError(f"--max-context must be at least 2 tokens, got {self.max_context}")
        if self.api_key is not None and not self.api_key.strip():
            raise FalconetError("--api-key is empty; give a key or leave the flag out")
        if not self.host:
            raise FalconetError("--host is empty; give an address such as 127.0.0.1")
        if not self.model_name:
            raise FalconetError("--served-model-name is empty")
        if self.rag_max_upload_mb < 1:
            raise FalconetError(f"--rag-max-upload-mb must be at least 1, got "
                                f"{self.rag_max_upload_mb}")  # fmt: skip
        self.rag_limits.checked()  # a RagError naming the --rag-max-* flag
        if self.rag_roots and self.rag_store is None:
            raise FalconetError("--rag-root needs --rag-store DIR|URL (where documents are stored)")
        if self.rag_uploads is not None and self.rag_store is None:
            raise FalconetError("--rag-uploads needs --rag-store DIR|URL")
        for root in self.rag_roots:
            if not Path(root).expanduser().is_dir():
                raise FalconetError(f"--rag-root {root}: not a folder")
        if self.audit_prompts and self.state_dir is None:
            raise FalconetError("--audit-prompts needs --state-dir DIR (where the audit log is)")
        if self.rate_limit is not None and self.rate_limit < 0:
            raise FalconetError(f"--rate-limit must be 0 (off) or more requests per minute, "
                                f"got {self.rate_limit}")  # fmt: skip
        if not (math.isfinite(self.session_hours) and 0 < self.session_hours <= 720):
            raise FalconetError(f"--session-hours must be above 0 and at most 720, got "
                                f"{self.session_hours}")  # fmt: skip
        if self.state_dir is not None and Path(self.state_dir).expanduser().is_file():
            raise FalconetError(f"--state-dir {self.state_dir} is a file; give a folder")
        if self.embedding_model is not None:
            folder = Path(self.embedding_model).expanduser()
            if not any((folder / f).is_file() for f in ("modules.json", "config.json")):
                raise FalconetError(f"--embedding-model {self.embedding_model}: not a "
                                    "sentence-transformers model folder (no modules.json or "
                                    "config.json)")  # fmt: skip

    def rag(self):
        """The RAG endpoints' settings, or None when --rag-store was not given."""
        from falconet.server.rag_routes import RagSettings

        if self.rag_store is None:
            return None
        roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in self.rag_roots)
        store: Path | str = self.rag_store
        uploads = None if self.rag_uploads is None else Path(self.rag_uploads).expanduser()
        if "://" in self.rag_store:  # a database: uploads need a folder of their own
            uploads = uploads or Path(RAG_UPLOADS)
        else:
            store = Path(self.rag_store).expanduser()
        return RagSettings(store, roots, self.rag_max_upload_mb * 2**20, self.rag_limits,
                           uploads)  # fmt: skip

    def access(self):
        """The gate's users, audit log and limits (server/gate.py)."""
        from falconet.access.audit import AUDIT_FILE, AuditLog
        from falconet.access.users import USERS_FILE, AccessDB
        from falconet.server.gate import Access

        if self.state_dir is None:
            return Access(rate_limit=self.rate_limit, session_hours=self.session_hours)
        folder = Path(self.state_dir).expanduser()
        return Access(AccessDB(folder / USERS_FILE), AuditLog(folder / AUDIT_FILE),
                      self.audit_prompts, self.rate_limit, self.session_hours)  # fmt: skip


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise FalconetError(f"--host {host!r} is not an address this machine has ({e})") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise FalconetError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Interrupted(Exception):
    pass


def open_access(settings: ServerSettings):
    """The users file and audit log of `settings.state_dir` (server/gate.py's Access)."""
    try:
        return settings.access()
    except AccessError as e:
        raise FalconetError(f"--state-dir: {e}") from e


def serve(llm, settings: ServerSettings, say: Callable[[str], None], access=None) -> None:
    """Serve `llm` until SIGINT or SIGTERM; the engine is shut down on the way out.
    `access`: from `open_access(settings)` (opened here when not given)."""
    import uvicorn

    from falconet.engine import Engine
    from falconet.server.app import create_app, licence_json
    from falconet.server.timeouts import uvicorn_options

    context = llm.config.max_position_embeddings
    if settings.max_context is not None and settings.max_context > context:
        raise FalconetError(
            f"--max-context {settings.max_context} is more than the model's context of "
            f"{context} tokens (max_position_embeddings)"
        )
    engine = Engine.from_llm(llm, max_batch=settings.max_batch, max_queue=settings.max_queue,
                             max_context=settings.max_context,
                             prefix_cache=settings.prefix_cache)  # fmt: skip
    embedding_model = settings.embedding_model
    if embedding_model is not None:
        embedding_model = Path(embedding_model).expanduser()
    if access is None:
        access = open_access(settings)
    try:
        rag = settings.rag()
        app = create_app(engine, settings.model_name, settings.api_key,
                         max_body_bytes=settings.max_body_bytes, rag=rag,
                         body_timeout=settings.timeout_body,
                         embedding_model=embedding_model, access=access,
                         licence=licence_json(llm.card.licence))  # fmt: skip
    except RagError as e:
        raise FalconetError(f"--rag-store: {e}") from e
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("falconet: %(name)s: %(levelname)s: %(message)s"))
    for name in ("falconet.server", "falconet.engine"):
        logging.getLogger(name).addHandler(handler)
    sock = _listen(settings.host, settings.port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            **uvicorn_options(settings.timeout_header,
                                              settings.timeout_keep_alive))  # fmt: skip

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                say(f"falconet: model {llm.path}: {llm.card.summary()}")
                prefix = "on" if engine.prefix_cache else "off"
                if engine.prefix_cache_off:  # asked for, but this model cannot share one
                    prefix += f": {engine.prefix_cache_off}"
                if access.multi_user:
                    say(
                        f"falconet: multi-user mode: {access.db.user_count()} users in "
                        f"{settings.state_dir}; rate limit {access.rate_limit}/min per user"
                    )
                elif settings.state_dir is not None:
                    say(f"falconet: single-user mode: no users in {settings.state_dir}")
                speculative = engine.speculative or "off"
                if engine.speculative_off:  # asked for, but this model cannot roll back
                    speculative += f": {engine.speculative_off}"
                say(f"falconet serving {settings.model_name} on {_url(sock)} "
                    f"(max batch {engine.max_batch}, prefix cache {prefix}, "
                    f"speculative decoding {speculative})")  # fmt: skip

    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then restores these
    # handlers and raises the signal again: it then lands here rather than killing the
    # process before the engine is shut down.
    def interrupted(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    engine.start()
    try:
        Server(config).run(sockets=[sock])
    except (_Interrupted, KeyboardInterrupt):
        pass
    finally:
        engine.shutdown()
        sock.close()
        for s, h in previous.items():
            signal.signal(s, h)
    say("falconet: server stopped")
