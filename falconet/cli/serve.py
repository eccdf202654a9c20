"""`falconet serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys

from falconet.cli.common import (
    Out,
    UsageError,
    add_model_flags,
    add_speculative_flags,
    add_tp_flag,
    load_model,
)
from falconet.cli.rag import add_limit_flags, limits_from_args
from falconet.rag.ingest import DEFAULT_MAX_UPLOAD_MB
from falconet.server import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, KEEP_ALIVE_S, SESSION_HOURS


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    add_model_flags(serve)
    add_tp_flag(serve)
    add_speculative_flags(serve)
    add_serve_flags(serve)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $FALCONET_API_KEY)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait; beyond that requests get 429")  # fmt: skip
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated) per sequence (default: the model's context)")  # fmt: skip
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a prompt prefix seen before, in steps of the "
                   "prefill chunk (128 tokens); default on, outputs bit-identical either way. "
                   "Off by itself, with a log line, for "
                   "Falcon-Mamba and Falcon-H1 (their recurrent state is not checkpointed) and "
                   "for dynamic RoPE scaling")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model folder or file name)")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the PEFT LoRA adapter folder DIR as model id NAME beside the "
                   "base model (repeatable); requests for different adapters share batches")  # fmt: skip
    p.add_argument("--rag-store", default=None, metavar="DIR|URL",
                   help="serve /v1/rag/* over the RAG store in DIR, or at a "
                   "postgresql://USER@HOST:PORT/DB[?schema=NAME] URL that several servers "
                   "may share (default: RAG routes off)")  # fmt: skip
    p.add_argument("--rag-uploads", default=None, metavar="DIR",
                   help="where uploaded files are kept (default: DIR/uploads of a store "
                   "folder; ./.falconet-rag-uploads for a postgresql:// store)")  # fmt: skip
    p.add_argument("--rag-root", action="append", default=[], metavar="DIR",
                   help="a folder whose files clients may ingest by path (repeatable)")  # fmt: skip
    p.add_argument("--rag-max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help="largest file accepted as an upload by POST /v1/rag/documents "
                   f"(default {DEFAULT_MAX_UPLOAD_MB}; larger files can be ingested by path)")  # fmt: skip
    add_limit_flags(p, prefix="rag-")
    p.add_argument("--embedding-model", default=None, metavar="DIR",
                   help="a sentence-transformers model folder that /v1/embeddings and RAG "
                   "embed with (default: all-MiniLM-L6-v2, packaged; never downloaded)")  # fmt: skip
    g = p.add_argument_group("users and audit")
    g.add_argument("--state-dir", default=None, metavar="DIR",
                   help="folder of the users file and the audit log (default: "
                   "$FALCONET_STATE_DIR; none: single-user mode, no audit log). With users "
                   "in it (`falconet users add`), every route but /health needs a user's key "
                   "or session, and /v1/rag/* works on the caller's collections")  # fmt: skip
    g.add_argument("--audit-prompts", action="store_true",
                   help="keep each prompt's text in the audit log, not only its sha256 "
                   "and length")  # fmt: skip
    g.add_argument("--rate-limit", type=int, default=None, metavar="N",
                   help="requests per minute per user, 429 beyond (default: 600 with users, "
                   "else off; 0: off)")  # fmt: skip
    g.add_argument("--session-hours", type=float, default=SESSION_HOURS, metavar="H",
                   help=f"sign-in sessions expire after H hours (default {SESSION_HOURS:g})")  # fmt: skip
    p.add_argument("--timeout-keep-alive", type=float, default=KEEP_ALIVE_S, metavar="S",
                   help=f"close a connection idle this long between requests (default "
                   f"{KEEP_ALIVE_S:g})")  # fmt: skip
    p.add_argument("--timeout-header", type=float, default=HEAD_TIMEOUT_S, metavar="S",
                   help=f"a request line and headers must arrive within S seconds, else 408 "
                   f"and the connection is closed (default {HEAD_TIMEOUT_S:g})")  # fmt: skip
    p.add_argument("--timeout-body", type=float, default=BODY_TIMEOUT_S, metavar="S",
                   help=f"a request body must arrive within S seconds plus 1 s per 16 KiB "
                   f"received, else 408 (default {BODY_TIMEOUT_S:g})")  # fmt: skip


def cmd_serve(args: argparse.Namespace, out: Out) -> int:
    import os
    from pathlib import Path

    from falconet.llm import DEFAULT_MODEL_DIR
    from falconet.server.serve import ServerSettings, open_access, serve

    name = args.served_model_name
    if name is None:
        name = (DEFAULT_MODEL_DIR if args.model is None else Path(args.model).expanduser()).name
        name = name or Path(args.model).expanduser().resolve().name  # "." or "~/m/"
    api_key = args.api_key
    if api_key is None:  # an unset or empty variable means no key
        api_key = os.environ.get("FALCONET_API_KEY") or None
    settings = ServerSettings(
        model_name=name, host=args.host, port=args.port, api_key=api_key,
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
        prefix_cache=args.prefix_cache,
        rag_store=args.rag_store, rag_roots=tuple(args.rag_root), rag_uploads=args.rag_uploads,
        rag_max_upload_mb=args.rag_max_upload_mb, rag_limits=limits_from_args(args, "rag-"),
        embedding_model=args.embedding_model,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_header=args.timeout_header, timeout_body=args.timeout_body,
        state_dir=args.state_dir or os.environ.get("FALCONET_STATE_DIR") or None,
        audit_prompts=args.audit_prompts, rate_limit=args.rate_limit,
        session_hours=args.session_hours,
    )  # fmt: skip
    access = open_access(settings)  # a bad users file is refused before the slow load
    adapters = read_adapters(args.adapter, name)  # and a bad adapter folder
    if adapters and args.tp != 1:
        raise UsageError("--adapter runs with --tp 1 (LoRA updates in one process)")
    llm = load_model(args)  # the server's startup log names its family and licence
    for adapter_name, adapter in adapters.items():
        llm.add_adapter(adapter_name, adapter)
    serve(llm, settings, lambda line: print(line, file=sys.stderr, flush=True), access)
    return 0


def read_adapters(specs: list[str], model_name: str) -> dict:
    """--adapter NAME=DIR flags -> NAME -> the adapter folder read and checked
    (models/adapters.py); AdapterError or UsageError names the flag's problem."""
    from falconet.models.adapters import read_peft_adapter

    adapters = {}
    for spec in specs:
        adapter_name, sep, folder = spec.partition("=")
        if not sep or not adapter_name or not folder:
            raise UsageError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter legal=./lora")
        if adapter_name == model_name or adapter_name in adapters:
            raise UsageError(
                f"--adapter {spec!r}: the model id {adapter_name!r} is taken; give each adapter "
                "its own name"
            )
        adapters[adapter_name] = read_peft_adapter(folder)
    return adapters
