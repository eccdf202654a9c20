"""What the PostgreSQL store is made of, apart from the store itself: the URL that names
it, the numbered migrations that build its tables, and the tokenizer that makes its
full-text terms the same as SQLite FTS5's (so BM25 ranks the same on both backends).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from falconet.errors import RagError
from falconet.rag.store import check_collection_name

DEFAULT_SCHEMA = "falconet_rag"
URL_SCHEMES = ("postgresql", "postgres")

# (number, what it does, SQL), applied in order, each once; `migrations` records them.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "documents, chunks with terms and vectors, term statistics",
        """
        CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
        INSERT INTO meta (key, value) VALUES ('generation', '0'), ('chunks', '0'), ('tokens', '0');
        CREATE TABLE documents (
            id text PRIMARY KEY,
            source text NOT NULL UNIQUE,
            sha256 text NOT NULL,
            version integer NOT NULL,
            size bigint NOT NULL,
            mtime_ns bigint NOT NULL,
            embedder text NOT NULL,
            ingested_at double precision NOT NULL
        );
        CREATE TABLE chunks (
            rowid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            doc_id text NOT NULL REFERENCES documents (id),
            ord integer NOT NULL,
            text text NOT NULL,
            start integer NOT NULL,
            "end" integer NOT NULL,
            section text,
            page integer,
            terms tsvector NOT NULL,
            tokens integer NOT NULL,
            dim integer NOT NULL,
            embedding vector NOT NULL,
            UNIQUE (doc_id, ord)
        );
        CREATE INDEX chunks_terms ON chunks USING gin (terms);
        CREATE TABLE terms (
            term text PRIMARY KEY,
            chunks integer NOT NULL,
            occurrences integer NOT NULL
        );
        """,
    ),
)


def is_url(spec: str) -> bool:
    return "://" in spec


@dataclass(frozen=True)
class Location:
    """Where a store lives: the libpq URL (without falconet's `schema` parameter), the
    schema, and the URL as messages show it (no password)."""

    url: str
    schema: str
    display: str


def parse_url(url: str, schema: str | None = None) -> Location:
    """A `postgresql://user:password@host:port/db?schema=NAME` URL, checked; `schema`
    (a collection's) overrides the URL's."""
    from psycopg import conninfo

    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise RagError(f"{parts.scheme}:// is not a store URL: use postgresql://... or a folder")
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [v for k, v in query if k == "schema"]
    url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
    try:
        info = conninfo.conninfo_to_dict(url)
    except Exception as e:  # psycopg.ProgrammingError: libpq refused it
        raise RagError(f"not a usable PostgreSQL URL ({first_line(e)})") from None
    host = info.get("host") or "localhost"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    display = f"postgresql://{user}{host}{port}/{info.get('dbname', '')}"
    name = schema if schema is not None else (given[-1] if given else DEFAULT_SCHEMA)
    return Location(url, check_collection_name(name), display)


def fts_tokens(text: str) -> list[str]:
    """`text`'s tokens as SQLite FTS5's `unicode61 remove_diacritics 2` tokenizer makes
    them: runs of letters, digits, private-use characters and combining marks; lowercased,
    with the diacritics taken off (é -> e) but no compatibility folding (ﬁ stays)."""
    tokens, current = [], []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "LN" or cat in ("Mn", "Co"):
            current.append(ch)
        elif current:
            tokens.append(_fold("".join(current)))
            current = []
    if current:
        tokens.append(_fold("".join(current)))
    return [t for t in tokens if t]


def _fold(token: str) -> str:
    decomposed = unicodedata.normalize("NFD", token.lower())
    return unicodedata.normalize(
        "NFC", "".join(c for c in decomposed if not unicodedata.combining(c))
    )


def tsvector_literal(tokens: Sequence[str]) -> str:
    """A tsvector literal: each lexeme with the positions (from 1) it occurs at."""
    positions: dict[str, list[int]] = {}
    for i, t in enumerate(tokens, start=1):
        positions.setdefault(t, []).append(min(i, 16383))  # the type's largest position
    return " ".join(f"{quote_lexeme(t)}:{','.join(map(str, p))}" for t, p in positions.items())


def quote_lexeme(term: str) -> str:
    return "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
