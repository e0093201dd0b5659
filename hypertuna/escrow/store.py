"""Escrow storage: one interface (:class:`EscrowDatabase`), two backends, and the SQL both run.

A backend only runs whole transactions: ``write(work)`` and ``read(work)`` call ``work`` with a
:class:`~hypertuna.storage._event_sql.SqlRunner` inside one transaction in a worker thread and
return its result; the transaction commits when ``work`` returns and rolls back when it raises.
Write transactions are serialized (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-scoped
advisory lock), which is what keeps the audit chain linear and lease issuance one-at-a-time per
relay. The functions below are that SQL, in the dialect both databases share, and are only
called from inside such a transaction.

Migrations are numbered files in ``hypertuna/escrow/migrations/{sqlite,postgres}/`` recorded
in ``escrow_schema_migrations``; opening a database applies the missing ones (idempotent).
"""

from __future__ import annotations

import contextlib
import enum
import json
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final, Protocol, TypeVar

import attrs

from hypertuna.escrow.audit import AuditEntry, Checkpoint
from hypertuna.escrow.policy import DepositStatus
from hypertuna.storage._event_sql import Row, SqlRunner, Statement
from hypertuna.storage.events import StorageError
from hypertuna.storage.migrate import Migration, load_migrations

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "DepositRecord",
    "EscrowDatabase",
    "EscrowStorageError",
    "LeaseRecord",
    "LeaseStatus",
    "Runner",
    "load_escrow_migrations",
    "open_escrow_database",
]

T = TypeVar("T")
Runner = SqlRunner

#: Where the embedded escrow database lives unless configured otherwise.
DEFAULT_SQLITE_PATH: Final = Path("var/escrow.db")


class EscrowStorageError(StorageError):
    """The escrow database failed or cannot be opened."""


class EscrowDatabase(Protocol):
    """Whole transactions on the escrow database (see the module docstring)."""

    backend: str
    applied_migrations: list[int]

    async def write(self, work: Callable[[Runner], T]) -> T: ...

    async def read(self, work: Callable[[Runner], T]) -> T: ...

    async def aclose(self) -> None: ...


def load_escrow_migrations(flavour: str) -> list[Migration]:
    """The escrow migrations of ``flavour`` ("sqlite" or "postgres"), in number order."""
    return load_migrations(flavour, "hypertuna.escrow")


@contextlib.asynccontextmanager
async def open_escrow_database(
    database_url: str | None, sqlite_path: Path = DEFAULT_SQLITE_PATH
) -> AsyncIterator[EscrowDatabase]:
    """The PostgreSQL database at ``database_url`` (``ESCROW_DATABASE_URL``), or the SQLite
    file ``sqlite_path`` when it is None; migrated, and closed when the block exits."""
    if database_url:
        from hypertuna.escrow.postgres_store import open_postgres_escrow_database

        async with open_postgres_escrow_database(database_url) as pg:
            yield pg
    else:
        from hypertuna.escrow.sqlite_store import open_sqlite_escrow_database

        async with open_sqlite_escrow_database(sqlite_path) as lite:
            yield lite


# --- records ---------------------------------------------------------------------------------


class LeaseStatus(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    SUPERSEDED = "superseded"  # its deposit was replaced by a rotation


@attrs.frozen
class DepositRecord:
    """A stored deposit, without its ciphertext."""

    deposit_id: str
    relay_key: str
    owner_key: str
    writer_public_key: str
    package_digest: str
    package_created_at_ms: int
    rotation: int
    deposited_at_ms: int
    expires_at_ms: int
    status: DepositStatus
    unlock_count: int
    ended_at_ms: int | None
    superseded_by: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "depositId": self.deposit_id,
            "relayKey": self.relay_key,
            "ownerKey": self.owner_key,
            "writerPublicKey": self.writer_public_key,
            "packageDigest": self.package_digest,
            "rotation": self.rotation,
            "depositedAt": self.deposited_at_ms,
            "expiresAt": self.expires_at_ms,
            "status": self.status.value,
            "unlockCount": self.unlock_count,
            "endedAt": self.ended_at_ms,
            "supersededBy": self.superseded_by,
        }


