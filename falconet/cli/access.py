"""`falconet users`, `falconet collections` and `falconet audit`: the users file and the
audit log of `falconet serve --state-dir DIR`, managed on the server's machine.

    falconet users add NAME [--admin] [--collection C]...   prints the user's API key, once
    falconet users list | remove NAME
    falconet collections add NAME [--member USER]... | list | remove NAME
    falconet collections grant COLLECTION USER | revoke COLLECTION USER
    falconet audit verify                                   exit 1 naming the first bad record
    falconet audit export --since DATE [--format csv|jsonl] [--output FILE]

Every command takes --state-dir DIR (default $FALCONET_STATE_DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from falconet.cli.common import Out, UsageError
from falconet.errors import AccessError


def add_parsers(sub) -> None:
    users = sub.add_parser("users", help="users of a multi-user server (API keys)")
    u = users.add_subparsers(dest="action", required=True, parser_class=type(users))
    p = u.add_parser("add", help="create a user and print its API key (shown once)")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may manage users and collections")
    p.add_argument("--collection", action="append", default=[], metavar="NAME",
                   help="make the user a member of this existing collection (repeatable)")  # fmt: skip
    u.add_parser("list", help="users, admins and their collections")
    p = u.add_parser("remove", help="remove a user: its key and sessions stop working at once")
    p.add_argument("name")

    colls = sub.add_parser("collections", help="collections of documents, each its own store")
    c = colls.add_subparsers(dest="action", required=True, parser_class=type(colls))
    p = c.add_parser("add", help="create an empty collection")
    p.add_argument("name")
    p.add_argument("--member", action="append", default=[], metavar="USER",
                   help="an existing user who may use it (repeatable)")  # fmt: skip
    c.add_parser("list", help="collections and their members")
    p = c.add_parser("remove", help="remove a collection (its store folder stays on disk)")
    p.add_argument("name")
    for action, what in (("grant", "add USER to COLLECTION"),
                         ("revoke", "take USER out of COLLECTION")):  # fmt: skip
        p = c.add_parser(action, help=what)
        p.add_argument("collection")
        p.add_argument("user")

    audit = sub.add_parser("audit", help="the server's hash-chained audit log")
    a = audit.add_subparsers(dest="action", required=True, parser_class=type(audit))
    a.add_parser("verify", help="check every record against the chain (exit 1 if broken)")
    p = a.add_parser("export", help="write records as CSV or JSON lines")
    p.add_argument("--since", required=True, metavar="DATE",
                   help="first time to include: 2026-01-31 or 2026-01-31T08:00:00Z (UTC)")  # fmt: skip
    p.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="default: stdout")

    for p in (*u.choices.values(), *c.choices.values(), *a.choices.values()):
        p.add_argument("--state-dir", default=None, metavar="DIR",
                       help="the server's --state-dir (default: $FALCONET_STATE_DIR)")  # fmt: skip


def _state_dir(args: argparse.Namespace) -> Path:
    value = args.state_dir or os.environ.get("FALCONET_STATE_DIR")
    if not value:
        raise UsageError("--state-dir DIR is required (or set FALCONET_STATE_DIR): the folder "
                         "`falconet serve --state-dir` keeps users and the audit log in")  # fmt: skip
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AccessError(f"--state-dir {value} is a file; give a folder")
    return folder


def _users(args: argparse.Namespace, create: bool = False):
    from falconet.access.users import USERS_FILE, AccessDB

    return AccessDB(_state_dir(args) / USERS_FILE, create=create)


def cmd_users(args: argparse.Namespace, out: Out) -> int:
    from falconet.access.users import check_collection_name, check_user_name

    if args.action == "add":
        check_user_name(args.name)  # before the users file is created
        for c in args.collection:
            check_collection_name(c)
        db = _users(args, create=True)
        for c in args.collection:
            if db.collection(c) is None:
                raise AccessError(f"no collection {c!r}; create it first with "
                                  f"`falconet collections add {c}`")  # fmt: skip
        key = db.add_user(args.name, args.admin)
        for c in args.collection:
            db.grant(args.name, c)
        print(f"falconet: user {args.name!r} created{' (admin)' if args.admin else ''}; its "
              "API key, shown only this once:", file=sys.stderr)  # fmt: skip
        out(key + "\n")
    elif args.action == "list":
        for user in _users(args).users():
            role = "admin" if user.admin else "user"
            out(f"{user.name}\t{role}\t{','.join(user.collections) or '-'}\n")
    else:
        _users(args).remove_user(args.name)
        print(f"falconet: user {args.name!r} removed", file=sys.stderr)
    return 0


def cmd_collections(args: argparse.Namespace, out: Out) -> int:
    from falconet.access.users import check_collection_name, check_user_name

    if args.action == "add":
        check_collection_name(args.name)
        db = _users(args, create=True)
        for u in args.member:
            if db.user(check_user_name(u)) is None:
                raise AccessError(f"no user {u!r}; create it first with `falconet users add`")
        db.add_collection(args.name)
        for u in args.member:
            db.grant(u, args.name)
        print(f"falconet: collection {args.name!r} created", file=sys.stderr)
    elif args.action == "list":
        for c in _users(args).collections():
            out(f"{c.name}\t{','.join(c.members) or '-'}\n")
    elif args.action == "remove":
        _users(args).remove_collection(args.name)
        print(f"falconet: collection {args.name!r} removed", file=sys.stderr)
    elif args.action == "grant":
        _users(args).grant(args.user, args.collection)
    else:
        _users(args).revoke(args.user, args.collection)
    return 0


def cmd_audit(args: argparse.Namespace, out: Out) -> int:
    from falconet.access.audit import AUDIT_FILE, AuditLog, parse_since

    since = parse_since(args.since) if args.action == "export" else None
    log = AuditLog(_state_dir(args) / AUDIT_FILE, create=False)
    if args.action == "verify":
        verdict = log.verify()
        if not verdict.ok:
            print(f"falconet: audit log {log.path} is broken: {verdict.problem} "
                  f"({verdict.records} records before it hold)", file=sys.stderr)  # fmt: skip
            return 1
        out(f"audit log OK: {verdict.records} records, head {verdict.head}\n")
        return 0
    if args.output is None:
        n = log.export(sys.stdout, since, args.format)
    else:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            n = log.export(f, since, args.format)
    print(f"falconet: exported {n} audit records", file=sys.stderr)
    return 0
