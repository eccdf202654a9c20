"""The OpenAI-compatible HTTP API over an `Engine`: `create_app(engine, model_name)`.

    GET  /v1/models, /v1/models/{id}   the served model and its LoRA adapters, with max_model_len
    POST /v1/completions               prompt (text or token ids) -> text, streamed or not;
                                       echo + logprobs, prompt_logprobs score the prompt
    POST /v1/chat/completions          messages -> assistant message, streamed or not
    POST /v1/embeddings                text or token ids -> unit vectors (the RAG embedder)
    POST /tokenize, /detokenize        the server's tokenizer (vLLM's endpoints)
    GET  /tokenizer_info               its special tokens and chat template (vLLM's)
    GET  /health                       200 while the engine thread runs (never needs a key)
    GET  /metrics                      Prometheus text (prometheus_client)
    GET  /openapi.json                 the API's OpenAPI schema, request bodies included
    /v1/auth/session, /v1/admin/*      sign-in and administration (account_routes.py)
    /v1/rag/*                          documents and questions over them (rag_routes.py)
    /v1/conversations                  the web app's conversations, per user
    GET  /, /web/*                     the web app (webapp.py)

Every request passes the gate (gate.py): security headers, the API key or a user's key or
session, CSRF, the per-user rate limit and the audit record.

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx
status for a bad request; nothing a client sends reaches the process as an unhandled
exception. A streaming request that fails after its first byte ends with an error event
and `[DONE]`. When a client goes away, its sequences are cancelled so the engine frees
their slots at its next step. The event loop only moves bytes: parsing bodies,
tokenizing, chat templates and building large answers run in worker threads
(workers.py), and slow clients meet deadlines (timeouts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from falconet import __version__
from falconet.engine import Delta, Engine, QueueFull, Stream
from falconet.errors import FalconetError
from falconet.generate import TokenStrings, usage
from falconet.server import BODY_TIMEOUT_S
from falconet.server import metrics as metrics_mod
from falconet.server.account_routes import register_account_routes
from falconet.server.conversation_routes import register_conversation_routes
from falconet.server.embeddings import EmbeddingRequest, create_embeddings
from falconet.server.fields import (
    MAX_BODY_BYTES,
    APIError,
    JSONBodyRoute,
    bad,
    error_body,
    read_json_object,
    validation_error,
)
from falconet.server.gate import Access, Gate
from falconet.server.generation import (
    GenerationRequest,
    chat_prompt,
    check_model,
    check_token_ids,
    parse_chat,
    parse_completion,
)
from falconet.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    prompt_items,
)
from falconet.server.rag_routes import RagSettings, register_rag_routes
from falconet.server.responses import DONE, Formatter, PromptShow, sse
from falconet.server.streaming import EventStream, wait_disconnect
from falconet.server.timeouts import BodyDeadline
from falconet.server.webapp import register_web_routes
from falconet.server.workers import RequestWorkers
from falconet.tools import ToolCallStream, parse_tool_calls

log = logging.getLogger("falconet.server")

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away first


def _sanitize(message: str) -> str:
    """No memory addresses in messages sent to clients (vLLM does the same)."""
    return re.sub(r"0x[0-9a-fA-F]{6,}", "0x...", message)


def _json_error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# --- streaming plumbing --------------------------------------------------------------


async def _merge(streams: list[Stream]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from several streams as the deltas arrive."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for d in stream:
                queue.put_nowait((i, d))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


# --- the application -----------------------------------------------------------------


class _Server:
    """What the routes share: the engine, tokenizer, model name, metrics, the embedder
    (/v1/embeddings and RAG's, loaded on first use) and the worker threads that do a
    request's CPU work (`await srv.workers.run(fn, *args)`)."""

    def __init__(
        self, engine: Engine, model_name: str, max_body_bytes: int, metrics: metrics_mod.Metrics,
        workers: RequestWorkers, embedding_model: str | Path | None = None,
        licence: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        from falconet.rag.embed import SentenceTransformerEmbedder, SharedEmbedder, default_embedder

        self.engine = engine
        self.workers = workers
        load = default_embedder
        if embedding_model is not None:
            load = functools.partial(SentenceTransformerEmbedder, embedding_model)
        self.embedder = SharedEmbedder(load)
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model.config.vocab_size
        self.model_name = model_name
        # LoRA adapters served beside the base, each its own model id (nn/lora.py)
        self.adapters = tuple(engine.adapters.names) if engine.adapters is not None else ()
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.strings = TokenStrings(engine.tokenizer)
        self.created = int(time.time())
        self.licence = licence  # the checkpoint's declared licence (models/card.py)

    async def body(self, request: Request) -> dict[str, Any]:
        """The JSON object body of a route that reads its own (413 beyond the limit)."""
        return await read_json_object(request, self.max_body_bytes)

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does
        (lm-evaluation-harness's remote tokenizer reads eos_token and chat_template)."""
        tok = self.tokenizer
        return {"tokenizer_class": f"tokenizers.{type(tok.backend.model).__name__}",
                "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "eos_token_ids": list(tok.eos_token_ids), "bos_token_id": tok.bos_token_id,
                "chat_template": tok.chat_template, "model_max_length": self.engine.max_context,
                "vocab_size": self.vocab_size}  # fmt: skip

    def model_card(self, model_id: str | None = None) -> dict[str, Any]:
        """The base model's card, or an adapter's (`parent`: the base, as vLLM lists LoRA
        modules)."""
        adapter = model_id if model_id in self.adapters else None
        return {"id": adapter or self.model_name, "object": "model", "created": self.created,
                "owned_by": "falconet", "root": adapter or self.model_name,
                "parent": self.model_name if adapter else None,
                "max_model_len": self.engine.max_context,
                "licence": self.licence}  # fmt: skip

    # -- generation -----------------------------------------------------------------

    def check_room(self, sequences: int, n: int) -> None:
        """A request for more sequences than the batch and the queue together hold could
        never run; fewer are queued (or get 429 while the queue is full)."""
        stats = self.engine.stats()
        if sequences > stats.max_batch + stats.max_queue:
            raise bad(f"the request asks for {sequences} sequences (prompts x n) but this "
                      f"server holds at most {stats.max_batch + stats.max_queue} (max batch "
                      f"{stats.max_batch} + max queue {stats.max_queue}); "
                      f"{'lower n' if n > 1 else 'send fewer prompts per request'}",
                      "n" if n > 1 else "prompt")  # fmt: skip

    def submit(self, req: GenerationRequest) -> list[Stream]:
        if not self.engine.alive:
            raise APIError(503, "the engine is not running; the server is shutting down")
        self.check_room(len(req.prompts), req.n)
        if req.params:  # one request, one logit_bias
            check_token_ids([t for t, _ in req.params[0].logit_bias], self.vocab_size, "logit_bias")
        try:
            streams = self.engine.submit(req.prompts, req.params, loop=asyncio.get_running_loop(),
                                         generate=req.generate, adapter=req.adapter)  # fmt: skip
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from e  # fmt: skip
        except FalconetError as e:  # GenerationError: beyond the context, bad ids
            raise bad(str(e)) from e
        self.metrics.add_prompt_tokens(sum(req.prompt_lengths))
        return streams

    async def generate(self, request: Request, req: GenerationRequest, chat: bool) -> Response:
        arrived = request.state.arrived
        streams = self.submit(req)
        show = None
        if req.echo_texts is not None or req.prompt_logprobs is not None:
            texts = req.echo_texts and [req.echo_texts[i // req.n] for i in range(len(streams))]
            show = PromptShow(req.prompts, texts, req.logprobs, req.prompt_logprobs)
        fmt = Formatter(chat, req.adapter or self.model_name, self.strings, len(streams), show)
        if req.stream:
            return EventStream(self._events(req, fmt, streams, arrived), self.closer(streams))
        task = asyncio.ensure_future(self._collect(req, fmt, streams, arrived))
        watcher = asyncio.ensure_future(wait_disconnect(request.receive))
        shutting_down = False
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server's shutdown grace period ran out
            shutting_down = True
        watcher.cancel()
        if not task.done():
            task.cancel()
        _cancel(streams)  # idempotent: finished streams do not mind
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(task, watcher, return_exceptions=True)
        if shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if task.cancelled():  # the client went away; nobody reads this answer
            self.metrics.client_gone()
            return Response(status_code=CLIENT_CLOSED)
        return await self.workers.run(task.result(), may_refuse=False)  # built in a worker

    def closer(self, streams: list[Stream]) -> Callable[[bool], None]:
        """An EventStream's `on_close` for `streams`: they are cancelled (a no-op for
        finished ones), and a client that left before the end is counted."""

        def on_close(client_gone: bool) -> None:
            _cancel(streams)
            if client_gone:
                self.metrics.client_gone()

        return on_close

    def _timing(self, arrived: float, n: int) -> Callable[[int, Delta], None]:
        """Feeds the latency histograms as deltas arrive."""
        last: list[float | None] = [None] * n
        first = [True]

        def observe(i: int, delta: Delta) -> None:
            if not delta.token_ids:
                return
            now = time.perf_counter()
            if first[0]:
                first[0] = False
                self.metrics.first_token(now - arrived)
            gap = None if last[i] is None else now - last[i]
            self.metrics.add_generated(len(delta.token_ids), gap)
            last[i] = now

        return observe

    async def _collect(
        self, req: GenerationRequest, fmt: Formatter, streams: list[Stream], arrived: float
    ) -> Callable[[], Response]:
        """Reads the streams to their end; returns what builds the answer from them (n
        choices with logprobs can make megabytes of JSON: not on the event loop)."""
        n = len(streams)
        texts: list[list[str]] = [[] for _ in range(n)]
        tokens, finish = [0] * n, ["length"] * n
        lps: list[list] = [[] for _ in range(n)]
        prompt_lps: list[list | None] = [None] * n
        observe = self._timing(arrived, n)
        async with contextlib.aclosing(_merge(streams)) as deltas:
            try:
                async for i, d in deltas:
                    observe(i, d)
                    if d.finish_reason == "error":
                        raise _engine_error(d.error)
                    texts[i].append(d.text)
                    tokens[i] += len(d.token_ids)
                    lps[i] += d.logprobs
                    prompt_lps[i] = d.prompt_logprobs or prompt_lps[i]
                    finish[i] = d.finish_reason or finish[i]
            except APIError:
                raise
            except Exception as e:  # a stream that broke: the server's fault, not the client's
                log.exception("generation failed")
                raise _engine_error(f"{type(e).__name__}: {e}") from e

        def answer() -> Response:
            choices = []
            for i in range(n):
                text: str | None = "".join(texts[i])
                calls = []
                if req.tool_calls:
                    text, calls = parse_tool_calls(text)
                choices.append(fmt.choice(i, text, lps[i] if req.logprobs is not None else None,
                                          _finish(finish[i], calls), prompt_lps[i], calls))  # fmt: skip
            return JSONResponse(fmt.response(choices, usage(sum(req.prompt_lengths), sum(tokens))))

        return answer

    async def _events(
        self, req: GenerationRequest, fmt: Formatter, streams: list[Stream], arrived: float
    ) -> AsyncIterator[bytes]:
        n = len(streams)
        tokens = 0
        observe = self._timing(arrived, n)
        tool_streams = [ToolCallStream() for _ in range(n)] if req.tool_calls else None
        if fmt.chat:
            yield fmt.chunk([fmt.role_choice(i) for i in range(n)], req.include_usage)
        try:
            async with contextlib.aclosing(_merge(streams)) as deltas:
                async for i, d in deltas:
                    observe(i, d)
                    if d.finish_reason == "error":
                        yield sse(_engine_error(d.error).body())
                        break
                    tokens += len(d.token_ids)
                    text, finish, calls = d.text, d.finish_reason, []
                    if tool_streams is not None:  # content until a call starts; calls at the end
                        text = tool_streams[i].add(text)
                        if finish is not None:
                            rest, calls = tool_streams[i].finish()
                            text += rest
                    if calls:
                        entries = fmt.delta_choices(i, text, d.logprobs, None, d.prompt_logprobs)
                        entries += fmt.tool_call_choices(i, calls)
                        entries += fmt.delta_choices(i, "", [], _finish(finish, calls))
                    else:
                        entries = fmt.delta_choices(i, text, d.logprobs, finish, d.prompt_logprobs)
                    for choice in entries:
                        yield fmt.chunk([choice], req.include_usage)
                else:
                    if req.include_usage:
                        yield fmt.chunk([], True, usage(sum(req.prompt_lengths), tokens))
        except Exception as e:
            log.exception("generation failed mid-stream")
            yield sse(_engine_error(f"{type(e).__name__}: {e}").body())
        yield DONE


def _finish(finish: str | None, calls: list) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for an answer that ended with its calls."""
    return "tool_calls" if calls and finish == "stop" else finish


def _cancel(streams: list[Stream]) -> None:
    for s in streams:
        s.cancel()


def _engine_error(detail: str | None) -> APIError:
    return APIError(500, f"internal server error: generation failed "
                    f"({_sanitize(detail or 'no detail')})", code="internal_error")  # fmt: skip


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    metrics: metrics_mod.Metrics | None = None,
    rag: RagSettings | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
    workers: RequestWorkers | None = None,
    embedding_model: str | Path | None = None,
    access: Access | None = None,
    licence: dict[str, Any] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. The caller starts and shuts down
    the engine; with `api_key`, every route but /health needs `Authorization: Bearer`.
    A request body must arrive within `body_timeout` seconds (see server/timeouts.py).
    /v1/embeddings and RAG embed with the sentence-transformers model in the folder
    `embedding_model` (default: the packaged all-MiniLM-L6-v2). `access` holds the users,
    the audit log and the rate limit (server/gate.py); without it: single-user mode.
    `licence` is what /v1/models says the model's licence is (`licence_json(card)`)."""
    metrics = metrics or metrics_mod.Metrics()
    workers = workers or RequestWorkers()
    srv = _Server(engine, model_name, max_body_bytes, metrics, workers, embedding_model,
                  licence)  # fmt: skip
    # No /docs or /redoc: their pages load scripts from a CDN; /openapi.json is served.
    summary = "OpenAI-compatible API over a Falcon model"
    app = FastAPI(
        title="falconet",
        version=__version__,
        summary=summary,
        docs_url=None,
        redoc_url=None,
        **_no_telemetry(),
    )
    app.state.server = srv
    app.state.max_body_bytes = max_body_bytes  # read by JSONBodyRoute
    app.state.workers = workers  # JSONBodyRoute parses and validates bodies in them
    app.router.route_class = JSONBodyRoute  # before any route is added
    access = access or Access()
    app.add_middleware(Gate, metrics=metrics, api_key=api_key, access=access,
                       max_body_bytes=max_body_bytes)  # fmt: skip
    # Outside the gate, so that a 401 to a request whose body is left unread closes too.
    app.add_middleware(BodyDeadline, timeout=body_timeout)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> Response:
        return Response(metrics.exposition(engine.stats()), media_type=metrics_mod.CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        cards = [srv.model_card(m) for m in (model_name, *srv.adapters)]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        check_model(model_id, model_name, srv.adapters)
        return JSONResponse(srv.model_card(model_id))

    # Tokenizing, chat templates and large answers are CPU work: in the worker threads.
    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        srv.check_room(len(prompt_items(body.prompt)) * body.n, body.n)  # before tokenizing
        req = await workers.run(parse_completion, body, srv.tokenizer, srv.vocab_size,
                                engine.max_context, model_name, srv.adapters)  # fmt: skip
        return await srv.generate(request, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        req = await workers.run(
            parse_chat, body, srv.tokenizer, engine.max_context, model_name, srv.adapters
        )
        return await srv.generate(request, req, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        # tokenizing and the model's forward are CPU work: in a worker thread
        answer = await workers.run(create_embeddings, body, srv.embedder.queries)
        return JSONResponse(answer)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        check_model(body.model, model_name, srv.adapters)

        def answer() -> Response:
            if body.messages is not None:
                ids = chat_prompt(srv.tokenizer, body.messages)
            elif body.prompt is not None:
                ids = srv.tokenizer.encode(body.prompt, body.add_special_tokens)
            else:
                raise bad('send {"prompt": str} or {"messages": [...]}', "prompt")
            return JSONResponse({"tokens": ids, "count": len(ids),
                                 "max_model_len": engine.max_context})  # fmt: skip

        return await workers.run(answer)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return JSONResponse(srv.tokenizer_info())

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        check_model(body.model, model_name, srv.adapters)

        def answer() -> Response:
            ids = check_token_ids(body.tokens, srv.vocab_size, "tokens")
            return JSONResponse({"prompt": srv.tokenizer.decode(ids)})

        return await workers.run(answer)

    register_account_routes(app, access)  # /v1/auth/session, /v1/admin/*
    register_conversation_routes(app, access)  # /v1/conversations: the web app's, per user
    register_web_routes(app)  # the web app at /
    register_rag_routes(app, srv, rag, access)  # /v1/rag/*: 404 unless started with --rag-store
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the 400 this server answers for a body that fails
    validation in place of FastAPI's 422 (see the RequestValidationError handler)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    error = {
        "description": "OpenAI-shaped error naming the invalid field in `param`",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if operation.get("responses", {}).pop("422", None) is not None:
                operation["responses"]["400"] = error
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    nullable = {"type": ["string", "null"]}
    fields = {
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": nullable,
        "code": nullable,
    }
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "object", "properties": fields}},
    }
    app.openapi_schema = schema
    return schema


def licence_json(licence: Any) -> dict[str, Any]:
    """A checkpoint's declared licence (models/card.py's Licence) as /v1/models shows it."""
    return {"id": licence.id, "name": licence.name, "link": licence.link,
            "declared": licence.declared, "text": str(licence)}  # fmt: skip


def _no_telemetry() -> dict[str, Any]:
    """Newer FastAPI versions can export requests and error messages (which may quote
    prompts) over OpenTelemetry when the environment configures it; prompts stay on
    this machine, so that is switched off where the option exists."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans", "auto_configure")
    return {"telemetry": dict.fromkeys(off, False)}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _json_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return _json_error(validation_error(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        message = f"internal server error ({type(exc).__name__}); the server log has the details"
        # Starlette raises the exception again after this answer and uvicorn then closes
        # the connection: say so, or a keep-alive client sends its next request into it.
        return JSONResponse(error_body(500, message, code="internal_error"), status_code=500,
                            headers={"Connection": "close"})  # fmt: skip