@attrs.frozen
class LeaseRecord:
    """A lease as stored and listed: ids, times and digests — never the secret or the box."""

    lease_id: str
    relay_key: str
    deposit_id: str
    lease_version: int
    requester_id: str
    session_key_digest: str  # SHA-256 of the session public key
    sealed_digest: str  # SHA-256 of the sealed lease package handed out
    issued_at_ms: int
    expires_at_ms: int
    status: LeaseStatus
    ended_at_ms: int | None
    end_reason: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "leaseId": self.lease_id,
            "relayKey": self.relay_key,
            "depositId": self.deposit_id,
            "leaseVersion": self.lease_version,
            "requesterId": self.requester_id,
            "sessionKeyDigest": self.session_key_digest,
            "sealedDigest": self.sealed_digest,
            "issuedAt": self.issued_at_ms,
            "expiresAt": self.expires_at_ms,
            "status": self.status.value,
            "endedAt": self.ended_at_ms,
            "endReason": self.end_reason,
        }


# --- relays ----------------------------------------------------------------------------------


def relay_owner(db: Runner, relay_key: str) -> tuple[str, int] | None:
    """``(owner_key, lease_version)`` of a relay the escrow knows."""
    row = db.fetch_one(
        "SELECT owner_key, lease_version FROM escrow_relays WHERE relay_key = ?", (relay_key,)
    )
    return None if row is None else (str(row[0]), int(row[1]))


def insert_relay(db: Runner, relay_key: str, owner_key: str, now_ms: int) -> None:
    db.execute(
        "INSERT INTO escrow_relays (relay_key, owner_key, lease_version, created_at_ms)"
        " VALUES (?, ?, 0, ?)",
        (relay_key, owner_key, now_ms),
    )


def set_lease_version(relay_key: str, version: int) -> Statement:
    """Record ``version`` as the relay's durable lease version (read with
    :func:`unlock_state`; the write lock keeps it from changing in between)."""
    return "UPDATE escrow_relays SET lease_version = ? WHERE relay_key = ?", (version, relay_key)


# --- deposits --------------------------------------------------------------------------------

_DEPOSIT_COLUMNS: Final = (
    "deposit_id, relay_key, owner_key, writer_public_key, package_digest,"
    " package_created_at_ms, rotation, deposited_at_ms, expires_at_ms, status, unlock_count,"
    " ended_at_ms, superseded_by"
)


def _deposit(row: Row) -> DepositRecord:
    return DepositRecord(
        deposit_id=str(row[0]),
        relay_key=str(row[1]),
        owner_key=str(row[2]),
        writer_public_key=str(row[3]),
        package_digest=str(row[4]),
        package_created_at_ms=int(row[5]),
        rotation=int(row[6]),
        deposited_at_ms=int(row[7]),
        expires_at_ms=int(row[8]),
        status=DepositStatus(row[9]),
        unlock_count=int(row[10]),
        ended_at_ms=None if row[11] is None else int(row[11]),
        superseded_by=None if row[12] is None else str(row[12]),
    )


def get_deposit(db: Runner, deposit_id: str) -> DepositRecord | None:
    row = db.fetch_one(
        f"SELECT {_DEPOSIT_COLUMNS} FROM escrow_deposits WHERE deposit_id = ?", (deposit_id,)
    )
    return None if row is None else _deposit(row)


def current_deposit(db: Runner, relay_key: str) -> DepositRecord | None:
    """The relay's active deposit, else its latest one (highest rotation), else None."""
    row = db.fetch_one(
        f"SELECT {_DEPOSIT_COLUMNS} FROM escrow_deposits WHERE relay_key = ?"
        " ORDER BY CASE WHEN status = 'active' THEN 0 ELSE 1 END, rotation DESC LIMIT 1",
        (relay_key,),
    )
    return None if row is None else _deposit(row)


@attrs.frozen
class UnlockState:
    """What an unlock judges a relay by, read in one query."""

    #: The relay's durable lease version (the last one issued; 0 before any).
    lease_version: int
    #: Active leases not yet due, and active leases whose expiry has come.
    live_leases: int
    due_leases: int
    #: :func:`current_deposit` and its sealed package (None when the relay has none).
    deposit: DepositRecord | None
    package: bytes


_QUALIFIED_DEPOSIT_COLUMNS: Final = ", ".join(
    "d." + column.strip() for column in _DEPOSIT_COLUMNS.split(",")
)


