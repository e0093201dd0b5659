"""The escrow database on PostgreSQL (``ESCROW_DATABASE_URL``).

psycopg 3 with a :class:`psycopg_pool.ConnectionPool` used from worker threads, through the event
store's call machinery (:class:`hypertuna.storage.postgres_events._Call`): each call is one whole
transaction in one thread; a cancelled caller gets its statement cancelled on the server, the
transaction rolled back and the connection back in the pool clean.

Every write transaction first takes one transaction-scoped advisory lock. The audit log is a
single hash chain, so its appends must be serialized anyway; the same lock serializes lease
issuance per relay (and across gateway processes sharing the database).

Write transactions are grouped (group commit): one writer task runs them, and the writes that
queued up while a transaction was running go together into the next one, and each caller gets
the outcome it would have had alone (see :func:`_run_batch`). Every caller is answered only
after the shared commit, so nothing is acknowledged before it is durable, but a batch pays for
one commit (one WAL flush) instead of one per write: with synchronous commits and the global
write lock, the flush is most of a transaction's time. Only that task takes a pooled connection
for writes, so waiting writers never occupy the pool.

A batch runs in psycopg's pipeline mode, so a write costs a round trip per query whose answer it
reads, not one per statement (an unlock reads twice). Since the write lock serializes every
write, those round trips are the escrow's throughput: see :func:`_run_batch` for how a late
server error is handled.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool

from hypertuna.escrow.store import (
    EscrowStorageError,
    Runner,
    load_escrow_migrations,
)
from hypertuna.storage._event_sql import Row, Statement
from hypertuna.storage.migrate import Migration
from hypertuna.storage.postgres_events import (
    _connect_kwargs,
    _PgRunner,
    open_pool,
    run_call,
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


#: The most write requests one transaction carries.
MAX_BATCH = 32


class _Skipped(Exception):
    """Internal: the caller of a batched write was cancelled before its work ran."""


class _WorkFailed(Exception):
    """Internal: the work of a batch of one raised ``error`` (its transaction rolled back)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Pending(Generic[T]):
    """One caller's write work waiting for (or carried by) a batch."""

    def __init__(self, work: Callable[[Runner], T]) -> None:
        self.work = work
        self.cancelled = False
        self.finished = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def settle(self, result: tuple[bool, object]) -> None:
        ok, value = result
        if ok:
            self._value = value  # type: ignore[assignment]
        else:
            assert isinstance(value, BaseException)
            if isinstance(value, psycopg.Error):
                value = EscrowStorageError(f"PostgreSQL failure: {value}")
            self._error = value
        self.finished.set()

    def fail(self, error: BaseException) -> None:
        if isinstance(error, psycopg.Error):
            error = EscrowStorageError(f"PostgreSQL failure: {error}")
        self._error = error
        self.finished.set()

    def outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class _BatchFailed(Exception):
    """Internal: the shared transaction of a batch cannot give each work the outcome it would
    have had alone (a statement failed on the server, or a work raised after sending a write);
    nothing of it is committed and the writer runs each work again in a transaction of its
    own."""


class _BatchRunner:
    """The runner a batched work gets: the transaction's, noting whether the work has sent a
    statement that may change something (anything but a ``SELECT``)."""

    def __init__(self, inner: _PgRunner) -> None:
        self._inner = inner
        self.max_params = inner.max_params
        self.wrote = False

    def fetch_one(self, sql: str, params: Sequence[object]) -> Row | None:
        self.wrote = self.wrote or not sql.startswith("SELECT")
        return self._inner.fetch_one(sql, params)

    def fetch_all(self, sql: str, params: Sequence[object]) -> list[Row]:
        self.wrote = self.wrote or not sql.startswith("SELECT")
        return self._inner.fetch_all(sql, params)

    def execute(self, sql: str, params: Sequence[object]) -> int:
        self.wrote = True
        return self._inner.execute(sql, params)

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.wrote = True
        self._inner.execute_many(sql, rows)

    def execute_together(self, statements: Sequence[Statement]) -> None:
        self.wrote = True
        self._inner.execute_together(statements)

    def insert_returning_seq(self, sql: str, params: Sequence[object]) -> int | None:
        self.wrote = True
        return self._inner.insert_returning_seq(sql, params)

    def in_list(self, column: str, values: Sequence[object]) -> tuple[str, list[object]]:
        return self._inner.in_list(column, values)

    def index_hint(self, index: str) -> str:
        return self._inner.index_hint(index)


