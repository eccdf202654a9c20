"""The web app end to end in a real headless Chromium (Debian's `chromium`, driven by
Playwright) against a real multi-user `falconet serve` on the embedded default model: sign
in, upload a .md and a .pdf, ask, see the streamed answer and its numbered sources, open a
source, stop a reply mid-stream, delete a document; user B never sees A's documents or
conversations; errors are shown as messages; an accessibility smoke check (every control
named, focus order, visible focus; axe-core where installed); single-user mode.
Screenshots go to test-artifacts/web/ (git-ignored)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.access_tools import ENV, add_user, audit_rows, cli_here
from tests.server_tools import ServerProcess
from tests.test_documents import make_pdf

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is not installed: "
    "`pip install playwright` (scripts/setup.sh test does)"
)  # fmt: skip

CHROMIUM = os.environ.get("FALCONET_CHROMIUM") or shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (`apt-get install chromium`, as "
                "scripts/setup.sh test does where apt can)", allow_module_level=True)  # fmt: skip

# The machine has no internet: without these Chromium keeps trying to reach it.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
# Per user per minute: far above what a test's clicks need, low enough that erin can spend
# it (the client address's bucket, shared by every page load and sign-in, too).
RATE_LIMIT = 120
T = 180_000  # ms: generous waits (the machine may be busy), so a broken page cannot hang the suite
MARKDOWN = """# Treasury notes

## March payments

