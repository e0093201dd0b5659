"""PostgreSQL specifics: cancellation reaches the server, lost connections become
StorageError, the pool stays usable, migrations are recorded once."""

from __future__ import annotations

import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from hypertuna.storage.events import IngestItem, StorageError, open_event_store
from hypertuna.storage.migrate import load_migrations
from tests.storage.storage_factory import NOW, flt, make_event, new_relay, open_store, put


def _with_application_name(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [*urllib.parse.parse_qsl(parts.query), ("application_name", name)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True, application_name="hypertuna-test-helper")


def _lock_events(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection holding an exclusive lock on ``events`` until it is closed."""
    conn = _connect(url)
    conn.execute("BEGIN")
    conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    return conn


def _lock_waiters(url: str, application_name: str) -> list[int]:
    with _connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'",
            (application_name,),
        ).fetchall()
    return [int(row[0]) for row in rows]


async def _wait_for_lock_waiter(url: str, application_name: str) -> int:
    while True:
        waiters = await trio.to_thread.run_sync(_lock_waiters, url, application_name)
        if waiters:
            assert len(waiters) == 1
            return waiters[0]
        await trio.sleep(0.02)


@pytest.mark.postgres
async def test_cancelling_a_call_cancels_its_statement_and_rolls_back(
    pg_url: str, tmp_path: Path
) -> None:
    app = f"hypertuna-test-{secrets.token_hex(4)}"
    url = _with_application_name(pg_url, app)
    async with open_store((url, tmp_path)) as store:
        relay = await new_relay(store)
        blocker = await trio.to_thread.run_sync(_lock_events, url)
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: store.ingest([IngestItem(relay.id, make_event())], now=NOW)
                    )
                    await _wait_for_lock_waiter(url, app)
                    cancelled_at = trio.current_time()
                    scope.cancel()
            assert scope.cancelled_caught
            # Without a server-side cancel the call would wait for the lock (the grace period
            # is 10 s); with it, the statement fails at once and the thread rolls back.
            assert trio.current_time() - cancelled_at < 3
            assert await trio.to_thread.run_sync(_lock_waiters, url, app) == []
        finally:
            await trio.to_thread.run_sync(blocker.close)
        # The cancelled batch was rolled back and every pooled connection still works.
        assert await store.event_count(relay.id) == 0
        for _ in range(6):
            assert await put(store, relay, make_event(content=secrets.token_hex(4))) == [""]


@pytest.mark.postgres
async def test_a_lost_connection_is_a_storage_error_and_the_pool_recovers(
    pg_url: str, tmp_path: Path
) -> None:
    app = f"hypertuna-test-{secrets.token_hex(4)}"
    url = _with_application_name(pg_url, app)
    async with open_store((url, tmp_path)) as store:
        relay = await new_relay(store)
        blocker = await trio.to_thread.run_sync(_lock_events, url)
        try:
            async with trio.open_nursery() as nursery:

                async def kill_the_waiting_backend() -> None:
                    pid = await _wait_for_lock_waiter(url, app)
                    with _connect(url) as admin:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

                nursery.start_soon(kill_the_waiting_backend)
                with pytest.raises(StorageError, match="PostgreSQL"):
                    await store.ingest([IngestItem(relay.id, make_event())], now=NOW)
        finally:
            await trio.to_thread.run_sync(blocker.close)
        assert await store.event_count(relay.id) == 0
        for _ in range(6):
            assert await put(store, relay, make_event(content=secrets.token_hex(4))) == [""]
        answer = await store.query(relay.id, [flt()], now=NOW, max_limit=10)
        assert len(answer.events) == 6


async def test_an_unreachable_server_is_a_storage_error(tmp_path: Path) -> None:
    with trio.fail_after(15), pytest.raises(StorageError, match="PostgreSQL"):
        async with open_event_store("postgresql://postgres@127.0.0.1:1/none", tmp_path):
            pass  # pragma: no cover


@pytest.mark.postgres
async def test_migrations_are_recorded_once(pg_url: str, tmp_path: Path) -> None:
    for _ in range(3):
        async with open_store((pg_url, tmp_path)) as store:
            await store.ping()
    with _connect(pg_url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(m.version, m.name) for m in load_migrations("postgres")]


@pytest.mark.postgres
async def test_concurrent_openings_migrate_once(pg_url: str, tmp_path: Path) -> None:
    async def open_and_ping() -> None:
        async with open_store((pg_url, tmp_path)) as store:
            await store.ping()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(open_and_ping)
    with _connect(pg_url) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(load_migrations("postgres")),)


@pytest.mark.postgres
async def test_a_database_at_an_older_version_gets_only_the_newer_migrations(
    pg_url: str, tmp_path: Path
) -> None:
    first, *later = load_migrations("postgres")
    assert later, "this test needs at least two postgres migrations"
    with _connect(pg_url) as conn:
        conn.execute(first.sql)
        conn.execute(
            "CREATE TABLE schema_migrations"
            " (version integer PRIMARY KEY, name text NOT NULL, applied_at bigint NOT NULL)"
        )
        conn.execute(
            "INSERT INTO schema_migrations VALUES (%s, %s, 0)", (first.version, first.name)
        )
    async with open_store((pg_url, tmp_path)) as store:
        relay = await new_relay(store)
        assert await put(store, relay, make_event()) == [""]
    with _connect(pg_url) as conn:
        rows = conn.execute("SELECT version, applied_at > 0 FROM schema_migrations ORDER BY 1")
        assert rows.fetchall() == [(first.version, False)] + [(m.version, True) for m in later]
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'events'::regclass"
        ).fetchone()
    assert options == (["autovacuum_analyze_scale_factor=0.02"],)
