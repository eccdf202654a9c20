"""What the PostgreSQL store is made of, apart from the store itself: the URL that names
it, the numbered migrations that build its tables (and `prepare`, which applies them), and
the tokenizer that makes its full-text terms the same as SQLite FTS5's (so BM25 ranks the
same on both backends).
"""

from __future__ import annotations

import unicodedata
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
        "documents, chunks with vectors, postings and term statistics",
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
            tokens integer NOT NULL,
            dim integer NOT NULL,
            embedding vector NOT NULL,
            UNIQUE (doc_id, ord)
        );
        CREATE INDEX chunks_doc ON chunks (doc_id);
        -- The inverted index BM25 reads: a chunk's count of each of its terms, and its
        -- length (dl), so a query reads the postings of its terms and nothing else.
        CREATE TABLE postings (
            term text NOT NULL,
            chunk bigint NOT NULL REFERENCES chunks (rowid) ON DELETE CASCADE,
            tf integer NOT NULL,
            dl integer NOT NULL,
            PRIMARY KEY (term, chunk) INCLUDE (tf, dl)
        );
        CREATE INDEX postings_chunk ON postings (chunk);
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


def prepare(conn, location: Location, create: bool) -> str:
    """Create or migrate the store's schema over `conn` (autocommit) and point the
    connection's search_path at it; returns the SET statement (for a reconnect)."""
    schema = location.schema
    vector_schema = _vector_schema(conn, location, create)
    search_path = f'SET search_path TO "{schema}", "{vector_schema}"'
    conn.execute(search_path)
    if _version(conn, location) == MIGRATIONS[-1][0]:
        return search_path
    with conn.transaction():
        # One process migrates at a time; the others then find it done.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("falconet-rag:" + schema,))
        exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if not exists and not create:
            raise RagError(f"no RAG store in schema {schema} at {location.display}; "
                           "ingest documents first")  # fmt: skip
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}  # fmt: skip
        if tables and "migrations" not in tables:
            raise RagError(f"schema {schema} at {location.display} holds tables that "
                           "are not a falconet RAG store; name another schema "
                           "(?schema=NAME)")  # fmt: skip
        conn.execute("CREATE TABLE IF NOT EXISTS migrations (version integer PRIMARY KEY, "
                     "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
        version = _version(conn, location)
        for number, description, sql in MIGRATIONS:
            if number > version:
                conn.execute(sql)
                conn.execute("INSERT INTO migrations (version, description) VALUES (%s, %s)",
                             (number, description))  # fmt: skip
    return search_path


def _vector_schema(conn, location: Location, create: bool) -> str:
    """The schema pgvector's types live in, creating the extension if needed."""
    query = ("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
             "ON n.oid = e.extnamespace WHERE e.extname = 'vector'")  # fmt: skip
    row = conn.execute(query).fetchone()
    if row is None and create:
        import psycopg

        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('falconet-rag'))")
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege as e:
            raise RagError(f"the database at {location.display} lacks the pgvector "
                           "extension and this user may not create it: have an "
                           "administrator run CREATE EXTENSION vector") from e  # fmt: skip
        except psycopg.errors.FeatureNotSupported as e:  # not installed
            raise RagError(f"the PostgreSQL server at {location.display} has no "
                           f"pgvector extension ({first_line(e)})") from e  # fmt: skip
        row = conn.execute(query).fetchone()
    if row is None:
        raise RagError(f"no RAG store in schema {location.schema} at {location.display} "
                       "(the database has no pgvector extension); ingest documents first")  # fmt: skip
    return row[0]


def _version(conn, location: Location) -> int:
    """The newest migration applied (0: none); a RagError if newer than this falconet."""
    table = f'"{location.schema}".migrations'
    if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
        return 0
    version = conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()[0]
    if version > MIGRATIONS[-1][0]:
        raise RagError(
            f"schema {location.schema} at {location.display} has store schema {version}; "
            f"this falconet knows up to {MIGRATIONS[-1][0]}: use a newer falconet"
        )
    return version


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


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