The zanzibarite ledger lists every payment the alpha team made in March: rent, the
printer lease and the harbour fees.
"""
PDF_PAGES = ["The quetzalcoatlite survey of the northern harbour.",
             "Page two: the harbour depth is twelve metres at low tide."]  # fmt: skip
BOB_NOTE = "The basilisk memo covers the beta team's travel plans for April.\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("web-e2e")
    state, store, files = base / "state", base / "store", base / "files"
    files.mkdir()
    for name in ("alpha", "beta"):
        assert cli_here("collections", "add", name, "--state-dir", str(state)).returncode == 0
    keys = {"alice": add_user(state, "alice", "--collection", "alpha"),
            "bob": add_user(state, "bob", "--collection", "beta"),
            "dave": add_user(state, "dave", "--collection", "beta"),
            "erin": add_user(state, "erin"),
            "frank": add_user(state, "frank", "--collection", "beta")}  # fmt: skip
    (files / "treasury.md").write_text(MARKDOWN)
    (files / "survey.pdf").write_bytes(make_pdf(PDF_PAGES))
    (files / "program.exe").write_bytes(b"MZ not a document")
    (files / "huge.txt").write_text("word " * (300 * 1024))  # 1.5 MB: over the 1 MB limit
    args = ["--state-dir", str(state), "--rag-store", str(store), "--rate-limit", str(RATE_LIMIT),
            "--rag-max-upload-mb", "1"]  # fmt: skip
    with ServerProcess(*args, env=ENV) as server:
        yield {"url": server.url, "keys": keys, "state": state, "files": files}


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    sync_api.expect.set_options(timeout=T)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def signed_in(browser, url: str, key: str, sent: list | None = None, **context):
    """A page signed in as the key's user; `sent` collects (method, path) of its requests."""
    page = browser.new_page(**context)
    page.set_default_timeout(T)
    if sent is not None:
        page.on("request", lambda r: sent.append((r.method, urlsplit(r.url).path)))
    page.goto(url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#app").wait_for(state="visible")
    return page


def ask(page, question: str):
    """Asks; returns the locator of this question's answer (the next one on the page)."""
    answers = page.locator("li.message.assistant")
    before = answers.count()
    page.get_by_label("Your question").fill(question)
    page.get_by_label("Your question").press("Enter")
    return answers.nth(before)


def documents(page) -> list[str]:
    return [t.split(" (")[0] for t in page.locator("#document-list .name").all_inner_texts()]


def test_sign_in_upload_ask_open_a_source_stop_and_delete(site, browser):
    sent: list[tuple[str, str]] = []
    page = signed_in(browser, site["url"], site["keys"]["alice"], sent)
    bodies: list[tuple[str, dict]] = []  # the JSON of each answer the page asks for
    page.on("request", lambda r: bodies.append((urlsplit(r.url).path, json.loads(r.post_data)))
            if r.url.endswith(("/rag/query", "/chat/completions")) else None)  # fmt: skip
    sync_api.expect(page.locator("#who")).to_have_text("Signed in as alice")
    sync_api.expect(page.locator("#licence")).to_contain_text("apache-2.0")
    shot(page, "01-signed-in")

    # upload a .md and a .pdf, with progress, then see them listed
    files = site["files"]
    page.get_by_label("Add documents").set_input_files([files / "treasury.md",
                                                        files / "survey.pdf"])  # fmt: skip
    page.get_by_role("button", name="Upload", exact=True).click()
    sync_api.expect(page.locator("#document-list li")).to_have_count(2)
    sync_api.expect(page.locator("#upload-status")).to_contain_text("treasury.md: added")
    sync_api.expect(page.locator("#upload-status")).to_contain_text("survey.pdf: added")
    assert page.locator("#upload-progress").evaluate("p => p.value") == 100
    assert sorted(documents(page)) == ["survey.pdf", "treasury.md"]
    shot(page, "02-uploaded")

    # ask: the answer arrives in pieces (counted as the page draws them), with sources
    page.evaluate("""() => { window.draws = 0; new MutationObserver(() => window.draws++)
        .observe(document.getElementById('messages'), {childList: true, subtree: true,
                                                       characterData: true}); }""")
    answer = ask(page, "What does the zanzibarite ledger list?")
    sync_api.expect(answer).to_have_attribute("data-streaming", "false")
    assert answer.get_attribute("data-stopped") == "false"
    body = answer.locator(".body").inner_text()
    sources = answer.locator("ol.sources > li")
    assert sources.count() >= 2 and len(body) > sources.all_inner_texts()[0].__len__()
    assert page.evaluate("window.draws") > 3  # the streamed pieces, drawn one by one
    texts = sources.all_inner_texts()
    assert texts[0].startswith("[1] file treasury.md")
    # "Reply length" left blank: the server's default, fitted to the model's context
    assert page.get_by_label("Reply length (tokens)").input_value() == ""
    assert bodies[-1][0] == "/v1/rag/query" and "max_tokens" not in bodies[-1][1]
    assert any(t.startswith("[") and "file survey.pdf, page " in t for t in texts), texts
    shot(page, "03-answered")

    # open source [1]: the passage, its file and section, in a dialog; Escape closes it
    answer.locator("ol.sources button.cite").first.click()
    dialog = page.locator("#source-dialog")
    sync_api.expect(dialog).to_be_visible()
    sync_api.expect(page.locator("#source-title")).to_have_text("[1] treasury.md")
    sync_api.expect(page.locator("#source-where")).to_contain_text("section Treasury notes")
    sync_api.expect(page.locator("#source-text")).to_contain_text("zanzibarite ledger")
    shot(page, "04-source")
    page.keyboard.press("Escape")
    sync_api.expect(dialog).to_be_hidden()

    # stop a reply mid-stream: the network is slowed so that the reply takes seconds
    # to arrive, and Stop is pressed once its first piece is on the page
    page.get_by_label("Answer from my documents").uncheck()
    page.get_by_label("Reply length (tokens)").fill("120")  # with the history: < 256
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 50,
                                                  "downloadThroughput": 400,
                                                  "uploadThroughput": 100_000})  # fmt: skip
    answer = ask(page, "And in April?")
    sync_api.expect(answer.locator(".body")).to_have_text(re.compile(r"\S"))
    page.get_by_role("button", name="Stop").click()
    sync_api.expect(answer).to_have_attribute("data-streaming", "false")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": -1,
                                                  "uploadThroughput": -1})  # fmt: skip
    assert answer.get_attribute("data-stopped") == "true"
    assert bodies[-1][0] == "/v1/chat/completions" and bodies[-1][1]["max_tokens"] == 120
    sync_api.expect(answer.locator(".note")).to_have_text("Stopped")
    kept = answer.locator(".body").inner_text().removesuffix("Stopped").strip()
    assert kept  # what had arrived stays on the page
    assert page.get_by_role("button", name="Send").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()
    shot(page, "05-stopped")

    # the conversation is kept on the server: after a reload it opens as it was
    page.reload()
    page.locator("#app").wait_for(state="visible")
    page.locator("#conversation-list button.open").first.click()
    sync_api.expect(page.locator("li.message")).to_have_count(4)
    sync_api.expect(page.locator("li.message.assistant .note")).to_have_text("Stopped")
    sync_api.expect(page.locator("li.message.assistant").last).to_contain_text(kept)
    assert not page.get_by_label("Answer from my documents").is_checked()  # kept per conversation

    # delete a document
    page.get_by_role("button", name="Delete document treasury.md").click()
    sync_api.expect(page.locator("#document-list li")).to_have_count(1)
    assert documents(page) == ["survey.pdf"]
    shot(page, "06-deleted")

    # every request of the run is in the audit log, under alice's name where signed in
    rows = [r for r in audit_rows(site["state"]) if r["user"] == "alice"]
    routes = {(r["method"], r["route"].split("/documents/")[0]) for r in rows}
    for expected in (("POST", "/v1/auth/session"), ("POST", "/v1/rag/documents"),
                     ("POST", "/v1/rag/query"), ("POST", "/v1/chat/completions"),
                     ("POST", "/v1/conversations"), ("DELETE", "/v1/rag")):  # fmt: skip
        assert expected in routes, expected
    logged = Counter((r["method"], r["route"]) for r in audit_rows(site["state"]))
    missing = Counter(sent) - logged  # each request the page sent has its own record
    assert len(sent) > 20 and not missing, missing
    verify = cli_here("audit", "verify", "--state-dir", str(site["state"]))
    assert verify.returncode == 0, verify.stderr
    page.close()


