"""The audit log and the `users`, `collections` and `audit` commands: every request a real
`falconet serve --state-dir` answers is recorded, an edited or deleted record makes
`falconet audit verify` fail naming the first bad one, and a server killed (SIGKILL) while
logging leaves a chain that verifies."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time

import httpx
import pytest

from tests.access_tools import ENV, add_user, audit_rows, cli, cli_here, copy_db
from tests.server_tools import ServerProcess

T = 120
CHAT = [{"role": "user", "content": "Which payments did the alpha team make?"}]


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- the CLI -----------------------------------------------------------------------------


def test_users_and_collections_commands(tmp_path):
    state = str(tmp_path / "state")
    key = add_user(tmp_path / "state", "root", "--admin")
    assert key.startswith("fnk_") and len(key) == 4 + 16 + 1 + 64
    assert cli_here("collections", "add", "legal", "--state-dir", state).returncode == 0
    key2 = add_user(tmp_path / "state", "lena", "--collection", "legal")
    assert key2 != key
    r = cli_here("users", "list", "--state-dir", state)
    assert r.returncode == 0 and r.stdout.splitlines() == ["lena\tuser\tlegal", "root\tadmin\t-"]
    assert key not in r.stdout + r.stderr and key2 not in r.stdout + r.stderr
    assert cli_here("collections", "grant", "legal", "root", "--state-dir", state).returncode == 0
    r = cli_here("collections", "list", "--state-dir", state)
    assert r.stdout.splitlines() == ["legal\tlena,root"]
    assert cli_here("collections", "revoke", "legal", "root", "--state-dir", state).returncode == 0
    assert cli_here("users", "remove", "lena", "--state-dir", state).returncode == 0
    assert cli_here("users", "list", "--state-dir", state).stdout.splitlines() == ["root\tadmin\t-"]
    # the key is not printed again by anything, and the env variable names the folder too
    r = cli("users", "list", env={"FALCONET_STATE_DIR": state})  # a real process, too
    assert r.returncode == 0 and "root" in r.stdout


def test_bad_command_lines(tmp_path):
    state = tmp_path / "state"
    add_user(state, "root", "--admin")
    add_user(state, "other")
    (tmp_path / "afile").write_text("x")
    s = ["--state-dir", str(state)]
    cases = [
        # (argv, words the one-line error must hold)
        (["users", "add", "../etc"], "not valid"),
        (["users", "add", "a" * 65], "not valid"),
        (["users", "add", "-x", *s], "arguments"),
        (["users", "add", "white space", *s], "not valid"),
        (["users", "add", "émile", *s], "not valid"),
        (["users", "add", "<script>", *s], "not valid"),
        (["users", "add", "root", *s], "exists already"),
        (["users", "add", "new", "--collection", "nope", *s], "no collection 'nope'"),
        (["users", "add", "new", "--collection", "UPPER", *s], "not valid"),
        (["users", "add", "x"], "--state-dir DIR is required"),
        (["users", "list", "--state-dir", str(tmp_path / "afile")], "is a file"),
        (["users", "list", "--state-dir", str(tmp_path / "empty")], "no users file"),
        (["users", "remove", "ghost", *s], "no user 'ghost'"),
        (["users", "remove", "root", *s], "last admin"),
        (["collections", "add", "Bad Name", *s], "not valid"),
        (["collections", "add", "c1", "--member", "ghost", *s], "no user 'ghost'"),
        (["collections", "grant", "nope", "root", *s], "no collection 'nope'"),
        (["collections", "remove", "nope", *s], "no collection 'nope'"),
        (["audit", "verify", *s], "no audit log"),
        (["audit", "export", "--since", "yesterday", *s], "is not a date"),
        (["audit", "export", "--since", "2026-01-01", "--format", "xml", *s], "invalid choice"),
        (["audit", "export", *s], "--since"),
        (["users"], "required"),
    ]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "users.sqlite3").write_bytes(b"not a database " * 100)
    (garbage / "audit.sqlite3").write_bytes(b"\x00" * 4096 + b"junk")
    cases += [
        (["users", "list", "--state-dir", str(garbage)], "not a falconet users file"),
        (["audit", "verify", "--state-dir", str(garbage)], "not a falconet audit log"),
    ]
    for argv, words in cases:
        r = cli_here(*argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("falconet: error:"), (argv, r.stderr)
        assert words in lines[0], (argv, lines[0])
    assert cli_here("users", "list", *s).stdout.splitlines() == ["other\tuser\t-", "root\tadmin\t-"]
    assert not (tmp_path / "empty").exists()  # a failed command leaves no users file behind


def test_bad_serve_flags_are_refused_before_the_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "users.sqlite3").write_bytes(b"not a database " * 100)
    cases = [
        (["--rate-limit", "-1"], "--rate-limit"),
        (["--rate-limit", "many"], "--rate-limit"),
        (["--session-hours", "0"], "--session-hours"),
        (["--session-hours", "nan"], "--session-hours"),
        (["--audit-prompts"], "--audit-prompts needs --state-dir"),
        (["--state-dir", str(tmp_path / "afile")], "is a file"),
        (["--state-dir", str(garbage)], "not a falconet users file"),
    ]
    for flags, words in cases:
        r = cli("serve", "--port", "0", *flags)  # a real process: a wrong pass would serve
        assert r.returncode == 2, (flags, r.stderr)
        assert words in r.stderr.strip().splitlines()[-1], (flags, r.stderr)


# --- every request is logged ---------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    state = tmp_path_factory.mktemp("audit") / "state"
    keys = {"alice": add_user(state, "alice"), "root": add_user(state, "root", "--admin")}
    server = ServerProcess("--state-dir", str(state), "--audit-prompts", env=ENV).wait_ready()
    try:
        yield {"url": server.url, "state": state, "keys": keys, "server": server}
    finally:
        server.stop()


def test_every_request_is_logged_with_its_user_route_and_prompt(logged):
    url, state, alice = logged["url"], logged["state"], logged["keys"]["alice"]
    auth = {"Authorization": f"Bearer {alice}"}
    before = len(audit_rows(state))
    sent = [
        ("GET", "/v1/models", {"headers": auth}, 200, "alice"),
        ("GET", "/v1/models", {}, 401, None),
        ("POST", "/v1/chat/completions", {"headers": auth, "json": {
            "model": "falconet-tiny", "messages": CHAT, "max_tokens": 2}}, 200, "alice"),
        ("POST", "/v1/completions", {"headers": auth, "json": {"prompt": "And", "max_tokens": 1,
                                                               "stream": True}}, 200, "alice"),
        ("POST", "/tokenize", {"headers": auth, "json": {"prompt": "héllo"}}, 200, "alice"),
        ("POST", "/v1/completions", {"headers": auth, "content": b"{"}, 400, "alice"),
        ("GET", "/nowhere", {"headers": auth}, 404, "alice"),
        ("GET", "/health", {}, 200, None),
        ("POST", "/v1/auth/session", {"json": {"api_key": alice}}, 200, "alice"),
        ("POST", "/v1/auth/session", {"json": {"api_key": "fnk_wrong"}}, 401, None),
        ("GET", "/v1/admin/users", {"headers": {"Authorization": f"Bearer {logged['keys']['root']}"}},
         200, "root"),
    ]  # fmt: skip
    for method, path, kw, status, _ in sent:
        r = httpx.request(method, f"{url}{path}", timeout=T, **kw)
        assert r.status_code == status, (path, r.text)
    rows = audit_rows(state)[before:]  # committed before each answer's last byte
    assert len(rows) == len(sent)
    for row, (method, path, _, status, user) in zip(rows, sent, strict=True):
        assert (row["method"], row["route"], row["status"], row["user"]) == (
            method, path, status, user)  # fmt: skip
        assert row["time"].endswith("Z")
    chat = rows[2]
    text = canonical(CHAT)
    assert chat["model"] == "falconet-tiny" and chat["prompt"] == text
    assert chat["prompt_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert chat["prompt_chars"] == len(text)
    assert rows[4]["prompt"] == "héllo" and rows[4]["prompt_chars"] == 5
    assert rows[5]["prompt_sha256"] is None  # a body that is not JSON has no prompt
    for row in rows[8:10]:  # a key is never a prompt and never logged
        assert row["prompt"] is None and alice not in json.dumps(row)
    r = cli_here("audit", "verify", "--state-dir", str(state))
    assert r.returncode == 0 and f"{len(audit_rows(state))} records" in r.stdout, r.stderr


def test_export_since_as_csv_and_json_lines(logged, tmp_path):
    state = str(logged["state"])
    assert httpx.get(f"{logged['url']}/health", timeout=T).status_code == 200
    rows = audit_rows(logged["state"])
    out = tmp_path / "all.jsonl"
    r = cli_here("audit", "export", "--since", "2000-01-01", "-o", str(out), "--state-dir", state)
    assert r.returncode == 0, r.stderr
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["seq"] for e in exported[: len(rows)]] == [row["seq"] for row in rows]
    assert exported[0]["documents"] == [] and exported[0]["hash"] == rows[0]["hash"]
    r = cli_here(
        "audit", "export", "--since", rows[-1]["time"], "--format", "csv", "--state-dir", state
    )
    lines = r.stdout.splitlines()
    assert lines[0].startswith("seq,time,user,method,route,status,model")
    assert lines[1].startswith(f"{rows[-1]['seq']},{rows[-1]['time']},")
    r = cli_here("audit", "export", "--since", "2999-01-01", "--state-dir", state)
    assert r.returncode == 0 and r.stdout == ""


def tamper(state, tmp_path, sql: str, args=()):
    """A copy of the state folder whose audit log has had `sql` run on it."""
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    copy_db(state / "audit.sqlite3", copy / "audit.sqlite3")
    db = sqlite3.connect(copy / "audit.sqlite3")
    with db:
        db.execute(sql, args)
    db.close()
    return cli_here("audit", "verify", "--state-dir", str(copy))


def test_an_edited_or_deleted_record_fails_verify_naming_it(logged, tmp_path):
    state = logged["state"]
    for _ in range(3):
        httpx.get(f"{logged['url']}/health", timeout=T)
    rows = audit_rows(state)
    n = len(rows)
    k = rows[n // 2]["seq"]
    edits = [
        ("UPDATE audit SET status = status + 1 WHERE seq = ?", (2,), 2, "edited"),
        ("UPDATE audit SET user = 'mallory' WHERE seq = ?", (k,), k, "edited"),
        ("UPDATE audit SET route = route || 'x' WHERE seq = ?", (3,), 3, "edited"),
        ("UPDATE audit SET documents = '[\"x\"]' WHERE seq = ?", (k,), k, "edited"),
        ("DELETE FROM audit WHERE seq = ?", (k,), k, "missing"),
        ("DELETE FROM audit WHERE seq = ?", (1,), 1, "missing"),
        ("DELETE FROM audit WHERE seq >= ?", (n - 1,), n - 1, "missing"),  # the tail
    ]
    for sql, args, bad, word in edits:
        r = tamper(state, tmp_path, sql, args)
        assert r.returncode == 1, (sql, r.stdout, r.stderr)
        assert f"record {bad}:" in r.stderr and word in r.stderr, (sql, r.stderr)
    # an edit that also rewrites the record's own hash is caught by the next record
    row = rows[k - 1]
    row = {**row, "user": "mallory", "documents": json.loads(row["documents"])}
    from falconet.access.audit import record_hash

    r = tamper(state, tmp_path, "UPDATE audit SET user = 'mallory', hash = ? WHERE seq = ?",
               (record_hash(row), k))  # fmt: skip
    assert r.returncode == 1 and f"record {k + 1}:" in r.stderr, r.stderr
    assert cli_here("audit", "verify", "--state-dir", str(state)).returncode == 0  # the original


# --- SIGKILL while logging ---------------------------------------------------------------


def hammer(url: str, path: str, body, stop: threading.Event) -> None:
    """Requests one after another until `stop` or the server is gone."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            try:
                client.request("POST" if body else "GET", f"{url}{path}", json=body)
            except httpx.HTTPError:  # a slow answer on a busy machine, or the server gone
                continue


