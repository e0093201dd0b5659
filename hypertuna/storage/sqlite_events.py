"""Embedded :class:`~hypertuna.storage.events.EventStore` on one SQLite file.

One writer connection and one reader connection, each guarded by a :class:`trio.Lock` and only
ever used from a worker thread (``trio.to_thread.run_sync``). The file is in WAL mode so the
reader never waits for the writer, with ``synchronous=FULL`` so that a batch is on disk when
``ingest`` returns; a batch is one ``BEGIN IMMEDIATE ... COMMIT``. A query and its ``high_seq``
are read in one read transaction, hence from one snapshot.

Reads first run on the event loop itself, on a third connection, with a hard budget of
``INLINE_READ_BUDGET_S``: a progress handler interrupts anything slower, and it is then run
again on the worker thread. Why: an indexed read takes well under a millisecond, while handing
it to a sleeping worker thread and waking the loop again cost 0.4 ms at the median and several
milliseconds at the tail on the machines measured, which dominated REQ latency. The inline
connection never waits for a lock (busy timeout 0): a busy database also goes to the thread.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from hypertuna.protocol.nostr.model import Event, Filter
from hypertuna.storage import _event_sql as core
from hypertuna.storage import registrations
from hypertuna.storage.events import (
    BeforeCommit,
    IngestItem,
    IngestResult,
    QueryResult,
    RelayRecord,
    StorageError,
    ViewCore,
)
from hypertuna.storage.migrate import Migration, load_migrations

__all__ = ["SqliteEventStore", "open_sqlite_event_store"]

T = TypeVar("T")

_BUSY_TIMEOUT_S = 10.0
#: Longest a read may hold the event loop before it is moved to the worker thread.
INLINE_READ_BUDGET_S = 0.002
# SQLite VM steps between checks of the inline budget.
_PROGRESS_STEPS = 2000
_CACHE_KIB = 32 * 1024
_WAL_CHECKPOINT_PAGES = 4000
_WAL_SIZE_LIMIT = 64 * 1024 * 1024


class _SqliteRunner:
    """:class:`~hypertuna.storage._event_sql.SqlRunner` over a sqlite3 connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # Stay under the compile-time limit of any SQLite build (32766 since 3.32).
        self.max_params = min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 30_000)

    def fetch_one(self, sql: str, params: Sequence[object]) -> core.Row | None:
        # fetchall() runs the statement to completion (and resets it) even for RETURNING.
        rows = self._conn.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def fetch_all(self, sql: str, params: Sequence[object]) -> list[core.Row]:
        return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[object]) -> int:
        return self._conn.execute(sql, params).rowcount

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._conn.executemany(sql, rows)

    def insert_returning_seq(self, sql: str, params: Sequence[object]) -> int | None:
        # RETURNING costs SQLite about a third of a plain insert; the rowid is at hand anyway.
        cursor = self._conn.execute(sql, params)
        return cursor.lastrowid if cursor.rowcount == 1 else None

    def in_list(self, column: str, values: Sequence[object]) -> tuple[str, list[object]]:
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    def execute_together(self, statements: Sequence[core.Statement]) -> None:
        # No round trips to save in process: one by one.
        for sql, params in statements:
            self._conn.execute(sql, params)

    def index_hint(self, index: str) -> str:
        return f" INDEXED BY {index}"


def _end(conn: sqlite3.Connection, statement: str) -> None:
    # SQLite rolls some failed transactions back by itself; only end one that is still open.
    if conn.in_transaction:
        conn.execute(statement)


def _in_transaction(conn: sqlite3.Connection, begin: str, work: Callable[[_SqliteRunner], T]) -> T:
    conn.execute(begin)
    try:
        result = work(_SqliteRunner(conn))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            _end(conn, "ROLLBACK")
        raise
    return result


