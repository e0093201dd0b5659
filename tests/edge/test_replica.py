"""Replica fallback: worker relays served from their mirrors, over real sockets.

The test plays the worker's mirroring side: it writes the relay's owner core (with the owner's
key, so its key is the relay key) and copies it into the front gateway's core store, then tells
the replica manager the mirror grew, as the blind-peer store does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from hypertuna.actors.blind_peer import RemovedMirror
from hypertuna.actors.replica import READ_ONLY_NOTICE, ReplicaManager, ReplicaSession
from hypertuna.edge.metrics import GatewayMetrics
from hypertuna.protocol.nostr.model import Event
from hypertuna.storage.cores import Core, CoreIdentity, KeyPair
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import open_event_store
from hypertuna.storage.relay_records import EventRecord, encode_record
from hypertuna.system import System
from tests.edge.test_workers import backend, front, metric, registered, wait_metric
from tests.edge.worker_support import Owner, open_worker
from tests.support import TIMEOUT, Gateway, Signer, connect, event_json

__all__ = ["backend", "front"]

FILTERS: list[dict[str, Any]] = [
    {"kinds": [1]},
    {"kinds": [1], "limit": 2},
    {"kinds": [7]},
    {"#t": ["x"]},
    {"since": 1_700_000_002},
]


class OwnerCore:
    """The owner core of ``owner``'s relay, written here and mirrored into ``cores``."""

    def __init__(self, owner: Owner, directory: Path, cores: CoreStore) -> None:
        key_pair = KeyPair.from_seed(bytes(owner.key))
        self.core = Core.open_or_create(directory, key_pair)
        assert self.core.key.hex() == owner.relay_key
        self.mirror = cores.mirror(CoreIdentity.for_key_pair(key_pair))

    def append(self, *events: Event) -> int:
        start = self.core.length
        self.core.append([encode_record(EventRecord(e)) for e in events])
        return self.mirror.apply(self.core.export_update(start))

    def close(self) -> None:
        self.core.close()


@contextlib.contextmanager
def owner_core(owner: Owner, directory: Path, cores: CoreStore) -> Iterator[OwnerCore]:
    written = OwnerCore(owner, directory, cores)
    try:
        yield written
    finally:
        written.close()


def sample_events(author: Signer) -> list[Event]:
    return [
        author.event(content=f"e{i}", created_at=1_700_000_000 + i, tags=[["t", "x"]] if i else [])
        for i in range(4)
    ] + [author.event(kind=7, content="+", created_at=1_700_000_010)]


async def test_relay_without_worker_is_served_from_its_mirror(
    front: System, backend: Gateway, tmp_path: Path
) -> None:
    alice, author = Owner(), Signer()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    key = nacl.signing.SigningKey.generate()
    events = sample_events(author)
    with owner_core(alice, tmp_path / "owner", front.cores) as written:
        async with open_worker(front.base_url, backend.url, key=key) as worker:
            await registered(front, worker, alice)
            async with connect(url) as client:
                for event in events:
                    assert await client.publish(event) == (True, "")
                expected = [await client.fetch(f"q{i}", f) for i, f in enumerate(FILTERS)]
                expected_count = await client.count("c", {"kinds": [1]})
        length = written.append(*events)
        front.replicas.notify_grow(bytes.fromhex(alice.relay_key), length, alice.relay_key)
        misses = metric(front, "gateway_replica_fallback_total", mode="sweep-miss")
        async with connect(url) as client:
            answers = [await client.fetch(f"q{i}", f) for i, f in enumerate(FILTERS)]
            assert answers == expected
            assert await client.count("c", {"kinds": [1]}) == expected_count
            assert metric(front, "gateway_relay_replica_sessions") == 1
            await client.send("EVENT", event_json(author.event(content="offline")))
            notice = await client.recv()
            assert notice == ["NOTICE", READ_ONLY_NOTICE]
            ok = await client.recv()
            assert ok[0] == "OK" and ok[2] is False and ok[3].startswith("blocked: ")
        assert metric(front, "gateway_replica_fallback_total", mode="sweep-miss") == misses + 1
        reads = metric(
            front, "gateway_relay_fallback_reads_total", relay=alice.relay_key[:16], mode="replica"
        )
        assert reads == len(FILTERS) + 1
        await wait_metric(front, "gateway_relay_replica_sessions", lambda v: v == 0)
        await wait_metric(front, "gateway_relay_fallback_duration_seconds_count", lambda v: v >= 1)
        # The hosted relays' store never sees a replica.
        assert await front.store.get_relay(alice.relay_key) is None


