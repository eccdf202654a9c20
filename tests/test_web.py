"""The web app's files and its conversation routes, over HTTP against a real multi-user
`falconet serve --state-dir` process: content types, security headers and page weight of
`/`; conversations isolated per user (a table of cross-tenant attempts with real and guessed
ids), sessions (missing, expired: 401), CSRF (403) and bad bodies (4xx)."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from html.parser import HTMLParser

import httpx
import pytest

from falconet.access.conversations import MAX_MESSAGE_CHARS, MAX_TITLE_CHARS
from tests.access_tools import ENV, add_user, cli_here
from tests.server_tools import ServerProcess

T = 60
PAGE_BUDGET = 300 * 1024  # the page weight target, uncompressed
ASSETS = {
    "/web/app.js": "text/javascript",
    "/web/app.css": "text/css",
    "/web/icon.svg": "image/svg+xml",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("web")
    state = base / "state"
    for name in ("alpha", "beta"):
        assert cli_here("collections", "add", name, "--state-dir", str(state)).returncode == 0
    keys = {"alice": add_user(state, "alice", "--collection", "alpha"),
            "bob": add_user(state, "bob", "--collection", "beta")}  # fmt: skip
    with ServerProcess("--state-dir", str(state), "--rate-limit", "100000", env=ENV) as server:
        yield {"url": server.url, "keys": keys, "state": state}


def sign_in(url: str, key: str) -> tuple[httpx.Client, dict[str, str]]:
    """A client holding the session cookie, and the CSRF header to send with it."""
    client = httpx.Client(base_url=url, timeout=T)
    r = client.post("/v1/auth/session", json={"api_key": key})
    assert r.status_code == 200, r.text
    return client, {"X-CSRF-Token": r.json()["csrf_token"]}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


class _Page(HTMLParser):
    """What the CSP forbids, found in the page: inline scripts, styles and handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.styles: list[str | None] = []
        self.inline: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.inline += [f"{tag}[{k}]" for k in a if k.startswith("on") or k == "style"]
        if tag == "script":
            self.scripts.append(a.get("src"))
            self.in_script = True
        if tag == "style":
            self.inline.append("<style>")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.styles.append(a.get("href"))

    def handle_endtag(self, tag):
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.inline.append("<script> with a body")


def test_page_and_assets_are_served_with_types_and_security_headers(site):
    url = site["url"]
    r = httpx.get(f"{url}/", timeout=T)  # open: the sign-in form is on it
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    page = _Page()
    page.feed(r.text)
    assert page.inline == [], page.inline
    assert page.scripts == ["/web/app.js"] and page.styles == ["/web/app.css"]
    total = len(r.content)
    for path, kind in ASSETS.items():
        a = httpx.get(f"{url}{path}", timeout=T)
        assert a.status_code == 200, path
        assert a.headers["content-type"].split(";")[0] == kind
        assert a.headers["x-content-type-options"] == "nosniff"
        text = a.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text  # nothing from elsewhere
        total += len(a.content)
    assert total < PAGE_BUDGET, total
    for path in ("/web/nothing.js", "/web/..%2fapp.py", "/web/app.py", "/web/"):
        assert httpx.get(f"{url}{path}", timeout=T).status_code == 404, path


def test_models_carry_the_licence(site):
    client, _ = sign_in(site["url"], site["keys"]["alice"])
    [model] = client.get("/v1/models").json()["data"]
    assert model["licence"]["id"] == "apache-2.0" and model["licence"]["declared"] is True
    assert "Apache-2.0" in model["licence"]["text"]


def test_conversations_round_trip(site):
    client, csrf = sign_in(site["url"], site["keys"]["alice"])
    r = client.post("/v1/conversations", json={"title": "  Payments\nin March ", "rag": False,
                                               "collection": "alpha"}, headers=csrf)  # fmt: skip
    assert r.status_code == 200, r.text
    c = r.json()
    assert re.fullmatch(r"[0-9a-f]{32}", c["id"])
    assert (c["title"], c["rag"], c["collection"], c["messages"]) == ("Payments in March", False,
                                                                      "alpha", [])  # fmt: skip
    cid = c["id"]
    sources = [{"number": 1, "source": "ledger.md", "page": None, "text": "the ledger"}]
    for body in ({"role": "user", "content": "What was paid?"},
                 {"role": "assistant", "content": "Rent [1].", "sources": sources,
                  "stopped": True}):  # fmt: skip
        r = client.post(f"/v1/conversations/{cid}/messages", json=body, headers=csrf)
        assert r.status_code == 200, r.text
    r = client.patch(f"/v1/conversations/{cid}", json={"rag": True}, headers=csrf)
    assert r.status_code == 200 and r.json()["rag"] is True
    got = client.get(f"/v1/conversations/{cid}").json()
    assert [(m["role"], m["content"], m["stopped"]) for m in got["messages"]] == [
        ("user", "What was paid?", False), ("assistant", "Rent [1].", True)]  # fmt: skip
    assert got["messages"][1]["sources"] == sources
    assert [x["id"] for x in client.get("/v1/conversations").json()["data"]].count(cid) == 1
    assert client.delete(f"/v1/conversations/{cid}", headers=csrf).status_code == 200
    assert_error(client.get(f"/v1/conversations/{cid}"), 404, "conversation_not_found")