def test_user_b_never_sees_a(site, browser):
    # alice's document and conversation, made through the API
    url = site["url"]
    alice = httpx.Client(base_url=url, timeout=60)
    csrf = {
        "X-CSRF-Token": alice.post(
            "/v1/auth/session", json={"api_key": site["keys"]["alice"]}
        ).json()["csrf_token"]
    }
    r = alice.post("/v1/rag/documents", headers=csrf,
                   files=[("file", ("ledger.md", MARKDOWN.encode(), "text/markdown"))])  # fmt: skip
    assert r.status_code == 200, r.text
    r = alice.post("/v1/conversations", json={"title": "zanzibarite secrets"}, headers=csrf)
    assert r.status_code == 200

    page = signed_in(browser, url, site["keys"]["bob"])
    page.get_by_label("Add documents").set_input_files(site["files"] / "survey.pdf")
    page.get_by_role("button", name="Upload", exact=True).click()
    sync_api.expect(page.locator("#upload-status")).to_contain_text("survey.pdf: ")
    shot(page, "07-bob-uploaded")
    assert page.get_by_role("alert").is_hidden(), page.get_by_role("alert").inner_text()
    sync_api.expect(page.locator("#document-list li")).to_have_count(1)
    assert documents(page) == ["survey.pdf"]
    assert page.locator("#conversation-list li").count() == 0
    answer = ask(page, "What does the zanzibarite ledger list?")
    sync_api.expect(answer).to_have_attribute("data-streaming", "false")
    sources = answer.locator("ol.sources > li").all_inner_texts()
    assert sources and all("survey.pdf" in s for s in sources), sources
    content = page.content()
    assert "treasury.md" not in content and "ledger.md" not in content
    assert "zanzibarite secrets" not in content and "printer lease" not in content
    page.reload()
    page.locator("#app").wait_for(state="visible")
    titles = page.locator("#conversation-list button.open").all_inner_texts()
    assert titles == ["What does the zanzibarite ledger list?"]
    shot(page, "07-bob")
    page.close()


def test_errors_are_shown_as_messages(site, browser):
    page = signed_in(browser, site["url"], site["keys"]["bob"])
    alert = page.get_by_role("alert")
    for name, words in (("program.exe", "Unsupported file type"), ("huge.txt", "Too big")):
        page.get_by_label("Add documents").set_input_files(site["files"] / name)
        page.get_by_role("button", name="Upload", exact=True).click()
        sync_api.expect(alert).to_contain_text(words)
        sync_api.expect(page.locator("#upload-status")).to_contain_text(f"{name}: not added")
    shot(page, "08-error")
    page.close()


def test_server_busy_is_shown(site, browser):
    # erin spends her own requests (RATE_LIMIT a minute) by listing her conversations
    page = signed_in(browser, site["url"], site["keys"]["erin"])
    alert = page.get_by_role("alert")
    for _ in range(2 * RATE_LIMIT):  # each click lists the conversations: one request
        page.get_by_role("button", name="New conversation").click()
        if alert.is_visible():
            break
    sync_api.expect(alert).to_contain_text("The server is busy, try again in")
    shot(page, "09-busy")
    page.close()