def split_script(script: str) -> list[str]:
    """Split a SQL script into complete statements (a trigger body stays whole). Raises
    :class:`ValueError` if text other than comments follows the last statement."""
    statements: list[str] = []
    pending = ""
    *terminated, tail = script.split(";")
    for piece in terminated:
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            body = "\n".join(
                line for line in pending.splitlines() if not line.strip().startswith("--")
            ).strip()
            if body.strip(";").strip():
                statements.append(body)
            pending = ""
    rest = "\n".join(
        line for line in (pending + tail).splitlines() if not line.strip().startswith("--")
    )
    if rest.strip():
        raise ValueError(f"incomplete SQL statement at the end of a script: {rest.strip()!r}")
    return statements


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    for migration in load_migrations("sqlite"):
        _in_transaction(
            conn, "BEGIN IMMEDIATE", functools.partial(_apply_migration, conn, migration)
        )


def _apply_migration(conn: sqlite3.Connection, migration: Migration, db: _SqliteRunner) -> None:
    if db.fetch_one("SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)):
        return  # already applied (possibly by another process just now)
    for statement in split_script(migration.sql):
        conn.execute(statement)
    db.execute(
        "INSERT INTO schema_migrations (version, name, applied_at)"
        " VALUES (?, ?, CAST(strftime('%s', 'now') AS INTEGER))",
        (migration.version, migration.name),
    )


def _connect(
    path: Path, *, writer: bool, busy_timeout_s: float = _BUSY_TIMEOUT_S
) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # used from trio worker threads, one at a time (trio.Lock)
        cached_statements=512,
    )
    try:
        if writer:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StorageError(f"cannot put {path} in WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Index pages touched by consecutive batches are copied back to the database once
            # per checkpoint, so fewer, larger checkpoints write much less.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        else:
            conn.execute("PRAGMA query_only = ON")
        conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        conn.execute("PRAGMA temp_store = MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteEventStore:
    """The SQLite event store; build it with :func:`open_sqlite_event_store`."""

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection,
        reader: sqlite3.Connection,
        inline_reader: sqlite3.Connection,
    ) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._inline_reader = inline_reader
        #: Reads answered on the loop, and reads moved to the worker thread.
        self.inline_reads = 0
        self.threaded_reads = 0
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._closed = False

    async def _run(self, lock: trio.Lock, work: Callable[[], T]) -> T:
        async with lock:
            if self._closed:
                raise StorageError("the event store is closed")
            try:
                # Not abandoned on cancel: the lock must cover the thread until it finishes.
                return await trio.to_thread.run_sync(work)
            except sqlite3.Error as exc:
                raise StorageError(f"SQLite failure on {self.path}: {exc}") from exc

    async def _write(self, work: Callable[[_SqliteRunner], T]) -> T:
        return await self._run(
            self._write_lock,
            functools.partial(_in_transaction, self._writer, "BEGIN IMMEDIATE", work),
        )

    async def _read(self, work: Callable[[_SqliteRunner], T]) -> T:
        if self._closed:
            raise StorageError("the event store is closed")
        done, result = self._read_inline(work)
        if done:
            self.inline_reads += 1
            await trio.lowlevel.checkpoint()
            return result  # type: ignore[return-value]
        self.threaded_reads += 1
        return await self._run(
            self._read_lock, functools.partial(_in_transaction, self._reader, "BEGIN", work)
        )

    def _read_inline(self, work: Callable[[_SqliteRunner], T]) -> tuple[bool, T | None]:
        """(True, result) when ``work`` finished within the budget, (False, None) when it must
        go to the worker thread (too slow, or the database was busy)."""
        deadline = time.perf_counter() + INLINE_READ_BUDGET_S
        over_budget = False

        def progress() -> int:
            nonlocal over_budget
            over_budget = time.perf_counter() > deadline
            return over_budget

        conn = self._inline_reader
        conn.set_progress_handler(progress, _PROGRESS_STEPS)
        try:
            return True, _in_transaction(conn, "BEGIN", work)
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if over_budget or code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False, None
            raise StorageError(f"SQLite failure on {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite failure on {self.path}: {exc}") from exc
        finally:
            conn.set_progress_handler(None, 0)

    async def ping(self) -> None:
        await self._read(lambda db: db.fetch_one("SELECT 1", ()))

    async def create_relay(
        self, *, key: str, name: str, description: str, created_at: int
    ) -> RelayRecord:
        record = RelayRecord(
            id=0, key=key, name=name, description=description, created_at=created_at
        )
        return await self._write(lambda db: core.create_relay(db, record))

    async def list_relays(self) -> list[RelayRecord]:
        return await self._read(core.list_relays)

    async def get_relay(self, key_or_name: str) -> RelayRecord | None:
        return await self._read(lambda db: core.get_relay(db, key_or_name))

    async def ingest(self, items: Sequence[IngestItem], *, now: int) -> list[IngestResult]:
        core.check_ingest_items(items)
        if not items:
            return []
        batch = list(items)
        return await self._write(lambda db: core.ingest_batch(db, batch, now))

    async def query(
        self, relay_id: int, filters: Sequence[Filter], *, now: int, max_limit: int
    ) -> QueryResult:
        wanted = list(filters)

        def work(db: _SqliteRunner) -> QueryResult:
            events = core.query_events(db, relay_id, wanted, now=now, max_limit=max_limit)
            return QueryResult(events=events, high_seq=core.high_seq(db))

        return await self._read(work)

    async def count(self, relay_id: int, filters: Sequence[Filter], *, now: int) -> int:
        wanted = list(filters)
        return await self._read(lambda db: core.count_events(db, relay_id, wanted, now=now))

    async def purge_expired(self, *, now: int) -> int:
        return await self._write(lambda db: core.purge_expired(db, now))

    async def event_count(self, relay_id: int) -> int:
        return await self._read(lambda db: core.event_count(db, relay_id))

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
        return await self._write(
            lambda db: core.apply_view(db, relay_id, batch, rows, before_commit)
        )

    async def view_cores(self, relay_id: int) -> list[ViewCore]:
        return await self._read(lambda db: core.view_cores(db, relay_id))

    async def apply_registration(
        self, registration: registrations.Registration, *, now: int
    ) -> tuple[registrations.RegistrationOutcome, registrations.WorkerRelay | None]:
        return await self._write(lambda db: registrations.apply(db, registration, now))

    async def worker_relays(self) -> list[registrations.WorkerRelay]:
        return await self._read(registrations.list_worker_relays)

    async def worker_relay(self, relay_key: str) -> registrations.WorkerRelay | None:
        return await self._read(lambda db: registrations.worker_relay(db, relay_key))

    async def reset_view(self, relay_id: int) -> None:
        await self._write(lambda db: core.reset_view(db, relay_id))

    async def aclose(self) -> None:
        # Taking both locks waits for calls in flight; new ones then see _closed.
        async with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            await trio.to_thread.run_sync(self._close_connections)

    def _close_connections(self) -> None:
        try:
            self._inline_reader.close()
            self._reader.close()
        finally:
            self._writer.close()


def _open(path: Path) -> SqliteEventStore:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _connect(path, writer=True)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open SQLite database {path}: {exc}") from exc
    try:
        _migrate(writer)
        reader = _connect(path, writer=False)
        inline_reader = _connect(path, writer=False, busy_timeout_s=0.0)
    except BaseException as exc:
        writer.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot migrate SQLite database {path}: {exc}") from exc
        raise
    return SqliteEventStore(path, writer, reader, inline_reader)


@contextlib.asynccontextmanager
async def open_sqlite_event_store(path: Path) -> AsyncIterator[SqliteEventStore]:
    """Open (creating it and its directory if needed) and migrate the SQLite event store at
    ``path``; close it when the block exits."""
    store = await trio.to_thread.run_sync(_open, path)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
