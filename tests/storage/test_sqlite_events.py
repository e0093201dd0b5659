"""SQLite specifics: where the file goes, how it is opened, migrations, failures."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from hypertuna.storage.events import (
    StorageError,
    open_event_store,
    resolve_sqlite_path,
)
from hypertuna.storage.migrate import load_migrations
from hypertuna.storage.sqlite_events import SqliteEventStore, split_script
from tests.storage.storage_factory import NOW, fetch, flt, make_event, new_relay, open_store, put


def test_sqlite_urls_resolve_against_the_data_dir(tmp_path: Path) -> None:
    assert resolve_sqlite_path(None, tmp_path) == tmp_path / "gateway.sqlite3"
    assert resolve_sqlite_path("sqlite:///abs/db.sqlite3", tmp_path) == Path("/abs/db.sqlite3")
    assert resolve_sqlite_path("sqlite:sub/db.sqlite3", tmp_path) == tmp_path / "sub/db.sqlite3"
    for bad in ("sqlite://host/db", "sqlite:", "sqlite::memory:", "sqlite:db?mode=ro"):
        with pytest.raises(ValueError, match="sqlite"):
            resolve_sqlite_path(bad, tmp_path)


@pytest.mark.parametrize("url", ["mysql://localhost/x", "file:/tmp/x", "redis://x"])
async def test_unknown_url_schemes_are_refused_by_name(tmp_path: Path, url: str) -> None:
    scheme = url.partition(":")[0]
    with pytest.raises(ValueError, match=re.escape(repr(scheme))):
        async with open_event_store(url, tmp_path):
            pass  # pragma: no cover


async def test_files_and_directories_are_created_where_the_url_says(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet"
    async with open_store((None, data_dir)) as store:
        await store.ping()
    assert (data_dir / "gateway.sqlite3").is_file()
    async with open_store(("sqlite:deeper/events.db", data_dir)) as store:
        await store.ping()
    assert (data_dir / "deeper" / "events.db").is_file()
    absolute = tmp_path / "elsewhere" / "abs.db"
    async with open_store((f"sqlite://{absolute}", data_dir)) as store:
        await store.ping()
    assert absolute.is_file()


async def test_connections_are_wal_full_sync_with_foreign_keys(tmp_path: Path) -> None:
    async with open_store((None, tmp_path)) as store:
        assert isinstance(store, SqliteEventStore)
        # Per-connection settings can only be read on the store's own writer connection.
        writer = store._writer
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert writer.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert writer.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert store._reader.execute("PRAGMA query_only").fetchone() == (1,)
    conn = sqlite3.connect(tmp_path / "gateway.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent
    conn.close()


async def test_migrations_are_recorded_once(tmp_path: Path) -> None:
    for _ in range(3):
        async with open_store((None, tmp_path)) as store:
            await store.ping()
    conn = sqlite3.connect(tmp_path / "gateway.sqlite3")
    rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    conn.close()
    assert rows == [(m.version, m.name) for m in load_migrations("sqlite")]
    assert rows[0] == (1, "initial")


def test_both_flavours_create_the_same_tables_and_indexes() -> None:
    def objects(flavour: str) -> set[str]:
        sql = "\n".join(m.sql for m in load_migrations(flavour))
        return set(re.findall(r"CREATE (?:UNIQUE )?(?:TABLE|INDEX) (\w+)", sql))

    sqlite_objects = objects("sqlite")
    assert {"relays", "events", "tags", "deleted_ids", "deleted_addresses"} <= sqlite_objects
    # PostgreSQL has no WITHOUT ROWID tables, so it needs a separate index for the tag key.
    assert objects("postgres") == sqlite_objects | {"tags_by_value"}


def test_split_script_keeps_statements_whole() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE a (x TEXT DEFAULT ';');
    CREATE TRIGGER t AFTER INSERT ON a BEGIN
        INSERT INTO a VALUES ('1'); INSERT INTO a VALUES ('2');
    END;
    """
    statements = split_script(script)
    assert len(statements) == 2
    assert statements[0].startswith("CREATE TABLE a")
    assert statements[1].startswith("CREATE TRIGGER t") and statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_script("CREATE TABLE b (x")


async def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "gateway.sqlite3").write_bytes(b"definitely not SQLite " * 512)
    with pytest.raises(StorageError):
        async with open_store((None, tmp_path)):
            pass  # pragma: no cover


async def test_a_committed_batch_is_in_the_file_for_any_other_reader(tmp_path: Path) -> None:
    event = make_event(content="on disk")
    async with open_store((None, tmp_path)) as store:
        relay = await new_relay(store)
        assert await put(store, relay, event) == [""]
        # Another connection (as another process would) sees the batch while the store is open.
        conn = sqlite3.connect(tmp_path / "gateway.sqlite3")
        assert conn.execute("SELECT raw FROM events").fetchall() == [(event.raw,)]
        conn.close()
        assert await fetch(store, relay, flt(), now=NOW) == [event.id]


async def test_fast_reads_stay_on_the_loop_and_slow_ones_move_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hypertuna.storage.sqlite_events as sqlite_events

    events = [make_event(content=f"n{i}", created_at=NOW - i) for i in range(300)]
    async with open_store((None, tmp_path)) as store:
        assert isinstance(store, SqliteEventStore)
        relay = await new_relay(store)
        await put(store, relay, *events)
        expected = [e.id for e in events]
        inline, threaded = store.inline_reads, store.threaded_reads
        # The budget is set explicitly both ways: on a loaded machine a real 2 ms budget may
        # or may not be met, and either path must give the same answer.
        monkeypatch.setattr(sqlite_events, "INLINE_READ_BUDGET_S", 10.0)
        assert await fetch(store, relay, flt(), now=NOW) == expected
        assert (store.inline_reads, store.threaded_reads) == (inline + 1, threaded)
        # A budget no query can meet: the progress handler interrupts it, the worker thread
        # runs it again, and the answer is the same.
        monkeypatch.setattr(sqlite_events, "INLINE_READ_BUDGET_S", -1.0)
        assert await fetch(store, relay, flt(), now=NOW) == expected
        assert store.threaded_reads == threaded + 1
