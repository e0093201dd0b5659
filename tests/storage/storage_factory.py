"""Test helpers for the storage tests: events built directly (the store does not verify
signatures), and a store opener with a real-clock deadline."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import trio

from hypertuna.protocol.nostr.model import Event, Filter
from hypertuna.storage.events import EventStore, IngestItem, RelayRecord, open_event_store

ALICE = "a1" * 32
BOB = "b2" * 32
CAROL = "c3" * 32
SIG = "5" * 128
NOW = 1_700_000_000

StoreUrl = tuple[str | None, Path]

_relay_counter = 0


def make_event(
    *,
    kind: int = 1,
    created_at: int = NOW - 100,
    pubkey: str = ALICE,
    tags: Iterable[Sequence[str]] = (),
    content: str = "",
    event_id: str | None = None,
) -> Event:
    """An event whose id is the real NIP-01 hash (unless ``event_id`` forces one) and whose
    ``raw`` is its compact JSON."""
    tag_tuple = tuple(tuple(t) for t in tags)
    tag_lists = [list(t) for t in tag_tuple]
    if event_id is None:
        serial = json.dumps(
            [0, pubkey, created_at, kind, tag_lists, content],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        event_id = hashlib.sha256(serial.encode()).hexdigest()
    raw = json.dumps(
        {
            "id": event_id,
            "pubkey": pubkey,
            "created_at": created_at,
            "kind": kind,
            "tags": tag_lists,
            "content": content,
            "sig": SIG,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return Event(
        id=event_id,
        pubkey=pubkey,
        created_at=created_at,
        kind=kind,
        tags=tag_tuple,
        content=content,
        sig=SIG,
        raw=raw,
    )


def flt(
    *,
    ids: Iterable[str] | None = None,
    authors: Iterable[str] | None = None,
    kinds: Iterable[int] | None = None,
    tags: dict[str, Iterable[str]] | None = None,
    since: int | None = None,
    until: int | None = None,
    limit: int | None = None,
) -> Filter:
    """A Filter from plain iterables."""
    return Filter(
        ids=None if ids is None else frozenset(ids),
        authors=None if authors is None else frozenset(authors),
        kinds=None if kinds is None else frozenset(kinds),
        tags=tuple(sorted((k, frozenset(v)) for k, v in (tags or {}).items())),
        since=since,
        until=until,
        limit=limit,
    )


@contextlib.asynccontextmanager
async def open_store(store_url: StoreUrl, *, deadline: float = 30.0) -> AsyncIterator[EventStore]:
    """The store of ``store_url``, under a real-clock deadline (it runs threads and I/O)."""
    with trio.fail_after(deadline):
        async with open_event_store(*store_url) as store:
            yield store


async def new_relay(store: EventStore, name: str | None = None) -> RelayRecord:
    """A fresh relay with a unique key and name."""
    global _relay_counter
    _relay_counter += 1
    key = hashlib.sha256(f"relay-{_relay_counter}-{name}".encode()).hexdigest()
    return await store.create_relay(
        key=key, name=name or f"relay-{_relay_counter}", description="test relay", created_at=NOW
    )


async def put(store: EventStore, relay: RelayRecord, *events: Event, now: int = NOW) -> list[str]:
    """Ingest ``events`` into ``relay`` in one batch; return the OK messages ("" = accepted)."""
    results = await store.ingest([IngestItem(relay.id, e) for e in events], now=now)
    return [r.message for r in results]


async def fetch(
    store: EventStore,
    relay: RelayRecord,
    *filters: Filter,
    now: int = NOW,
    max_limit: int = 500,
) -> list[str]:
    """Ids answered to ``filters``, in the order returned."""
    result = await store.query(relay.id, filters, now=now, max_limit=max_limit)
    return [json.loads(e.raw)["id"] for e in result.events]


def newest_first(events: Iterable[Event]) -> list[str]:
    """Ids in query order: created_at descending, then id ascending."""
    return [e.id for e in sorted(events, key=lambda e: (-e.created_at, e.id))]
