"""Batch scoring: a prompt template over every record of a JSON Lines input, run through
the engine with continuous batching, each record's result written exactly once (a ledger
of records pending -> done, outputs written only from committed rows). `falconet batch
run` is the command; `BatchJob` the same job from Python."""

from falconet.batch.job import BatchJob, BatchProgress, BatchSettings
from falconet.batch.ledger import Ledger, SQLiteLedger
from falconet.batch.ledger_postgres import PostgresLedger
from falconet.batch.ledgers import open_ledger

__all__ = [
    "BatchJob",
    "BatchProgress",
    "BatchSettings",
    "Ledger",
    "PostgresLedger",
    "SQLiteLedger",
    "open_ledger",
]
