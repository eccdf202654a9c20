"""Opening a batch ledger by what names it: an SQLite file or a `postgresql://` URL. Apart
from ledger.py (the protocol and records both ledgers import), so that neither imports
the other."""

from __future__ import annotations

from pathlib import Path

from falconet.batch.ledger import Ledger, SQLiteLedger


def open_ledger(location: str | Path) -> Ledger:
    """The ledger at `location`: a `postgresql://...?schema=NAME` URL (ledger_postgres.py),
    or an SQLite file path (created when missing)."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from falconet.batch.ledger_postgres import PostgresLedger

        return PostgresLedger(text)
    return SQLiteLedger(Path(text).expanduser())
