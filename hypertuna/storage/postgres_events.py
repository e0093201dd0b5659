"""PostgreSQL :class:`~hypertuna.storage.events.EventStore`.

psycopg 3 with a synchronous :class:`psycopg_pool.ConnectionPool`, used from worker threads: each
store call is one whole transaction inside one ``trio.to_thread.run_sync`` call, so a connection
is never shared between tasks and never left mid-transaction. Write transactions run one at a
time. Queries run in ``REPEATABLE READ`` so that their ``high_seq`` comes from the same snapshot
as their rows; ingest commits with ``synchronous_commit = on``.

When the calling trio task is cancelled, the statement running on the server is cancelled too
(``Connection.cancel_safe``), the transaction is rolled back and the connection goes back to the
pool in a clean state; the caller gets :class:`trio.Cancelled` once that is done (or after a
grace period if the server does not answer). Connection failures raise
:class:`~hypertuna.storage.events.StorageError`; the pool checks connections before handing them
out, so the next call gets a fresh one.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from psycopg_pool import ConnectionPool

from hypertuna.protocol.nostr.model import Event, Filter
from hypertuna.storage import _event_sql as core
from hypertuna.storage import registrations
from hypertuna.storage.events import (
    BeforeCommit,
    IngestItem,
    IngestResult,
    QueryResult,
    RelayExistsError,
    RelayRecord,
    StorageError,
    ViewCore,
)
from hypertuna.storage.migrate import Migration, load_migrations

__all__ = ["PostgresEventStore", "open_postgres_event_store"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_APPLICATION_NAME = "hypertuna-gateway"
_CONNECT_TIMEOUT_S = 10
_CANCEL_TIMEOUT_S = 5.0
# How long a cancelled caller waits for its thread to roll back before giving up on it.
_CANCEL_GRACE_S = 10.0
# Serialises concurrent migrations of the same database (any number, shared by convention).
_MIGRATION_LOCK_ID = 0x68797065_7274756E
# Serialises claims of relay keys and names (hosted relays, worker registrations) across
# processes: the write lock is per process, and `hypertuna relay create` opens the database
# beside a running gateway. Each claim checks both tables before inserting into one.
_RELAY_CLAIM_LOCK_ID = 0x68797065_72636C6D


def _lock_relay_claims(db: _PgRunner) -> None:
    db.fetch_one("SELECT pg_advisory_xact_lock(?)", (_RELAY_CLAIM_LOCK_ID,))


@functools.lru_cache(maxsize=2048)
def _pg_sql(sql: str) -> str:
    """The shared ``?`` placeholder in psycopg's ``%s`` style."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgRunner:
    """:class:`~hypertuna.storage._event_sql.SqlRunner` over a psycopg connection."""

    max_params = 30_000

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        #: The connection the transaction runs on (for pipeline mode).
        self.connection = conn
        self._cur = conn.cursor()

    def fetch_one(self, sql: str, params: Sequence[object]) -> core.Row | None:
        self._cur.execute(_pg_sql(sql), params)
        return self._cur.fetchone()

    def fetch_all(self, sql: str, params: Sequence[object]) -> list[core.Row]:
        self._cur.execute(_pg_sql(sql), params)
        return self._cur.fetchall()

    def execute(self, sql: str, params: Sequence[object]) -> int:
        self._cur.execute(_pg_sql(sql), params)
        return self._cur.rowcount

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._cur.executemany(_pg_sql(sql), rows)

    def execute_together(self, statements: Sequence[core.Statement]) -> None:
        if len(statements) == 1:
            self.execute(*statements[0])
            return
        *first, (last_sql, last_params) = statements
        heads = ", ".join(f"w{index} AS ({sql})" for index, (sql, _) in enumerate(first))
        params = [value for _, values in first for value in values]
        self.execute(f"WITH {heads} {last_sql}", [*params, *last_params])

    def insert_returning_seq(self, sql: str, params: Sequence[object]) -> int | None:
        row = self.fetch_one(sql + " RETURNING seq", params)
        return None if row is None else int(row[0])

    def in_list(self, column: str, values: Sequence[object]) -> tuple[str, list[object]]:
        # One array parameter keeps the statement text independent of the list length, so
        # psycopg's automatic prepared statements get reused.
        return f"{column} = ANY(?)", [list(values)]

    def index_hint(self, index: str) -> str:
        return ""  # PostgreSQL has statistics and no hints


