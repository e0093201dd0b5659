"""Helpers for relay view tests: signed events, record blocks, a relay's cores in memory, and
the view semantics written plainly over Python collections (the oracle)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from hypertuna.protocol.nostr.codec import public_key_hex, sign_event
from hypertuna.protocol.nostr.model import Event, Filter, KindClass, kind_class
from hypertuna.storage.cores.log import BlockLog
from hypertuna.storage.events import EventStore, RelayRecord
from hypertuna.storage.relay_records import (
    AddWriter,
    EventRecord,
    RemoveWriter,
    WriterRole,
    decode_record,
    encode_record,
)
from tests.storage.memory_log import MemoryLog
from tests.storage.storage_factory import NOW

_relays = 0


class Author:
    """A Nostr identity with a fixed key, so examples are reproducible."""

    def __init__(self, name: str) -> None:
        self.secret = hashlib.sha256(name.encode()).digest()
        self.pubkey = public_key_hex(self.secret)

    def event(
        self,
        *,
        kind: int = 1,
        created_at: int = NOW - 100,
        tags: Sequence[Sequence[str]] = (),
        content: str = "",
    ) -> Event:
        return sign_event(self.secret, created_at=created_at, kind=kind, tags=tags, content=content)


ALICE = Author("alice")
BOB = Author("bob")
CAROL = Author("carol")


def event_block(event: Event) -> bytes:
    return encode_record(EventRecord(event))


def add_block(log: BlockLog, role: WriterRole = WriterRole.WORKER) -> bytes:
    return encode_record(AddWriter(log.key.hex(), role))


def remove_block(log: BlockLog, at_length: int) -> bytes:
    return encode_record(RemoveWriter(log.key.hex(), at_length))


def forged(event: Event) -> bytes:
    """An event record whose signature is another event's (same author): well formed, but
    the signature does not verify."""
    other = sign_event(ALICE.secret, created_at=1, kind=1, content="other")
    data = json.loads(event.raw)
    data["sig"] = other.sig
    return json.dumps({"v": 1, "type": "event", "event": data}).encode()


class Cores:
    """The owner core of a relay and its writer cores, all in memory."""

    def __init__(self, name: str, writers: int = 0) -> None:
        self.owner = MemoryLog(f"{name}-owner")
        self.writers = [MemoryLog(f"{name}-writer-{i}") for i in range(writers)]
        self.available: set[bytes] = {w.key for w in self.writers}

    def lookup(self, key: bytes) -> BlockLog | None:
        if key not in self.available:
            return None
        return next((w for w in self.writers if w.key == key), None)

    @property
    def relay_key(self) -> str:
        return self.owner.key.hex()


async def new_core_relay(store: EventStore, cores: Cores) -> RelayRecord:
    global _relays
    _relays += 1
    return await store.create_relay(
        key=cores.relay_key, name=f"cores-{_relays}", description="", created_at=NOW
    )


async def answers(
    store: EventStore, relay: RelayRecord, filters: Iterable[Filter], times: Iterable[int]
) -> list[list[str]]:
    """The raw events answered to each filter at each time."""
    out = []
    for now in times:
        for f in filters:
            result = await store.query(relay.id, [f], now=now, max_limit=1000)
            out.append([e.raw for e in result.events])
    return out


# --- the oracle -----------------------------------------------------------------------------


def counted_events(owner: BlockLog, writers: Sequence[BlockLog]) -> list[Event]:
    """The events of the counted blocks, by the rules of the relay_view module docstring."""
    events: list[Event] = []
    members: dict[str, int | None] = {}  # admitted key -> end (None while admitted)
    removed: set[str] = set()
    owner_key = owner.key.hex()
    for index in range(owner.length):
        record = _record(owner.get(index))
        if isinstance(record, EventRecord):
            events.append(record.event)
        elif isinstance(record, AddWriter):
            if record.key != owner_key and record.key not in members:
                members[record.key] = None
        elif (
            isinstance(record, RemoveWriter) and record.key in members and record.key not in removed
        ):
            members[record.key] = record.at_length
            removed.add(record.key)
    for log in writers:
        key = log.key.hex()
        if key not in members:
            continue
        end = members[key]
        for index in range(log.length if end is None else min(end, log.length)):
            record = _record(log.get(index))
            if isinstance(record, EventRecord):
                events.append(record.event)
    return events


def _record(block: bytes) -> object:
    try:
        record = decode_record(block)
    except Exception:
        return None
    if isinstance(record, EventRecord) and record.event.kind_class is KindClass.EPHEMERAL:
        return None
    return record


def _address(event: Event) -> tuple[int, str, str] | None:
    klass = event.kind_class
    if klass is KindClass.REPLACEABLE:
        return (event.kind, event.pubkey, "")
    if klass is KindClass.ADDRESSABLE:
        return (event.kind, event.pubkey, event.d_tag)
    return None


def visible(events: Iterable[Event], now: int) -> list[Event]:
    """What the view shows at ``now``, from the set of counted events alone."""
    by_id = {e.id: e for e in events}
    deleted_ids: set[tuple[str, str]] = set()
    deleted_until: dict[tuple[int, str, str], int] = {}
    for d in by_id.values():
        if d.kind != 5:
            continue
        for tag in d.tags:
            if len(tag) < 2:
                continue
            if tag[0] == "e":
                deleted_ids.add((tag[1], d.pubkey))
            elif tag[0] == "a":
                kind_text, pubkey, d_tag = tag[1].split(":", 2)
                klass = kind_class(int(kind_text))
                if pubkey != d.pubkey or klass not in (
                    KindClass.REPLACEABLE,
                    KindClass.ADDRESSABLE,
                ):
                    continue
                key = (int(kind_text), pubkey, "" if klass is KindClass.REPLACEABLE else d_tag)
                deleted_until[key] = max(deleted_until.get(key, -1), d.created_at)
    winners: dict[tuple[int, str, str], Event] = {}
    shown: list[Event] = []
    for e in by_id.values():
        address = _address(e)
        if address is None:
            if e.kind == 5 or (e.id, e.pubkey) not in deleted_ids:
                shown.append(e)
            continue
        best = winners.get(address)
        if best is None or (-e.created_at, e.id) < (-best.created_at, best.id):
            winners[address] = e
    for address, e in winners.items():
        if (e.id, e.pubkey) in deleted_ids or e.created_at <= deleted_until.get(address, -1):
            continue
        shown.append(e)
    return [e for e in shown if e.expiration is None or e.expiration > now]


def expected_answer(events: Iterable[Event], f: Filter, now: int) -> list[str]:
    matching = [e for e in visible(events, now) if f.matches(e)]
    matching.sort(key=lambda e: (-e.created_at, e.id))
    limit = 1000 if f.limit is None else min(f.limit, 1000)
    return [e.raw for e in matching[:limit]]