def unlock_state(db: Runner, relay_key: str, now_ms: int) -> UnlockState | None:
    """The relay's :class:`UnlockState` at ``now_ms``; None for a relay the escrow does not
    know. One round trip, since every unlock pays it under the write lock."""
    row = db.fetch_one(
        "SELECT r.lease_version,"
        " (SELECT COUNT(*) FROM escrow_leases AS l WHERE l.relay_key = r.relay_key"
        "  AND l.status = 'active' AND l.expires_at_ms > ?),"
        " (SELECT COUNT(*) FROM escrow_leases AS l WHERE l.relay_key = r.relay_key"
        "  AND l.status = 'active' AND l.expires_at_ms <= ?),"
        f" {_QUALIFIED_DEPOSIT_COLUMNS}, d.package"
        " FROM escrow_relays AS r LEFT JOIN escrow_deposits AS d ON d.deposit_id = ("
        "  SELECT c.deposit_id FROM escrow_deposits AS c WHERE c.relay_key = r.relay_key"
        "  ORDER BY CASE WHEN c.status = 'active' THEN 0 ELSE 1 END, c.rotation DESC LIMIT 1)"
        " WHERE r.relay_key = ?",
        (now_ms, now_ms, relay_key),
    )
    if row is None:
        return None
    has_deposit = row[3] is not None
    return UnlockState(
        lease_version=int(row[0]),
        live_leases=int(row[1]),
        due_leases=int(row[2]),
        deposit=_deposit(row[3:]) if has_deposit else None,
        package=bytes(row[16]) if has_deposit else b"",
    )


def max_rotation(db: Runner, relay_key: str) -> int | None:
    row = db.fetch_one(
        "SELECT MAX(rotation) FROM escrow_deposits WHERE relay_key = ?", (relay_key,)
    )
    return None if row is None or row[0] is None else int(row[0])


def deposit_package(db: Runner, deposit_id: str) -> bytes:
    row = db.fetch_one("SELECT package FROM escrow_deposits WHERE deposit_id = ?", (deposit_id,))
    if row is None:
        raise EscrowStorageError(f"deposit {deposit_id} vanished")
    return bytes(row[0])


def insert_deposit(db: Runner, record: DepositRecord, package: bytes) -> None:
    db.execute(
        f"INSERT INTO escrow_deposits ({_DEPOSIT_COLUMNS}, package)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.deposit_id,
            record.relay_key,
            record.owner_key,
            record.writer_public_key,
            record.package_digest,
            record.package_created_at_ms,
            record.rotation,
            record.deposited_at_ms,
            record.expires_at_ms,
            record.status.value,
            record.unlock_count,
            record.ended_at_ms,
            record.superseded_by,
            package,
        ),
    )


def end_deposit(
    db: Runner,
    deposit_id: str,
    status: DepositStatus,
    now_ms: int,
    superseded_by: str | None = None,
) -> None:
    db.execute(
        "UPDATE escrow_deposits SET status = ?, ended_at_ms = ?, superseded_by = ?"
        " WHERE deposit_id = ?",
        (status.value, now_ms, superseded_by, deposit_id),
    )


def count_unlock(deposit_id: str) -> Statement:
    return (
        "UPDATE escrow_deposits SET unlock_count = unlock_count + 1 WHERE deposit_id = ?",
        (deposit_id,),
    )


# --- leases ----------------------------------------------------------------------------------

_LEASE_COLUMNS: Final = (
    "lease_id, relay_key, deposit_id, lease_version, requester_id, session_key_digest,"
    " sealed_digest, issued_at_ms, expires_at_ms, status, ended_at_ms, end_reason"
)


def _lease(row: Row) -> LeaseRecord:
    return LeaseRecord(
        lease_id=str(row[0]),
        relay_key=str(row[1]),
        deposit_id=str(row[2]),
        lease_version=int(row[3]),
        requester_id=str(row[4]),
        session_key_digest=str(row[5]),
        sealed_digest=str(row[6]),
        issued_at_ms=int(row[7]),
        expires_at_ms=int(row[8]),
        status=LeaseStatus(row[9]),
        ended_at_ms=None if row[10] is None else int(row[10]),
        end_reason=None if row[11] is None else str(row[11]),
    )


def get_lease(db: Runner, lease_id: str) -> LeaseRecord | None:
    row = db.fetch_one(
        f"SELECT {_LEASE_COLUMNS} FROM escrow_leases WHERE lease_id = ?", (lease_id,)
    )
    return None if row is None else _lease(row)


def active_lease(db: Runner, relay_key: str) -> LeaseRecord | None:
    row = db.fetch_one(
        f"SELECT {_LEASE_COLUMNS} FROM escrow_leases WHERE relay_key = ? AND status = 'active'",
        (relay_key,),
    )
    return None if row is None else _lease(row)


def due_leases(db: Runner, now_ms: int, relay_key: str | None = None) -> list[LeaseRecord]:
    """Active leases whose expiry has come (of one relay, or all)."""
    sql = (
        f"SELECT {_LEASE_COLUMNS} FROM escrow_leases WHERE status = 'active' AND expires_at_ms <= ?"
    )
    params: list[object] = [now_ms]
    if relay_key is not None:
        sql += " AND relay_key = ?"
        params.append(relay_key)
    return [_lease(row) for row in db.fetch_all(sql + " ORDER BY lease_id", params)]