def test_sigkill_while_logging_leaves_a_valid_chain(tmp_path):
    """Single-user mode with a state folder: no users, but every request is audited. Two
    clients keep the log busy; the server is killed once the log passes a mark, twice."""
    state = tmp_path / "state"
    total = 0
    for _ in range(2):
        server = ServerProcess("--state-dir", str(state), env=ENV).wait_ready()
        stop = threading.Event()

        threads = [threading.Thread(target=hammer, args=(server.url, "/v1/models", None, stop)),
                   threading.Thread(target=hammer, args=(server.url, "/tokenize",
                                                         {"prompt": "And"}, stop))]  # fmt: skip
        for t in threads:
            t.start()
        try:
            mark = total + 40
            give_up = time.monotonic() + 600  # only so a broken server cannot hang the suite
            while len(audit_rows(state)) < mark:
                assert server.proc.poll() is None, "\n".join(server.lines)
                assert time.monotonic() < give_up, "the audit log stopped growing"
                time.sleep(0.05)  # a poll, not a measurement
            server.proc.kill()  # SIGKILL, mid-stream of records
            server.proc.wait()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            server.stop()
        r = cli_here("audit", "verify", "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        rows = audit_rows(state)
        assert len(rows) >= mark and [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
        assert {row["user"] for row in rows} == {"local"}  # single-user mode, no key needed
        total = len(rows)
