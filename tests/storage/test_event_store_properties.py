"""Property test: for random small histories and random filters the store agrees with a
brute-force model built from the rules in the module docstring of hypertuna.storage.events
(``Filter.matches`` + sort + limit over the accepted, not deleted, not expired events)."""

from __future__ import annotations

from collections.abc import Sequence

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypertuna.protocol.nostr.model import Event, Filter, KindClass, kind_class
from hypertuna.storage.events import IngestItem
from tests.storage.storage_factory import (
    ALICE,
    BOB,
    CAROL,
    NOW,
    StoreUrl,
    flt,
    make_event,
    new_relay,
    newest_first,
    open_store,
)

PUBKEYS = [ALICE, BOB, CAROL]
KINDS = [1, 1, 7, 0, 10002, 30023, 30023, 5, 5]
LETTERS = ["e", "p", "t"]
VALUES = ["x", "y", "z"]
D_VALUES = ["", "a", "b"]


def _address(event: Event) -> tuple[int, str, str] | None:
    klass = event.kind_class
    if klass is KindClass.REPLACEABLE:
        return (event.kind, event.pubkey, "")
    if klass is KindClass.ADDRESSABLE:
        return (event.kind, event.pubkey, event.d_tag)
    return None


def _alive(event: Event, now: int) -> bool:
    return event.expiration is None or event.expiration > now


class Model:
    """The merge rules, written plainly over Python collections."""

    def __init__(self) -> None:
        self.stored: dict[str, Event] = {}
        self.deleted_ids: set[tuple[str, str]] = set()
        self.deleted_addresses: dict[tuple[int, str, str], int] = {}

    def ingest(self, event: Event, now: int) -> str:
        """The expected OK message prefix ("" when stored)."""
        if not _alive(event, now):
            return "invalid:"
        if event.kind != 5 and (event.id, event.pubkey) in self.deleted_ids:
            return "blocked:"
        address = _address(event)
        if address is not None:
            if self.deleted_addresses.get(address, -1) >= event.created_at:
                return "blocked:"
            for current in list(self.stored.values()):
                if _address(current) != address:
                    continue
                if current.id == event.id:
                    return "duplicate:"
                newer = (current.created_at, -int(current.id, 16)) > (
                    event.created_at,
                    -int(event.id, 16),
                )
                if _alive(current, now) and newer:
                    return "duplicate:"
                del self.stored[current.id]
        if event.id in self.stored:
            return "duplicate:"
        self.stored[event.id] = event
        if event.kind == 5:
            self._delete(event)
        return ""

    def _delete(self, deletion: Event) -> None:
        for tag in deletion.tags:
            if len(tag) < 2:
                continue
            if tag[0] == "e":
                target = self.stored.get(tag[1])
                if target is not None and target.pubkey == deletion.pubkey and target.kind != 5:
                    del self.stored[tag[1]]
                self.deleted_ids.add((tag[1], deletion.pubkey))
            elif tag[0] == "a":
                kind_text, pubkey, d_tag = tag[1].split(":", 2)
                kind = int(kind_text)
                if pubkey != deletion.pubkey:
                    continue
                if kind_class(kind) is KindClass.REPLACEABLE:
                    d_tag = ""
                elif kind_class(kind) is not KindClass.ADDRESSABLE:
                    continue
                address = (kind, pubkey, d_tag)
                for event in list(self.stored.values()):
                    if _address(event) == address and event.created_at <= deletion.created_at:
                        del self.stored[event.id]
                self.deleted_addresses[address] = max(
                    self.deleted_addresses.get(address, -1), deletion.created_at
                )

    def query(self, filters: Sequence[Filter], now: int, max_limit: int) -> list[str]:
        visible = [e for e in self.stored.values() if _alive(e, now)]
        chosen: dict[str, Event] = {}
        for f in filters:
            if not f.can_match:
                continue
            limit = max_limit if f.limit is None else min(f.limit, max_limit)
            for event_id in newest_first(e for e in visible if f.matches(e))[:limit]:
                chosen[event_id] = self.stored[event_id]
        return newest_first(chosen.values())

    def count(self, filters: Sequence[Filter], now: int) -> int:
        visible = [e for e in self.stored.values() if _alive(e, now)]
        return len({e.id for f in filters if f.can_match for e in visible if f.matches(e)})


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """Events in arrival order, with deletions, replacements, expirations and resubmissions."""
    events: list[Event] = []
    for i in range(draw(st.integers(0, 18))):
        kind = draw(st.sampled_from(KINDS))
        pubkey = draw(st.sampled_from(PUBKEYS))
        tags: list[tuple[str, str]] = draw(
            st.lists(st.tuples(st.sampled_from(LETTERS), st.sampled_from(VALUES)), max_size=3)
        )
        if kind == 30023 and draw(st.booleans()):
            tags.append(("d", draw(st.sampled_from(D_VALUES))))
        if kind == 5 and events:
            targets = draw(st.lists(st.sampled_from(events), max_size=2))
            if targets:  # a deletion mostly matters when its author wrote the target
                pubkey = draw(st.sampled_from([targets[0].pubkey, *PUBKEYS]))
            for target in targets:
                if draw(st.booleans()):
                    tags.append(("e", target.id))
                elif (address := _address(target)) is not None:
                    target_pubkey = draw(st.sampled_from([target.pubkey, pubkey]))
                    tags.append(("a", f"{address[0]}:{target_pubkey}:{address[2]}"))
        if draw(st.integers(0, 5)) == 0:
            tags.append(("expiration", str(NOW + draw(st.integers(-1, 3)))))
        created_at = draw(st.integers(100, 104))
        events.append(
            make_event(kind=kind, pubkey=pubkey, created_at=created_at, tags=tags, content=str(i))
        )
    resubmitted = draw(st.lists(st.sampled_from(events), max_size=3)) if events else []
    arrival: list[Event] = draw(st.permutations(events + resubmitted))
    return arrival