def active_leases_of_deposit(db: Runner, deposit_id: str) -> list[LeaseRecord]:
    rows = db.fetch_all(
        f"SELECT {_LEASE_COLUMNS} FROM escrow_leases WHERE deposit_id = ? AND status = 'active'"
        " ORDER BY lease_id",
        (deposit_id,),
    )
    return [_lease(row) for row in rows]


def insert_lease(lease: LeaseRecord) -> Statement:
    return (
        f"INSERT INTO escrow_leases ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            lease.lease_id,
            lease.relay_key,
            lease.deposit_id,
            lease.lease_version,
            lease.requester_id,
            lease.session_key_digest,
            lease.sealed_digest,
            lease.issued_at_ms,
            lease.expires_at_ms,
            lease.status.value,
            lease.ended_at_ms,
            lease.end_reason,
        ),
    )


def end_lease(
    db: Runner, lease: LeaseRecord, status: LeaseStatus, now_ms: int, reason: str
) -> LeaseRecord:
    db.execute(
        "UPDATE escrow_leases SET status = ?, ended_at_ms = ?, end_reason = ?"
        " WHERE lease_id = ? AND status = 'active'",
        (status.value, now_ms, reason, lease.lease_id),
    )
    return attrs.evolve(lease, status=status, ended_at_ms=now_ms, end_reason=reason)


def end_active_lease(
    db: Runner, lease_id: str, status: LeaseStatus, now_ms: int, reason: str
) -> LeaseRecord | None:
    """End the lease ``lease_id`` if it is active and return it as ended; None (and no change)
    if it is not active or unknown. One statement: a release pays nothing more."""
    row = db.fetch_one(
        "UPDATE escrow_leases SET status = ?, ended_at_ms = ?, end_reason = ?"
        f" WHERE lease_id = ? AND status = 'active' RETURNING {_LEASE_COLUMNS}",
        (status.value, now_ms, reason, lease_id),
    )
    return None if row is None else _lease(row)


def list_leases(
    db: Runner, *, relay_key: str | None, active_only: bool, limit: int
) -> list[LeaseRecord]:
    conditions: list[str] = []
    params: list[object] = []
    if relay_key is not None:
        conditions.append("relay_key = ?")
        params.append(relay_key)
    if active_only:
        conditions.append("status = 'active'")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    params.append(limit)
    rows = db.fetch_all(
        f"SELECT {_LEASE_COLUMNS} FROM escrow_leases{where}"
        " ORDER BY issued_at_ms DESC, lease_id LIMIT ?",
        params,
    )
    return [_lease(row) for row in rows]


def counts(db: Runner) -> tuple[int, int, int, int | None]:
    """(active deposits, active leases, audit entries, last checkpoint seq)."""
    deposits = db.fetch_one("SELECT COUNT(*) FROM escrow_deposits WHERE status = 'active'", ())
    leases = db.fetch_one("SELECT COUNT(*) FROM escrow_leases WHERE status = 'active'", ())
    audit = db.fetch_one("SELECT COUNT(*) FROM escrow_audit", ())
    checkpoint = db.fetch_one("SELECT MAX(seq) FROM escrow_checkpoints", ())
    assert deposits is not None and leases is not None and audit is not None
    return (
        int(deposits[0]),
        int(leases[0]),
        int(audit[0]),
        None if checkpoint is None or checkpoint[0] is None else int(checkpoint[0]),
    )


# --- audit -----------------------------------------------------------------------------------

_AUDIT_COLUMNS: Final = (
    "seq, at_ms, action, relay_key, deposit_id, lease_id, actor, details, prev_hash, hash"
)


def _audit(row: Row) -> AuditEntry:
    return AuditEntry(
        seq=int(row[0]),
        at_ms=int(row[1]),
        action=str(row[2]),
        relay_key=row[3],
        deposit_id=row[4],
        lease_id=row[5],
        actor=str(row[6]),
        details=json.loads(row[7]),
        prev_hash=str(row[8]),
        hash=str(row[9]),
    )


#: The last audit entry ``(seq, hash)`` appended by a write transaction still running on a
#: runner: the transaction holds the write lock, so nobody else appends until it ends. Dropped
#: with the runner; a transaction that rolls back takes its runner with it (a batch of writes
#: that fails is run again on new runners).
_AUDIT_TAIL: Final[weakref.WeakKeyDictionary[Runner, tuple[int, str]]] = weakref.WeakKeyDictionary()