def test_accessibility_smoke(site, browser):
    page = browser.new_page()
    page.set_default_timeout(T)
    page.goto(site["url"])
    sync_api.expect(page.get_by_label("API key")).to_be_focused()
    page.close()
    page = signed_in(browser, site["url"], site["keys"]["dave"])
    # every form control has a label the accessibility tree names it by
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    tree = page.locator("#app").aria_snapshot()
    for control in ('combobox "Model"', 'textbox "Your question"',
                    'checkbox "Answer from my documents"', 'spinbutton "Reply length (tokens)"',
                    'button "Upload"', 'button "Send"', 'button "New conversation"'):  # fmt: skip
        assert control in tree, (control, tree)
    # focus order: the page's reading order, and always visible
    page.get_by_role("link", name="Skip to the question").focus()  # the page's first stop
    order = []
    for _ in range(9):
        page.keyboard.press("Tab")
        focused = page.evaluate("""() => { const e = document.activeElement;
            const s = getComputedStyle(e);
            return [e === document.body ? "body" : (e.id || e.textContent.trim()),
                    s.outlineStyle, s.outlineWidth]; }""")
        order.append(focused[0])
        assert focused[1] != "none" and focused[2] != "0px", focused
    # header, conversations, the question and its controls, documents (Stop is disabled)
    assert order == ["model", "signout", "new-conversation", "question", "rag", "max-tokens",
                     "send", "upload", "upload-button"], order  # fmt: skip
    # on a phone-sized screen: one column, nothing wider than the screen
    phone = signed_in(browser, site["url"], site["keys"]["dave"],
                      viewport={"width": 390, "height": 844})  # fmt: skip
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    shot(phone, "10-phone")
    page.close()
    phone.close()


def test_axe_core_finds_nothing_serious(site, browser):
    """axe-core (Deque's rules, bundled by the axe-playwright-python package) over the
    sign-in form and the signed-in page, an answer with its sources and the source dialog
    included: no serious or critical violation."""
    axe = pytest.importorskip(
        "axe_playwright_python.sync_playwright", reason="axe-core for Playwright is not "
        "installed: `pip install axe-playwright-python`"
    ).Axe()  # fmt: skip
    page = browser.new_page()
    page.set_default_timeout(T)
    page.goto(site["url"])
    page.get_by_label("API key").wait_for()
    found = {"sign-in": axe.run(page).response["violations"]}
    page.close()
    page = signed_in(browser, site["url"], site["keys"]["frank"])
    page.get_by_label("Add documents").set_input_files(site["files"] / "survey.pdf")
    page.get_by_role("button", name="Upload", exact=True).click()
    sync_api.expect(page.locator("#document-list li")).to_have_count(1)
    answer = ask(page, "What does the survey say?")
    sync_api.expect(answer).to_have_attribute("data-streaming", "false")
    found["signed in"] = axe.run(page).response["violations"]
    answer.locator("ol.sources button.cite").first.click()
    found["source dialog"] = axe.run(page).response["violations"]
    page.close()
    serious = {where: [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in vs
                       if v["impact"] in ("serious", "critical")]
               for where, vs in found.items()}  # fmt: skip
    assert serious == {"sign-in": [], "signed in": [], "source dialog": []}, serious


def test_single_user_mode_needs_no_sign_in(browser):
    """Without users (and without --rag-store) the page opens on the chat at once, says
    documents are off, answers from the model alone and keeps conversations in the page."""
    with ServerProcess(env=ENV) as server:
        page = browser.new_page()
        page.set_default_timeout(T)
        page.goto(server.url)
        sync_api.expect(page.locator("#app")).to_be_visible()
        assert page.locator("#signin").is_hidden() and page.locator("#signout").is_hidden()
        sync_api.expect(page.locator("#upload-status")).to_contain_text("--rag-store")
        assert not page.get_by_label("Answer from my documents").is_checked()
        answer = ask(page, "In the beginning")
        sync_api.expect(answer).to_have_attribute("data-streaming", "false")
        assert answer.locator(".body").inner_text().strip()
        assert page.get_by_role("alert").is_hidden()
        titles = page.locator("#conversation-list button.open").all_inner_texts()
        assert titles == ["In the beginning"]
        shot(page, "11-single-user")
        page.close()


def test_single_user_mode_with_an_api_key(browser):
    """`--api-key` without users: the page asks for the key and sends it as a Bearer
    header (there are no sessions); a wrong key is refused in words."""
    with ServerProcess("--api-key", "the-team-key", env=ENV) as server:
        page = browser.new_page()
        page.set_default_timeout(T)
        page.goto(server.url)
        page.get_by_label("API key").fill("not-the-key")
        page.get_by_role("button", name="Sign in").click()
        sync_api.expect(page.get_by_role("alert")).to_contain_text("You are signed out")
        assert page.locator("#app").is_hidden()
        page.get_by_label("API key").fill("the-team-key")
        page.get_by_role("button", name="Sign in").click()
        sync_api.expect(page.locator("#app")).to_be_visible()
        answer = ask(page, "And God said")
        sync_api.expect(answer).to_have_attribute("data-streaming", "false")
        assert answer.locator(".body").inner_text().strip()
        assert page.get_by_role("alert").is_hidden()
        page.close()
