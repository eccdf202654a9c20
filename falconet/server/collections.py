"""Collections: in multi-user mode every request to /v1/rag/* works on one of its caller's
collections, and each collection is its own document store, in
`<--rag-store>/collections/<name>-<random id>/` (store file, uploads, ANN index). A
search, an answer, a document list or a deletion opens only that store, so one team's
documents cannot reach another's results by any query or guessed id: isolation by
construction, not by a filter every query must remember.

The caller picks a collection with the body's `collection` field, the
`X-Falconet-Collection` header or `?collection=`; a caller in exactly one needs none. A
collection that does not exist and one the caller is not in get the same 404, so names
cannot be probed. A collection's store is named by `collection_store` and opened by the
RAG routes' own opener (`open_store`): the seams where another kind of store slots in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.requests import Request

from falconet.access.users import AccessDB
from falconet.server.fields import APIError, bad

COLLECTIONS = "collections"  # the folder, under the RAG store, holding one store each
HEADER = "x-falconet-collection"


class Collections:
    """Opens (once) and hands out the store of the collection a request names."""

    def __init__(self, settings: Any, db: AccessDB, open_rag: Callable[[Any], Any]) -> None:
        self.settings = settings  # RagSettings of the root store folder
        self.db = db
        self.open_rag = open_rag  # RagSettings -> the routes' per-store object
        self._open: dict[str, Any] = {}  # by folder name: unique per created collection
        self._lock = threading.Lock()

    def for_request(self, request: Request, choice: str | None) -> Any:
        """The store of the caller's chosen collection (runs in a worker thread)."""
        identity = request.state.identity
        name = choice or request.headers.get(HEADER) or request.query_params.get("collection")
        if not identity.is_user:  # --api-key callers belong to no collection
            raise _not_found(name)
        if name:
            found = self.db.member_collection(identity.name, name)
            if found is None:
                raise _not_found(name)
        else:
            user = self.db.user(identity.name)
            names = list(user.collections) if user else []
            if not names:
                raise _not_found(None)
            if len(names) > 1:
                raise bad(f"you belong to {len(names)} collections ({', '.join(names)}); name "
                          "one in the 'collection' field, the X-Falconet-Collection header or "
                          "?collection=", "collection")  # fmt: skip
            found = self.db.member_collection(identity.name, names[0])
            if found is None:  # removed between the two reads
                raise _not_found(names[0])
        request.state.audit["collection"] = found.name
        with self._lock:
            rag = self._open.get(found.folder)
            if rag is None:
                store = collection_store(self.settings.store, found.folder)
                rag = self.open_rag(dataclasses.replace(self.settings, store=store))
                self._open[found.folder] = rag
        return rag


def collection_store(root: Path | str, folder: str) -> Path | str:
    """Where a collection's store lives, given the server's RAG store: the one place that
    knows. A folder store keeps each collection in a folder of its own; on PostgreSQL each
    collection is a schema of its own, named from a digest of the collection's folder name
    (unique per created collection, and always a valid schema name)."""
    text = str(root)
    if "://" in text:
        parts = urlsplit(text)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
        schema = "c_" + hashlib.sha256(folder.encode()).hexdigest()[:40]
        return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))
    return Path(root) / COLLECTIONS / folder


def _not_found(name: str | None) -> APIError:
    if name is None:
        return APIError(404, "you belong to no collection; an admin adds you to one with "
                        "`falconet collections grant`", "collection",
                        code="collection_not_found")  # fmt: skip
    shown = name if len(name) <= 64 else name[:61] + "..."
    return APIError(404, f"no collection {shown!r} among yours", "collection",
                    code="collection_not_found")  # fmt: skip
