"""The escrow database on PostgreSQL (``ESCROW_DATABASE_URL``).

psycopg 3 with a :class:`psycopg_pool.ConnectionPool` used from worker threads, through the event
store's call machinery (:class:`hypertuna.storage.postgres_events._Call`): each call is one whole
transaction in one thread; a cancelled caller gets its statement cancelled on the server, the
transaction rolled back and the connection back in the pool clean.

Every write transaction first takes one transaction-scoped advisory lock. The audit log is a
single hash chain, so its appends must be serialized anyway; the same lock serializes lease
issuance per relay (and across gateway processes sharing the database). A process-local
:class:`trio.Lock` in front keeps waiting writers from occupying every pooled connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool

from hypertuna.escrow.store import EscrowStorageError, Runner, load_escrow_migrations
from hypertuna.storage.migrate import Migration
from hypertuna.storage.postgres_events import (
    _CANCEL_GRACE_S,
    _Call,
    _configure,
    _connect_kwargs,
    _PgRunner,
)

__all__ = ["PostgresEscrowDatabase", "open_postgres_escrow_database"]

T = TypeVar("T")

_MIGRATIONS_TABLE = "escrow_schema_migrations"
# Serializes escrow migrations, and separately every escrow write (numbers shared by convention).
_MIGRATION_LOCK_ID = 0x68797065_65736D67
_WRITE_LOCK_ID = 0x68797065_65737772


def _apply_migrations(conn: psycopg.Connection[Any], migrations: Sequence[Migration]) -> list[int]:
    applied = []
    for migration in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_MIGRATIONS_TABLE} ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at bigint NOT NULL)"
            )
            done = conn.execute(
                f"SELECT 1 FROM {_MIGRATIONS_TABLE} WHERE version = %s", (migration.version,)
            ).fetchone()
            if done:
                continue
            conn.execute(migration.sql)  # no parameters: sent as one multi-statement query
            conn.execute(
                f"INSERT INTO {_MIGRATIONS_TABLE} (version, name, applied_at)"
                " VALUES (%s, %s, extract(epoch FROM now())::bigint)",
                (migration.version, migration.name),
            )
            applied.append(migration.version)
    return applied


class PostgresEscrowDatabase:
    """:class:`~hypertuna.escrow.store.EscrowDatabase` on PostgreSQL; build it with
    :func:`open_postgres_escrow_database`."""

    backend = "postgres"

    def __init__(
        self, pool: ConnectionPool[psycopg.Connection[Any]], pool_size: int, applied: list[int]
    ) -> None:
        self.applied_migrations = applied
        self._pool = pool
        self._limiter = trio.CapacityLimiter(pool_size)
        self._write_lock = trio.Lock()
        self._closed = False

    async def _call(self, work: Callable[[_PgRunner], T], *, read_only: bool) -> T:
        if self._closed:
            raise EscrowStorageError("the escrow database is closed")
        call = _Call(self._pool, work, read_only=read_only)
        try:
            return await trio.to_thread.run_sync(
                call.run, abandon_on_cancel=True, limiter=self._limiter
            )
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                if call.request_cancel():
                    await trio.to_thread.run_sync(call.send_cancel)
                    with trio.move_on_after(_CANCEL_GRACE_S):
                        await call.finished.wait()
            raise
        except psycopg.Error as exc:
            raise EscrowStorageError(f"PostgreSQL failure: {exc}") from exc

    async def write(self, work: Callable[[Runner], T]) -> T:
        def locked(db: _PgRunner) -> T:
            db.fetch_one("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_ID,))
            return work(db)

        async with self._write_lock:
            return await self._call(locked, read_only=False)

    async def read(self, work: Callable[[Runner], T]) -> T:
        return await self._call(work, read_only=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._pool.close)


def _open(url: str, pool_size: int, open_timeout: float) -> PostgresEscrowDatabase:
    kwargs = _connect_kwargs(url)
    try:
        with psycopg.connect(url, **kwargs) as conn:
            applied = _apply_migrations(conn, load_escrow_migrations("postgres"))
    except psycopg.Error as exc:
        raise EscrowStorageError(f"cannot open the PostgreSQL escrow database: {exc}") from exc
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=pool_size,
        open=False,
        configure=_configure,
        check=ConnectionPool.check_connection,
        name="hypertuna-escrow",
    )
    try:
        pool.open(wait=True, timeout=open_timeout)
    except BaseException as exc:
        pool.close()
        if isinstance(exc, psycopg.Error):
            raise EscrowStorageError(f"cannot open the PostgreSQL connection pool: {exc}") from exc
        raise
    return PostgresEscrowDatabase(pool, pool_size, applied)


@contextlib.asynccontextmanager
async def open_postgres_escrow_database(
    url: str, *, pool_size: int = 4, open_timeout: float = 10.0
) -> AsyncIterator[PostgresEscrowDatabase]:
    """Connect to ``url``, apply pending escrow migrations and yield the database; close the
    pool when the block exits. :class:`EscrowStorageError` if the server cannot be reached."""
    db = await trio.to_thread.run_sync(_open, url, pool_size, open_timeout)
    try:
        yield db
    finally:
        with trio.CancelScope(shield=True):
            await db.aclose()
