"""Backend-neutral core of the event store: the ingest rules and the query SQL.

Both backends run this same synchronous code inside one of their transactions, through a
:class:`SqlRunner` that hides the driver. SQL is written with ``?`` placeholders and only in the
dialect that SQLite and PostgreSQL share; the runner supplies the few constructs that differ
(list membership, getting the new row's key, planner hints).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import attrs

from hypertuna.protocol.nostr.model import Event, Filter, KindClass, kind_class
from hypertuna.storage.events import (
    MAX_INDEXED_TAG_BYTES,
    MSG_EXPIRED,
    BeforeCommit,
    IngestItem,
    IngestResult,
    RelayExistsError,
    RelayRecord,
    RelayRegisteredError,
    StoredEvent,
    ViewCore,
)

MSG_DUPLICATE = "duplicate: already have this event"
MSG_NEWER_STORED = "duplicate: a newer version of this event is already stored"
MSG_DELETED = "blocked: this event was deleted by its author"
MSG_SUPERSEDED = "duplicate: a newer version of this event is known"
MSG_CORE_BACKED = "blocked: this relay is written through its cores"

DELETION_KIND = 5

# SQLite refuses compound SELECTs of more than 500 terms; stay well below.
_MAX_TERMS = 100
_MAX_COUNT_TERMS = 400

Row = tuple[Any, ...]

# Lookups made while ingesting, named so the plan tests can check that each one uses an index.
SQL_ID_TOMBSTONE = "SELECT 1 FROM deleted_ids WHERE relay_id = ? AND event_id = ? AND pubkey = ?"
SQL_ADDRESS_TOMBSTONE = (
    "SELECT 1 FROM deleted_addresses WHERE relay_id = ? AND kind = ? AND pubkey = ?"
    " AND d_tag = ? AND until_created_at >= ?"
)
SQL_CURRENT_VERSION = (
    "SELECT seq, id, created_at, expiration FROM events WHERE relay_id = ?"
    " AND pubkey = ? AND kind = ? AND d_tag = ?"
)
SQL_DELETE_ID = "DELETE FROM events WHERE relay_id = ? AND id = ? AND pubkey = ? AND kind <> ?"
SQL_DELETE_ADDRESS = (
    "DELETE FROM events WHERE relay_id = ? AND pubkey = ? AND kind = ?"
    " AND d_tag = ? AND created_at <= ?"
)
SQL_PURGE = "DELETE FROM events WHERE expiration IS NOT NULL AND expiration <= ?"
SQL_ADDRESS_FLOOR = (
    "SELECT created_at, id FROM address_floors WHERE relay_id = ? AND kind = ? AND pubkey = ?"
    " AND d_tag = ?"
)
SQL_TARGET_ADDRESS = (
    "SELECT kind, d_tag, created_at FROM events WHERE relay_id = ? AND id = ? AND pubkey = ?"
    " AND kind <> ? AND d_tag IS NOT NULL"
)
# Raises a floor only to a newer version: newest created_at, then lowest id.
_FLOOR_UPSERT = (
    " ON CONFLICT (relay_id, kind, pubkey, d_tag) DO UPDATE SET"
    " created_at = excluded.created_at, id = excluded.id"
    " WHERE excluded.created_at > address_floors.created_at"
    " OR (excluded.created_at = address_floors.created_at AND excluded.id < address_floors.id)"
)
SQL_RAISE_FLOOR = (
    "INSERT INTO address_floors (relay_id, kind, pubkey, d_tag, created_at, id)"
    " VALUES (?, ?, ?, ?, ?, ?)" + _FLOOR_UPSERT
)
SQL_PURGE_FLOORS = (
    "INSERT INTO address_floors (relay_id, kind, pubkey, d_tag, created_at, id)"
    " SELECT relay_id, kind, pubkey, d_tag, created_at, id FROM events"
    " WHERE expiration IS NOT NULL AND expiration <= ? AND d_tag IS NOT NULL" + _FLOOR_UPSERT
)
SQL_INSERT_TAG = (
    "INSERT INTO tags (relay_id, name, value, created_at, event_seq) VALUES (?, ?, ?, ?, ?)"
)


#: One SQL statement (``?`` placeholders) and its parameters.
Statement: TypeAlias = tuple[str, Sequence[object]]


class SqlRunner(Protocol):
    """Statements inside one open transaction; SQL uses ``?`` placeholders."""

    max_params: int

    def fetch_one(self, sql: str, params: Sequence[object]) -> Row | None: ...

    def fetch_all(self, sql: str, params: Sequence[object]) -> list[Row]: ...

    def execute(self, sql: str, params: Sequence[object]) -> int:
        """Run a statement that returns no rows; return the number of rows it changed."""
        ...

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    def execute_together(self, statements: Sequence[Statement]) -> None:
        """Run ``statements`` (``INSERT``/``UPDATE``/``DELETE`` without ``RETURNING``), in one
        go where the backend can: PostgreSQL runs them as one statement (``WITH``), which costs
        the client one statement's work instead of one each. They then share one snapshot and
        run in no defined order, so none may depend on another's effect (e.g. touch the same
        row, or free a unique key that another takes)."""
        ...

    def insert_returning_seq(self, sql: str, params: Sequence[object]) -> int | None:
        """Run ``INSERT ... ON CONFLICT DO NOTHING`` of one row into a table whose key column
        is ``seq``; return the new row's ``seq``, or None when nothing was inserted."""
        ...

    def in_list(self, column: str, values: Sequence[object]) -> tuple[str, list[object]]:
        """A condition "``column`` is one of ``values``" (never empty) and its parameters."""
        ...

    def index_hint(self, index: str) -> str:
        """Text to put after a table name to make the planner use ``index`` ("" if the backend
        plans well without it)."""
        ...


