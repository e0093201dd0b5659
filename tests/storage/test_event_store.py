"""The EventStore contract, run against every backend (``store_url`` is parametrized)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import psycopg
import pytest

from hypertuna.protocol.nostr.model import Filter
from hypertuna.storage import _event_sql as core
from hypertuna.storage.events import (
    IngestItem,
    IngestResult,
    RelayExistsError,
    StorageError,
    StoredEvent,
)
from tests.storage.storage_factory import (
    ALICE,
    BOB,
    CAROL,
    NOW,
    StoreUrl,
    fetch,
    flt,
    make_event,
    new_relay,
    newest_first,
    open_store,
    put,
)

DUPLICATE = "duplicate: already have this event"
EXPIRED = "invalid: event has expired"
DELETED = "blocked: this event was deleted by its author"

# --- relays ---------------------------------------------------------------------------------


async def test_relays_are_created_listed_and_found_by_key_or_name(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        assert await store.list_relays() == []
        first = await store.create_relay(
            key="0" * 64, name="first", description="one", created_at=10
        )
        second = await store.create_relay(
            key="f" * 64, name="second-2", description="", created_at=20
        )
        assert (first.key, first.name, first.description, first.created_at) == (
            "0" * 64,
            "first",
            "one",
            10,
        )
        assert first.id != second.id
        assert await store.list_relays() == [first, second]
        assert await store.get_relay("0" * 64) == first
        assert await store.get_relay("second-2") == second
        assert await store.get_relay("third") is None
        assert await store.get_relay("1" * 64) is None


async def test_relay_key_and_name_are_unique(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        await store.create_relay(key="1" * 64, name="taken", description="", created_at=1)
        with pytest.raises(RelayExistsError):
            await store.create_relay(key="1" * 64, name="other", description="", created_at=1)
        with pytest.raises(RelayExistsError):
            await store.create_relay(key="2" * 64, name="taken", description="", created_at=1)
        assert [r.name for r in await store.list_relays()] == ["taken"]
        assert issubclass(RelayExistsError, StorageError)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("A" * 64, "upper-key"),
        ("1" * 63, "short-key"),
        ("g" * 64, "non-hex-key"),
        ("3" * 64, "Upper"),
        ("3" * 64, ""),
        ("3" * 64, "x" * 65),
        ("3" * 64, "under_score"),
        ("3" * 64, "a" * 64),  # a name that looks like a key would make get_relay ambiguous
    ],
)
async def test_malformed_relay_key_or_name_is_refused(
    store_url: StoreUrl, key: str, name: str
) -> None:
    async with open_store(store_url) as store:
        with pytest.raises(ValueError, match="relay"):
            await store.create_relay(key=key, name=name, description="", created_at=1)
        assert await store.list_relays() == []


# --- ingest basics --------------------------------------------------------------------------


async def test_ingest_returns_one_result_per_item_with_increasing_seqs(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = [make_event(content=str(i), created_at=NOW - i) for i in range(5)]
        results = await store.ingest([IngestItem(relay.id, e) for e in events], now=NOW)
        assert [(r.accepted, r.message) for r in results] == [(True, "")] * 5
        seqs = [r.seq for r in results]
        assert all(isinstance(s, int) for s in seqs)
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
        later = await store.ingest([IngestItem(relay.id, make_event(content="x"))], now=NOW)
        assert later[0].seq is not None and later[0].seq > max(s for s in seqs if s)
        assert await store.event_count(relay.id) == 6
        assert await store.ingest([], now=NOW) == []


async def test_duplicates_are_refused_within_and_across_batches(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        event = make_event(content="once")
        results = await store.ingest(
            [IngestItem(relay.id, event), IngestItem(relay.id, event)], now=NOW
        )
        assert results[0] == IngestResult(True, "", results[0].seq)
        assert results[1] == IngestResult(False, DUPLICATE, None)
        assert await put(store, relay, event) == [DUPLICATE]
        assert await store.event_count(relay.id) == 1


async def test_ephemeral_event_is_a_caller_error_and_nothing_of_the_batch_is_written(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        regular = make_event(content="regular")
        for kind in (20000, 25000, 29999):
            with pytest.raises(ValueError, match="ephemeral"):
                await store.ingest(
                    [IngestItem(relay.id, regular), IngestItem(relay.id, make_event(kind=kind))],
                    now=NOW,
                )
        assert await store.event_count(relay.id) == 0
        assert await put(store, relay, regular) == [""]


async def test_unknown_relay_is_a_caller_error_and_the_batch_is_rolled_back(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        items = [IngestItem(relay.id, make_event()), IngestItem(relay.id + 1000, make_event())]
        with pytest.raises(ValueError, match="unknown relay"):
            await store.ingest(items, now=NOW)
        assert await store.event_count(relay.id) == 0


async def test_one_batch_may_target_several_relays(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        one, two = await new_relay(store), await new_relay(store)
        event = make_event(content="shared")
        results = await store.ingest(
            [IngestItem(one.id, event), IngestItem(two.id, event), IngestItem(one.id, event)],
            now=NOW,
        )
        assert [r.message for r in results] == ["", "", DUPLICATE]
        assert await fetch(store, one, flt()) == [event.id]
        assert await fetch(store, two, flt()) == [event.id]


# --- replaceable and addressable ------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 3, 10000, 10002, 19999])
async def test_replaceable_keeps_the_newest_version(store_url: StoreUrl, kind: int) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        old = make_event(kind=kind, created_at=NOW - 50, tags=[("t", "old")])
        new = make_event(kind=kind, created_at=NOW - 10, tags=[("t", "new")])
        other_author = make_event(kind=kind, created_at=NOW - 60, pubkey=BOB)
        assert await put(store, relay, old, other_author) == ["", ""]
        assert await put(store, relay, new) == [""]
        assert await fetch(store, relay, flt(kinds=[kind])) == [new.id, other_author.id]
        # The replaced version's tags went with it.
        assert await fetch(store, relay, flt(tags={"t": ["old"]})) == []
        assert await fetch(store, relay, flt(tags={"t": ["new"]})) == [new.id]
        # An older version arriving late is refused, and so is the replaced one.
        older = make_event(kind=kind, created_at=NOW - 30)
        for late in (older, old):
            [message] = await put(store, relay, late)
            assert message.startswith("duplicate:")
        assert await put(store, relay, new) == [DUPLICATE]
        assert await store.event_count(relay.id) == 2


async def test_replaceable_tie_keeps_the_lowest_id_in_either_order(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        a = make_event(kind=0, created_at=NOW - 5, content="a")
        b = make_event(kind=0, created_at=NOW - 5, content="b")
        low, high = sorted([a, b], key=lambda e: e.id)
        relay1, relay2 = await new_relay(store), await new_relay(store)
        assert await put(store, relay1, low) == [""]
        [message] = await put(store, relay1, high)
        assert message.startswith("duplicate:")
        assert await put(store, relay2, high) == [""]
        assert await put(store, relay2, low) == [""]
        for relay in (relay1, relay2):
            assert await fetch(store, relay, flt(kinds=[0])) == [low.id]


async def test_addressable_is_keyed_by_author_kind_and_d_tag(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        x1 = make_event(kind=30023, created_at=NOW - 50, tags=[("d", "x")])
        y1 = make_event(kind=30023, created_at=NOW - 40, tags=[("d", "y")])
        nod = make_event(kind=30023, created_at=NOW - 45)  # no d tag: address d=""
        emptyd = make_event(kind=30023, created_at=NOW - 44, tags=[("d", "")])
        other_kind = make_event(kind=30024, created_at=NOW - 50, tags=[("d", "x")])
        bob_x = make_event(kind=30023, created_at=NOW - 50, tags=[("d", "x")], pubkey=BOB)
        x2 = make_event(kind=30023, created_at=NOW - 20, tags=[("d", "x")])
        x_old = make_event(kind=30023, created_at=NOW - 30, tags=[("d", "x")], content="late")
        messages = await put(store, relay, x1, y1, nod, emptyd, other_kind, bob_x, x2, x_old)
        assert messages[:7] == ["", "", "", "", "", "", ""]
        assert messages[7].startswith("duplicate:")
        stored = await fetch(store, relay, flt(kinds=[30023, 30024]))
        assert stored == newest_first([y1, emptyd, other_kind, bob_x, x2])
        assert await fetch(store, relay, flt(tags={"d": ["x"]}, authors=[ALICE])) == newest_first(
            [x2, other_kind]
        )


async def test_addressable_tie_keeps_the_lowest_id(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        a = make_event(kind=30000, created_at=NOW - 5, tags=[("d", "k")], content="a")
        b = make_event(kind=30000, created_at=NOW - 5, tags=[("d", "k")], content="b")
        low, high = sorted([a, b], key=lambda e: e.id)
        messages = await put(store, relay, high, low)
        assert messages == ["", ""]
        assert await fetch(store, relay, flt()) == [low.id]


async def test_an_expired_stored_version_does_not_shadow_an_older_live_one(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        newer_expiring = make_event(
            kind=0, created_at=NOW - 10, tags=[("expiration", str(NOW + 5))]
        )
        older = make_event(kind=0, created_at=NOW - 20)
        assert await put(store, relay, newer_expiring) == [""]
        [message] = await put(store, relay, older, now=NOW)
        assert message.startswith("duplicate:")
        assert await put(store, relay, older, now=NOW + 5) == [""]
        assert await fetch(store, relay, flt(), now=NOW + 5) == [older.id]


# --- NIP-09 deletion ------------------------------------------------------------------------


async def test_deletion_removes_only_the_authors_own_events(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        mine = make_event(content="mine", tags=[("t", "x")])
        theirs = make_event(content="theirs", pubkey=BOB)
        my_deletion_before = make_event(kind=5, content="earlier deletion", created_at=NOW - 200)
        assert await put(store, relay, mine, theirs, my_deletion_before) == ["", "", ""]
        deletion = make_event(
            kind=5,
            created_at=NOW - 1,
            tags=[("e", mine.id), ("e", theirs.id), ("e", my_deletion_before.id), ("k", "1")],
        )
        assert await put(store, relay, deletion) == [""]
        assert await fetch(store, relay, flt()) == newest_first(
            [theirs, my_deletion_before, deletion]
        )
        assert await fetch(store, relay, flt(tags={"t": ["x"]})) == []
        # Resubmission of the deleted event is blocked; the others are plain duplicates.
        assert await put(store, relay, mine, theirs, my_deletion_before) == [
            DELETED,
            DUPLICATE,
            DUPLICATE,
        ]


async def test_deletion_before_the_event_blocks_it(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        target = make_event(content="to be")
        deletion = make_event(kind=5, tags=[("e", target.id)])
        # Same batch: a later item sees the earlier deletion.
        assert await put(store, relay, deletion, target) == ["", DELETED]
        assert await put(store, relay, target) == [DELETED]
        assert await fetch(store, relay, flt()) == [deletion.id]


async def test_tombstone_is_per_pubkey_and_never_blocks_deletions(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        target_id = "d" * 64
        deletion = make_event(kind=5, tags=[("e", target_id)])
        assert await put(store, relay, deletion) == [""]
        # An event with that id by another author (ids are not verified here) is not blocked.
        by_bob = make_event(pubkey=BOB, event_id=target_id)
        assert await put(store, relay, by_bob) == [""]
        # A kind-5 target is never deleted, so its tombstone must not block it either.
        other_deletion = make_event(kind=5, content="second")
        deletes_deletion = make_event(kind=5, content="third", tags=[("e", other_deletion.id)])
        assert await put(store, relay, deletes_deletion, other_deletion) == ["", ""]
        assert len(await fetch(store, relay, flt(kinds=[5]))) == 3


async def test_deletion_is_confined_to_its_relay(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        here, there = await new_relay(store), await new_relay(store)
        target = make_event(content="both")
        deletion = make_event(kind=5, tags=[("e", target.id)])
        assert await put(store, here, target) == [""]
        assert await put(store, there, target) == [""]
        assert await put(store, here, deletion) == [""]
        assert await fetch(store, here, flt()) == [deletion.id]
        assert await fetch(store, there, flt()) == [target.id]
        late = make_event(content="late")
        late_deletion = make_event(kind=5, content="x", tags=[("e", late.id)])
        assert await put(store, here, late_deletion) == [""]
        assert await put(store, there, late) == [""]


async def test_address_deletion_removes_versions_up_to_its_time_and_blocks_them(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        article = make_event(kind=30023, created_at=NOW - 50, tags=[("d", "post")])
        other_d = make_event(kind=30023, created_at=NOW - 50, tags=[("d", "other")])
        bobs = make_event(kind=30023, created_at=NOW - 50, tags=[("d", "post")], pubkey=BOB)
        profile = make_event(kind=0, created_at=NOW - 50)
        assert await put(store, relay, article, other_d, bobs, profile) == [""] * 4
        deletion = make_event(
            kind=5,
            created_at=NOW - 40,
            tags=[
                ("a", f"30023:{ALICE}:post"),
                ("a", f"30023:{BOB}:other"),  # not the deleter's address: ignored
                ("a", f"0:{ALICE}:"),
                ("a", "garbage"),
                ("a", f"1:{ALICE}:"),  # a regular kind has no address
            ],
        )
        assert await put(store, relay, deletion) == [""]
        assert await fetch(store, relay, flt()) == newest_first([deletion, other_d, bobs])
        # Versions up to the deletion time stay blocked; newer ones are welcome.
        at_deletion = make_event(kind=30023, created_at=NOW - 40, tags=[("d", "post")])
        newer = make_event(kind=30023, created_at=NOW - 39, tags=[("d", "post")])
        old_profile = make_event(kind=0, created_at=NOW - 45)
        new_profile = make_event(kind=0, created_at=NOW - 30)
        assert await put(store, relay, at_deletion, old_profile) == [DELETED, DELETED]
        assert await put(store, relay, newer, new_profile) == ["", ""]


async def test_address_deletion_before_any_version_blocks_older_ones(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        deletion = make_event(kind=5, created_at=NOW - 40, tags=[("a", f"30001:{ALICE}:list")])
        earlier = make_event(kind=30001, created_at=NOW - 41, tags=[("d", "list")])
        later = make_event(kind=30001, created_at=NOW - 39, tags=[("d", "list")])
        assert await put(store, relay, deletion, earlier, later) == ["", DELETED, ""]
        # A second, earlier address deletion does not lower the bar.
        weaker = make_event(kind=5, created_at=NOW - 60, tags=[("a", f"30001:{ALICE}:list")])
        assert await put(store, relay, weaker) == [""]
        again = make_event(kind=30001, created_at=NOW - 45, tags=[("d", "list")], content="2")
        assert await put(store, relay, again) == [DELETED]


# --- NIP-40 expiration ----------------------------------------------------------------------


async def test_expired_events_are_refused_hidden_uncounted_and_purged(
    store_url: StoreUrl,
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        past = make_event(content="past", tags=[("expiration", str(NOW - 1))])
        exactly_now = make_event(content="now", tags=[("expiration", str(NOW))])
        soon = make_event(content="soon", tags=[("expiration", str(NOW + 10))])
        later = make_event(content="later", tags=[("expiration", str(NOW + 100))])
        forever = make_event(content="forever", tags=[("expiration", "not a number")])
        messages = await put(store, relay, past, exactly_now, soon, later, forever)
        assert messages == [EXPIRED, EXPIRED, "", "", ""]
        everything = flt()
        assert set(await fetch(store, relay, everything, now=NOW)) == {
            soon.id,
            later.id,
            forever.id,
        }
        assert set(await fetch(store, relay, everything, now=NOW + 10)) == {later.id, forever.id}
        assert await store.count(relay.id, [everything], now=NOW + 9) == 3
        assert await store.count(relay.id, [everything], now=NOW + 10) == 2
        assert await fetch(store, relay, flt(ids=[soon.id]), now=NOW + 10) == []
        assert await store.event_count(relay.id) == 3
        assert await store.purge_expired(now=NOW + 10) == 1
        assert await store.event_count(relay.id) == 2
        assert await store.purge_expired(now=NOW + 10) == 0
        assert await store.purge_expired(now=NOW + 1000) == 1
        assert await fetch(store, relay, everything, now=NOW) == [forever.id]


# --- queries --------------------------------------------------------------------------------


async def test_results_are_newest_first_with_ties_by_lowest_id(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = [make_event(content=str(i), created_at=NOW - (i % 3)) for i in range(12)]
        assert await put(store, relay, *events) == [""] * 12
        expected = newest_first(events)
        assert await fetch(store, relay, flt()) == expected
        assert await fetch(store, relay, flt(kinds=[1])) == expected
        assert await fetch(store, relay, flt(authors=[ALICE])) == expected
        assert await fetch(store, relay, flt(ids=[e.id for e in events])) == expected
        # A cut inside a run of equal timestamps keeps the lowest ids.
        assert await fetch(store, relay, flt(limit=6)) == expected[:6]
        assert await fetch(store, relay, flt(kinds=[1], limit=5)) == expected[:5]


async def test_limits_zero_none_and_the_max_limit_cap(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = [make_event(content=str(i), created_at=NOW - i) for i in range(10)]
        await put(store, relay, *events)
        expected = newest_first(events)
        assert await fetch(store, relay, flt(limit=3)) == expected[:3]
        assert await fetch(store, relay, flt(limit=0)) == []
        assert await fetch(store, relay, flt(limit=0), flt(kinds=[1], limit=2)) == expected[:2]
        assert await fetch(store, relay, flt(), max_limit=4) == expected[:4]
        assert await fetch(store, relay, flt(limit=100), max_limit=4) == expected[:4]
        assert await fetch(store, relay, flt(limit=2), max_limit=4) == expected[:2]
        assert await fetch(store, relay, flt(kinds=[1]), max_limit=0) == []


async def test_since_and_until_are_inclusive(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = {t: make_event(created_at=t, tags=[("t", "x")]) for t in range(100, 106)}
        await put(store, relay, *events.values())
        window = [events[t].id for t in (104, 103, 102)]
        assert await fetch(store, relay, flt(since=102, until=104)) == window
        assert await fetch(store, relay, flt(since=102, until=104, kinds=[1])) == window
        assert await fetch(store, relay, flt(since=102, until=104, authors=[ALICE])) == window
        assert await fetch(store, relay, flt(since=102, until=104, tags={"t": ["x"]})) == window
        assert await fetch(store, relay, flt(since=105)) == [events[105].id]
        assert await fetch(store, relay, flt(until=100)) == [events[100].id]
        assert await fetch(store, relay, flt(since=103, until=103)) == [events[103].id]
        assert await fetch(store, relay, flt(since=104, until=103)) == []


async def test_filters_are_ored_deduplicated_and_limited_one_by_one(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        notes = [make_event(content=f"n{i}", created_at=NOW - i) for i in range(5)]
        reactions = [make_event(kind=7, content=f"r{i}", created_at=NOW - 10 - i) for i in range(3)]
        by_bob = make_event(pubkey=BOB, content="b", created_at=NOW - 20)
        await put(store, relay, *notes, *reactions, by_bob)
        got = await fetch(
            store,
            relay,
            flt(kinds=[1], limit=2),
            flt(kinds=[7], limit=1),
            flt(authors=[BOB]),
            flt(ids=[notes[0].id, reactions[2].id]),
        )
        assert got == [notes[0].id, notes[1].id, reactions[0].id, reactions[2].id, by_bob.id]
        assert (
            await store.count(relay.id, [flt(kinds=[1], limit=1), flt(authors=[ALICE])], now=NOW)
            == 9
        )


async def test_tag_filters_and_across_letters_or_within_one(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        ex = make_event(content="e=x", tags=[("e", "x"), ("e", "x")], created_at=NOW - 1)
        ey_pz = make_event(content="e=y p=z", tags=[("e", "y"), ("p", "z")], created_at=NOW - 2)
        ex_ey_pz = make_event(
            content="e=x,y p=z", tags=[("e", "x"), ("e", "y"), ("p", "z")], created_at=NOW - 3
        )
        upper = make_event(content="E=x", tags=[("E", "x")], created_at=NOW - 4)
        long_name = make_event(content="ee=x", tags=[("ee", "x")], created_at=NOW - 5)
        value_only = make_event(content="t", tags=[("t",)], created_at=NOW - 6)
        await put(store, relay, ex, ey_pz, ex_ey_pz, upper, long_name, value_only)
        assert await fetch(store, relay, flt(tags={"e": ["x"]})) == [ex.id, ex_ey_pz.id]
        assert await fetch(store, relay, flt(tags={"e": ["x", "y"]})) == [
            ex.id,
            ey_pz.id,
            ex_ey_pz.id,
        ]
        assert await fetch(store, relay, flt(tags={"e": ["x", "y"], "p": ["z"]})) == [
            ey_pz.id,
            ex_ey_pz.id,
        ]
        assert await fetch(store, relay, flt(tags={"e": ["x"], "p": ["z", "q"]})) == [ex_ey_pz.id]
        assert await fetch(store, relay, flt(tags={"E": ["x"]})) == [upper.id]
        assert await fetch(store, relay, flt(tags={"e": ["x", "y"]}, limit=2)) == [
            ex.id,
            ey_pz.id,
        ]
        assert await fetch(store, relay, flt(tags={"e": ["x"]}, kinds=[7])) == []
        assert await store.count(relay.id, [flt(tags={"e": ["x", "y"]})], now=NOW) == 3
        # The same letter twice: both conditions hold (AND), as Filter.matches says.
        both = Filter(tags=(("e", frozenset({"x"})), ("e", frozenset({"y", "w"}))))
        assert await fetch(store, relay, both) == [ex_ey_pz.id]
        assert await store.count(relay.id, [both], now=NOW) == 1
        assert await store.count(relay.id, [flt(tags={"t": ["x"]})], now=NOW) == 0


async def test_filters_that_cannot_match_return_nothing(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        await put(store, relay, make_event(tags=[("t", "x")]))
        for hopeless in (
            flt(ids=[]),
            flt(authors=[]),
            flt(kinds=[]),
            flt(tags={"t": []}),
            flt(since=10, until=9),
            flt(ids=["\x00"]),
        ):
            assert await fetch(store, relay, hopeless) == []
            assert await store.count(relay.id, [hopeless], now=NOW) == 0


async def test_relays_never_see_each_others_events(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        one, two = await new_relay(store), await new_relay(store)
        in_one = make_event(content="one", tags=[("t", "x")])
        in_two = make_event(content="two", tags=[("t", "x")])
        await put(store, one, in_one)
        await put(store, two, in_two)
        for relay, own in ((one, in_one), (two, in_two)):
            for f in (
                flt(),
                flt(kinds=[1]),
                flt(authors=[ALICE]),
                flt(tags={"t": ["x"]}),
                flt(ids=[in_one.id, in_two.id]),
                flt(authors=[ALICE], kinds=[1]),
            ):
                assert await fetch(store, relay, f) == [own.id]
                assert await store.count(relay.id, [f], now=NOW) == 1
            assert await store.event_count(relay.id) == 1


async def test_many_values_in_a_filter_are_answered_in_full(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        authors = [f"{i:064x}" for i in range(250)]
        events = [
            make_event(pubkey=a, kind=1 + i % 3, created_at=NOW - i, tags=[("p", a)])
            for i, a in enumerate(authors)
        ]
        await put(store, relay, *events)
        expected = newest_first(events)
        assert await fetch(store, relay, flt(authors=authors)) == expected
        assert await fetch(store, relay, flt(authors=authors, kinds=[1, 2, 3])) == expected
        assert await fetch(store, relay, flt(tags={"p": authors})) == expected
        assert await fetch(store, relay, flt(authors=authors, limit=7)) == expected[:7]
        assert await fetch(store, relay, flt(tags={"p": authors}, limit=7)) == expected[:7]
        assert await store.count(relay.id, [flt(authors=authors)], now=NOW) == 250
        many_filters = [flt(ids=[e.id]) for e in events] + [flt(kinds=[2])]
        assert await store.count(relay.id, many_filters, now=NOW) == 250
        assert await fetch(store, relay, *many_filters) == expected


async def test_unindexable_tag_values_are_stored_but_never_matched(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        long_value = "é" * 600  # 1200 UTF-8 bytes
        odd = make_event(tags=[("t", long_value), ("t", "nul\x00byte"), ("t", "ok")])
        weird_d = make_event(kind=30000, tags=[("d", "nul\x00" + "x" * 2000)])
        assert await put(store, relay, odd, weird_d) == ["", ""]
        assert await fetch(store, relay, flt(tags={"t": ["ok"]})) == [odd.id]
        assert await fetch(store, relay, flt(tags={"t": [long_value, "nul\x00byte"]})) == []
        replacement = make_event(
            kind=30000, created_at=NOW, tags=[("d", "nul\x00" + "x" * 2000)], content="2"
        )
        assert await put(store, relay, replacement) == [""]
        assert await fetch(store, relay, flt(kinds=[30000])) == [replacement.id]


async def test_raw_is_returned_verbatim_with_seq_and_high_seq(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay, other = await new_relay(store), await new_relay(store)
        empty = await store.query(relay.id, [flt()], now=NOW, max_limit=10)
        assert empty.events == [] and empty.high_seq == 0
        event = make_event(content='héllo "quoted" ✓', tags=[("t", "ünï")])
        [result] = await store.ingest([IngestItem(relay.id, event)], now=NOW)
        answer = await store.query(relay.id, [flt()], now=NOW, max_limit=10)
        assert [(e.seq, e.raw) for e in answer.events] == [(result.seq, event.raw)]
        assert answer.high_seq == result.seq
        assert json.loads(answer.events[0].raw)["content"] == event.content
        # high_seq covers the whole store, even rows the query did not ask for.
        [elsewhere] = await store.ingest([IngestItem(other.id, make_event(content="x"))], now=NOW)
        answer = await store.query(relay.id, [flt(kinds=[7])], now=NOW, max_limit=10)
        assert answer.events == [] and answer.high_seq == elsewhere.seq


async def test_data_survives_reopening_and_migrations_are_not_reapplied(
    store_url: StoreUrl,
) -> None:
    event = make_event(content="durable")
    async with open_store(store_url) as store:
        relay = await new_relay(store, "durable")
        [result] = await store.ingest([IngestItem(relay.id, event)], now=NOW)
    for reopening in range(2):
        async with open_store(store_url) as store:
            assert await store.get_relay("durable") == relay
            assert await store.event_count(relay.id) == 1 + reopening
            answer = await store.query(relay.id, [flt(ids=[event.id])], now=NOW, max_limit=10)
            assert [e.raw for e in answer.events] == [event.raw]
            assert answer.high_seq == result.seq
            [next_result] = await store.ingest(
                [IngestItem(relay.id, make_event(content=str(result.seq)))], now=NOW
            )
            assert next_result.seq is not None and result.seq is not None
            assert next_result.seq > result.seq
            result = next_result


async def test_closed_store_raises_storage_error(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        await store.ping()
    await store.aclose()  # idempotent
    with pytest.raises(StorageError):
        await store.ping()
    with pytest.raises(StorageError):
        await store.ingest([IngestItem(relay.id, make_event())], now=NOW)
    with pytest.raises(StorageError):
        await store.query(relay.id, [flt()], now=NOW, max_limit=1)


async def test_count_ignores_limits_and_deduplicates(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        events = [make_event(content=str(i), pubkey=(ALICE, BOB, CAROL)[i % 3]) for i in range(9)]
        await put(store, relay, *events)
        assert await store.count(relay.id, [flt(limit=1)], now=NOW) == 9
        assert await store.count(relay.id, [flt(limit=0)], now=NOW) == 9
        assert (
            await store.count(relay.id, [flt(authors=[ALICE]), flt(authors=[ALICE, BOB])], now=NOW)
            == 6
        )
        assert await store.count(relay.id, [], now=NOW) == 0


def _commit_from_another_connection(store_url: StoreUrl, relay_id: int, event_id: str) -> None:
    """Store a row the way a concurrent writer would, bypassing the store under test."""
    columns = "relay_id, id, pubkey, kind, created_at, raw"
    values = (relay_id, event_id, ALICE, 1, NOW - 1, "{}")
    url, data_dir = store_url
    if url is None:
        conn = sqlite3.connect(data_dir / "gateway.sqlite3", timeout=10)
        conn.execute(f"INSERT INTO events ({columns}) VALUES (?, ?, ?, ?, ?, ?)", values)
        conn.commit()
        conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(f"INSERT INTO events ({columns}) VALUES (%s, %s, %s, %s, %s, %s)", values)


async def test_high_seq_comes_from_the_same_snapshot_as_the_events(
    store_url: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        [stored] = await store.ingest([IngestItem(relay.id, make_event())], now=NOW)
        real_query_events = core.query_events
        sneaked: list[str] = []

        def query_then_let_a_writer_commit(*args: Any, **kwargs: Any) -> list[StoredEvent]:
            events = real_query_events(*args, **kwargs)
            if not sneaked:
                sneaked.append("9" * 64)
                _commit_from_another_connection(store_url, relay.id, sneaked[0])
            return events

        monkeypatch.setattr(core, "query_events", query_then_let_a_writer_commit)
        first = await store.query(relay.id, [flt()], now=NOW, max_limit=10)
        # The row committed between the two reads is neither listed nor counted in high_seq.
        assert [e.seq for e in first.events] == [stored.seq]
        assert first.high_seq == stored.seq
        second = await store.query(relay.id, [flt()], now=NOW, max_limit=10)
        assert len(second.events) == 2
        assert second.high_seq == max(e.seq for e in second.events) > first.high_seq
