"""Users, collections, sessions, CSRF, security headers and the rate limit, through a real
multi-user `falconet serve --state-dir` process and raw HTTP.

Alice is in collection alpha, Bob in beta, Carol in both; the admin is in none. Every
cross-tenant attempt in the table below must fail, and no answer to Bob may carry a trace of
Alice's document (its id, its words, its folder) through any route."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from falconet.access.users import SCRYPT
from falconet.rag.store import document_id
from tests.access_tools import ENV, add_user, cli_here
from tests.server_tools import ServerProcess, sse_events

T = 120
LEGACY_KEY = "legacy-service-key"
ALPHA = "The zanzibarite ledger lists every payment the alpha team made in March.\n"
BETA = "The quetzalcoatlite memo covers the beta team's travel plans for April.\n"
SECRET_WORD = "zanzibarite"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("access")
    state, store, root = base / "state", base / "store", base / "root"
    root.mkdir()
    (root / "shared.txt").write_text("A shared handbook on the server's disk.\n")
    keys = {"admin": add_user(state, "admin", "--admin")}
    for name in ("alpha", "beta"):
        assert cli_here("collections", "add", name, "--state-dir", str(state)).returncode == 0
    keys["alice"] = add_user(state, "alice", "--collection", "alpha")
    keys["bob"] = add_user(state, "bob", "--collection", "beta")
    keys["carol"] = add_user(state, "carol", "--collection", "alpha", "--collection", "beta")
    args = ["--state-dir", str(state), "--rag-store", str(store), "--rag-root", str(root),
            "--api-key", LEGACY_KEY, "--rate-limit", "100000"]  # fmt: skip
    procs = {"main": ServerProcess(*args, env=ENV)}
    limited = base / "limited"
    keys["u1"] = add_user(limited, "u1")
    keys["u2"] = add_user(limited, "u2")
    procs["limited"] = ServerProcess("--state-dir", str(limited), "--rate-limit", "5", env=ENV)
    try:
        for p in procs.values():
            p.wait_ready()
        url = procs["main"].url
        docs = {}
        for who, name, text in (("alice", "ledger.txt", ALPHA), ("bob", "memo.txt", BETA)):
            r = httpx.post(f"{url}/v1/rag/documents", headers=bearer(keys[who]), timeout=T,
                           files=[("file", (name, text.encode(), "text/plain"))])  # fmt: skip
            assert r.status_code == 200, r.text
            [(source, doc)] = r.json()["document_ids"].items()
            docs[who] = {"id": doc, "source": source}
        yield {"url": url, "keys": keys, "state": state, "store": store, "docs": docs,
               "limited": procs["limited"].url}  # fmt: skip
    finally:
        for p in procs.values():
            p.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def sign_in(url: str, key: str) -> tuple[httpx.Client, str]:
    """A client holding the session cookie, and the session's CSRF token."""
    client = httpx.Client(base_url=url, timeout=T)
    r = client.post("/v1/auth/session", json={"api_key": key})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf_token"]


# --- keys, sessions, CSRF --------------------------------------------------------------


def test_keys_are_stored_as_scrypt_hashes(site):
    raw = (site["state"] / "users.sqlite3").read_bytes()
    db = sqlite3.connect(site["state"] / "users.sqlite3")
    try:
        for name in ("alice", "bob"):
            key = site["keys"][name]
            _, key_id, secret = key.split("_")
            assert secret.encode() not in raw
            salt, digest = db.execute("SELECT key_salt, key_hash FROM users WHERE key_id = ?",
                                      (key_id,)).fetchone()  # fmt: skip
            assert digest == hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)
    finally:
        db.close()


def test_sign_in_sets_a_strict_http_only_cookie(site):
    r = httpx.post(f"{site['url']}/v1/auth/session", json={"api_key": site["keys"]["alice"]})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith("falconet_session=")
    for part in ("httponly", "samesite=strict", "path=/", "max-age="):
        assert part in cookie
    body = r.json()
    assert body["user"] == "alice" and body["collections"] == ["alpha"] and body["csrf_token"]
    assert r.headers["cache-control"] == "no-store"
    token = r.cookies["falconet_session"]
    db = sqlite3.connect(site["state"] / "users.sqlite3")
    try:  # the server keeps only the token's sha256
        stored = [row[0] for row in db.execute("SELECT token_sha256 FROM sessions")]
    finally:
        db.close()
    assert hashlib.sha256(token.encode()).digest() in stored
    assert token.encode() not in (site["state"] / "users.sqlite3").read_bytes()