# --- values as stored -----------------------------------------------------------------------


def storable_text(value: str) -> bool:
    """Whether a string can be stored and compared on both backends (PostgreSQL text cannot
    hold NUL)."""
    return "\x00" not in value


def indexable_tag_value(value: str) -> bool:
    """Whether a tag value goes into the tag index (and so whether ``#x`` can match it)."""
    return storable_text(value) and (
        len(value) * 4 <= MAX_INDEXED_TAG_BYTES
        or len(value.encode("utf-8", "surrogatepass")) <= MAX_INDEXED_TAG_BYTES
    )


def address_key(d_tag: str) -> str:
    """The ``d_tag`` column value for an address. Plain values are kept as they are so the
    database stays readable; values that could not be stored or indexed (NUL, \\x01, very long)
    become "\\x01" + sha256, which no plain value can equal since plain values have no \\x01."""
    if "\x01" not in d_tag and indexable_tag_value(d_tag):
        return d_tag
    return "\x01" + hashlib.sha256(d_tag.encode("utf-8", "surrogatepass")).hexdigest()


def _is_hex64(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- relays ---------------------------------------------------------------------------------

_RELAY_COLUMNS = "id, key, name, description, created_at"


def _relay(row: Row) -> RelayRecord:
    return RelayRecord(
        id=int(row[0]), key=row[1], name=row[2], description=row[3], created_at=int(row[4])
    )


def create_relay(db: SqlRunner, record: RelayRecord) -> RelayRecord:
    """Insert ``record`` (whose ``id`` is ignored) and return it with its id.

    :class:`RelayExistsError` when a hosted relay has the key or name,
    :class:`RelayRegisteredError` when a worker registration has it (also one no worker serves
    now: registrations keep their key and name, see :mod:`hypertuna.storage.registrations`)."""
    if db.fetch_one("SELECT 1 FROM relays WHERE key = ? OR name = ?", (record.key, record.name)):
        raise RelayExistsError(f"a relay with key {record.key} or name {record.name!r} exists")
    if db.fetch_one(
        "SELECT 1 FROM worker_relays WHERE relay_key = ? OR name = ?", (record.key, record.name)
    ):
        raise RelayRegisteredError(
            f"workers registered a relay with key {record.key} or name {record.name!r}"
        )
    row = db.fetch_one(
        "INSERT INTO relays (key, name, description, created_at) VALUES (?, ?, ?, ?) RETURNING id",
        (record.key, record.name, record.description, record.created_at),
    )
    assert row is not None
    return attrs.evolve(record, id=int(row[0]))


def list_relays(db: SqlRunner) -> list[RelayRecord]:
    return [_relay(r) for r in db.fetch_all(f"SELECT {_RELAY_COLUMNS} FROM relays ORDER BY id", ())]


def get_relay(db: SqlRunner, key_or_name: str) -> RelayRecord | None:
    if not storable_text(key_or_name):
        return None
    row = db.fetch_one(
        f"SELECT {_RELAY_COLUMNS} FROM relays WHERE key = ? OR name = ?", (key_or_name, key_or_name)
    )
    return None if row is None else _relay(row)


def event_count(db: SqlRunner, relay_id: int) -> int:
    row = db.fetch_one("SELECT COUNT(*) FROM events WHERE relay_id = ?", (relay_id,))
    assert row is not None
    return int(row[0])


def purge_expired(db: SqlRunner, now: int) -> int:
    # Floors for every relay: only view ingest reads them, and working out which relays are
    # core-backed would cost more than the few rows an expired address leaves behind.
    db.execute(SQL_PURGE_FLOORS, (now,))
    return db.execute(SQL_PURGE, (now,))


# --- views of core-backed relays ------------------------------------------------------------


def _mark_core_backed(db: SqlRunner, relay_id: int) -> None:
    if db.execute("UPDATE relays SET core_backed = 1 WHERE id = ?", (relay_id,)) != 1:
        raise ValueError(f"unknown relay id {relay_id}")


def view_cores(db: SqlRunner, relay_id: int) -> list[ViewCore]:
    rows = db.fetch_all(
        "SELECT core_key, role, length, end_length FROM view_cores WHERE relay_id = ?"
        " ORDER BY core_key",
        (relay_id,),
    )
    return [
        ViewCore(key=r[0], role=r[1], length=int(r[2]), end=None if r[3] is None else int(r[3]))
        for r in rows
    ]


def reset_view(db: SqlRunner, relay_id: int) -> None:
    _mark_core_backed(db, relay_id)
    # Tags first: the cascade from events would look each one up by event instead.
    for table in ("tags", "events", "deleted_ids", "deleted_addresses", "address_floors"):
        db.execute(f"DELETE FROM {table} WHERE relay_id = ?", (relay_id,))
    db.execute("DELETE FROM view_cores WHERE relay_id = ?", (relay_id,))


def apply_view(
    db: SqlRunner,
    relay_id: int,
    events: Sequence[Event],
    cores: Sequence[ViewCore],
    before_commit: BeforeCommit | None = None,
) -> list[IngestResult]:
    """Apply ``events`` with the view's rules and store ``cores`` (and the rows
    ``before_commit`` returns), in the caller's transaction."""
    _mark_core_backed(db, relay_id)
    state = _Ingest(db, None)
    results = [state.one(relay_id, event) for event in events]
    state.flush_tags()
    if before_commit is not None:
        cores = [*cores, *before_commit(results)]
    db.execute_many(
        "INSERT INTO view_cores (relay_id, core_key, role, length, end_length)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (relay_id, core_key) DO UPDATE SET"
        " role = excluded.role, length = excluded.length, end_length = excluded.end_length",
        [(relay_id, c.key, c.role, c.length, c.end) for c in cores],
    )
    return results


def high_seq(db: SqlRunner) -> int:
    row = db.fetch_one("SELECT COALESCE(MAX(seq), 0) FROM events", ())
    assert row is not None
    return int(row[0])


# --- ingest ---------------------------------------------------------------------------------


def check_ingest_items(items: Sequence[IngestItem]) -> None:
    """Refuse a batch that holds an ephemeral event: those are routed, never stored."""
    check_events([item.event for item in items])


def check_events(events: Sequence[Event]) -> None:
    """Refuse a batch that holds an ephemeral event: those are routed, never stored."""
    for event in events:
        if event.kind_class is KindClass.EPHEMERAL:
            raise ValueError(f"ephemeral event {event.id} (kind {event.kind}) sent to the store")


@attrs.define
class _RelayState:
    """Per-relay facts cached for one batch: most relays never see a deletion, and knowing it
    saves a tombstone lookup per event."""

    has_deleted_ids: bool
    has_deleted_addresses: bool
    has_floors: bool
    core_backed: bool


def _beats(created_at: int, event_id: str, other_created_at: int, other_id: str) -> bool:
    """Whether a version (created_at, id) of an address is newer than another: later
    ``created_at``, then lower id."""
    return (created_at, other_id) > (other_created_at, event_id)


class _Ingest:
    """One batch. ``now`` None selects the view's rules (module docstring of
    :mod:`hypertuna.storage.events`): no NIP-40 at ingest, address floors."""

    def __init__(self, db: SqlRunner, now: int | None) -> None:
        self.db = db
        self.now = now
        self.view = now is None
        self.relays: dict[int, _RelayState] = {}
        # Tag rows are written in one statement per batch (one round trip on PostgreSQL), but
        # always before any DELETE, whose cascade must see them.
        self.pending_tags: list[tuple[int, str, str, int, int]] = []

    def flush_tags(self) -> None:
        if self.pending_tags:
            self.db.execute_many(SQL_INSERT_TAG, self.pending_tags)
            self.pending_tags = []

    def relay(self, relay_id: int) -> _RelayState:
        state = self.relays.get(relay_id)
        if state is None:
            row = self.db.fetch_one(
                "SELECT"
                " (SELECT core_backed FROM relays WHERE id = ?),"
                " (SELECT 1 FROM deleted_ids WHERE relay_id = ? LIMIT 1),"
                " (SELECT 1 FROM deleted_addresses WHERE relay_id = ? LIMIT 1),"
                " (SELECT 1 FROM address_floors WHERE relay_id = ? LIMIT 1)",
                (relay_id, relay_id, relay_id, relay_id),
            )
            assert row is not None
            if row[0] is None:
                raise ValueError(f"unknown relay id {relay_id}")
            state = _RelayState(
                has_deleted_ids=row[1] is not None,
                has_deleted_addresses=row[2] is not None,
                has_floors=row[3] is not None,
                core_backed=bool(row[0]),
            )
            self.relays[relay_id] = state
        return state

    def one(self, relay_id: int, event: Event) -> IngestResult:
        expiration = event.expiration
        now = self.now
        if now is not None and expiration is not None and expiration <= now:
            return IngestResult(False, MSG_EXPIRED, None)
        state = self.relay(relay_id)
        if state.core_backed and not self.view:
            return IngestResult(False, MSG_CORE_BACKED, None)
        db = self.db
        d_key: str | None = None
        klass = event.kind_class
        if klass is KindClass.REPLACEABLE or klass is KindClass.ADDRESSABLE:
            d_key = address_key(event.d_tag if klass is KindClass.ADDRESSABLE else "")
        # A deletion can never be deleted, so tombstones do not apply to kind 5.
        if (
            event.kind != DELETION_KIND
            and state.has_deleted_ids
            and db.fetch_one(
                SQL_ID_TOMBSTONE,
                (relay_id, event.id, event.pubkey),
            )
        ):
            if self.view and d_key is not None:
                # Deleted, yet still the newest version known: older ones stay out whether
                # they came before or come after it.
                self.raise_floor(relay_id, event.kind, event.pubkey, d_key, event, state)
            return IngestResult(False, MSG_DELETED, None)

        if d_key is not None:
            if state.has_deleted_addresses and db.fetch_one(
                SQL_ADDRESS_TOMBSTONE,
                (relay_id, event.kind, event.pubkey, d_key, event.created_at),
            ):
                return IngestResult(False, MSG_DELETED, None)
            if self.view and state.has_floors:
                floor = db.fetch_one(SQL_ADDRESS_FLOOR, (relay_id, event.kind, event.pubkey, d_key))
                if floor is not None and not _beats(
                    event.created_at, event.id, int(floor[0]), floor[1]
                ):
                    return IngestResult(
                        False, MSG_DUPLICATE if floor[1] == event.id else MSG_SUPERSEDED, None
                    )
            current = db.fetch_one(
                SQL_CURRENT_VERSION,
                (relay_id, event.pubkey, event.kind, d_key),
            )
            if current is not None:
                seq, stored_id, stored_at, stored_exp = current
                if stored_id == event.id:
                    return IngestResult(False, MSG_DUPLICATE, None)
                # At the edge an expired version is invisible already and must not shadow a
                # live one; a view ignores NIP-40 until query time.
                alive = now is None or stored_exp is None or stored_exp > now
                if alive and not _beats(event.created_at, event.id, stored_at, stored_id):
                    return IngestResult(False, MSG_NEWER_STORED, None)
                self.flush_tags()
                db.execute("DELETE FROM events WHERE seq = ?", (seq,))

        seq = db.insert_returning_seq(
            "INSERT INTO events (relay_id, id, pubkey, kind, created_at, expiration, d_tag, raw)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                relay_id,
                event.id,
                event.pubkey,
                event.kind,
                event.created_at,
                expiration,
                d_key,
                event.raw,
            ),
        )
        if seq is None:
            return IngestResult(False, MSG_DUPLICATE, None)
        self.pending_tags.extend(
            (relay_id, name, value, event.created_at, seq)
            for name, value in {(n, v) for n, v in event.indexed_tags() if indexable_tag_value(v)}
        )
        if event.kind == DELETION_KIND:
            self.apply_deletion(relay_id, event, state)
        return IngestResult(True, "", seq)

    def raise_floor(
        self, relay_id: int, kind: int, pubkey: str, d_key: str, version: Event, state: _RelayState
    ) -> None:
        """Make ``version`` (not stored) the floor of its address if it is the newest known,
        and drop the stored version if ``version`` beats it."""
        self.raise_floor_to(relay_id, kind, pubkey, d_key, version.created_at, version.id, state)
        current = self.db.fetch_one(SQL_CURRENT_VERSION, (relay_id, pubkey, kind, d_key))
        if current is not None and _beats(version.created_at, version.id, current[2], current[1]):
            self.flush_tags()
            self.db.execute("DELETE FROM events WHERE seq = ?", (current[0],))

    def raise_floor_to(
        self,
        relay_id: int,
        kind: int,
        pubkey: str,
        d_key: str,
        created_at: int,
        event_id: str,
        state: _RelayState,
    ) -> None:
        self.db.execute(SQL_RAISE_FLOOR, (relay_id, kind, pubkey, d_key, created_at, event_id))
        state.has_floors = True

    def apply_deletion(self, relay_id: int, deletion: Event, state: _RelayState) -> None:
        self.flush_tags()
        db = self.db
        seen: set[tuple[str, str]] = set()
        for tag in deletion.tags:
            if len(tag) < 2 or tag[0] not in ("e", "a") or (tag[0], tag[1]) in seen:
                continue
            seen.add((tag[0], tag[1]))
            if tag[0] == "e":
                target = tag[1]
                # Stored ids are validated hex: anything else can match nothing.
                if not _is_hex64(target):
                    continue
                if self.view:
                    version = db.fetch_one(
                        SQL_TARGET_ADDRESS, (relay_id, target, deletion.pubkey, DELETION_KIND)
                    )
                    if version is not None:
                        kind, d_key, created_at = version
                        self.raise_floor_to(
                            relay_id, kind, deletion.pubkey, d_key, created_at, target, state
                        )
                db.execute(
                    SQL_DELETE_ID,
                    (relay_id, target, deletion.pubkey, DELETION_KIND),
                )
                db.execute(
                    "INSERT INTO deleted_ids (relay_id, event_id, pubkey) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (relay_id, target, deletion.pubkey),
                )
                state.has_deleted_ids = True
            else:
                address = _parse_address(tag[1])
                if address is None or address[1] != deletion.pubkey:
                    continue
                kind, pubkey, d_key = address
                db.execute(
                    SQL_DELETE_ADDRESS,
                    (relay_id, pubkey, kind, d_key, deletion.created_at),
                )
                db.execute(
                    "INSERT INTO deleted_addresses"
                    " (relay_id, kind, pubkey, d_tag, until_created_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (relay_id, kind, pubkey, d_tag) DO UPDATE SET until_created_at ="
                    " CASE WHEN excluded.until_created_at > deleted_addresses.until_created_at"
                    " THEN excluded.until_created_at ELSE deleted_addresses.until_created_at END",
                    (relay_id, kind, pubkey, d_key, deletion.created_at),
                )
                state.has_deleted_addresses = True


