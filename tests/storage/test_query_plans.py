"""Every filter shape, and every lookup made while ingesting, is answered through an index.

SQLite: ``EXPLAIN QUERY PLAN`` must never show ``SCAN`` of ``events`` or ``tags`` (a full
table or full index walk); subquery co-routines (``SCAN picked``, ``SCAN term0``) are fine.
PostgreSQL: with ``enable_seqscan = off`` (tiny test tables would otherwise be read
sequentially, rightly) the plan must never contain ``Seq Scan on events`` or ``on tags``.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import psycopg
import pytest

from hypertuna.protocol.nostr.model import Filter
from hypertuna.storage import _event_sql as core
from hypertuna.storage.postgres_events import _pg_sql, _PgRunner
from hypertuna.storage.sqlite_events import _SqliteRunner
from tests.storage.storage_factory import (
    ALICE,
    BOB,
    NOW,
    StoreUrl,
    flt,
    make_event,
    new_relay,
    open_store,
    put,
)

EID = "e" * 64

SHAPES: dict[str, Filter] = {
    "ids": flt(ids=[EID, "f" * 64]),
    "ids+kinds": flt(ids=[EID], kinds=[1], authors=[ALICE]),
    "authors": flt(authors=[ALICE, BOB], limit=20),
    "authors+regular kinds": flt(authors=[ALICE, BOB], kinds=[1, 7]),
    "authors+replaceable kinds": flt(authors=[ALICE, BOB], kinds=[0, 3, 30023]),
    "authors+mixed kinds+time": flt(authors=[ALICE], kinds=[1, 10002], since=5, until=NOW),
    "kinds": flt(kinds=[1, 7]),
    "#e": flt(tags={"e": [EID, "x"]}),
    "#e+#p": flt(tags={"e": [EID], "p": [ALICE]}),
    "#e+kinds+authors": flt(tags={"e": [EID]}, kinds=[1], authors=[ALICE]),
    "since/until": flt(since=5, until=NOW),
    "since": flt(since=5),
    "no condition": flt(limit=10),
    "combined": flt(
        authors=[ALICE, BOB],
        kinds=[1, 7],
        tags={"e": [EID], "t": ["x", "y"]},
        since=5,
        until=NOW,
        limit=5,
    ),
}

_SQLITE_FULL_WALK = re.compile(r"^SCAN (events|tags|other_tags)\b")
_PG_FULL_WALK = re.compile(r"Seq Scan on (events|tags)\b")


async def _populate(store_url: StoreUrl) -> int:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = [
            make_event(
                kind=kind,
                pubkey=pubkey,
                created_at=NOW - i,
                tags=[("e", EID), ("p", ALICE), ("t", "x"), ("d", str(i % 3))],
                content=str(i),
            )
            for i, (kind, pubkey) in enumerate(
                (k, p) for k in (1, 7, 0, 30023, 5) for p in (ALICE, BOB) for _ in range(5)
            )
        ]
        await put(store, relay, *events)
        return relay.id


def _statements(db: core.SqlRunner, relay_id: int, f: Filter) -> list[tuple[str, list[object]]]:
    statements = core.filter_statements(db, relay_id, f, now=NOW, limit=50)
    statements += core.count_selects(db, relay_id, [f], now=NOW)
    assert statements, "every shape must produce statements to check"
    return statements


def _ingest_lookups(relay_id: int) -> list[tuple[str, list[object]]]:
    return [
        (core.SQL_ID_TOMBSTONE, [relay_id, EID, ALICE]),
        (core.SQL_ADDRESS_TOMBSTONE, [relay_id, 30023, ALICE, "x", NOW]),
        (core.SQL_CURRENT_VERSION, [relay_id, ALICE, 30023, "x"]),
        (core.SQL_DELETE_ID, [relay_id, EID, ALICE, 5]),
        (core.SQL_DELETE_ADDRESS, [relay_id, ALICE, 30023, "x", NOW]),
        (core.SQL_PURGE, [NOW]),
        # Relays written through cores (the view's rules).
        (core.SQL_ADDRESS_FLOOR, [relay_id, 30023, ALICE, "x"]),
        (core.SQL_TARGET_ADDRESS, [relay_id, EID, ALICE, 5]),
        (core.SQL_PURGE_FLOORS, [NOW]),
    ]


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_sqlite_filter_shapes_never_walk_a_whole_table(tmp_path: Path, shape: str) -> None:
    relay_id = await _populate((None, tmp_path))
    conn = sqlite3.connect(tmp_path / "gateway.sqlite3")
    try:
        db = _SqliteRunner(conn)
        for sql, params in _statements(db, relay_id, SHAPES[shape]):
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            assert any(line.startswith("SEARCH events") for line in plan), plan
            walks = [line for line in plan if _SQLITE_FULL_WALK.match(line)]
            assert not walks, f"{shape}: {plan}"
    finally:
        conn.close()


async def test_sqlite_ingest_lookups_use_indexes(tmp_path: Path) -> None:
    relay_id = await _populate((None, tmp_path))
    conn = sqlite3.connect(tmp_path / "gateway.sqlite3")
    try:
        for sql, params in _ingest_lookups(relay_id):
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            assert plan and all(line.startswith("SEARCH") for line in plan), (sql, plan)
    finally:
        conn.close()


def test_sqlite_plan_check_catches_a_full_walk(tmp_path: Path) -> None:
    """The pattern used above does recognise a full walk when there is one."""
    conn = sqlite3.connect(tmp_path / "x.sqlite3")
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, content TEXT)")
    plan = [
        row[3]
        for row in conn.execute("EXPLAIN QUERY PLAN SELECT * FROM events WHERE content = 'x'")
    ]
    conn.close()
    assert any(_SQLITE_FULL_WALK.match(line) for line in plan)


def _pg_plan(conn: psycopg.Connection[tuple[object, ...]], sql: str, params: list[object]) -> str:
    rows = conn.execute("EXPLAIN " + _pg_sql(sql), params).fetchall()
    return "\n".join(str(row[0]) for row in rows)


@pytest.mark.postgres
async def test_postgres_filter_shapes_never_walk_a_whole_table(pg_url: str, tmp_path: Path) -> None:
    relay_id = await _populate((pg_url, tmp_path))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE")
        conn.execute("SET enable_seqscan = off")
        db = _PgRunner(conn)
        for shape, f in SHAPES.items():
            for sql, params in _statements(db, relay_id, f):
                plan = _pg_plan(conn, sql, params)
                assert "Index" in plan, plan
                assert not _PG_FULL_WALK.search(plan), f"{shape}:\n{plan}"
        for sql, params in _ingest_lookups(relay_id):
            plan = _pg_plan(conn, sql, params)
            assert not _PG_FULL_WALK.search(plan), f"{sql}:\n{plan}"
        # The check is not vacuous: an unindexed condition does show up.
        assert _PG_FULL_WALK.search(_pg_plan(conn, "SELECT seq FROM events WHERE raw = ?", ["x"]))