def _run_batch(batch: Sequence[_Pending[Any]], db: _PgRunner) -> list[tuple[bool, object]]:
    """The work of every caller in ``batch``, in order, in one transaction under the write
    lock, each caller getting the outcome it would have had alone.

    The batch runs in psycopg's pipeline mode: a statement whose result nobody reads (the lock,
    inserts and updates) is sent without waiting for its answer, so a work costs one round trip
    per query it reads, not one per statement, and the answers of the rest come back with the
    next read or the final sync. Works raise Python exceptions for their own refusals, almost
    always before they write: such a work has changed nothing and its caller simply gets the
    exception. The rare cases where the shared transaction cannot isolate a work — a server
    error (which in pipeline mode may surface in a later work), or a work that raises after
    writing — raise :class:`_BatchFailed`. Per-work savepoints would isolate them too, but cost
    a statement each on every write, for what does not happen."""
    with db.connection.pipeline() as pipeline:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_ID,))
        if len(batch) == 1:
            if batch[0].cancelled:
                return [(False, _Skipped())]
            # Alone: if the work raises, its transaction is rolled back whole.
            try:
                return [(True, batch[0].work(db))]
            except psycopg.Error:
                raise  # the transaction failed (maybe the connection): EscrowStorageError
            except Exception as exc:
                raise _WorkFailed(exc) from exc
        results: list[tuple[bool, object]] = []
        # One runner for the whole batch: what it remembers (the audit chain's tail) holds
        # for every work of the transaction.
        runner = _BatchRunner(db)
        try:
            for item in batch:
                if item.cancelled:
                    results.append((False, _Skipped()))
                    continue
                runner.wrote = False
                try:
                    results.append((True, item.work(runner)))
                except psycopg.Error:
                    raise
                except Exception as exc:  # handed to its caller, if it changed nothing
                    if runner.wrote:
                        raise _BatchFailed from exc
                    results.append((False, exc))
            pipeline.sync()
        except psycopg.OperationalError:
            raise  # the connection is gone: every caller gets EscrowStorageError
        except psycopg.Error as exc:
            raise _BatchFailed from exc
    return results


class PostgresEscrowDatabase:
    """:class:`~hypertuna.escrow.store.EscrowDatabase` on PostgreSQL; build it with
    :func:`open_postgres_escrow_database`."""

    backend = "postgres"

    def __init__(
        self, pool: ConnectionPool[psycopg.Connection[Any]], pool_size: int, applied: list[int]
    ) -> None:
        self.applied_migrations = applied
        self._pool = pool
        # The writer task has a connection and a thread of its own, so that reads (as many as
        # the rest of the pool) never make the one writer wait.
        self._read_limiter = trio.CapacityLimiter(max(pool_size - 1, 1))
        self._write_limiter = trio.CapacityLimiter(1)
        self._queue: list[_Pending[Any]] = []
        self._has_work = trio.Event()
        self._closed = False

    async def _call(self, work: Callable[[_PgRunner], T], *, read_only: bool) -> T:
        if self._closed:
            raise EscrowStorageError("the escrow database is closed")
        return await run_call(
            self._pool,
            self._read_limiter if read_only else self._write_limiter,
            work,
            read_only=read_only,
            error=EscrowStorageError,
        )

    async def write(self, work: Callable[[Runner], T]) -> T:
        """Run ``work`` in a write transaction, batched with the writes queued at the same time
        (group commit: see the module docstring). A caller cancelled before its work has run is
        dropped from its batch; one cancelled later leaves, and the batch commits without it
        waiting."""
        if self._closed:
            raise EscrowStorageError("the escrow database is closed")
        item: _Pending[T] = _Pending(work)
        self._queue.append(item)
        self._has_work.set()
        try:
            await item.finished.wait()
        except BaseException:
            if not item.finished.is_set():
                if item in self._queue:
                    self._queue.remove(item)
                item.cancelled = True
            raise
        return item.outcome()

    async def _writer(self) -> None:
        """The one task that runs write transactions: the queued writes (up to
        :data:`MAX_BATCH`) in one transaction, then every caller gets its outcome."""
        batch: list[_Pending[Any]] = []
        try:
            while True:
                if not self._queue:
                    self._has_work = trio.Event()
                    await self._has_work.wait()
                    continue
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._run(batch)
                except _BatchFailed:
                    # Nothing of the batch was committed: each work again, alone.
                    for item in batch:
                        await self._run([item])
                batch = []
        finally:
            closed = EscrowStorageError("the escrow database is closed")
            for item in [*batch, *self._queue]:
                if not item.finished.is_set():
                    item.fail(closed)
            self._queue = []

    async def _run(self, batch: list[_Pending[Any]]) -> None:
        """Run ``batch`` in one transaction and settle its callers; :class:`_BatchFailed` (no
        caller settled) when a server error lost the transaction of a batch of several."""
        try:
            results = await self._call(functools.partial(_run_batch, batch), read_only=False)
        except _BatchFailed:
            raise
        except _WorkFailed as failed:
            batch[0].fail(failed.error)
        except Exception as exc:
            for item in batch:
                item.fail(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                item.settle(result)

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
    pool = open_pool(
        url, kwargs, pool_size, open_timeout, name="hypertuna-escrow", error=EscrowStorageError
    )
    return PostgresEscrowDatabase(pool, pool_size, applied)


@contextlib.asynccontextmanager
async def open_postgres_escrow_database(
    url: str, *, pool_size: int = 4, open_timeout: float = 10.0
) -> AsyncIterator[PostgresEscrowDatabase]:
    """Connect to ``url``, apply pending escrow migrations and yield the database; close the
    pool when the block exits. :class:`EscrowStorageError` if the server cannot be reached."""
    db = await trio.to_thread.run_sync(_open, url, pool_size, open_timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db._writer)
            try:
                yield db
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await db.aclose()