async def test_subscription_survives_worker_death_and_goes_back(
    front: System, backend: Gateway, tmp_path: Path
) -> None:
    alice, author = Owner(), Signer()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    key = nacl.signing.SigningKey.generate()
    events = sample_events(author)[:3]
    with owner_core(alice, tmp_path / "owner", front.cores) as written:
        async with open_worker(front.base_url, backend.url, key=key) as worker:
            await registered(front, worker, alice)
            async with connect(url) as client:
                for event in events:
                    assert await client.publish(event) == (True, "")
                written.append(*events)
                got = await client.query("s", {"kinds": [1]})
                assert {e["id"] for e in got} == {e.id for e in events}
                lost = metric(front, "gateway_replica_fallback_total", mode="worker-lost")
                await worker.ws.aclose()
                # The worker is gone: the session moves to the replica, which re-runs "s";
                # the stored events and EOSE are not sent again.
                await wait_metric(front, "gateway_relay_replica_sessions", lambda v: v == 1)
                await client.recv_nothing(0.3)
                fallbacks = metric(front, "gateway_replica_fallback_total", mode="worker-lost")
                assert fallbacks == lost + 1
                # Blocks mirrored afterwards (the worker appended before it left) arrive live.
                late = author.event(content="late", created_at=1_700_000_100)
                length = written.append(late)
                front.replicas.notify_grow(bytes.fromhex(alice.relay_key), length, alice.relay_key)
                reply = await client.recv()
                assert reply[:2] == ["EVENT", "s"] and reply[2]["id"] == late.id
                await client.recv_nothing(0.3)
                spans = metric(front, "gateway_relay_fallback_duration_seconds_count")
                # The worker comes back: a new subscription goes to it.
                async with open_worker(front.base_url, backend.url, key=key) as back:
                    # Answered by the replica right away; the sweep it starts finds the worker.
                    on_replica = await client.query("t", {"kinds": [1]})
                    assert late.id in {e["id"] for e in on_replica}
                    with trio.fail_after(TIMEOUT):
                        while back.opened == 0:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    await wait_metric(front, "gateway_relay_replica_sessions", lambda v: v == 0)
                    # The worker's backend never got "late": it was written to the core only.
                    from_worker = await client.query("u", {"kinds": [1]})
                    assert {e["id"] for e in from_worker} == {e.id for e in events}
                    assert metric(front, "gateway_relay_fallback_duration_seconds_count") > spans


