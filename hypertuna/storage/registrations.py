"""Durable worker registrations: which relays workers host and which workers serve each.

Both event-store backends keep them in their database (tables ``worker_relays`` and
``worker_registrations``) with the statements below, run in one write transaction per
registration so that checking and recording a statement can never interleave with another.

What a store promises (:meth:`EventStore.apply_registration`):

- A relay key is bound to its owner key for good (the row is never deleted); a statement from
  another owner key is a conflict. The binding is intrinsic too, since the relay key is the key of
  the owner's core, but the store does not rely on the caller having checked that.
- A relay key or name that the gateway hosts itself, or a name another relay already uses, is a
  conflict.
  The other way round, :meth:`EventStore.create_relay` refuses a key or name recorded here
  (:class:`~hypertuna.storage.events.RelayRegisteredError`).
- ``seq`` must be greater than the last accepted seq of the (relay, worker) pair, which is kept
  after a removal, so a replayed statement stays refused, also after a restart.
- ``update`` and ``remove`` need an active registration of the pair (``NOT_FOUND`` otherwise);
  ``register`` (re)activates it. Only accepted statements change anything.

The caller checks signatures and that the statement names this gateway and the connection's
worker; this module is only about what is recorded.
"""

from __future__ import annotations

import enum

import attrs

from hypertuna.storage._event_sql import SqlRunner

__all__ = [
    "Registration",
    "RegistrationOutcome",
    "WorkerRelay",
    "apply",
    "list_worker_relays",
    "worker_relay",
]


class RegistrationOutcome(enum.Enum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"
    #: The relay key or name is hosted by the gateway itself.
    HOSTED = "hosted"
    #: Another relay uses the name.
    NAME_TAKEN = "name-taken"
    #: The relay key is bound to another owner key.
    OTHER_OWNER = "other-owner"
    #: ``update`` or ``remove`` for a pair that is not registered.
    NOT_FOUND = "not-found"


@attrs.frozen
class Registration:
    """One verified statement to record (``action`` is ``register``, ``update`` or ``remove``)."""

    action: str = attrs.field(validator=attrs.validators.in_(("register", "update", "remove")))
    relay_key: str
    owner_key: str
    worker_key: str
    seq: int
    name: str
    description: str


@attrs.frozen
class WorkerRelay:
    """A relay hosted by workers, with the workers whose registration is active."""

    relay_key: str
    owner_key: str
    name: str
    description: str
    workers: frozenset[str]


def worker_relay(db: SqlRunner, relay_key: str) -> WorkerRelay | None:
    """The relay of ``relay_key`` as recorded (None if no worker ever registered it)."""
    row = db.fetch_one(
        "SELECT owner_key, name, description FROM worker_relays WHERE relay_key = ?", (relay_key,)
    )
    if row is None:
        return None
    workers = db.fetch_all(
        "SELECT worker_key FROM worker_registrations WHERE relay_key = ? AND active = 1",
        (relay_key,),
    )
    return WorkerRelay(
        relay_key=relay_key,
        owner_key=row[0],
        name=row[1],
        description=row[2],
        workers=frozenset(w[0] for w in workers),
    )


def apply(
    db: SqlRunner, reg: Registration, now: int
) -> tuple[RegistrationOutcome, WorkerRelay | None]:
    """Check and record ``reg`` inside the caller's write transaction; returns the outcome and,
    when accepted, the relay as it now stands."""
    if db.fetch_one("SELECT 1 FROM relays WHERE key = ?", (reg.relay_key,)):
        return RegistrationOutcome.HOSTED, None
    existing = worker_relay(db, reg.relay_key)
    if existing is not None and existing.owner_key != reg.owner_key:
        return RegistrationOutcome.OTHER_OWNER, None
    last = db.fetch_one(
        "SELECT seq, active FROM worker_registrations WHERE relay_key = ? AND worker_key = ?",
        (reg.relay_key, reg.worker_key),
    )
    if last is not None and reg.seq <= int(last[0]):
        return RegistrationOutcome.REPLAYED, None
    active = last is not None and int(last[1]) == 1
    if reg.action == "remove":
        if not active:
            return RegistrationOutcome.NOT_FOUND, None
        db.execute(
            "UPDATE worker_registrations SET seq = ?, active = 0, updated_at = ?"
            " WHERE relay_key = ? AND worker_key = ?",
            (reg.seq, now, reg.relay_key, reg.worker_key),
        )
        return RegistrationOutcome.ACCEPTED, worker_relay(db, reg.relay_key)
    if reg.action == "update" and not active:
        return RegistrationOutcome.NOT_FOUND, None
    if db.fetch_one("SELECT 1 FROM relays WHERE name = ?", (reg.name,)):
        return RegistrationOutcome.HOSTED, None
    if db.fetch_one(
        "SELECT 1 FROM worker_relays WHERE name = ? AND relay_key <> ?", (reg.name, reg.relay_key)
    ):
        return RegistrationOutcome.NAME_TAKEN, None
    db.execute(
        "INSERT INTO worker_relays (relay_key, owner_key, name, description, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (relay_key) DO UPDATE SET"
        " name = excluded.name, description = excluded.description,"
        " updated_at = excluded.updated_at",
        (reg.relay_key, reg.owner_key, reg.name, reg.description, now),
    )
    db.execute(
        "INSERT INTO worker_registrations (relay_key, worker_key, seq, active, updated_at)"
        " VALUES (?, ?, ?, 1, ?) ON CONFLICT (relay_key, worker_key) DO UPDATE SET"
        " seq = excluded.seq, active = 1, updated_at = excluded.updated_at",
        (reg.relay_key, reg.worker_key, reg.seq, now),
    )
    return RegistrationOutcome.ACCEPTED, worker_relay(db, reg.relay_key)


def list_worker_relays(db: SqlRunner) -> list[WorkerRelay]:
    """Every relay ever registered by a worker (also those no worker serves now), by key."""
    rows = db.fetch_all(
        "SELECT relay_key, owner_key, name, description FROM worker_relays ORDER BY relay_key", ()
    )
    active: dict[str, set[str]] = {}
    for relay_key, worker_key in db.fetch_all(
        "SELECT relay_key, worker_key FROM worker_registrations WHERE active = 1", ()
    ):
        active.setdefault(relay_key, set()).add(worker_key)
    return [
        WorkerRelay(
            relay_key=r[0],
            owner_key=r[1],
            name=r[2],
            description=r[3],
            workers=frozenset(active.get(r[0], ())),
        )
        for r in rows
    ]
