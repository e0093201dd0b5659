"""Relays the gateway hosts itself, written through an owner core of its own.

A hosted relay named ``name`` has the owner core named ``relay/<name>`` in the gateway's
:class:`~hypertuna.storage.corestore.CoreStore`; the relay key *is* that core's key, so anyone
holding the key can mirror and verify everything the relay ever accepted. Its event-store view
is core-backed (:mod:`hypertuna.storage.relay_view`): the writer appends the events a batch
accepted to the owner core inside the view's transaction, and on start the view catches up with
whatever the core holds beyond the last committed batch.

Each hosted relay also has a drive (:mod:`hypertuna.storage.drives`), created with the relay,
and the gateway has one shared ``pfp`` drive; :func:`open_drive` opens either from the core
store.

Relays created before cores existed keep their random keys and are written as plain views.
"""

from __future__ import annotations

import trio

from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.drives import PFP_DRIVE, Drive, drive_core_names
from hypertuna.storage.events import EventStore, RelayRecord

__all__ = [
    "OWNER_CORE_PREFIX",
    "PFP_DRIVE",
    "create_hosted_relay",
    "is_hosted",
    "open_drive",
    "owner_core_name",
]

OWNER_CORE_PREFIX = "relay/"


def owner_core_name(relay_name: str) -> str:
    """The name of the owner core of the hosted relay ``relay_name``."""
    return OWNER_CORE_PREFIX + relay_name


def is_hosted(cores: CoreStore, relay: RelayRecord) -> bool:
    """Whether ``relay`` is written through an owner core of this gateway's core store."""
    return cores.key_for(owner_core_name(relay.name)).hex() == relay.key


async def create_hosted_relay(
    store: EventStore, cores: CoreStore, *, name: str, description: str, created_at: int
) -> RelayRecord:
    """Create the relay ``name`` with its owner core; its key is the core key.

    :class:`~hypertuna.storage.events.RelayExistsError` when the name (or key) is taken, also
    by a relay that workers registered at this gateway
    (:class:`~hypertuna.storage.events.RelayRegisteredError`), and then no core is created;
    ``ValueError`` for a malformed name.
    """
    key = await trio.to_thread.run_sync(cores.key_for, owner_core_name(name))
    record = await store.create_relay(
        key=key.hex(), name=name, description=description, created_at=created_at
    )
    await trio.to_thread.run_sync(cores.writable, owner_core_name(name))
    await trio.to_thread.run_sync(open_drive, cores, record.key)
    # Core-backed from the start, so no event can reach the view except through the core.
    await store.reset_view(record.id)
    return record


def open_drive(cores: CoreStore, drive: str) -> Drive:
    """The writable drive ``drive`` (a hosted relay's key, or :data:`PFP_DRIVE`), its two cores
    created empty if needed. Blocks on disk (scans the entry core): call it from a worker
    thread."""
    names = drive_core_names(drive)
    return Drive(cores.writable(names.entries), cores.writable(names.blobs))
