"""Durable state of the gateway behind backend-neutral interfaces.

Every store here has an embedded implementation (SQLite or files, the default) and a PostgreSQL
one selected by a ``postgresql://`` URL; both pass the same tests. Schemas evolve through
numbered SQL migrations (:mod:`hypertuna.storage.migrate`).

The public API, importable from here:

Signed logs (:mod:`hypertuna.storage.cores`), byte-compatible with hypercore 11
    :class:`Core` (``create``/``open``, ``append``, ``get``, ``truncate``, ``prove``,
    ``export_update``, ``verify_all``), :class:`Mirror` (``apply`` a :class:`CoreUpdate`: verify
    and store), :func:`verify_proof`, :class:`KeyPair`, :class:`CoreIdentity`,
    :func:`load_vectors` (the hypercore test-vector format), the protocols :class:`BlockLog` and
    :class:`AppendLog`, and the errors :class:`CoreError`, :class:`CoreCorruptError`,
    :class:`CoreVerificationError`.
Many cores (:mod:`hypertuna.storage.corestore`)
    :class:`CoreStore`: cores found by key, named cores derived from one primary key.
Relays on cores (:mod:`hypertuna.storage.relay_records`, :mod:`hypertuna.storage.relay_view`)
    :func:`encode_record`/:func:`decode_record` for the blocks, :class:`RelayView` to build a
    relay's event store from its cores (``sync``, ``rebuild``).
Drives (:mod:`hypertuna.storage.drives`)
    :class:`Drive` / :class:`ReadOnlyDrive`: versioned files over an entry core and a blob core.
The relay view's event store (:mod:`hypertuna.storage.events`)
    :class:`EventStore` and :func:`open_event_store`.
"""

from __future__ import annotations

from hypertuna.storage.cores import (
    AppendLog,
    BlockLog,
    Core,
    CoreCorruptError,
    CoreError,
    CoreIdentity,
    CoreUpdate,
    CoreVerificationError,
    KeyPair,
    Mirror,
    Proof,
    load_vectors,
    verify_proof,
)
from hypertuna.storage.corestore import CoreStore, CoreStoreError
from hypertuna.storage.drives import Drive, DriveError, ReadOnlyDrive
from hypertuna.storage.events import (
    EventStore,
    IngestItem,
    IngestResult,
    QueryResult,
    RelayExistsError,
    RelayRecord,
    RelayRegisteredError,
    StorageError,
    StoredEvent,
    ViewCore,
    open_event_store,
)
from hypertuna.storage.relay_records import (
    AddWriter,
    EventRecord,
    RecordError,
    RemoveWriter,
    decode_record,
    encode_record,
)
from hypertuna.storage.relay_view import RelayView, SyncReport

__all__ = [
    "AddWriter",
    "AppendLog",
    "BlockLog",
    "Core",
    "CoreCorruptError",
    "CoreError",
    "CoreIdentity",
    "CoreStore",
    "CoreStoreError",
    "CoreUpdate",
    "CoreVerificationError",
    "Drive",
    "DriveError",
    "EventRecord",
    "EventStore",
    "IngestItem",
    "IngestResult",
    "KeyPair",
    "Mirror",
    "Proof",
    "QueryResult",
    "ReadOnlyDrive",
    "RecordError",
    "RelayExistsError",
    "RelayRecord",
    "RelayRegisteredError",
    "RelayView",
    "RemoveWriter",
    "StorageError",
    "StoredEvent",
    "SyncReport",
    "ViewCore",
    "decode_record",
    "encode_record",
    "load_vectors",
    "open_event_store",
    "verify_proof",
]