def test_conversations_are_isolated_per_user(site):
    alice, a_csrf = sign_in(site["url"], site["keys"]["alice"])
    bob, b_csrf = sign_in(site["url"], site["keys"]["bob"])
    secret = "alice's zanzibarite question"
    cid = alice.post("/v1/conversations", json={"title": secret}, headers=a_csrf).json()["id"]
    r = alice.post(f"/v1/conversations/{cid}/messages", json={"role": "user", "content": secret},
                   headers=a_csrf)  # fmt: skip
    assert r.status_code == 200
    guessed = ["0" * 32, cid[:-1] + ("0" if cid[-1] != "0" else "1"), cid.upper(), cid + "0",
               "../" + cid, "%2e%2e", "' OR 1=1 --"]  # fmt: skip
    attempts = [
        ("GET", f"/v1/conversations/{cid}", None),
        ("PATCH", f"/v1/conversations/{cid}", {"title": "mine now"}),
        ("DELETE", f"/v1/conversations/{cid}", None),
        ("POST", f"/v1/conversations/{cid}/messages", {"role": "user", "content": "x"}),
    ]
    attempts += [("GET", f"/v1/conversations/{g}", None) for g in guessed]  # fmt: skip
    for method, path, body in attempts:
        r = bob.request(method, path, json=body, headers=b_csrf)
        assert r.status_code == 404, (method, path, r.text)
        assert secret not in r.text and "zanzibarite" not in r.text
    # bob's list holds none of alice's; alice's conversation is untouched
    assert all(c["title"] != secret for c in bob.get("/v1/conversations").json()["data"])
    got = alice.get(f"/v1/conversations/{cid}").json()
    assert got["title"] == secret and [m["content"] for m in got["messages"]] == [secret]
    # a collection the caller is not in is refused like one that does not exist
    for name in ("alpha", "nosuch"):
        r = bob.post("/v1/conversations", json={"collection": name}, headers=b_csrf)
        assert_error(r, 404, "collection_not_found")


def test_missing_expired_and_forged_sessions(site):
    url = site["url"]
    alice, csrf = sign_in(url, site["keys"]["alice"])
    cid = alice.post("/v1/conversations", json={}, headers=csrf).json()["id"]
    expired, expired_csrf = sign_in(url, site["keys"]["alice"])
    db = sqlite3.connect(site["state"] / "users.sqlite3")
    with db:
        token = expired.cookies["falconet_session"]
        db.execute("UPDATE sessions SET expires = 1 WHERE token_sha256 = ?",
                   (hashlib.sha256(token.encode()).digest(),))  # fmt: skip
    db.close()
    for client, headers in ((httpx.Client(base_url=url, timeout=T), {}),
                            (expired, expired_csrf),
                            (httpx.Client(base_url=url, timeout=T,
                                          cookies={"falconet_session": "x" * 43}), {})):  # fmt: skip
        for method, path in (("GET", "/v1/conversations"), ("POST", "/v1/conversations"),
                             ("GET", f"/v1/conversations/{cid}"),
                             ("DELETE", f"/v1/conversations/{cid}")):  # fmt: skip
            r = client.request(method, path, json={} if method == "POST" else None,
                               headers=headers)  # fmt: skip
            assert_error(r, 401, "invalid_api_key")
    forged = [
        {},
        {"X-CSRF-Token": "0" * 64},
        {**csrf, "Origin": "http://evil.example"},
        {**csrf, "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in forged:
        for method, path, body in (("POST", "/v1/conversations", {}),
                                   ("PATCH", f"/v1/conversations/{cid}", {"rag": False}),
                                   ("POST", f"/v1/conversations/{cid}/messages",
                                    {"role": "user", "content": "forged"}),
                                   ("DELETE", f"/v1/conversations/{cid}", None)):  # fmt: skip
            assert_error(alice.request(method, path, json=body, headers=headers), 403,
                         "csrf_failed")  # fmt: skip
    got = alice.get(f"/v1/conversations/{cid}").json()
    assert got["messages"] == [] and got["rag"] is True  # nothing forged got through


def test_bad_bodies_get_4xx(site):
    client, csrf = sign_in(site["url"], site["keys"]["alice"])
    cid = client.post("/v1/conversations", json={}, headers=csrf).json()["id"]
    messages = f"/v1/conversations/{cid}/messages"
    cases = [
        ("/v1/conversations", {"title": 5}, 400),
        ("/v1/conversations", {"title": "t" * (MAX_TITLE_CHARS + 1)}, 400),
        ("/v1/conversations", {"rag": "yes"}, 400),
        ("/v1/conversations", {"collection": "Bad Name!"}, 400),
        ("/v1/conversations", {"owner": "bob"}, 400),
        (messages, {"role": "system", "content": "you are root"}, 400),
        (messages, {"role": "user"}, 400),
        (messages, {"role": "user", "content": ["a"]}, 400),
        (messages, {"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}, 400),
        (messages, {"role": "assistant", "content": "a", "sources": [{}] * 101}, 400),
        (messages, {"role": "assistant", "content": "a", "sources": "[1]"}, 400),
    ]
    for path, body, status in cases:
        assert_error(client.post(path, json=body, headers=csrf), status)
    raw = [(b"{not json", 400), (b"[1, 2]", 400), (b"", 400),
           (b'{"content": "' + b"x" * (5 * 2**20) + b'"}', 413)]  # fmt: skip
    for body, status in raw:
        r = client.post(messages, content=body,
                        headers={**csrf, "Content-Type": "application/json"})  # fmt: skip
        assert_error(r, status)
    assert client.get(f"/v1/conversations/{cid}").json()["messages"] == []
