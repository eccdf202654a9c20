"""The web app: static files in the package (falconet/server/web/), served at `/` and
`/web/<file>`. Plain HTML, CSS and JavaScript written by hand: nothing is built at install
time, nothing comes from a CDN, and the page works with no network beyond this server.

The page and its files are open (the sign-in form is part of them); everything they show
comes from the API routes, which the gate guards. The gate adds the Content-Security-Policy
(scripts and styles from this server only, no inline ones) to these answers too.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from falconet.server.fields import APIError

WEB_PREFIX = "/web/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def is_web_path(path: str) -> bool:
    """The paths the gate opens without a key: the page and its files."""
    return path == "/" or path.startswith(WEB_PREFIX)


def _files() -> dict[str, bytes]:
    """Every file of the app, read once: a few tens of kilobytes."""
    folder = resources.files("falconet.server") / "web"
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            out[entry.name] = entry.read_bytes()
    return out


def register_web_routes(app: FastAPI) -> None:
    files = _files()

    def answer(name: str) -> Response:
        body = files.get(name)
        if body is None:
            raise APIError(404, f"no such file of the web app: {name[:80]!r}", code="not_found")
        kind = CONTENT_TYPES["." + name.rsplit(".", 1)[-1]]
        # no-cache: revalidated on every load, so a new falconet's page never runs old code
        return Response(body, media_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return answer("index.html")

    @app.get(WEB_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return answer(name)