class _State(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    ABANDONED = "abandoned"
    DONE = "done"


class _CallCancelled(Exception):
    """Raised in the worker thread to roll back a transaction whose caller was cancelled."""


class _Call(Generic[T]):
    """One store call: a transaction run in a worker thread, cancellable from trio.

    ``lock`` orders the thread's use of the connection against a cancel request, so a cancel
    is only ever sent to the connection while this call still holds it.
    """

    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[Any]],
        work: Callable[[_PgRunner], T],
        *,
        read_only: bool,
    ) -> None:
        self._pool = pool
        self._work = work
        self._read_only = read_only
        self._token = trio.lowlevel.current_trio_token()
        self._conn: psycopg.Connection[Any] | None = None
        self._cancel_requested = False
        self.lock = threading.Lock()
        self.state = _State.PENDING
        self.finished = trio.Event()

    def run(self) -> T:
        with self.lock:
            if self.state is _State.ABANDONED:
                raise _CallCancelled
            self.state = _State.RUNNING
        try:
            with self._pool.connection() as conn:
                with self.lock:
                    self._conn = conn
                try:
                    return self._transaction(conn)
                finally:
                    with self.lock:
                        self._conn = None
        finally:
            with self.lock:
                self.state = _State.DONE
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self.finished.set)

    def _transaction(self, conn: psycopg.Connection[Any]) -> T:
        # Folded into the BEGIN that psycopg sends, so they cost no round trip. Reads need one
        # snapshot for their rows and high_seq; the single writer is fine with the default.
        if self._read_only:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        else:
            conn.isolation_level = None
            conn.read_only = None
        with conn.transaction():
            if self._cancel_requested:
                raise _CallCancelled
            result = self._work(_PgRunner(conn))
            # A cancel that arrived between statements did not stop anything on the server.
            if self._cancel_requested:
                raise _CallCancelled
        return result

    def request_cancel(self) -> bool:
        """Mark the call cancelled; True when a thread is running it (then ``send_cancel``
        and wait for ``finished``)."""
        with self.lock:
            self._cancel_requested = True
            if self.state is _State.PENDING:
                self.state = _State.ABANDONED
            return self.state is _State.RUNNING

    def send_cancel(self) -> None:
        """Ask the server to cancel the statement running for this call, if any."""
        with self.lock:
            if self._conn is None:
                return
            try:
                self._conn.cancel_safe(timeout=_CANCEL_TIMEOUT_S)
            except psycopg.Error as exc:
                logger.warning("cancelling a PostgreSQL statement failed: %s", exc)


