"""RelayView on both backends: membership, incremental against rebuild, restart, retraction,
bad and corrupt blocks, missing and forked cores."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from hypertuna.protocol.nostr.model import Event
from hypertuna.storage.cores.log import CoreCorruptError
from hypertuna.storage.events import (
    EventStore,
    IngestItem,
    IngestResult,
    RelayRecord,
    StorageError,
    ViewCore,
)
from hypertuna.storage.relay_records import WriterRole
from hypertuna.storage.relay_view import OWNER_ROLE, RelayView, RelayViewError, Skip
from tests.storage.memory_log import MemoryLog
from tests.storage.storage_factory import NOW, StoreUrl, flt, open_store
from tests.storage.view_support import (
    ALICE,
    BOB,
    Cores,
    add_block,
    answers,
    event_block,
    forged,
    new_core_relay,
    remove_block,
)

FILTERS = [flt(), flt(kinds=[1]), flt(kinds=[0, 30023]), flt(limit=2)]


def view_of(store: EventStore, relay: RelayRecord, cores: Cores, **kwargs: int) -> RelayView:
    return RelayView(
        relay_id=relay.id, owner=cores.owner, writer_log=cores.lookup, store=store, **kwargs
    )


async def shown(store: EventStore, relay: RelayRecord) -> list[str]:
    """Contents of the events the relay shows, newest first."""
    result = await store.query(relay.id, [flt()], now=NOW, max_limit=1000)
    return [json.loads(e.raw)["content"] for e in result.events]


def notes(*contents: str, author: object = ALICE) -> list[Event]:
    signer = ALICE if author is ALICE else BOB
    return [signer.event(content=c, created_at=NOW - 100 + i) for i, c in enumerate(contents)]


def append_events(log: MemoryLog, events: Sequence[Event]) -> None:
    log.append([event_block(e) for e in events])


async def test_owner_and_admitted_writers_count_others_do_not(store_url: StoreUrl) -> None:
    cores = Cores("members", writers=3)
    w0, w1, w2 = cores.writers
    append_events(cores.owner, notes("o1"))
    append_events(w0, notes("w0a", "w0b"))  # written before its admission: counts once admitted
    append_events(w1, notes("w1a"))  # never admitted
    append_events(w2, notes("w2a"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        report = await view.sync()
        assert await shown(store, relay) == ["o1"]
        assert (report.blocks, report.stored) == (1, 1)

        cores.owner.append([add_block(w0), add_block(w2, WriterRole.GATEWAY)])
        report = await view.sync()
        assert sorted(await shown(store, relay)) == ["o1", "w0a", "w0b", "w2a"]
        assert (report.blocks, report.stored) == (2 + 2 + 1, 3)
        assert view.statistics().cores == (
            ViewCore(cores.relay_key, OWNER_ROLE, 3),
            *sorted(
                [ViewCore(w0.key.hex(), "worker", 2), ViewCore(w2.key.hex(), "gateway", 1)],
                key=lambda c: c.key,
            ),
        )
        assert await store.view_cores(relay.id) == sorted(
            view.statistics().cores, key=lambda c: c.key
        )


async def test_removal_caps_a_writer_for_good(store_url: StoreUrl) -> None:
    cores = Cores("removal", writers=2)
    w0, w1 = cores.writers
    cores.owner.append([add_block(w0), remove_block(w0, 2)])
    append_events(w0, notes("a", "b", "c"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        await view.sync()
        assert sorted(await shown(store, relay)) == ["a", "b"]
        # Re-admission, a second removal, removing an unknown key, and naming the owner change
        # nothing.
        cores.owner.append(
            [
                add_block(w0),
                remove_block(w0, 3),
                remove_block(w1, 0),
                add_block(cores.owner),
                remove_block(cores.owner, 0),
            ]
        )
        append_events(w0, notes("d"))
        append_events(cores.owner, notes("o"))
        report = await view.sync()
        assert sorted(await shown(store, relay)) == ["a", "b", "o"]
        assert report.skipped == ((Skip.IGNORED_MEMBERSHIP, 5),)
        assert (report.rebuilds, report.missing) == (0, ())
        [_, writer] = sorted(view.statistics().cores, key=lambda c: c.role)
        assert writer == ViewCore(w0.key.hex(), "worker", 2, end=2)


async def test_incremental_build_equals_rebuild(store_url: StoreUrl) -> None:
    cores = Cores("rebuild", writers=2)
    w0, w1 = cores.writers
    profile = [ALICE.event(kind=0, content=f"p{i}", created_at=100 + i) for i in range(3)]
    first = ALICE.event(content="first")
    steps: list[tuple[MemoryLog, list[bytes]]] = [
        (w1, [event_block(profile[2])]),  # newest first, before its writer is admitted
        (cores.owner, [add_block(w0), event_block(first)]),
        (w0, [event_block(profile[0]), event_block(first)]),  # a duplicate across cores
        (cores.owner, [add_block(w1)]),
        (w0, [event_block(ALICE.event(kind=5, tags=[["e", first.id]]))]),
        (w0, [event_block(profile[1])]),
    ]
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        for log, blocks in steps:
            log.append(blocks)
            await view.sync()
        times = [NOW, NOW + 10]
        incremental = await answers(store, relay, FILTERS, times)
        # The newest profile and the deletion (content ""); "first" is deleted.
        assert sorted(await shown(store, relay)) == ["", "p2"]
        report = await view.rebuild()
        assert report.rebuilds == 1
        assert await answers(store, relay, FILTERS, times) == incremental


@pytest.mark.parametrize("deletion_first", [False, True])
async def test_a_deletion_in_one_writer_core_removes_an_event_of_another(
    store_url: StoreUrl, deletion_first: bool
) -> None:
    cores = Cores(f"cross-{deletion_first}", writers=2)
    w0, w1 = cores.writers
    target = ALICE.event(content="target")
    kept = BOB.event(content="not alice's")
    deletion = ALICE.event(kind=5, tags=[["e", target.id], ["e", kept.id]], content="deletion")
    cores.owner.append([add_block(w0), add_block(w1)])
    arrivals = [(w0, [target, kept]), (w1, [deletion])]
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        for log, events in reversed(arrivals) if deletion_first else arrivals:
            append_events(log, events)
            await view.sync()
        assert sorted(await shown(store, relay)) == ["deletion", "not alice's"]


async def test_a_restarted_view_resumes_after_the_last_committed_batch(
    store_url: StoreUrl,
) -> None:
    cores = Cores("restart", writers=1)
    [w0] = cores.writers
    cores.owner.append([add_block(w0)])
    append_events(w0, notes("a", "b", "c"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        report = await view_of(store, relay, cores, batch_blocks=2).sync()
        assert report.blocks == 4
    append_events(w0, notes("d", "e"))
    append_events(cores.owner, notes("o"))
    async with open_store(store_url) as store:
        view = view_of(store, relay, cores)
        report = await view.sync()
        # Only the new blocks are read again; nothing is stored twice.
        assert (report.blocks, report.stored, report.refused) == (3, 3, 0)
        assert sorted(await shown(store, relay)) == ["a", "b", "c", "d", "e", "o"]


class FailingStore:
    """An event store whose ``apply_view`` fails once, after ``good`` successful calls."""

    def __init__(self, store: EventStore, good: int) -> None:
        self._store = store
        self._good = good

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def apply_view(
        self, relay_id: int, events: Sequence[Event], cores: Sequence[ViewCore]
    ) -> list[IngestResult]:
        if self._good == 0:
            self._good = -1
            raise StorageError("connection lost")
        self._good -= 1
        return await self._store.apply_view(relay_id, events, cores)


@pytest.mark.parametrize("good", [0, 1, 3])
async def test_a_failed_batch_is_retried_from_the_committed_progress(
    store_url: StoreUrl, good: int
) -> None:
    cores = Cores("failure", writers=1)
    [w0] = cores.writers
    profile = [ALICE.event(kind=0, content=f"p{i}", created_at=100 + i) for i in range(4)]
    cores.owner.append([add_block(w0), event_block(profile[3]), b"junk"])
    w0.append([b"junk", *(event_block(e) for e in [*profile[:3], *notes("a", "b")])])
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        flaky = FailingStore(store, good)
        view = view_of(flaky, relay, cores, batch_blocks=2)  # type: ignore[arg-type]
        with pytest.raises(StorageError):
            await view.sync()
        await view.sync()
        assert sorted(await shown(store, relay)) == ["a", "b", "p3"]
        rows = await store.view_cores(relay.id)
        assert {(r.role, r.length) for r in rows} == {(OWNER_ROLE, 3), ("worker", 6)}
        # Each block is counted once, whatever failed.
        assert view.statistics().blocks == 9
        assert view.statistics().skipped == ((Skip.MALFORMED, 2),)


async def test_a_removal_below_the_applied_length_rebuilds_the_view(store_url: StoreUrl) -> None:
    cores = Cores("retract", writers=2)
    w0, w1 = cores.writers
    shared = ALICE.event(content="shared")
    old, new = (ALICE.event(kind=0, content=c, created_at=t) for c, t in (("old", 1), ("new", 2)))
    cores.owner.append([add_block(w0), add_block(w1)])
    w0.append([event_block(e) for e in (old, *notes("kept"), new, shared, *notes("z"))])
    append_events(w1, [shared])
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        await view.sync()
        assert sorted(await shown(store, relay)) == ["kept", "new", "shared", "z"]
        cores.owner.append([remove_block(w0, 2)])
        report = await view.sync()
        assert report.rebuilds == 1
        # "new" had replaced "old": only a rebuild brings "old" back. "shared" stays, from w1.
        assert sorted(await shown(store, relay)) == ["kept", "old", "shared"]
        assert ViewCore(w0.key.hex(), "worker", 2, end=2) in view.statistics().cores
        # A removal at (or past) the applied length is the common case and rebuilds nothing.
        cores.owner.append([remove_block(w1, 5)])
        assert (await view.sync()).rebuilds == 0


async def test_bad_blocks_are_skipped_and_reported(store_url: StoreUrl) -> None:
    cores = Cores("bad", writers=1)
    [w0] = cores.writers
    cores.owner.append([b"not json", add_block(w0), forged(ALICE.event(content="forged"))])
    w0.append(
        [
            b'{"v":2,"type":"event"}',
            forged(ALICE.event(content="forged too")),
            event_block(ALICE.event(kind=20001, content="ephemeral")),
            add_block(cores.owner),  # membership belongs in the owner core only
            remove_block(w0, 0),
            event_block(ALICE.event(content="good")),
        ]
    )
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        report = await view.sync()
        assert await shown(store, relay) == ["good"]
        assert report.skipped == (
            (Skip.MALFORMED, 2),
            (Skip.BAD_SIGNATURE, 2),
            (Skip.EPHEMERAL, 1),
            (Skip.NOT_AN_EVENT, 2),
        )
        assert report.skipped_for(Skip.NOT_AN_EVENT) == 2
        assert (report.blocks, report.stored) == (9, 1)
        assert view.statistics().skipped == report.skipped
        # Skipped blocks count as applied: they are not read again.
        assert (await view.sync()).blocks == 0


class CorruptLog(MemoryLog):
    """A core whose block ``bad`` fails verification until it is repaired."""

    def __init__(self, name: str, bad: int) -> None:
        super().__init__(name)
        self.bad: int | None = bad

    def get(self, index: int) -> bytes:
        if index == self.bad:
            raise CoreCorruptError(f"block {index}")
        return super().get(index)


async def test_a_corrupt_block_stops_its_core_there(store_url: StoreUrl) -> None:
    cores = Cores("corrupt")
    corrupt = CorruptLog("corrupt-writer", bad=1)
    cores.writers.append(corrupt)
    cores.available.add(corrupt.key)
    cores.owner.append([add_block(corrupt)])
    append_events(corrupt, notes("a", "b", "c"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        report = await view.sync()
        assert report.stalled == (corrupt.key.hex(),)
        assert await shown(store, relay) == ["a"]
        corrupt.bad = None
        report = await view.sync()
        assert (report.stalled, report.blocks) == ((), 2)
        assert sorted(await shown(store, relay)) == ["a", "b", "c"]


async def test_a_missing_writer_core_counts_once_it_is_there(store_url: StoreUrl) -> None:
    cores = Cores("missing", writers=1)
    [w0] = cores.writers
    cores.available.clear()
    cores.owner.append([add_block(w0)])
    append_events(w0, notes("a"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        assert (await view.sync()).missing == (w0.key.hex(),)
        assert await shown(store, relay) == []
        cores.available.add(w0.key)
        report = await view.sync()
        assert (report.missing, report.stored) == ((), 1)


class ForkedLog(MemoryLog):
    def truncate(self, length: int) -> None:
        del self._blocks[length:]


async def test_a_core_shorter_than_what_was_applied_rebuilds_the_view(
    store_url: StoreUrl,
) -> None:
    cores = Cores("fork")
    forked = ForkedLog("fork-writer")
    cores.writers.append(forked)
    cores.available.add(forked.key)
    cores.owner.append([add_block(forked)])
    append_events(forked, notes("a", "b"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        view = view_of(store, relay, cores)
        await view.sync()
        forked.truncate(1)
        report = await view.sync()
        assert report.rebuilds == 1
        assert await shown(store, relay) == ["a"]


async def test_a_view_refuses_a_relay_built_from_another_owner(store_url: StoreUrl) -> None:
    cores, other = Cores("mine"), Cores("theirs")
    append_events(cores.owner, notes("a"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        await view_of(store, relay, cores).sync()
        with pytest.raises(RelayViewError, match="another owner core"):
            await view_of(store, relay, other).sync()
        # A rebuild is explicit: it replaces whatever the relay held.
        await view_of(store, relay, other).rebuild()
        assert await shown(store, relay) == []


async def test_a_new_view_replaces_what_plain_ingest_stored(store_url: StoreUrl) -> None:
    cores = Cores("takeover")
    append_events(cores.owner, notes("from the core"))
    async with open_store(store_url) as store:
        relay = await new_core_relay(store, cores)
        await store.ingest([IngestItem(relay.id, BOB.event(content="edge"))], now=NOW)
        report = await view_of(store, relay, cores).sync()
        assert report.rebuilds == 0
        assert await shown(store, relay) == ["from the core"]


def test_batch_limits_must_be_positive() -> None:
    cores = Cores("limits")
    with pytest.raises(ValueError, match="positive"):
        RelayView(relay_id=1, owner=cores.owner, writer_log=cores.lookup, store=None, batch_bytes=0)  # type: ignore[arg-type]