def _parse_address(value: str) -> tuple[int, str, str] | None:
    """``kind:pubkey:d`` -> (kind, pubkey, stored d key) for replaceable and addressable kinds.
    A replaceable kind's address has no d part, whatever follows the second colon."""
    kind_text, sep1, rest = value.partition(":")
    pubkey, sep2, d_tag = rest.partition(":")
    if not (sep1 and sep2 and kind_text.isascii() and kind_text.isdigit() and len(kind_text) <= 5):
        return None
    kind = int(kind_text)
    if kind > 65535 or not _is_hex64(pubkey):
        return None
    klass = kind_class(kind)
    if klass is KindClass.REPLACEABLE:
        return kind, pubkey, address_key("")
    if klass is KindClass.ADDRESSABLE:
        return kind, pubkey, address_key(d_tag)
    return None


def ingest_batch(db: SqlRunner, items: Sequence[IngestItem], now: int) -> list[IngestResult]:
    """Apply the merge rules to ``items`` in order, inside the caller's transaction."""
    state = _Ingest(db, now)
    results = [state.one(item.relay_id, item.event) for item in items]
    state.flush_tags()
    return results


# --- queries --------------------------------------------------------------------------------


@attrs.frozen
class _Norm:
    """A filter reduced to what the store can match: values that cannot be stored dropped,
    lists sorted so equal filters give identical SQL (and reuse prepared statements)."""

    ids: list[str] | None
    authors: list[str] | None
    kinds: list[int] | None
    tags: list[tuple[str, list[str]]]
    since: int | None
    until: int | None


