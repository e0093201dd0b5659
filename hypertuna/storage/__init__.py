"""Durable state of the gateway behind backend-neutral interfaces.

Every store here has an embedded implementation (SQLite or files, the default) and a PostgreSQL
one selected by a ``postgresql://`` URL; both pass the same tests. Schemas evolve through
numbered SQL migrations (:mod:`hypertuna.storage.migrate`).

- :mod:`hypertuna.storage.events`: the relay view's event store (NIP-01 merge rules, queries).
"""

from __future__ import annotations

from hypertuna.storage.events import (
    EventStore,
    IngestItem,
    IngestResult,
    QueryResult,
    RelayExistsError,
    RelayRecord,
    StorageError,
    StoredEvent,
    open_event_store,
)

__all__ = [
    "EventStore",
    "IngestItem",
    "IngestResult",
    "QueryResult",
    "RelayExistsError",
    "RelayRecord",
    "StorageError",
    "StoredEvent",
    "open_event_store",
]