@contextlib.asynccontextmanager
async def open_manager(
    tmp_path: Path, max_open: int, store_path: Path | None = None
) -> AsyncIterator[tuple[ReplicaManager, CoreStore]]:
    metrics = GatewayMetrics()
    with CoreStore.open(tmp_path / "cores") as cores:
        async with open_event_store(None, store_path or tmp_path / "replicas") as store:
            manager = ReplicaManager(
                store, cores, metrics, wall_clock=lambda: 1_700_000_500, max_open=max_open
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                yield manager, cores
                manager.inbox.close()


async def _wait_idle_syncs(manager: ReplicaManager, count: int) -> None:
    with trio.fail_after(TIMEOUT):
        while (  # noqa: ASYNC110
            manager.statistics().background_syncs < count or manager.statistics().dirty_views
        ):
            await trio.sleep(0.01)


async def test_views_are_kept_up_to_date_without_readers(tmp_path: Path) -> None:
    """Mirrors that grow while nobody reads the relay are applied in the background, so a
    failover only opens a view that is already built."""
    alice, author = Owner(), Signer()
    events = [author.event(content=f"e{i}", created_at=1_700_000_000 + i) for i in range(30)]
    async with open_manager(tmp_path, max_open=4) as (manager, cores):
        with owner_core(alice, tmp_path / "alice", cores) as a:
            for chunk in (events[:10], events[10:20], events[20:]):
                length = a.append(*chunk)
                manager.notify_grow(bytes.fromhex(alice.relay_key), length, alice.relay_key)
            await _wait_idle_syncs(manager, 1)
            assert manager.snapshot() == ()  # nothing was opened for it
            store = manager._store
            relay = await store.get_relay(alice.relay_key)
            assert relay is not None
            rows = await store.view_cores(relay.id)
            assert [(r.key, r.length) for r in rows] == [(alice.relay_key, 30)]
            syncs = manager.statistics().background_syncs
            # Opening the replica now applies nothing more: the view was ready.
            session = await manager.open(alice.relay_key)
            assert session is not None
            frames = await _req(session, "s")
            assert len(frames) == 31
            assert manager.statistics().background_syncs == syncs
            (state,) = manager.snapshot()
            assert state.relay_key == alice.relay_key and state.sessions == 1
            assert state.opened_at == 1_700_000_500
            # A grow of an open replica goes to its subscribers, not to the background.
            late = author.event(content="late", created_at=1_700_000_100)
            manager.notify_grow(bytes.fromhex(alice.relay_key), a.append(late), alice.relay_key)
            with trio.fail_after(TIMEOUT):
                live = await session.receive()
            assert len(live) == 1 and late.id in live[0]
            assert manager.statistics().background_syncs == syncs


async def _req(session: ReplicaSession, sub_id: str) -> list[str]:
    await session.send([f'["REQ","{sub_id}",{{"kinds":[1]}}]'])
    frames: list[str] = []
    with trio.fail_after(TIMEOUT):
        while not frames or not frames[-1].startswith('["EOSE"'):
            frames += await session.receive()
    return frames


async def test_isolation_and_lru_eviction(tmp_path: Path) -> None:
    alice, bob, author = Owner(), Owner(), Signer()
    async with open_manager(tmp_path, max_open=1) as (manager, cores):
        with (
            owner_core(alice, tmp_path / "alice", cores) as a,
            owner_core(bob, tmp_path / "bob", cores) as b,
        ):
            a_event, b_event = author.event(content="a"), author.event(content="b")
            a.append(a_event)
            b.append(b_event)
            assert await manager.open("00" * 32) is None  # no mirror, no replica
            on_a = await manager.open(alice.relay_key)
            assert on_a is not None
            frames = await _req(on_a, "s")
            assert len(frames) == 2 and a_event.id in frames[0]
            # Opening Bob's replica evicts Alice's (max_open=1): her session ends cleanly.
            on_b = await manager.open(bob.relay_key)
            assert on_b is not None
            with trio.fail_after(TIMEOUT):
                while on_a.open:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            with pytest.raises(trio.EndOfChannel):
                on_a.receive_nowait()
            assert on_a.end_reason == "replica evicted"
            assert manager.statistics().evictions == 1
            frames = await _req(on_b, "s")
            assert len(frames) == 2 and b_event.id in frames[0] and a_event.id not in frames[0]
            # Growth of Alice's mirror never reaches Bob's subscription.
            length = a.append(author.event(content="a2"))
            manager.notify_grow(bytes.fromhex(alice.relay_key), length, alice.relay_key)
            b2 = author.event(content="b2")
            length = b.append(b2)
            manager.notify_grow(bytes.fromhex(bob.relay_key), length, bob.relay_key)
            with trio.fail_after(TIMEOUT):
                live = await on_b.receive()
            assert len(live) == 1 and b2.id in live[0]
            assert manager.statistics().sessions == 1


async def test_removed_mirrors_drop_their_view(tmp_path: Path) -> None:
    """A removed mirror takes its events out of the replica view: what the relay still has
    mirrored is applied again, and a relay without its owner mirror keeps nothing."""
    alice, author = Owner(), Signer()
    events = [author.event(content=f"e{i}", created_at=1_700_000_000 + i) for i in range(5)]
    async with open_manager(tmp_path, max_open=4) as (manager, cores):
        with owner_core(alice, tmp_path / "alice", cores) as a:
            key = bytes.fromhex(alice.relay_key)
            manager.notify_grow(key, a.append(*events), alice.relay_key)
            await _wait_idle_syncs(manager, 1)
            store = manager._store
            relay = await store.get_relay(alice.relay_key)
            assert relay is not None and await store.event_count(relay.id) == 5
            # Another of the relay's mirrors went (say a writer's): rebuilt from the owner core.
            manager.notify_removed(RemovedMirror("ab" * 32, alice.relay_key, "writer", 10, 0))
            await _wait_idle_syncs(manager, 2)
            assert await store.event_count(relay.id) == 5
            # The owner mirror itself went: nothing of the relay stays in the replica store.
            cores.remove(key)
            manager.notify_removed(RemovedMirror(alice.relay_key, alice.relay_key, "owner", 10, 0))
            with trio.fail_after(TIMEOUT):
                while await store.event_count(relay.id):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert await store.view_cores(relay.id) == []
            assert await manager.open(alice.relay_key) is None
