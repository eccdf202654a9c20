"""Opening a document store by what names it: a folder (SQLite, the embedded default) or a
`postgresql://` URL. Apart from store.py (the protocol and records both backends import),
so that neither backend imports the other."""

from __future__ import annotations

from pathlib import Path

from falconet.rag.store import DocumentStore, check_collection_name


def open_store(
    spec: str | Path, create: bool = True, collection: str | None = None
) -> DocumentStore:
    """The store that `spec` names: a folder (SQLite, its file `store.sqlite3` inside) or
    a `postgresql://` URL (PostgreSQL + pgvector; `?schema=NAME` picks the schema).

    `collection` gives a store of its own beside the others: on PostgreSQL the schema of
    that name, in a folder the folder `collections/<name>` inside it."""
    text = str(spec)
    if "://" in text:
        from falconet.rag.store_postgres import PostgresStore

        return PostgresStore(text, create=create, schema=collection)
    from falconet.rag.store_sqlite import open_folder

    folder = Path(spec)
    if collection is not None:
        folder = Path(spec).expanduser() / "collections" / check_collection_name(collection)
    return open_folder(folder, create=create)
