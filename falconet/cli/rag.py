"""`falconet rag ...`: ingest, sync, list, remove and search a local document store.

falconet/cli/main.py registers these; errors are raised as FalconetError subclasses and
turned into one line + exit 2 there.
"""

from __future__ import annotations

import argparse
import sys

from falconet.cli.common import Out, add_model_flags, load_model

DEFAULT_STORE = ".falconet-rag"
EXCERPT_CHARS = 240


def add_rag_parser(sub, parser_class) -> None:
    from falconet.rag.retrieve import DEFAULT_MODE, MODES
    from falconet.request_rules import RAG_MAX_TOKENS

    rag = sub.add_parser("rag", help="retrieval over your own documents (ingest, sync, search)")
    cmds = rag.add_subparsers(dest="rag_command", required=True, parser_class=parser_class,
                              metavar="{ingest,sync,list,remove,search}")  # fmt: skip

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help)
        p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR|URL",
                       help=f"store folder (default ./{DEFAULT_STORE}; the file store.sqlite3 "
                       "inside) or a postgresql://USER@HOST:PORT/DB[?schema=NAME] URL (a store "
                       "shared by several processes; pip install falconet[postgres])")  # fmt: skip
        return p

    ingest = command("ingest", help="add or update files (.txt .md .html .pdf) and folders")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    add_limit_flags(ingest)
    sync = command("sync", help="make the store match a folder: add, update and remove documents")
    sync.add_argument("folder")
    add_limit_flags(sync)
    command("list", help="the documents in the store")
    remove = command("remove", help="remove a document (by id, id prefix or path)")
    remove.add_argument("doc", metavar="DOC")
    search = command("search", help="the passages that best match a query")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="passages to show (default 5)")
    search.add_argument("--mode", default=DEFAULT_MODE, choices=MODES,
                        help="hybrid (default) fuses bm25 and vector rankings (RRF, k=60)")  # fmt: skip
    search.add_argument("--ann", action="store_true",
                        help="vector candidates from an approximate usearch index (cached "
                        "beside the store, rebuilt when stale; pip install falconet[ann])")  # fmt: skip
    ask = command("ask", help="answer a question from the store's passages, citing them as [n]")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=5, help="passages to retrieve (default 5)")
    ask.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    ask.add_argument("--ann", action="store_true", help="as for `rag search`")
    ask.add_argument("--max-tokens", type=int, default=None,
                     help=f"answer length (default: up to {RAG_MAX_TOKENS}, what the model's "
                     "context leaves after the passages)")  # fmt: skip
    ask.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")

    add_model_flags(ask)  # the same --model/--dtype/--device/--quant