@st.composite
def filters(draw: st.DrawFn, events: list[Event]) -> Filter:
    known_ids = [e.id for e in events] + ["f" * 64]
    return flt(
        ids=draw(st.none() | st.lists(st.sampled_from(known_ids), max_size=3)),
        authors=draw(st.none() | st.lists(st.sampled_from(PUBKEYS), max_size=2)),
        kinds=draw(
            st.none() | st.lists(st.sampled_from([0, 1, 2, 5, 7, 10002, 30023]), max_size=3)
        ),
        tags=draw(
            st.dictionaries(
                st.sampled_from([*LETTERS, "d"]),
                st.lists(st.sampled_from(VALUES + D_VALUES), max_size=2),
                max_size=2,
            )
        ),
        since=draw(st.none() | st.integers(99, 105)),
        until=draw(st.none() | st.integers(99, 105)),
        limit=draw(st.none() | st.integers(0, 6)),
    )


def test_store_agrees_with_the_brute_force_model(store_url: StoreUrl) -> None:
    # Each example runs its own trio.run against the same database, in a relay of its own.
    examples = 120 if store_url[0] is None else 30

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        arrival = data.draw(histories())
        sizes = data.draw(st.lists(st.integers(1, 6), min_size=len(arrival), max_size=len(arrival)))
        queries = data.draw(
            st.lists(
                st.tuples(
                    st.lists(filters(arrival), min_size=1, max_size=3),
                    st.integers(0, 4),  # query time after NOW
                    st.integers(1, 8),  # max_limit
                ),
                min_size=1,
                max_size=3,
            )
        )
        trio.run(_run_example, store_url, arrival, sizes, queries)

    check()


async def _run_example(
    store_url: StoreUrl,
    arrival: list[Event],
    sizes: list[int],
    queries: list[tuple[list[Filter], int, int]],
) -> None:
    model = Model()
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        position = 0
        for size in sizes:
            batch = arrival[position : position + size]
            position += size
            if not batch:
                break
            results = await store.ingest([IngestItem(relay.id, e) for e in batch], now=NOW)
            expected = [model.ingest(e, NOW) for e in batch]
            got = [r.message[: r.message.find(":") + 1] for r in results]
            assert got == expected, (batch, results)
            assert [r.accepted for r in results] == [m == "" for m in expected]
        for query_filters, later, max_limit in queries:
            now = NOW + later
            answer = await store.query(relay.id, query_filters, now=now, max_limit=max_limit)
            raws = [e.raw for e in answer.events]
            assert raws == [model.stored[i].raw for i in model.query(query_filters, now, max_limit)]
            assert await store.count(relay.id, query_filters, now=now) == model.count(
                query_filters, now
            )
