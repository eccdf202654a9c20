"""`falconet batch run`: score every record of a JSON Lines input with a prompt template,
exactly once (falconet/batch/). SIGINT and SIGTERM stop it cleanly: what finished is
written, what was in flight stays pending in the ledger for the next run."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from falconet.cli.common import (
    Out,
    UsageError,
    add_model_flags,
    add_sampling_flags,
    announce,
    load_model,
    sampling_params,
)
from falconet.errors import BatchError


def add_batch_parser(sub, parser_class) -> None:
    from falconet.batch import BatchSettings

    default = BatchSettings(Path("-"), "", Path("-"))
    batch = sub.add_parser("batch", help="score a file of records with a prompt, exactly once")
    cmds = batch.add_subparsers(dest="batch_command", required=True, parser_class=parser_class)
    run = cmds.add_parser("run", help="run (or resume) a batch job")
    run.add_argument(
        "--input", required=True, type=Path, help="a JSON Lines file, or a folder of *.jsonl files"
    )
    run.add_argument(
        "--prompt",
        required=True,
        type=Path,
        metavar="TEMPLATE",
        help="jinja2 template file over each record's fields (sandboxed)",
    )
    run.add_argument("--out", required=True, type=Path, help="results file (JSON Lines)")
    run.add_argument(
        "--schema",
        type=Path,
        default=None,
        help="JSON schema file the output must follow (structured output)",
    )
    run.add_argument(
        "--key",
        default=None,
        metavar="FIELD",
        help="field that identifies a record (default: its content hash)",
    )
    run.add_argument(
        "--follow",
        action="store_true",
        help="keep reading the growing file or folder until SIGINT/SIGTERM",
    )
    run.add_argument(
        "--ledger",
        default=None,
        metavar="PATH|URL",
        help="ledger file (default: OUT.ledger beside the results), or a PostgreSQL ledger "
        "shared by several workers: postgresql://user@host/db?schema=NAME",
    )
    run.add_argument(
        "--rejects",
        type=Path,
        default=None,
        help="rejects file (default: OUT's name with .rejects.jsonl)",
    )
    run.add_argument(
        "--max-batch",
        type=int,
        default=default.max_batch,
        metavar="N",
        help=f"sequences decoded together (default {default.max_batch})",
    )
    run.add_argument(
        "--max-record-bytes",
        type=int,
        default=default.max_record_bytes,
        metavar="N",
        help="longest input line taken as a record",
    )
    run.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS (host:port, auto, or local for one started "
        "here), one model per worker; needs falconet[ray] and, unless every node is this "
        "machine, a PostgreSQL --ledger",
    )
    run.add_argument(
        "--ray-workers",
        type=int,
        default=2,
        metavar="N",
        help="Ray actors, each loading the model once (default 2)",
    )
    add_model_flags(run)
    add_sampling_flags(run, max_tokens=64)


def cmd_batch(args: argparse.Namespace, out: Out) -> int:
    from falconet.batch import BatchJob, BatchSettings

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_record_bytes < 1:
        raise UsageError(f"--max-record-bytes must be at least 1, got {args.max_record_bytes}")
    settings = BatchSettings(
        input=args.input,
        template=_read_text(args.prompt, "--prompt"),
        template_name=f"--prompt {args.prompt}",
        out=args.out,
        params=sampling_params(args),
        schema=_read_schema(args.schema) if args.schema else None,
        key_field=args.key,
        follow=args.follow,
        ledger=args.ledger,
        rejects=args.rejects,
        max_batch=args.max_batch,
        max_record_bytes=args.max_record_bytes,
    )
    settings.check()  # before the (slow) load
    if args.ray is not None:
        job = _ray_job(args, settings)
    else:
        llm = load_model(args)
        job = BatchJob(llm, settings)  # checks the input, template, schema and ledger
        announce(llm)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _Bar()
    try:
        final = job.run(bar.update, stop.is_set)
    finally:
        bar.close()
        job.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    stopped = " (stopped; run again to go on)" if final.pending else ""
    out(
        f"{final.done} done, {final.rejected} rejected, {final.pending} pending, "
        f"{final.duplicates} duplicates skipped{stopped}\n"
    )
    return 0


def _ray_job(args: argparse.Namespace, settings):
    """The job on a Ray cluster: this process loads no model, each worker loads one."""
    from falconet.batch.ray_job import RayBatchJob

    if args.ray_workers < 1:
        raise UsageError(f"--ray-workers must be at least 1, got {args.ray_workers}")
    if args.follow:
        raise UsageError("--follow is not supported with --ray yet; run it without --ray")
    load = {"dtype": args.dtype, "device": args.device, "quant": args.quant}
    return RayBatchJob(settings, args.ray, args.model, args.ray_workers, load)


class _Bar:
    """A tqdm bar on stderr: records finished (done or rejected), records/s and ETA."""

    def __init__(self) -> None:
        self._bar = None

    def update(self, progress) -> None:
        from tqdm import tqdm

        finished = progress.done + progress.rejected
        if self._bar is None:
            print(
                f"falconet batch: {finished} of {progress.total or '?'} records finished "
                "before this run",
                file=sys.stderr,
                flush=True,
            )
            self._bar = tqdm(
                total=progress.total,
                initial=finished,
                unit="rec",
                file=sys.stderr,
                desc="batch",
                dynamic_ncols=True,
            )
        self._bar.total = progress.total
        self._bar.set_postfix(rejected=progress.rejected, refresh=False)
        self._bar.update(finished - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"{flag} {path}: cannot read it as text ({e})") from e


def _read_schema(path: Path) -> dict:
    try:
        schema = json.loads(_read_text(path, "--schema"))
    except json.JSONDecodeError as e:
        raise BatchError(f"--schema {path}: not JSON ({e})") from e
    if not isinstance(schema, dict):
        raise BatchError(f"--schema {path}: a JSON schema is an object")
    return schema
