"""The RAG endpoints of `falconet serve --rag-store DIR|URL`, in the same app as the OpenAI API.

    POST   /v1/rag/documents        multipart upload (`file` fields) or JSON {"path": ...}
    GET    /v1/rag/documents        the stored documents
    DELETE /v1/rag/documents/{id}   remove one
    POST   /v1/rag/query            search hits, or an answer with numbered sources
                                    (streamed as SSE: {"sources"}, {"delta"}..., [DONE])

A path on the server's disk is ingested only when its real path (symlinks resolved) lies
under a `--rag-root`; folders are walked and any file resolving outside the roots is
skipped. Uploads are written to `<uploads>/<sha256>/<name>` (temp file, fsync, rename;
`<uploads>` is `<store>/uploads`, or --rag-uploads) after they load as a supported document, so a refused upload leaves the store as
it was; an upload whose ingestion fails or is cancelled is removed, and so is any file in
uploads/ that no stored document references when the server starts (a killed server's).
Store connections (an SQLite file's, or PostgreSQL's) are not shared between threads: every
store call runs in a worker thread (never on the event loop) on that thread's own
connection. Replicas sharing one PostgreSQL store each keep their uploads on their own disk;
a document uploaded to one and removed through another keeps its file until the first
restarts (the orphan sweep below).

Ingestion is bounded per document (`IngestLimits`: --rag-max-file-mb, --rag-max-chunks,
--rag-max-tokens-per-byte; a refused upload gets a 413 naming the limit), embeds a few
chunks at a time with queries served first between batches, and stops when its client
goes away (nothing of the document in progress is stored).

In multi-user mode (`falconet serve --state-dir` with users) each request works on one of
its caller's collections, each its own store under `<store>/collections/` (collections.py);
ingesting a path on the server's disk is then for admins only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from falconet.errors import (
    FalconetError,
    LimitError,
    LoaderError,
    RagError,
    StoreUnavailableError,
)
from falconet.generate import usage
from falconet.rag.embed import SharedEmbedder
from falconet.rag.ingest import DEFAULT_MAX_UPLOAD_MB, IngestLimits
from falconet.rag.retrieve import DEFAULT_MODE, MODES, Mode, needs_embedder
from falconet.request_rules import RAG_MAX_TOKENS
from falconet.sampling import SamplingParams
from falconet.server.collections import Collections
from falconet.server.fields import APIError, Flag, bad, check_text, checked, parse_model, ruled
from falconet.server.gate import Access
from falconet.server.generation import GenerationRequest
from falconet.server.protocol import SamplingFields
from falconet.server.responses import DONE, sse
from falconet.server.streaming import EventStream, wait_disconnect

MAX_NAME_CHARS = 120
MAX_K = 100  # passages per query
UPLOADS = "uploads"


Query = Annotated[
    str, Field(strict=True, pattern=r"\S"), checked("a non-empty string", null_is_default=False)
]
Passages = Annotated[
    int | None,
    Field(strict=True, ge=1, le=MAX_K),
    checked(f"an integer in [1, {MAX_K}]", integral=True),
]
SearchMode = Annotated[Mode | None, checked(f"one of {', '.join(MODES)}")]
ServerPath = Annotated[
    str,
    Field(strict=True),
    checked("a string naming a file or folder", null_is_default=False, then=check_text),
]

Choice = Annotated[str | None, Field(strict=True, max_length=200), checked("a collection name")]


class RagQueryRequest(SamplingFields):
    """POST /v1/rag/query: retrieve passages, and by default answer from them. The
    sampling fields are the OpenAI routes' (with greedy decoding by default)."""

    query: Query = Field(description="the question, or the words to search for")
    k: Passages = Field(5, description="passages to retrieve")
    mode: SearchMode = Field(
        DEFAULT_MODE, description="hybrid fuses the bm25 and vector rankings (RRF, k=60)"
    )
    answer: Flag = Field(True, description="false: the passages only")
    stream: Flag = Field(False, description="stream the answer as server-sent events")
    max_tokens: ruled("max_tokens") = Field(
        None,
        description=f"answer length (default: up to {RAG_MAX_TOKENS}, what the model's "
        "context leaves after the passages)",
    )
    temperature: ruled("temperature") = Field(0.0, description="0 = greedy")
    collection: Choice = Field(None, description="which of your collections (multi-user mode)")