def _normalize(f: Filter) -> _Norm | None:
    """None when the filter can match nothing."""
    if not f.can_match:
        return None
    ids = None if f.ids is None else sorted(v for v in f.ids if storable_text(v))
    authors = None if f.authors is None else sorted(v for v in f.authors if storable_text(v))
    kinds = None if f.kinds is None else sorted(f.kinds)
    tags = [
        (letter, sorted(v for v in values if indexable_tag_value(v))) for letter, values in f.tags
    ]
    if ids == [] or authors == [] or any(not values for _, values in tags):
        return None
    return _Norm(ids, authors, kinds, sorted(tags), f.since, f.until)


# Driving dimensions, most selective first. A filter is answered by one index range per value
# of its driving list, each already in (created_at DESC, id) order.
_IDS, _TAG, _AUTHORS, _KINDS, _TIME = "ids", "tag", "authors", "kinds", "time"


def _driver(n: _Norm) -> str:
    if n.ids is not None:
        return _IDS
    if n.tags:
        return _TAG
    if n.authors is not None:
        return _AUTHORS
    if n.kinds is not None:
        return _KINDS
    return _TIME


def _has_address(kind: int) -> bool:
    return kind_class(kind) in (KindClass.REPLACEABLE, KindClass.ADDRESSABLE)


