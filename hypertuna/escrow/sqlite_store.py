"""The escrow database on one SQLite file (the embedded default, ``./var/escrow.db``).

One connection, guarded by a :class:`trio.Lock` and used only from a worker thread, in WAL mode
with ``synchronous=FULL``. Every call is one whole transaction; writes are ``BEGIN IMMEDIATE``,
which takes SQLite's write lock at once, so write transactions — lease issuance included — are
serialized across tasks and across processes sharing the file. A call is not abandoned when its
task is cancelled: the lock covers the thread until its transaction has committed or rolled back.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import trio

from hypertuna.escrow.store import EscrowStorageError, Runner, load_escrow_migrations
from hypertuna.storage.migrate import Migration
from hypertuna.storage.sqlite_events import _connect, _in_transaction, split_script

__all__ = ["SqliteEscrowDatabase", "open_sqlite_escrow_database"]

T = TypeVar("T")

_MIGRATIONS_TABLE = "escrow_schema_migrations"


def _apply(conn: sqlite3.Connection, migration: Migration, db: Runner) -> bool:
    if db.fetch_one(f"SELECT 1 FROM {_MIGRATIONS_TABLE} WHERE version = ?", (migration.version,)):
        return False  # already applied (possibly by another process just now)
    for statement in split_script(migration.sql):
        conn.execute(statement)
    db.execute(
        f"INSERT INTO {_MIGRATIONS_TABLE} (version, name, applied_at)"
        " VALUES (?, ?, CAST(strftime('%s', 'now') AS INTEGER))",
        (migration.version, migration.name),
    )
    return True


def _migrate(conn: sqlite3.Connection) -> list[int]:
    # A table of its own: the escrow may share a database file with other stores.
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_MIGRATIONS_TABLE} ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    applied = []
    for migration in load_escrow_migrations("sqlite"):
        if _in_transaction(conn, "BEGIN IMMEDIATE", functools.partial(_apply, conn, migration)):
            applied.append(migration.version)
    return applied


class SqliteEscrowDatabase:
    """:class:`~hypertuna.escrow.store.EscrowDatabase` on SQLite; build it with
    :func:`open_sqlite_escrow_database`."""

    backend = "sqlite"

    def __init__(self, path: Path, conn: sqlite3.Connection, applied: list[int]) -> None:
        self.path = path
        self.applied_migrations = applied
        self._conn = conn
        self._lock = trio.Lock()
        self._closed = False

    async def _run(self, begin: str, work: Callable[[Runner], T]) -> T:
        async with self._lock:
            if self._closed:
                raise EscrowStorageError("the escrow database is closed")
            try:
                return await trio.to_thread.run_sync(
                    functools.partial(_in_transaction, self._conn, begin, work)
                )
            except sqlite3.Error as exc:
                raise EscrowStorageError(f"SQLite failure on {self.path}: {exc}") from exc

    async def write(self, work: Callable[[Runner], T]) -> T:
        return await self._run("BEGIN IMMEDIATE", work)

    async def read(self, work: Callable[[Runner], T]) -> T:
        return await self._run("BEGIN", work)

    async def aclose(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await trio.to_thread.run_sync(self._conn.close)


def _open(path: Path) -> SqliteEscrowDatabase:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path, writer=True)
    except (OSError, sqlite3.Error) as exc:
        raise EscrowStorageError(f"cannot open SQLite database {path}: {exc}") from exc
    try:
        applied = _migrate(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise EscrowStorageError(f"cannot migrate SQLite database {path}: {exc}") from exc
        raise
    return SqliteEscrowDatabase(path, conn, applied)


@contextlib.asynccontextmanager
async def open_sqlite_escrow_database(path: Path) -> AsyncIterator[SqliteEscrowDatabase]:
    """Open (creating it and its directory if needed) and migrate the escrow database at
    ``path``; close it when the block exits."""
    db = await trio.to_thread.run_sync(_open, path)
    try:
        yield db
    finally:
        with trio.CancelScope(shield=True):
            await db.aclose()