def test_wrong_missing_and_expired_credentials_get_401(site):
    url, keys = site["url"], site["keys"]
    _, key_id, secret = keys["alice"].split("_")
    other_secret = ("0" if secret[0] != "0" else "1") + secret[1:]
    expired, _ = sign_in(url, keys["alice"])
    db = sqlite3.connect(site["state"] / "users.sqlite3")
    with db:
        digest = hashlib.sha256(expired.cookies["falconet_session"].encode()).digest()
        db.execute("UPDATE sessions SET expires = 1 WHERE token_sha256 = ?", (digest,))
    db.close()
    signed_out, csrf = sign_in(url, keys["alice"])
    assert signed_out.get("/v1/models").status_code == 200
    r = signed_out.delete("/v1/auth/session", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    attempts = {
        "nothing": {},
        "bearer without a key": {"Authorization": "Bearer"},
        "basic auth": {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        "not a key": bearer("hunter2"),
        "right id, wrong secret": bearer(f"fnk_{key_id}_{other_secret}"),
        "unknown id": bearer(f"fnk_{'0' * 16}_{secret}"),
        "truncated key": bearer(keys["alice"][:-1]),
        "garbage cookie": {"Cookie": "falconet_session=not-a-session"},
        "huge cookie": {"Cookie": "falconet_session=" + "a" * 4000},
        "expired session": {"Cookie": f"falconet_session={expired.cookies['falconet_session']}"},
        "signed-out session": {
            "Cookie": f"falconet_session={signed_out.cookies.get('falconet_session', 'x')}"
        },
    }
    for name, headers in attempts.items():
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/rag/documents"),
                             ("POST", "/v1/rag/query"), ("GET", "/v1/admin/users")):  # fmt: skip
            r = httpx.request(method, f"{url}{path}", headers=headers, timeout=T,
                              json={"query": SECRET_WORD} if method == "POST" else None)  # fmt: skip
            err = assert_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer", name
            assert SECRET_WORD not in r.text and site["docs"]["alice"]["id"] not in r.text
        assert httpx.get(f"{url}/health", headers=headers, timeout=T).status_code == 200
    assert "sign in" in err["message"]
    # signing in with a wrong key: 401, no cookie
    for key in ("", "fnk_x", keys["alice"] + "0", f"fnk_{key_id}_{other_secret}"):
        r = httpx.post(f"{url}/v1/auth/session", json={"api_key": key}, timeout=T)
        assert r.status_code in (400, 401) and "set-cookie" not in r.headers


def test_removed_user_is_locked_out_at_once(site):
    url, admin = site["url"], bearer(site["keys"]["admin"])
    r = httpx.post(f"{url}/v1/admin/users", json={"name": "dave", "collections": ["beta"]},
                   headers=admin, timeout=T)  # fmt: skip
    assert r.status_code == 200, r.text
    key = r.json()["api_key"]
    session, _ = sign_in(url, key)
    assert httpx.get(f"{url}/v1/rag/documents", headers=bearer(key), timeout=T).status_code == 200
    assert httpx.delete(f"{url}/v1/admin/users/dave", headers=admin, timeout=T).status_code == 200
    assert_error(httpx.get(f"{url}/v1/models", headers=bearer(key), timeout=T), 401)
    assert_error(session.get("/v1/models"), 401)


def test_csrf_on_cookie_sessions(site):
    url = site["url"]
    client, csrf = sign_in(url, site["keys"]["alice"])
    query = {"query": SECRET_WORD, "answer": False, "mode": "bm25"}
    own = {"X-CSRF-Token": csrf}
    forged = [
        {},
        {"X-CSRF-Token": ""},
        {"X-CSRF-Token": csrf[:-1] + ("0" if csrf[-1] != "0" else "1")},
        {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        {"X-CSRF-Token": csrf, "Origin": "null"},
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-site"},
    ]
    before = client.get("/v1/rag/documents").json()["data"]
    for headers in forged:
        assert_error(client.post("/v1/rag/query", json=query, headers=headers), 403,
                     "csrf_failed")  # fmt: skip
        r = client.delete(f"/v1/rag/documents/{site['docs']['alice']['id']}", headers=headers)
        assert_error(r, 403, "csrf_failed")
        assert_error(client.delete("/v1/auth/session", headers=headers), 403, "csrf_failed")
    assert client.get("/v1/rag/documents").json()["data"] == before  # nothing was deleted
    origin = {**own, "Origin": url, "Sec-Fetch-Site": "same-origin"}
    for headers in (own, origin):
        r = client.post("/v1/rag/query", json=query, headers=headers)
        assert r.status_code == 200 and SECRET_WORD in r.text
    # a bearer key is not sent by browsers on their own: no CSRF token needed
    r = httpx.post(f"{url}/v1/rag/query", json=query, headers=bearer(site["keys"]["alice"]),
                   timeout=T)  # fmt: skip
    assert r.status_code == 200
    # another site cannot sign a browser in either (login CSRF)
    for headers in forged[3:]:
        r = httpx.post(f"{url}/v1/auth/session", json={"api_key": site["keys"]["alice"]},
                       headers=headers, timeout=T)  # fmt: skip
        assert_error(r, 403, "csrf_failed")
        assert "set-cookie" not in r.headers
    # another user's CSRF token does not fit this session
    _, bobs = sign_in(url, site["keys"]["bob"])
    assert_error(client.post("/v1/rag/query", json=query, headers={"X-CSRF-Token": bobs}), 403)


# --- isolation ---------------------------------------------------------------------------


def cross_tenant_attempts(site) -> list[tuple[str, str, str, dict, int]]:
    """(name, method, path, request kwargs, status) of Bob reaching for Alice's documents."""
    alice = site["docs"]["alice"]
    ask = {"query": f"{SECRET_WORD} ledger payments", "k": 10, "max_tokens": 4}
    alpha = {"X-Falconet-Collection": "alpha"}
    folder = Path(alice["source"]).parents[2].name  # alpha-<id>
    guesses = [alice["id"], document_id(alice["source"]), "0" * 64, "../" + alice["id"],
               "%2e%2e%2f" + alice["id"], alice["id"].upper(), alice["source"]]  # fmt: skip
    table = [
        ("list alpha by header", "GET", "/v1/rag/documents", {"headers": alpha}, 404),
        ("list alpha by query", "GET", "/v1/rag/documents?collection=alpha", {}, 404),
        ("list alpha's folder", "GET", f"/v1/rag/documents?collection={folder}", {}, 404),
        ("list a missing one", "GET", "/v1/rag/documents?collection=nope", {}, 404),
        ("list a hostile name", "GET", "/v1/rag/documents?collection=../alpha", {}, 404),
        ("query alpha by field", "POST", "/v1/rag/query",
         {"json": {**ask, "collection": "alpha"}}, 404),
        ("query alpha by header", "POST", "/v1/rag/query", {"json": ask, "headers": alpha}, 404),
        ("stream alpha", "POST", "/v1/rag/query",
         {"json": {**ask, "collection": "alpha", "stream": True}}, 404),
        ("upload into alpha", "POST", "/v1/rag/documents",
         {"headers": alpha, "files": [("file", ("x.txt", b"bob was here", "text/plain"))]}, 404),
        ("ingest a path into alpha", "POST", "/v1/rag/documents",
         {"json": {"path": "shared.txt", "collection": "alpha"}}, 404),
        ("ingest a path (not admin)", "POST", "/v1/rag/documents",
         {"json": {"path": "shared.txt"}}, 403),
        ("admin routes", "GET", "/v1/admin/users", {}, 403),
        ("make himself admin", "POST", "/v1/admin/users", {"json": {"name": "bob2",
         "admin": True}}, 403),
        ("grant himself alpha", "PUT", "/v1/admin/collections/alpha/members/bob", {}, 403),
    ]  # fmt: skip
    for i, guess in enumerate(guesses):
        table.append((f"delete guessed id {i}", "DELETE", f"/v1/rag/documents/{guess}", {}, 404))
        table.append((f"delete guessed id {i} in alpha", "DELETE",
                      f"/v1/rag/documents/{guess}?collection=alpha", {}, 404))  # fmt: skip
    return table


def test_cross_tenant_attempts_fail_and_leak_nothing(site):
    url, keys, alice = site["url"], site["keys"], site["docs"]["alice"]
    traces = (alice["id"], SECRET_WORD, "alpha-", "ledger.txt")
    before = httpx.get(f"{url}/v1/rag/documents", headers=bearer(keys["alice"]), timeout=T)
    for name, method, path, kw, status in cross_tenant_attempts(site):
        headers = {**bearer(keys["bob"]), **kw.pop("headers", {})}
        sent = path + repr(kw) + repr(headers)  # an error may quote what Bob sent, nothing more
        r = httpx.request(method, f"{url}{path}", headers=headers, timeout=T, **kw)
        assert r.status_code == status, (name, r.text)
        assert not any(t in r.text and t not in sent for t in traces), (name, r.text)
    # what Bob may do shows nothing of Alice's either
    own = [("GET", "/v1/rag/documents", {})]
    for mode in ("bm25", "vector", "hybrid"):
        own.append(("POST", "/v1/rag/query",
                    {"json": {"query": f"{SECRET_WORD} ledger", "answer": False, "mode": mode}}))  # fmt: skip
    own.append(("POST", "/v1/rag/query", {"json": {"query": SECRET_WORD, "max_tokens": 4}}))
    for method, path, kw in own:
        r = httpx.request(method, f"{url}{path}", headers=bearer(keys["bob"]), timeout=T, **kw)
        assert r.status_code == 200, r.text
        assert not any(t in r.text for t in traces), r.text
    with httpx.stream("POST", f"{url}/v1/rag/query", headers=bearer(keys["bob"]), timeout=T,
                      json={"query": SECRET_WORD, "max_tokens": 4, "stream": True}) as r:  # fmt: skip
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "quetzalcoatlite" in events[0]["sources"][0]["text"]
    assert not any(t in str(events) for t in traces)
    # Alice's collection is as it was, and she (and Carol, naming it) still find her document
    after = httpx.get(f"{url}/v1/rag/documents", headers=bearer(keys["alice"]), timeout=T)
    assert after.json() == before.json() and alice["id"] in after.text
    for who, extra in (("alice", {}), ("carol", {"collection": "alpha"})):
        r = httpx.post(f"{url}/v1/rag/query", headers=bearer(keys[who]), timeout=T,
                       json={"query": SECRET_WORD, "answer": False, "mode": "bm25", **extra})  # fmt: skip
        assert r.status_code == 200 and r.json()["sources"][0]["doc_id"] == alice["id"]


def test_collection_choice_and_callers_without_collections(site):
    url, keys = site["url"], site["keys"]
    # Carol is in two: she must choose; a name she is not in gets the same 404 as a missing one
    err = assert_error(httpx.get(f"{url}/v1/rag/documents", headers=bearer(keys["carol"]),
                                 timeout=T), 400)  # fmt: skip
    assert err["param"] == "collection" and "alpha, beta" in err["message"]
    missing = assert_error(httpx.get(f"{url}/v1/rag/documents?collection=gone",
                                     headers=bearer(keys["bob"]), timeout=T), 404)  # fmt: skip
    theirs = assert_error(httpx.get(f"{url}/v1/rag/documents?collection=alpha",
                                    headers=bearer(keys["bob"]), timeout=T), 404)  # fmt: skip
    assert missing["message"].replace("gone", "alpha") == theirs["message"]
    for key in (keys["admin"], LEGACY_KEY):  # in no collection: no documents at all
        r = httpx.get(f"{url}/v1/rag/documents?collection=alpha", headers=bearer(key), timeout=T)
        assert_error(r, 404, "collection_not_found")
        assert httpx.get(f"{url}/v1/models", headers=bearer(key), timeout=T).status_code == 200
    assert_error(httpx.get(f"{url}/v1/admin/users", headers=bearer(LEGACY_KEY), timeout=T), 403)
    # on disk, each collection is its own store: nothing of alpha's under beta's folder
    folders = sorted(p.name for p in (site["store"] / "collections").iterdir())
    assert [f.split("-")[0] for f in folders] == ["alpha", "beta"]
    beta = next(p for p in (site["store"] / "collections").iterdir() if p.name.startswith("beta"))
    assert not any(SECRET_WORD.encode() in f.read_bytes() for f in beta.rglob("*") if f.is_file())


def test_admin_routes_and_a_recreated_collection_starts_empty(site):
    url, admin = site["url"], bearer(site["keys"]["admin"])
    r = httpx.post(f"{url}/v1/admin/collections", json={"name": "gamma"}, headers=admin, timeout=T)
    assert r.status_code == 200 and r.json()["members"] == []
    r = httpx.post(f"{url}/v1/admin/users", headers=admin, timeout=T,
                   json={"name": "erin", "collections": ["gamma"]})  # fmt: skip
    assert r.status_code == 200 and r.json()["collections"] == ["gamma"]
    erin = bearer(r.json()["api_key"])
    r = httpx.post(f"{url}/v1/rag/documents", headers=erin, timeout=T,
                   files=[("file", ("old.txt", b"an old gamma note", "text/plain"))])  # fmt: skip
    assert r.status_code == 200, r.text
    assert len(httpx.get(f"{url}/v1/rag/documents", headers=erin, timeout=T).json()["data"]) == 1
    assert httpx.delete(f"{url}/v1/admin/collections/gamma", headers=admin,
                        timeout=T).status_code == 200  # fmt: skip
    assert_error(httpx.get(f"{url}/v1/rag/documents", headers=erin, timeout=T), 404)
    r = httpx.post(f"{url}/v1/admin/collections", json={"name": "gamma", "members": ["erin"]},
                   headers=admin, timeout=T)  # fmt: skip
    assert r.status_code == 200 and r.json()["members"] == ["erin"]
    assert httpx.get(f"{url}/v1/rag/documents", headers=erin, timeout=T).json()["data"] == []
    r = httpx.delete(f"{url}/v1/admin/collections/gamma/members/erin", headers=admin, timeout=T)
    assert r.status_code == 200 and r.json()["members"] == []
    listed = httpx.get(f"{url}/v1/admin/users", headers=admin, timeout=T).json()["data"]
    assert {u["name"] for u in listed} >= {"admin", "alice", "bob", "carol", "erin"}
    assert not any("key" in field for u in listed for field in u)


ADMIN_BAD_BODIES = [
    # (id, method, path, body, status, param)
    ("user name a path", "POST", "/v1/admin/users", {"name": "../etc"}, 400, "name"),
    ("user name too long", "POST", "/v1/admin/users", {"name": "a" * 65}, 400, "name"),
    ("user name with NUL", "POST", "/v1/admin/users", {"name": "a\x00b"}, 400, "name"),
    ("user name a number", "POST", "/v1/admin/users", {"name": 7}, 400, "name"),
    ("user name missing", "POST", "/v1/admin/users", {}, 400, "name"),
    ("admin a string", "POST", "/v1/admin/users", {"name": "x1", "admin": "yes"}, 400, "admin"),
    ("collections a string", "POST", "/v1/admin/users",
     {"name": "x1", "collections": "alpha"}, 400, "collections"),
    ("collection name upper", "POST", "/v1/admin/users",
     {"name": "x1", "collections": ["Alpha"]}, 400, "collections[0]"),
    ("too many collections", "POST", "/v1/admin/users",
     {"name": "x1", "collections": ["alpha"] * 65}, 400, "collections"),
    ("unknown collection", "POST", "/v1/admin/users",
     {"name": "x1", "collections": ["nope"]}, 404, None),
    ("existing user", "POST", "/v1/admin/users", {"name": "alice"}, 409, None),
    ("extra field", "POST", "/v1/admin/users", {"name": "x1", "password": "p"}, 400, "password"),
    ("malformed json", "POST", "/v1/admin/collections", b'{"name": ', 400, None),
    ("collection name html", "POST", "/v1/admin/collections",
     {"name": "<script>"}, 400, "name"),
    ("unknown member", "POST", "/v1/admin/collections",
     {"name": "delta", "members": ["nobody"]}, 404, None),
    ("remove a missing user", "DELETE", "/v1/admin/users/nobody", None, 404, None),
    ("grant a missing user", "PUT", "/v1/admin/collections/alpha/members/nobody", None, 404, None),
    ("oversized body", "POST", "/v1/admin/users", b'{"name": "' + b"a" * (5 * 2**20) + b'"}',
     413, None),
]  # fmt: skip


@pytest.mark.parametrize("method,path,body,status,param", [c[1:] for c in ADMIN_BAD_BODIES],
                         ids=[c[0] for c in ADMIN_BAD_BODIES])  # fmt: skip
def test_admin_bad_requests(site, method, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.request(method, f"{site['url']}{path}", headers=bearer(site["keys"]["admin"]),
                      timeout=T, **kw)  # fmt: skip
    err = assert_error(r, status)
    assert err["param"] == param
    users = httpx.get(f"{site['url']}/v1/admin/users", headers=bearer(site["keys"]["admin"]),
                      timeout=T).json()["data"]  # fmt: skip
    assert not {"x1", "delta"} & {u["name"] for u in users}  # nothing half-made


# --- headers, uploads, rate limit --------------------------------------------------------


def assert_security_headers(r: httpx.Response) -> None:
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"


def test_security_headers_on_every_response_and_uploads_never_come_back_as_html(site):
    url, alice = site["url"], bearer(site["keys"]["alice"])
    page = b"<html><body><script>alert(document.cookie)</script><p>beware</p></body></html>"
    r = httpx.post(f"{url}/v1/rag/documents", headers=alice, timeout=T,
                   files=[("file", ("page.html", page, "text/html"))])  # fmt: skip
    assert r.status_code == 200, r.text
    source = r.json()["added"][0]
    responses = [
        r,
        httpx.get(f"{url}/health", timeout=T),
        httpx.get(f"{url}/v1/models", timeout=T),  # 401
        httpx.get(f"{url}/v1/models", headers=alice, timeout=T),
        httpx.get(f"{url}/nowhere", headers=alice, timeout=T),  # 404
        httpx.get(f"{url}/v1/completions", headers=alice, timeout=T),  # 405
        httpx.post(f"{url}/v1/completions", headers=alice, content=b"{", timeout=T),  # 400
        httpx.get(f"{url}/v1/rag/documents", headers=alice, timeout=T),
        httpx.post(
            f"{url}/v1/rag/query",
            headers=alice,
            timeout=T,
            json={"query": "beware", "answer": False, "mode": "bm25"},
        ),
        httpx.get(f"{url}{source}", headers=alice, timeout=T),  # the upload's path: 404
        httpx.get(f"{url}/metrics", headers=alice, timeout=T),
        httpx.get(f"{url}/openapi.json", headers=alice, timeout=T),
    ]
    with httpx.stream("POST", f"{url}/v1/completions", headers=alice, timeout=T,
                      json={"prompt": "And", "max_tokens": 2, "stream": True}) as s:  # fmt: skip
        s.read()
        responses.append(s)
    for resp in responses:
        assert_security_headers(resp)
        assert "html" not in resp.headers.get("content-type", ""), resp.request.url
        assert b"<script>" not in resp.content
    assert responses[9].status_code == 404


def test_rate_limit_per_user(site):
    url, keys = site["limited"], site["keys"]
    for _ in range(5):
        assert (
            httpx.get(f"{url}/v1/models", headers=bearer(keys["u1"]), timeout=T).status_code == 200
        )
    r = httpx.get(f"{url}/v1/models", headers=bearer(keys["u1"]), timeout=T)
    err = assert_error(r, 429, "rate_limited")
    assert err["type"] == "rate_limit_error" and "5 per minute" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert_security_headers(r)
    # another user has a bucket of their own; /health is never limited
    assert httpx.get(f"{url}/v1/models", headers=bearer(keys["u2"]), timeout=T).status_code == 200
    for _ in range(8):
        assert httpx.get(f"{url}/health", timeout=T).status_code == 200
    # wrong keys spend the client address's bucket: then 429 before any key is checked
    _, key_id, secret = keys["u2"].split("_")
    wrong = bearer(f"fnk_{key_id}_{secret[::-1]}")
    statuses = [httpx.get(f"{url}/v1/models", headers=wrong, timeout=T).status_code
                for _ in range(6)]  # fmt: skip
    assert statuses[:5] == [401] * 5 and statuses[5] == 429
    r = httpx.get(f"{url}/v1/models", headers=bearer(keys["u2"]), timeout=T)
    assert_error(r, 429, "rate_limited")  # this address is held back, right key or not
    assert "per client address" in r.json()["error"]["message"]