def _driving_tag(n: _Norm) -> int:
    """Index in ``n.tags`` of the tag condition with the fewest values."""
    return min(range(len(n.tags)), key=lambda i: len(n.tags[i][1]))


def _conditions(
    db: SqlRunner, n: _Norm, driver: str, now: int, *, time_on_events: bool
) -> tuple[str, list[object]]:
    """Conditions on ``events`` other than the driving dimension."""
    conds = ["(events.expiration IS NULL OR events.expiration > ?)"]
    params: list[object] = [now]

    def add(sql: str, values: list[object]) -> None:
        conds.append(sql)
        params.extend(values)

    if n.ids is not None and driver != _IDS:
        add(*db.in_list("events.id", n.ids))
    if n.authors is not None and driver != _AUTHORS:
        add(*db.in_list("events.pubkey", n.authors))
    # The authors driver deals with kinds itself (see _top_selects).
    if n.kinds is not None and driver not in (_KINDS, _AUTHORS):
        add(*db.in_list("events.kind", n.kinds))
    if time_on_events:
        if n.since is not None:
            add("events.created_at >= ?", [n.since])
        if n.until is not None:
            add("events.created_at <= ?", [n.until])
    driving_tag = _driving_tag(n) if driver == _TAG else None
    for index, (letter, values) in enumerate(n.tags):
        if index == driving_tag:
            continue
        sql, values_params = db.in_list("other_tags.value", values)
        add(
            "EXISTS (SELECT 1 FROM tags AS other_tags WHERE other_tags.event_seq = events.seq"
            f" AND other_tags.name = ? AND {sql})",
            [letter, *values_params],
        )
    return " AND ".join(conds), params