def add_limit_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The per-document ingestion limits as flags (`falconet serve`: prefix "rag-")."""
    from falconet.rag.ingest import MIN_TOKEN_BUDGET, IngestLimits

    default = IngestLimits()
    p.add_argument(f"--{prefix}max-file-mb", type=int, default=default.max_file_mb, metavar="MB",
                   help="largest file read, checked before it is opened "
                   f"(default {default.max_file_mb})")  # fmt: skip
    p.add_argument(f"--{prefix}max-chunks", type=int, default=default.max_chunks, metavar="N",
                   help=f"chunks one document may make (default {default.max_chunks})")  # fmt: skip
    p.add_argument(f"--{prefix}max-tokens-per-byte", type=float, metavar="X",
                   default=default.max_tokens_per_byte,
                   help="embedder tokens a document may have per byte of its text, or "
                   f"{MIN_TOKEN_BUDGET} if more (default {default.max_tokens_per_byte}; text "
                   "runs at 0.2-0.4, a wall of punctuation at 1)")  # fmt: skip


def limits_from_args(args: argparse.Namespace, prefix: str = ""):
    """The IngestLimits that `add_limit_flags(p, prefix)` parsed, checked."""
    from falconet.rag.ingest import IngestLimits

    key = prefix.replace("-", "_")
    return IngestLimits(
        max_file_mb=getattr(args, key + "max_file_mb"),
        max_chunks=getattr(args, key + "max_chunks"),
        max_tokens_per_byte=getattr(args, key + "max_tokens_per_byte"),
        flag_prefix=prefix,
    ).checked()


def cmd_rag(args: argparse.Namespace, out: Out) -> int:
    import sqlite3

    from falconet.errors import RagError

    try:
        return _COMMANDS[args.rag_command](args, out)
    except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e):
            raise RagError(f"the RAG store in {args.store}: {e}") from e
        raise RagError(
            f"the RAG store in {args.store} stayed locked by another process writing it; "
            "try again when that one has finished"
        ) from e
    except sqlite3.DatabaseError as e:  # a page damaged after the store was opened
        raise RagError(
            f"the RAG store in {args.store} is damaged ({e}); move it aside and ingest again"
        ) from e


def _open(args: argparse.Namespace, create: bool = False):
    from falconet.rag.stores import open_store

    return open_store(args.store, create=create)


def _warn(message: str) -> None:
    print(f"falconet: warning: {message}", file=sys.stderr, flush=True)


def _run_ingest(args: argparse.Namespace, out: Out, desc: str, job) -> int:
    from tqdm import tqdm

    from falconet.rag.embed import default_embedder

    bar = None

    def progress(done: int, total: int, path: str | None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True, file=sys.stderr)
        bar.update(done - bar.n)

    with _open(args, create=True) as store:  # a broken store fails before the slow load
        embedder = default_embedder()
        try:
            report = job(store, embedder, progress)
        finally:
            if bar is not None:
                bar.close()
    for path, why in report.skipped:  # loader messages name the file already
        _warn(f"skipped {why}" if path in why else f"skipped {path}: {why}")
    out(report.summary() + "\n")
    return 0


def cmd_ingest(args: argparse.Namespace, out: Out) -> int:
    from falconet.rag.ingest import checked_path, ingest

    limits = limits_from_args(args)
    for p in args.paths:  # before the slow embedder load
        checked_path(p)

    def job(store, embedder, progress):
        return ingest(store, args.paths, embedder, limits=limits, progress=progress)

    return _run_ingest(args, out, "ingest", job)


def cmd_sync(args: argparse.Namespace, out: Out) -> int:
    from falconet.errors import RagError
    from falconet.rag.ingest import checked_path, sync

    limits = limits_from_args(args)
    if not checked_path(args.folder)[1]:
        raise RagError(f"{args.folder}: not a folder (sync takes a folder; use ingest for files)")

    def job(store, embedder, progress):
        return sync(store, args.folder, embedder, limits=limits, progress=progress)

    return _run_ingest(args, out, "sync", job)


def cmd_list(args: argparse.Namespace, out: Out) -> int:
    with _open(args) as store:
        docs = store.documents()
    if not docs:
        out("no documents (add some with `falconet rag ingest PATH`)\n")
        return 0
    out(f"{'id':<12}  {'version':>7}  {'chunks':>6}  source\n")
    for d in docs:
        out(f"{d.id[:12]}  {d.version:>7}  {d.chunks:>6}  {d.source}\n")
    return 0


def cmd_remove(args: argparse.Namespace, out: Out) -> int:
    with _open(args) as store:
        doc = store.remove_document(args.doc)
    out(f"removed {doc.source} ({doc.id[:12]}, {doc.chunks} chunks)\n")
    return 0


def _search(args: argparse.Namespace, query: str) -> list:
    from falconet.errors import RagError
    from falconet.rag.retrieve import needs_embedder, search

    if args.k < 1:
        raise RagError(f"-k must be at least 1, got {args.k}")
    with _open(args) as store:
        if store.embedder_id is None:  # nothing ingested yet
            return []
        embedder = None
        if needs_embedder(args.mode):
            from falconet.rag.embed import default_embedder

            embedder = default_embedder()
        return search(store, query, args.k, args.mode, embedder, ann=args.ann)


def cmd_search(args: argparse.Namespace, out: Out) -> int:
    hits = _search(args, args.query)
    if not hits:
        out("no matching passages\n")
        return 0
    from falconet.rag.answer import location

    for n, h in enumerate(hits, start=1):
        where = location(h)
        text = " ".join(h.text.split())
        if len(text) > EXCERPT_CHARS:
            text = text[: EXCERPT_CHARS - 3] + "..."
        out(f"[{n}] {where} (chars {h.start}-{h.end}, score {h.score:.4f})\n    {text}\n")
    return 0


def cmd_ask(args: argparse.Namespace, out: Out) -> int:
    """Retrieve, then stream the model's answer and print the numbered sources it saw."""
    from falconet.engine import Engine
    from falconet.rag.answer import location, stream_answer
    from falconet.sampling import SamplingParams

    # with no --max-tokens the answer gets the default length (rag/answer.py), fitted there
    asked = args.max_tokens
    params = SamplingParams(max_tokens=1 if asked is None else asked,
                            temperature=args.temperature)  # fmt: skip
    hits = _search(args, args.question)
    if not hits:
        out("no passages in the store match the question; ingest documents first\n")
        return 0
    engine = Engine.from_llm(load_model(args, answering=True), max_batch=1)
    engine.start()
    try:
        sources, pieces = stream_answer(engine, args.question, hits, params,
                                         default_length=asked is None)  # fmt: skip
        for piece in pieces:
            out(piece)
    finally:
        engine.shutdown()
    out("\n\nSources:\n")
    for s in sources:
        out(f"[{s.number}] {location(s.hit)} (chars {s.hit.start}-{s.hit.end})\n")
    return 0


_COMMANDS = {"ingest": cmd_ingest, "sync": cmd_sync, "list": cmd_list, "remove": cmd_remove,
             "search": cmd_search, "ask": cmd_ask}  # fmt: skip