def _connect_kwargs(url: str) -> dict[str, Any]:
    given = psycopg.conninfo.conninfo_to_dict(url)
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = _CONNECT_TIMEOUT_S
    if "application_name" not in given:
        kwargs["application_name"] = _APPLICATION_NAME
    return kwargs


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Session settings of every pooled connection."""
    # "Acknowledged means durable" must not depend on the server's default.
    conn.execute("SET synchronous_commit = on")


def _apply_migrations(conn: psycopg.Connection[Any], migrations: Sequence[Migration]) -> None:
    for migration in migrations:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at bigint NOT NULL)"
            )
            done = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
            ).fetchone()
            if done:
                continue
            # No parameters: psycopg sends the script as one multi-statement query.
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at)"
                " VALUES (%s, %s, extract(epoch FROM now())::bigint)",
                (migration.version, migration.name),
            )


class PostgresEventStore:
    """The PostgreSQL event store; build it with :func:`open_postgres_event_store`."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]], pool_size: int) -> None:
        self._pool = pool
        # One thread per pooled connection: more would only queue inside the pool.
        self._limiter = trio.CapacityLimiter(pool_size)
        # Write transactions run one at a time, as on SQLite: seq then grows in commit order
        # (what QueryResult.high_seq promises), and a purge or an edge batch never interleaves
        # with the merge decisions of a view batch.
        self._write_lock = trio.Lock()
        self._closed = False

    async def _run(self, work: Callable[[_PgRunner], T], *, read_only: bool) -> T:
        if read_only:
            return await self._call(work, read_only=True)
        async with self._write_lock:
            return await self._call(work, read_only=False)

    async def _call(self, work: Callable[[_PgRunner], T], *, read_only: bool) -> T:
        if self._closed:
            raise StorageError("the event store is closed")
        return await run_call(self._pool, self._limiter, work, read_only=read_only)

    async def ping(self) -> None:
        await self._run(lambda db: db.fetch_one("SELECT 1", ()), read_only=True)

    async def create_relay(
        self, *, key: str, name: str, description: str, created_at: int
    ) -> RelayRecord:
        record = RelayRecord(
            id=0, key=key, name=name, description=description, created_at=created_at
        )

        def work(db: _PgRunner) -> RelayRecord:
            _lock_relay_claims(db)
            try:
                return core.create_relay(db, record)
            except psycopg.errors.UniqueViolation as exc:  # lost a race with another writer
                raise RelayExistsError(f"relay {key} or {name!r} already exists") from exc

        return await self._run(work, read_only=False)

    async def list_relays(self) -> list[RelayRecord]:
        return await self._run(core.list_relays, read_only=True)

    async def get_relay(self, key_or_name: str) -> RelayRecord | None:
        return await self._run(lambda db: core.get_relay(db, key_or_name), read_only=True)

    async def ingest(self, items: Sequence[IngestItem], *, now: int) -> list[IngestResult]:
        core.check_ingest_items(items)
        if not items:
            return []
        batch = list(items)
        return await self._run(lambda db: core.ingest_batch(db, batch, now), read_only=False)

    async def query(
        self, relay_id: int, filters: Sequence[Filter], *, now: int, max_limit: int
    ) -> QueryResult:
        wanted = list(filters)

        def work(db: _PgRunner) -> QueryResult:
            events = core.query_events(db, relay_id, wanted, now=now, max_limit=max_limit)
            return QueryResult(events=events, high_seq=core.high_seq(db))

        return await self._run(work, read_only=True)

    async def count(self, relay_id: int, filters: Sequence[Filter], *, now: int) -> int:
        wanted = list(filters)
        return await self._run(
            lambda db: core.count_events(db, relay_id, wanted, now=now), read_only=True
        )

    async def purge_expired(self, *, now: int) -> int:
        return await self._run(lambda db: core.purge_expired(db, now), read_only=False)

    async def event_count(self, relay_id: int) -> int:
        return await self._run(lambda db: core.event_count(db, relay_id), read_only=True)

    async def apply_view(
        self,
        relay_id: int,
        events: Sequence[Event],
        cores: Sequence[ViewCore],
        *,
        before_commit: BeforeCommit | None = None,
    ) -> list[IngestResult]:
        core.check_events(events)
        batch, rows = list(events), list(cores)
        return await self._run(
            lambda db: core.apply_view(db, relay_id, batch, rows, before_commit), read_only=False
        )

    async def view_cores(self, relay_id: int) -> list[ViewCore]:
        return await self._run(lambda db: core.view_cores(db, relay_id), read_only=True)

    async def apply_registration(
        self, registration: registrations.Registration, *, now: int
    ) -> tuple[registrations.RegistrationOutcome, registrations.WorkerRelay | None]:
        def work(
            db: _PgRunner,
        ) -> tuple[registrations.RegistrationOutcome, registrations.WorkerRelay | None]:
            _lock_relay_claims(db)
            return registrations.apply(db, registration, now)

        return await self._run(work, read_only=False)

    async def worker_relays(self) -> list[registrations.WorkerRelay]:
        return await self._run(registrations.list_worker_relays, read_only=True)

    async def worker_relay(self, relay_key: str) -> registrations.WorkerRelay | None:
        return await self._run(lambda db: registrations.worker_relay(db, relay_key), read_only=True)

    async def reset_view(self, relay_id: int) -> None:
        await self._run(lambda db: core.reset_view(db, relay_id), read_only=False)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Connections still in use are closed by the pool when their call returns them.
        await trio.to_thread.run_sync(self._pool.close)