def _tag_time(n: _Norm) -> tuple[str, list[object]]:
    sql = ""
    params: list[object] = []
    if n.since is not None:
        sql += " AND tags.created_at >= ?"
        params.append(n.since)
    if n.until is not None:
        sql += " AND tags.created_at <= ?"
        params.append(n.until)
    return sql, params


_EVENT_KEYS = "events.seq AS seq, events.created_at AS created_at, events.id AS id"
_NEWEST_FIRST = "ORDER BY events.created_at DESC, events.id LIMIT ?"


def _top_selects(
    db: SqlRunner, relay_id: int, n: _Norm, now: int, limit: int
) -> list[tuple[str, list[object]]]:
    """One SELECT (seq, created_at, id) per value of the driving list, each the newest
    ``limit`` matches for that value."""
    driver = _driver(n)
    if driver == _TAG:
        letter, values = n.tags[_driving_tag(n)]
        cond, cond_params = _conditions(db, n, driver, now, time_on_events=False)
        time_sql, time_params = _tag_time(n)
        # CROSS JOIN pins the join order in SQLite: walk the tag index, then fetch events.
        sql = (
            "SELECT events.seq AS seq, tags.created_at AS created_at, events.id AS id"
            " FROM tags CROSS JOIN events WHERE tags.relay_id = ? AND tags.name = ?"
            f" AND tags.value = ?{time_sql} AND events.seq = tags.event_seq AND {cond}"
            " ORDER BY tags.created_at DESC, events.id LIMIT ?"
        )
        return [
            (sql, [relay_id, letter, value, *time_params, *cond_params, limit]) for value in values
        ]
    cond, cond_params = _conditions(db, n, driver, now, time_on_events=True)
    base = f"SELECT {_EVENT_KEYS} FROM events WHERE events.relay_id = ?"
    if driver == _IDS:
        assert n.ids is not None
        # One lookup per id: with "id IN (...)" and ORDER BY, SQLite prefers walking the time
        # index of the whole relay to avoid a sort.
        sql = f"{base} AND events.id = ? AND {cond} {_NEWEST_FIRST}"
        return [(sql, [relay_id, event_id, *cond_params, limit]) for event_id in n.ids]
    if driver == _AUTHORS:
        assert n.authors is not None
        if n.kinds is None:
            sql = f"{base} AND events.pubkey = ? AND {cond} {_NEWEST_FIRST}"
            return [(sql, [relay_id, author, *cond_params, limit]) for author in n.authors]
        selects: list[tuple[str, list[object]]] = []
        regular = [k for k in n.kinds if not _has_address(k)]
        if regular:
            in_sql, in_params = db.in_list("events.kind", regular)
            sql = f"{base} AND events.pubkey = ? AND {in_sql} AND {cond} {_NEWEST_FIRST}"
            selects += [
                (sql, [relay_id, author, *in_params, *cond_params, limit]) for author in n.authors
            ]
        # Replaceable and addressable kinds go through the address index, where an author has
        # a handful of rows, instead of walking everything the author wrote.
        # Without statistics SQLite would rather walk the author index to skip a sort.
        sql = (
            f"SELECT {_EVENT_KEYS} FROM events{db.index_hint('events_by_address')}"
            " WHERE events.relay_id = ? AND events.pubkey = ? AND events.kind = ?"
            f" AND events.d_tag IS NOT NULL AND {cond} {_NEWEST_FIRST}"
        )
        selects += [
            (sql, [relay_id, author, kind, *cond_params, limit])
            for author in n.authors
            for kind in n.kinds
            if _has_address(kind)
        ]
        return selects
    if driver == _KINDS:
        assert n.kinds is not None
        sql = f"{base} AND events.kind = ? AND {cond} {_NEWEST_FIRST}"
        return [(sql, [relay_id, kind, *cond_params, limit]) for kind in n.kinds]
    return [(f"{base} AND {cond} {_NEWEST_FIRST}", [relay_id, *cond_params, limit])]


