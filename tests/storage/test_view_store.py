"""The event store's side of core-backed relays, on both backends: checkpoints written with
the events, reset, plain ingest refused, and merge rules that do not depend on arrival order."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import pytest

from hypertuna.protocol.nostr.model import Event
from hypertuna.storage.events import EventStore, IngestItem, IngestResult, RelayRecord, ViewCore
from tests.storage.storage_factory import NOW, StoreUrl, flt, new_relay, open_store
from tests.storage.view_support import ALICE, BOB, visible

OWNER = "0a" * 32
WRITER = "0b" * 32


async def ids(store: EventStore, relay: RelayRecord, now: int = NOW) -> list[str]:
    result = await store.query(relay.id, [flt()], now=now, max_limit=1000)
    return [json.loads(e.raw)["id"] for e in result.events]


def expected_ids(events: list[Event], now: int = NOW) -> list[str]:
    return [e.id for e in sorted(visible(events, now), key=lambda e: (-e.created_at, e.id))]


async def test_events_and_core_progress_are_written_together(store_url: StoreUrl) -> None:
    note = ALICE.event(content="a")
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        assert await store.view_cores(relay.id) == []
        owner = ViewCore(OWNER, "owner", 1)
        writer = ViewCore(WRITER, "gateway", 0)
        results = await store.apply_view(relay.id, [note], [writer, owner])
        assert [r.accepted for r in results] == [True]
        assert await store.view_cores(relay.id) == [owner, writer]  # ordered by key
        removed = ViewCore(WRITER, "gateway", 2, end=2)
        again = await store.apply_view(relay.id, [note], [removed])
        assert [(r.accepted, r.message[:10]) for r in again] == [(False, "duplicate:")]
        assert await store.view_cores(relay.id) == [owner, removed]
        assert await ids(store, relay) == [note.id]


async def test_before_commit_sees_results_and_adds_progress(store_url: StoreUrl) -> None:
    first, second = ALICE.event(content="1"), ALICE.event(content="2")
    seen: list[list[bool]] = []

    def append(results: Sequence[IngestResult]) -> list[ViewCore]:
        seen.append([r.accepted for r in results])
        return [ViewCore(OWNER, "owner", sum(r.accepted for r in results))]

    async with open_store(store_url) as store:
        relay = await new_relay(store)
        await store.apply_view(relay.id, [first], [], before_commit=append)
        await store.apply_view(relay.id, [first, second], [], before_commit=append)
        assert seen == [[True], [False, True]]
        assert await store.view_cores(relay.id) == [ViewCore(OWNER, "owner", 1)]
        assert sorted(await ids(store, relay)) == sorted([first.id, second.id])


async def test_a_failing_before_commit_writes_nothing(store_url: StoreUrl) -> None:
    def fail(_results: Sequence[IngestResult]) -> list[ViewCore]:
        raise OSError("disk full")

    async with open_store(store_url) as store:
        relay = await new_relay(store)
        with pytest.raises(OSError, match="disk full"):
            await store.apply_view(
                relay.id, [ALICE.event()], [ViewCore(OWNER, "owner", 1)], before_commit=fail
            )
        assert await store.view_cores(relay.id) == []
        assert await store.event_count(relay.id) == 0


async def test_a_failed_batch_writes_neither_events_nor_progress(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        relay = await new_relay(store)
        ephemeral = ALICE.event(kind=20001)
        with pytest.raises(ValueError, match="ephemeral"):
            await store.apply_view(
                relay.id, [ALICE.event(), ephemeral], [ViewCore(OWNER, "owner", 2)]
            )
        assert await store.view_cores(relay.id) == []
        assert await store.event_count(relay.id) == 0
        with pytest.raises(ValueError, match="unknown relay"):
            await store.apply_view(relay.id + 1000, [], [ViewCore(OWNER, "owner", 1)])
        with pytest.raises(ValueError, match="unknown relay"):
            await store.reset_view(relay.id + 1000)


async def test_a_core_backed_relay_refuses_plain_ingest(store_url: StoreUrl) -> None:
    async with open_store(store_url) as store:
        backed, plain = await new_relay(store), await new_relay(store)
        await store.apply_view(backed.id, [], [ViewCore(OWNER, "owner", 0)])
        results = await store.ingest(
            [IngestItem(backed.id, ALICE.event()), IngestItem(plain.id, ALICE.event())], now=NOW
        )
        assert [(r.accepted, r.message) for r in results] == [
            (False, "blocked: this relay is written through its cores"),
            (True, ""),
        ]
        assert await store.event_count(backed.id) == 0


async def test_reset_forgets_one_relay_entirely(store_url: StoreUrl) -> None:
    target = ALICE.event(kind=30023, tags=[["d", "x"]], created_at=10)
    deletion = ALICE.event(kind=5, tags=[["e", target.id], ["a", f"0:{ALICE.event().pubkey}:"]])
    async with open_store(store_url) as store:
        relay, other = await new_relay(store), await new_relay(store)
        for r in (relay, other):
            await store.apply_view(r.id, [target, deletion], [ViewCore(OWNER, "owner", 2)])
        await store.reset_view(relay.id)
        assert await store.view_cores(relay.id) == []
        assert await store.event_count(relay.id) == 0
        # Tombstones and the floor left by the deletion are gone too: the target comes back.
        await store.apply_view(relay.id, [target], [ViewCore(OWNER, "owner", 1)])
        assert await ids(store, relay) == [target.id]
        # The other relay is untouched, and a reset relay is still core-backed.
        assert await ids(store, other) == [deletion.id]
        assert await store.view_cores(other.id) == [ViewCore(OWNER, "owner", 2)]
        [result] = await store.ingest([IngestItem(relay.id, ALICE.event())], now=NOW)
        assert result.message.startswith("blocked:")


def _scenarios() -> dict[str, list[Event]]:
    """Small sets of events whose merge outcome once depended on their order."""
    note = ALICE.event(content="note", created_at=50)
    profile_old = ALICE.event(kind=0, content="old", created_at=10)
    profile_new = ALICE.event(kind=0, content="new", created_at=20)
    tie = [ALICE.event(kind=10002, content=str(i), created_at=30) for i in range(2)]
    article = [
        ALICE.event(kind=30023, tags=[["d", "x"]], content=str(i), created_at=40 + i)
        for i in range(2)
    ]
    article.append(ALICE.event(kind=30023, tags=[["d", "y"]], created_at=10))
    expiring_new = ALICE.event(kind=0, tags=[["expiration", str(NOW - 5)]], created_at=30)
    return {
        "deletion before or after its target": [
            note,
            ALICE.event(kind=5, tags=[["e", note.id]]),
            BOB.event(kind=5, tags=[["e", note.id]]),  # not the author: no effect
        ],
        "replaceable, either order": [profile_old, profile_new, ALICE.event(kind=0, content="x")],
        "replaceable tie keeps the lowest id": tie,
        "addressable by d tag": article,
        "newest version deleted by id keeps older ones out": [
            profile_old,
            profile_new,
            ALICE.event(kind=5, tags=[["e", profile_new.id]], created_at=60),
        ],
        "address deletion": [
            profile_old,
            profile_new,
            ALICE.event(kind=5, tags=[["a", f"0:{profile_old.pubkey}:"]], created_at=15),
        ],
        "an expired deletion still deletes": [
            note,
            ALICE.event(kind=5, tags=[["e", note.id], ["expiration", str(NOW - 1)]]),
        ],
        "an expired newest version still replaces": [profile_old, expiring_new],
    }


@pytest.mark.parametrize("scenario", list(_scenarios()))
async def test_view_merge_does_not_depend_on_arrival_order(
    store_url: StoreUrl, scenario: str
) -> None:
    events = _scenarios()[scenario]
    expected = expected_ids(events)
    async with open_store(store_url) as store:
        for order in itertools.permutations(events):
            relay = await new_relay(store)
            for event in order:  # one transaction each, as blocks arriving one by one would
                await store.apply_view(relay.id, [event], [])
            assert await ids(store, relay) == expected, [e.content for e in order]


async def test_the_scenarios_do_depend_on_order_for_plain_ingest(store_url: StoreUrl) -> None:
    """Guards the test above: these scenarios exercise the view's rules, since plain ingest
    (which keeps its established behaviour at the edge) gives order-dependent answers."""
    events = _scenarios()["newest version deleted by id keeps older ones out"]
    async with open_store(store_url) as store:
        answers = set()
        for order in itertools.permutations(events):
            relay = await new_relay(store)
            for event in order:
                await store.ingest([IngestItem(relay.id, event)], now=NOW)
            answers.add(tuple(await ids(store, relay)))
        assert len(answers) > 1


async def test_purging_an_expired_newest_version_keeps_it_shadowing(store_url: StoreUrl) -> None:
    old = ALICE.event(kind=0, content="old", created_at=10)
    expiring = ALICE.event(kind=0, tags=[["expiration", str(NOW + 5)]], created_at=20)
    async with open_store(store_url) as store:
        backed, plain = await new_relay(store), await new_relay(store)
        await store.apply_view(backed.id, [expiring], [])
        await store.ingest([IngestItem(plain.id, expiring)], now=NOW)
        assert await store.purge_expired(now=NOW + 5) == 2
        [late] = await store.apply_view(backed.id, [old], [])
        assert (late.accepted, late.message) == (
            False,
            "duplicate: a newer version of this event is known",
        )
        assert await ids(store, backed, NOW + 5) == []
        # Plain ingest keeps its behaviour: an expired version does not shadow a live one.
        assert [r.accepted for r in await store.ingest([IngestItem(plain.id, old)], now=NOW)] == [
            True
        ]


def test_progress_rows_are_validated() -> None:
    with pytest.raises(ValueError, match="past its end"):
        ViewCore(WRITER, "worker", 3, end=2)
    with pytest.raises(ValueError, match="core key"):
        ViewCore("x", "worker", 0)
    with pytest.raises(ValueError, match="length"):
        ViewCore(WRITER, "worker", -1)