def last_audit(db: Runner) -> tuple[int, str] | None:
    cached = _AUDIT_TAIL.get(db)
    if cached is not None:
        return cached
    row = db.fetch_one("SELECT seq, hash FROM escrow_audit ORDER BY seq DESC LIMIT 1", ())
    return None if row is None else (int(row[0]), str(row[1]))


def get_audit_entry(db: Runner, seq: int) -> AuditEntry | None:
    row = db.fetch_one(f"SELECT {_AUDIT_COLUMNS} FROM escrow_audit WHERE seq = ?", (seq,))
    return None if row is None else _audit(row)


def insert_audit(db: Runner, entry: AuditEntry, details_json: str) -> Statement:
    """The statement that appends ``entry``; from now on :func:`last_audit` on ``db`` answers
    ``entry`` (run the statement in the same transaction)."""
    _AUDIT_TAIL[db] = (entry.seq, entry.hash)
    return (
        f"INSERT INTO escrow_audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.seq,
            entry.at_ms,
            entry.action,
            entry.relay_key,
            entry.deposit_id,
            entry.lease_id,
            entry.actor,
            details_json,
            entry.prev_hash,
            entry.hash,
        ),
    )


def audit_entries(db: Runner, after_seq: int = 0, limit: int | None = None) -> list[AuditEntry]:
    sql = f"SELECT {_AUDIT_COLUMNS} FROM escrow_audit WHERE seq > ? ORDER BY seq"
    params: list[object] = [after_seq]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_audit(row) for row in db.fetch_all(sql, params)]


def insert_checkpoint(checkpoint: Checkpoint) -> Statement:
    return (
        "INSERT INTO escrow_checkpoints (seq, hash, at_ms, public_key, signature)"
        " VALUES (?, ?, ?, ?, ?)",
        (
            checkpoint.seq,
            checkpoint.hash,
            checkpoint.at_ms,
            checkpoint.public_key,
            checkpoint.signature,
        ),
    )


def checkpoints(db: Runner) -> list[Checkpoint]:
    rows = db.fetch_all(
        "SELECT seq, hash, at_ms, public_key, signature FROM escrow_checkpoints ORDER BY seq", ()
    )
    return [
        Checkpoint(
            seq=int(r[0]),
            hash=str(r[1]),
            at_ms=int(r[2]),
            public_key=str(r[3]),
            signature=str(r[4]),
        )
        for r in rows
    ]


# --- idempotency -----------------------------------------------------------------------------


@attrs.frozen
class IdempotencyRow:
    request_digest: str
    done: bool
    claimed_at_ms: int
    response: str | None


def get_idempotency(db: Runner, key: str) -> IdempotencyRow | None:
    row = db.fetch_one(
        "SELECT request_digest, state, claimed_at_ms, response FROM escrow_idempotency"
        " WHERE idempotency_key = ?",
        (key,),
    )
    if row is None:
        return None
    return IdempotencyRow(str(row[0]), row[1] == "done", int(row[2]), row[3])


def claim_idempotency(db: Runner, key: str, digest: str, now_ms: int) -> None:
    """Insert (or take over a stale) pending claim of ``key``."""
    db.execute("DELETE FROM escrow_idempotency WHERE idempotency_key = ?", (key,))
    db.execute(
        "INSERT INTO escrow_idempotency (idempotency_key, request_digest, state, claimed_at_ms)"
        " VALUES (?, ?, 'pending', ?)",
        (key, digest, now_ms),
    )


def finish_idempotency(db: Runner, key: str, response: str) -> None:
    db.execute(
        "UPDATE escrow_idempotency SET state = 'done', response = ? WHERE idempotency_key = ?",
        (response, key),
    )


def drop_idempotency_claim(db: Runner, key: str, digest: str) -> None:
    db.execute(
        "DELETE FROM escrow_idempotency WHERE idempotency_key = ? AND request_digest = ?"
        " AND state = 'pending'",
        (key, digest),
    )


def all_rows(db: Runner) -> Sequence[Row]:
    """Every row of every escrow table (for tests that prove nothing changed)."""
    out: list[Row] = []
    for table in (
        "escrow_relays",
        "escrow_deposits",
        "escrow_leases",
        "escrow_audit",
        "escrow_checkpoints",
        "escrow_idempotency",
    ):
        out.extend((table, *row) for row in db.fetch_all(f"SELECT * FROM {table} ORDER BY 1", ()))
    return out