class RagDocumentRequest(BaseModel):
    """POST /v1/rag/documents as JSON: a file or folder on the server's disk."""

    model_config = ConfigDict(extra="forbid")

    path: ServerPath = Field(
        description="a file or folder under a --rag-root (relative: to the first root)"
    )
    collection: Choice = Field(None, description="which of your collections (multi-user mode)")


# The route reads its own body (an upload or JSON), so its schema is written here.
_UPLOAD = {"type": "array", "items": {"type": "string", "format": "binary"}}
_DOCUMENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _UPLOAD}}},
            "application/json": {"schema": RagDocumentRequest.model_json_schema()},
        },
    }
}


@dataclass(frozen=True)
class RagSettings:
    store: Path | str  # the store folder, or a postgresql:// URL
    roots: tuple[Path, ...] = ()  # resolved; server-side paths must lie under one
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
    limits: IngestLimits = IngestLimits(flag_prefix="rag-")
    uploads: Path | None = None  # where uploads are kept; None: <store folder>/uploads


class _Rag:
    def __init__(self, settings: RagSettings, embedder: SharedEmbedder) -> None:
        from falconet.rag.stores import open_store

        self.settings = settings
        self.uploads = (settings.uploads or Path(settings.store) / UPLOADS).resolve()
        self._local = threading.local()
        self.embedder = embedder  # the server's, which /v1/embeddings shares
        # Uploads being ingested, by final path: a failed one removes its file only when
        # no other request is ingesting the same bytes.
        self._uploading: Counter[Path] = Counter()
        self._uploading_lock = threading.Lock()
        with open_store(settings.store) as store:  # created (or checked) once, at startup
            self.uploads.mkdir(parents=True, exist_ok=True)
            self._remove_orphan_uploads(store)

    def store(self):
        """This thread's connection to the store (kept: it caches the vector matrix)."""
        from falconet.rag.stores import open_store

        s = getattr(self._local, "store", None)
        if s is None:
            s = self._local.store = open_store(self.settings.store)
        return s

    async def run(self, fn: Callable, *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
        except LimitError as e:
            raise APIError(413, e.message(self.settings.limits.flag_prefix), "file",
                           code="document_too_large") from e  # fmt: skip
        except LoaderError as e:
            raise bad(str(e), "file") from e
        except StoreUnavailableError as e:  # the database: try again later, not a bad request
            raise APIError(503, str(e), code="store_unavailable") from e
        except RagError as e:
            raise bad(str(e)) from e

    async def ingest(self, request: Request, fn: Callable, *args: Any) -> Any:
        """`fn(*args, cancel)` in a worker thread, cancelled if the client goes away first:
        the thread stops at its next batch, storing nothing of its document in progress,
        and the client (gone) is answered 499."""
        cancel = threading.Event()
        work = asyncio.ensure_future(self.run(fn, *args, cancel))
        gone = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the client left, or the server is stopping
                cancel.set()
            gone.cancel()
        if not cancel.is_set():
            return work.result()
        with contextlib.suppress(APIError):  # IngestCancelled, as a 400 nobody reads
            await work
        raise APIError(499, "the client closed the connection", code="client_closed")

    # -- documents ------------------------------------------------------------------

    def under_root(self, real: Path) -> bool:
        return any(real == r or real.is_relative_to(r) for r in self.settings.roots)

    def resolve_path(self, value: str) -> Path:
        if not value or "\x00" in value:
            raise bad("'path' is empty or holds a NUL byte", "path")
        if not self.settings.roots:
            raise bad("this server takes no paths on its disk: start it with --rag-root DIR, "
                      "or upload the file as multipart/form-data", "path")  # fmt: skip
        p = Path(value)
        if not p.is_absolute():  # relative to the first root
            p = self.settings.roots[0] / p
        try:
            real = Path(os.path.realpath(p, strict=True))
        except (OSError, ValueError) as e:
            raise bad(f"'path' {value!r}: no such file or folder under a --rag-root", "path") from e
        if not self.under_root(real):
            raise bad(f"'path' {value!r} is outside the server's --rag-root folders", "path")
        return real

    def ingest_path(self, real: Path, cancel: threading.Event) -> dict[str, Any]:
        from falconet.rag.ingest import IngestReport, ingest_files
        from falconet.rag.loaders import find_documents

        report = IngestReport()
        files = [real]
        if real.is_dir():
            files = []
            # resolved: a symlink inside the root may point out
            for f in find_documents(real, report.skip):
                if self.under_root(f):
                    files.append(f)
                else:
                    report.skip(f, "resolves outside the server's --rag-root folders")
        # a file and a link to it are one document
        files = list(dict.fromkeys(files))
        ingest_files(self.store(), files, self.embedder.ingestion, report=report,
                     limits=self.settings.limits, cancel=cancel)  # fmt: skip
        return self.report_json(report)

    def ingest_upload(
        self, name: str, tmp: Path, sha: str, cancel: threading.Event
    ) -> dict[str, Any]:
        """Check that the temp file loads, move it into place, ingest it; a file that ends
        up in no stored document is removed."""
        from falconet.rag.ingest import ingest_file
        from falconet.rag.loaders import load_document

        try:
            load_document(tmp, max_bytes=self.settings.max_upload_bytes)
        except LimitError as e:  # name the upload, not the temp file
            raise LimitError(e.problem.replace(str(tmp), name), e.setting) from None
        except LoaderError as e:
            raise LoaderError(str(e).replace(str(tmp), name)) from e
        folder = self.uploads / sha
        final = folder / name
        with self._uploading_lock:
            folder.mkdir(exist_ok=True)
            if final.exists():
                tmp.unlink()
            else:
                os.replace(tmp, final)
                _fsync_dir(folder)
            self._uploading[final] += 1
        try:
            report = ingest_file(self.store(), final, self.embedder.ingestion,
                                 limits=self.settings.limits, cancel=cancel)  # fmt: skip
        except LimitError as e:  # name the upload, not where it was put
            raise LimitError(e.problem.replace(str(final), name), e.setting) from None
        finally:
            with self._uploading_lock:
                self._uploading[final] -= 1
                if not self._uploading[final]:
                    del self._uploading[final]
                    if self.store().document(str(final)) is None:
                        _remove_upload(final)
        return self.report_json(report)

    def _remove_orphan_uploads(self, store) -> None:
        """Files in uploads/ that no stored document references: temp files and ingests
        that a killed server left behind."""
        referenced = {d.source for d in store.documents()}
        for entry in self.uploads.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                for f in entry.iterdir():
                    if str(f) not in referenced:
                        _remove_upload(f)
                with contextlib.suppress(OSError):  # empty: its file was removed by hand
                    entry.rmdir()
            elif entry.name.startswith(".upload-"):
                entry.unlink(missing_ok=True)

    def report_json(self, report) -> dict[str, Any]:
        from falconet.rag.store import document_id

        docs = {s: document_id(s) for s in report.added + report.updated + report.unchanged}
        return {"added": report.added, "updated": report.updated,
                "unchanged": report.unchanged, "removed": report.removed,
                "skipped": [{"source": s, "reason": r} for s, r in report.skipped],
                "document_ids": docs, "chunks_written": report.chunks_written,
                "seconds": round(report.seconds_total, 3)}  # fmt: skip

    def documents(self) -> list[dict[str, Any]]:
        return [_doc_json(d) for d in self.store().documents()]

    def remove(self, doc_id: str) -> dict[str, Any] | None:
        store = self.store()
        if store.document(doc_id) is None:
            return None
        doc = store.remove_document(doc_id)
        source = Path(doc.source)
        if source.parent.parent == self.uploads:  # an upload: its file goes too
            _remove_upload(source)
        return _doc_json(doc)

    def search(self, query: str, k: int, mode: Mode):
        from falconet.rag.retrieve import search

        embedder = self.embedder.queries if needs_embedder(mode) else None
        return search(self.store(), query, k, mode, embedder)


def _doc_json(d) -> dict[str, Any]:
    keys = ("id", "source", "sha256", "version", "chunks", "ingested_at", "size")
    return {k: v for k, v in asdict(d).items() if k in keys}


def _remove_upload(path: Path) -> None:
    """An uploaded file, and its <sha256> folder once empty."""
    with contextlib.suppress(OSError):
        path.unlink()
        path.parent.rmdir()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sanitize_name(raw: str | None) -> str:
    """A safe basename for an uploaded file, or a 400."""
    from falconet.rag.loaders import SUPPORTED_SUFFIXES

    name = (raw or "").replace("\\", "/").split("/")[-1]
    if "\x00" in (raw or ""):
        raise bad("the uploaded file's name holds a NUL byte", "file")
    name = re.sub(r"[^\w.\- ]", "_", name).strip(" .")
    if not name or name in (".", ".."):
        raise bad("the uploaded file has no usable name; send a filename such as notes.txt",
                  "file")  # fmt: skip
    stem, suffix = os.path.splitext(name)
    suffix = suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:  # 415: the web app says "unsupported type"
        raise APIError(415, f"unsupported file type {suffix or '(none)'}; supported: "
                       f"{', '.join(SUPPORTED_SUFFIXES)}", "file",
                       code="unsupported_file_type")  # fmt: skip
    return stem[: MAX_NAME_CHARS - len(suffix)] + suffix


def register_rag_routes(
    app: FastAPI, srv: Any, settings: RagSettings | None, access: Access | None = None
) -> None:
    """Adds /v1/rag/*; without settings every RAG route answers a 404 saying how to
    enable it. `srv` is the app's _Server (engine, body reading, submission). In
    multi-user mode (`access`) each request works on one of its caller's collections."""
    if settings is None:
        rag = None
    elif access is not None and access.multi_user:
        rag = Collections(settings, access.db, lambda s: _Rag(s, srv.embedder))
    else:
        rag = _Rag(settings, srv.embedder)

    async def need(request: Request, choice: str | None = None) -> _Rag:
        if rag is None:
            raise APIError(404, "the RAG endpoints are off: start the server with "
                           "--rag-store DIR (or a postgresql:// URL)",
                           code="rag_disabled")  # fmt: skip
        if isinstance(rag, _Rag):
            return rag
        return await run_in_threadpool(rag.for_request, request, choice)

    @app.get("/v1/rag/documents")
    async def list_documents(request: Request) -> Response:
        r = await need(request)
        return JSONResponse({"object": "list", "data": await r.run(r.documents)})

    @app.delete("/v1/rag/documents/{doc_id}")
    async def delete_document(request: Request, doc_id: str) -> Response:
        r = await need(request)
        doc = await r.run(r.remove, doc_id)
        request.state.audit["documents"] = [doc_id]
        if doc is None:
            raise APIError(404, f"no document with id {doc_id!r}", "doc_id")
        return JSONResponse(doc)

    @app.post("/v1/rag/documents", openapi_extra=_DOCUMENTS_BODY)
    async def add_documents(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            r = await need(request)
            return JSONResponse(_audited(request, await _upload(r, request)))
        if kind in ("application/json", ""):
            body = parse_model(RagDocumentRequest, await srv.body(request))
            r = await need(request, body.collection)
            if isinstance(rag, Collections) and not request.state.identity.admin:
                raise APIError(403, "only an admin may ingest files from the server's disk; "
                               "upload the file instead", "path", code="admin_only")  # fmt: skip
            real = r.resolve_path(body.path)
            return JSONResponse(_audited(request, await r.ingest(request, r.ingest_path, real)))
        await need(request)  # a server without RAG, or a caller without it, says so first
        raise bad(f"unsupported content type {kind!r}: upload files as multipart/form-data "
                  'or send JSON {"path": "..."}')  # fmt: skip

    @app.post("/v1/rag/query")
    async def query(request: Request, body: RagQueryRequest) -> Response:
        r = await need(request, body.collection)
        context = srv.engine.max_context
        if body.max_tokens is not None and body.max_tokens >= context:
            message = (
                f"'max_tokens' is {body.max_tokens}; it must be less than this model's "
                f"context of {context} tokens"
            )
            raise bad(message, "max_tokens", "context_length_exceeded")
        try:  # a second guard: the body's fields obey the same rules
            kw = body.sampling_kwargs()
            # the default length is fitted to the prompt in _answer
            asked = 1 if body.max_tokens is None else body.max_tokens
            params = SamplingParams(max_tokens=asked, seed=body.seed, **kw)
        except FalconetError as e:
            raise bad(str(e)) from e
        hits = await r.run(r.search, body.query, body.k, body.mode)
        request.state.audit["documents"] = sorted({h.doc_id for h in hits})
        if body.answer:
            request.state.audit["model"] = srv.model_name
        if not body.answer:
            from falconet.rag.answer import Source

            return JSONResponse({"sources": [Source(i + 1, h, h.text).as_dict()
                                             for i, h in enumerate(hits)]})  # fmt: skip
        return await _answer(request, body.query, hits, params, body.max_tokens, body.stream)

    async def _answer(request: Request, q: str, hits, params: SamplingParams,
                      asked: int | None, stream: bool) -> Response:  # fmt: skip
        from falconet.rag.answer import answer_tokens, build_prompt

        context = srv.engine.max_context
        try:
            # tokenizing the sources and the question is CPU work: never on the event loop
            ids, sources = await srv.workers.run(build_prompt, srv.tokenizer, q, hits,
                                                 context, asked)  # fmt: skip
        except RagError as e:
            raise bad(str(e), "query") from e
        params = replace(params, max_tokens=answer_tokens(context, len(ids), asked))
        req = GenerationRequest(prompts=[ids], params=[params], prompt_lengths=[len(ids)], n=1,
                                stream=stream, include_usage=False, logprobs=None)  # fmt: skip
        [s] = srv.submit(req)
        src = [x.as_dict() for x in sources]
        if stream:
            return EventStream(_events(s, src, len(ids)), srv.closer([s]))
        task = asyncio.ensure_future(_collect(s))
        watcher = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            s.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, watcher, return_exceptions=True)
        if task.cancelled():  # the client went away
            srv.metrics.client_gone()
            return Response(status_code=499)
        text, n = task.result()
        return JSONResponse({"answer": text, "sources": src, "usage": usage(len(ids), n)})

    async def _collect(s) -> tuple[str, int]:
        parts, n = [], 0
        async for d in s:
            if d.finish_reason == "error":
                raise APIError(500, "generation failed", code="internal_error")
            parts.append(d.text)
            n += len(d.token_ids)
        return "".join(parts), n

    async def _events(s, src: list, prompt_tokens: int) -> AsyncIterator[bytes]:
        yield sse({"sources": src})
        n = 0
        try:
            async for d in s:
                if d.finish_reason == "error":
                    yield sse(APIError(500, "generation failed", code="internal_error").body())
                    break
                n += len(d.token_ids)
                if d.text:
                    yield sse({"delta": d.text})
            else:
                yield sse({"usage": usage(prompt_tokens, n)})
        finally:
            s.cancel()
        yield DONE


def _audited(request: Request, report: dict[str, Any]) -> dict[str, Any]:
    """The report, its documents noted in the request's audit record."""
    ids = [i for r in report.get("reports", [report]) for i in r["document_ids"].values()]
    request.state.audit["documents"] = sorted(set(ids))
    return report


async def _upload(r: _Rag, request: Request) -> dict[str, Any]:
    limit = r.settings.max_upload_bytes
    too_big = APIError(413, f"the upload is larger than {limit} bytes; raise --rag-max-upload-mb",
                       "file", code="document_too_large")  # fmt: skip
    length = request.headers.get("content-length")
    # The body may hold a little more than the file (multipart headers and boundaries).
    allowed = limit + 64 * 1024
    if length is not None and length.isdigit() and int(length) > allowed:
        with contextlib.suppress(Exception):  # read it to its end: the client sees the 413
            async for _ in request.stream():
                pass
        raise too_big
    seen = [0]

    async def receive() -> dict:
        message = await request.receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > allowed:
                raise too_big
        return message

    limited = Request(request.scope, receive)
    try:
        form = await limited.form(max_files=16, max_fields=16)
    except StarletteHTTPException as e:
        raise bad(f"malformed multipart/form-data body: {e.detail}", "file") from e
    try:
        files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise bad("the upload has no 'file' field holding a file", "file")
        names = [sanitize_name(f.filename) for f in files]  # all checked before any write
        results = []
        for f, name in zip(files, names, strict=True):
            tmp, sha, size = await r.run(_spool, f, r.uploads, limit, Path(name).suffix)
            try:
                if size > limit:
                    raise too_big
                if size == 0:
                    raise bad(f"{name} is empty", "file")
                results.append(await r.ingest(request, r.ingest_upload, name, tmp, sha))
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return results[0] if len(results) == 1 else {"reports": results}
    finally:
        await form.close()


def _spool(f: UploadFile, uploads: Path, limit: int, suffix: str) -> tuple[Path, str, int]:
    """The upload copied to a temp file (fsynced) in the uploads folder; its sha256."""
    h, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=uploads, prefix=".upload-", suffix=suffix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            f.file.seek(0)
            while block := f.file.read(1 << 20):
                size += len(block)
                if size > limit:
                    break
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest(), size