def _chunks(
    selects: list[tuple[str, list[object]]], max_terms: int, max_params: int
) -> Iterator[list[tuple[str, list[object]]]]:
    chunk: list[tuple[str, list[object]]] = []
    params = 0
    for select in selects:
        if chunk and (len(chunk) >= max_terms or params + len(select[1]) > max_params):
            yield chunk
            chunk, params = [], 0
        chunk.append(select)
        params += len(select[1])
    if chunk:
        yield chunk


def filter_statements(
    db: SqlRunner, relay_id: int, f: Filter, *, now: int, limit: int
) -> list[tuple[str, list[object]]]:
    """Statements returning (seq, created_at, id, raw) newest first, whose rows, merged and cut
    at ``limit``, are the filter's answer. Exposed so tests can inspect the query plans."""
    n = _normalize(f)
    if n is None or limit <= 0:
        return []
    union = " UNION " if _driver(n) == _TAG else " UNION ALL "
    statements = []
    # Leave room for the outer LIMIT parameter.
    for chunk in _chunks(_top_selects(db, relay_id, n, now, limit), _MAX_TERMS, db.max_params - 1):
        if len(chunk) == 1:
            inner, params = chunk[0]
        else:
            inner = union.join(
                f"SELECT seq, created_at, id FROM ({sql}) AS term{i}"
                for i, (sql, _) in enumerate(chunk)
            )
            inner += " ORDER BY created_at DESC, id LIMIT ?"
            params = [p for _, term_params in chunk for p in term_params]
            params.append(limit)
        statements.append(
            (
                "SELECT events.seq, events.created_at, events.id, events.raw"
                f" FROM ({inner}) AS picked CROSS JOIN events WHERE events.seq = picked.seq"
                " ORDER BY picked.created_at DESC, picked.id",
                params,
            )
        )
    return statements