def _open(url: str, pool_size: int, open_timeout: float) -> PostgresEventStore:
    kwargs = _connect_kwargs(url)
    try:
        # A direct connection first: an unreachable server fails here at once instead of
        # after the pool's retry window, and migrations need a session of their own anyway.
        with psycopg.connect(url, **kwargs) as conn:
            _apply_migrations(conn, load_migrations("postgres"))
    except psycopg.Error as exc:
        raise StorageError(f"cannot open the PostgreSQL event store: {exc}") from exc
    pool = open_pool(url, kwargs, pool_size, open_timeout, name="hypertuna-events")
    return PostgresEventStore(pool, pool_size)


async def run_call(
    pool: ConnectionPool[psycopg.Connection[Any]],
    limiter: trio.CapacityLimiter,
    work: Callable[[_PgRunner], T],
    *,
    read_only: bool,
    error: type[StorageError] = StorageError,
) -> T:
    """Run ``work`` as one transaction on a pooled connection in a worker thread, cancel-safe:
    a cancelled call cancels its statement on the server and waits (briefly, shielded) for the
    thread, so the connection goes back clean. A database failure raises ``error``."""
    call = _Call(pool, work, read_only=read_only)
    try:
        # Abandoning lets trio deliver the cancellation at once; the except branch below then
        # makes sure the thread really stops and the connection is clean again.
        return await trio.to_thread.run_sync(call.run, abandon_on_cancel=True, limiter=limiter)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            if call.request_cancel():
                await trio.to_thread.run_sync(call.send_cancel)
                with trio.move_on_after(_CANCEL_GRACE_S):
                    await call.finished.wait()
        raise
    except psycopg.Error as exc:
        raise error(f"PostgreSQL failure: {exc}") from exc


def open_pool(
    url: str,
    kwargs: dict[str, Any],
    pool_size: int,
    open_timeout: float,
    *,
    name: str,
    error: type[StorageError] = StorageError,
) -> ConnectionPool[psycopg.Connection[Any]]:
    """An open connection pool of up to ``pool_size`` sessions configured like the event
    store's; ``error`` (a :class:`StorageError`) when it cannot open within ``open_timeout``."""
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=pool_size,
        open=False,
        configure=_configure,
        check=ConnectionPool.check_connection,
        name=name,
    )
    try:
        pool.open(wait=True, timeout=open_timeout)
    except BaseException as exc:
        pool.close()
        if isinstance(exc, psycopg.Error):
            raise error(f"cannot open the PostgreSQL connection pool: {exc}") from exc
        raise
    return pool


@contextlib.asynccontextmanager
async def open_postgres_event_store(
    url: str, *, pool_size: int = 4, open_timeout: float = 10.0
) -> AsyncIterator[PostgresEventStore]:
    """Connect to ``url``, apply pending migrations and yield the store; close the pool when
    the block exits. :class:`StorageError` if the server cannot be reached."""
    store = await trio.to_thread.run_sync(_open, url, pool_size, open_timeout)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