def query_events(
    db: SqlRunner, relay_id: int, filters: Sequence[Filter], *, now: int, max_limit: int
) -> list[StoredEvent]:
    """Answer ``filters`` (see ``EventStore.query``) inside the caller's read transaction."""
    answers: list[list[Row]] = []
    for f in filters:
        limit = max_limit if f.limit is None else min(f.limit, max_limit)
        statements = filter_statements(db, relay_id, f, now=now, limit=limit)
        if len(statements) == 1:
            answers.append(db.fetch_all(*statements[0]))
        elif statements:
            rows = [row for sql, params in statements for row in db.fetch_all(sql, params)]
            rows.sort(key=_newest_first)
            answers.append(rows[:limit])
    if len(answers) == 1:  # the usual case: already in order, without duplicates
        ordered = answers[0]
    else:
        merged = {row[0]: row for rows in answers for row in rows}
        ordered = sorted(merged.values(), key=_newest_first)
    return [StoredEvent(seq=row[0], raw=row[3]) for row in ordered]


def _newest_first(row: Row) -> tuple[int, str]:
    return (-int(row[1]), row[2])


def _count_select(db: SqlRunner, relay_id: int, n: _Norm, now: int) -> tuple[str, list[object]]:
    """One SELECT of the seqs matching the filter (possibly repeated for tag drivers)."""
    driver = _driver(n)
    if driver == _TAG:
        letter, values = n.tags[_driving_tag(n)]
        cond, cond_params = _conditions(db, n, driver, now, time_on_events=False)
        time_sql, time_params = _tag_time(n)
        in_sql, in_params = db.in_list("tags.value", values)
        return (
            "SELECT events.seq AS seq FROM tags CROSS JOIN events WHERE tags.relay_id = ?"
            f" AND tags.name = ? AND {in_sql}{time_sql} AND events.seq = tags.event_seq"
            f" AND {cond}",
            [relay_id, letter, *in_params, *time_params, *cond_params],
        )
    cond, cond_params = _conditions(db, n, _TIME, now, time_on_events=True)
    return f"SELECT events.seq AS seq FROM events WHERE events.relay_id = ? AND {cond}", [
        relay_id,
        *cond_params,
    ]


def count_selects(
    db: SqlRunner, relay_id: int, filters: Sequence[Filter], *, now: int
) -> list[tuple[str, list[object]]]:
    """One SELECT of matching seqs per filter that can match (a seq may repeat). Exposed so
    tests can inspect the query plans."""
    normalized = (_normalize(f) for f in filters)
    return [_count_select(db, relay_id, n, now) for n in normalized if n is not None]


def count_events(db: SqlRunner, relay_id: int, filters: Sequence[Filter], *, now: int) -> int:
    """Distinct unexpired events of the relay matching any filter."""
    chunks = list(
        _chunks(count_selects(db, relay_id, filters, now=now), _MAX_COUNT_TERMS, db.max_params)
    )
    if not chunks:
        return 0
    if len(chunks) == 1:
        sql = " UNION ALL ".join(s for s, _ in chunks[0])
        row = db.fetch_one(
            f"SELECT COUNT(DISTINCT seq) FROM ({sql}) AS matched",
            [p for _, params in chunks[0] for p in params],
        )
        assert row is not None
        return int(row[0])
    # Too many filters for one statement: deduplicate across statements here.
    seqs: set[int] = set()
    for chunk in chunks:
        sql = " UNION ".join(s for s, _ in chunk)
        params = [p for _, chunk_params in chunk for p in chunk_params]
        seqs.update(int(r[0]) for r in db.fetch_all(sql, params))
    return len(seqs)
