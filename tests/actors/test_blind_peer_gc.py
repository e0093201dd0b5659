"""BlindPeerStore garbage collection: idle mirrors past the TTL go, held relays' mirrors stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from hypertuna.actors.blind_peer import (
    META_FILE,
    CollectGarbage,
    Hold,
    MirrorAccepted,
    MirrorLength,
    MirrorRefused,
    Release,
    RemovedMirror,
)
from hypertuna.actors.runtime import Reply
from hypertuna.protocol.worker import ErrorCode
from hypertuna.storage.corestore import CoreStore, CoreStoreError
from tests.actors.test_blind_peer import Harness, apply, mirrors, open_store

TTL = 1000.0


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def collect(store: object) -> tuple[RemovedMirror, ...]:
    def build(reply: Reply[tuple[RemovedMirror, ...]]) -> CollectGarbage:
        return CollectGarbage(reply)

    return await store.inbox.request(build)  # type: ignore[attr-defined, no-any-return]


async def test_idle_mirror_removed_after_ttl_on_demand(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"one", b"two"])
    async with open_store(harness, mirror_ttl_s=TTL) as (store, cores):
        assert isinstance(
            await apply(store, owner.update(0, meta=harness.owner_meta())), MirrorAccepted
        )
        key = bytes.fromhex(owner.key)
        directory = cores.directory_for(key)
        assert (directory / META_FILE).exists()
        harness.now += int(TTL)
        assert await collect(store) == ()  # exactly the TTL: not yet
        harness.now += 1
        (removed,) = await collect(store)
        assert removed == RemovedMirror(owner.key, owner.key, "owner", 6, 1_700_000_000)
        assert await mirrors(store) == ()
        assert not directory.exists() and not cores.has(key)
        assert not [p for p in cores.root.iterdir() if p.name.startswith(".removed-")]
        assert await store.inbox.request(lambda r: MirrorLength(owner.key, r)) == (0, 0)
        assert store.statistics().collected == 1 and store.statistics().bytes == 0
        assert await collect(store) == ()
    # Metadata gone for good: nothing comes back after a restart.
    async with open_store(harness) as (store, _):
        assert await mirrors(store) == ()


async def test_held_relay_is_kept_until_released(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    async with open_store(harness, mirror_ttl_s=TTL) as (store, cores):
        await apply(store, owner.update(0, meta=harness.owner_meta()))
        await store.inbox.send(Hold(owner.key, "lease"))
        await store.inbox.send(Hold(owner.key, "pending-writes"))
        harness.now += 10 * int(TTL)
        assert await collect(store) == ()
        await store.inbox.send(Release(owner.key, "lease"))
        await store.inbox.send(Release(owner.key, "unknown"))
        assert await collect(store) == ()
        assert store.held(owner.key)
        await store.inbox.send(Release(owner.key, "pending-writes"))
        assert [m.core_key for m in await collect(store)] == [owner.key]
        assert not cores.has(bytes.fromhex(owner.key))


async def test_is_held_predicate_keeps_mirrors(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    open_relays = {owner.key}
    async with open_store(harness, mirror_ttl_s=TTL, is_held=open_relays.__contains__) as (
        store,
        cores,
    ):
        await apply(store, owner.update(0, meta=harness.owner_meta()))
        harness.now += 2 * int(TTL)
        assert await collect(store) == ()
        assert cores.has(bytes.fromhex(owner.key))
        open_relays.clear()
        assert len(await collect(store)) == 1


async def test_fresh_activity_keeps_a_mirror(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    async with open_store(harness, mirror_ttl_s=TTL) as (store, _):
        await apply(store, owner.update(0, meta=harness.owner_meta()))
        harness.now += int(TTL) - 10
        owner.core.append([b"b"])
        await apply(store, owner.update(1, meta=harness.owner_meta(), manifest=False))
        harness.now += 20
        assert await collect(store) == ()
        assert len(await mirrors(store)) == 1


async def test_collection_frees_quota(harness: Harness) -> None:
    owner, writer = harness.owner, harness.writer
    owner.core.append([b"x" * 60])
    writer.core.append([b"w" * 50])
    writer_meta = {"relay_key": owner.key, "type": "writer"}
    async with open_store(harness, max_bytes=100, mirror_ttl_s=TTL) as (store, _):
        accepted = await apply(store, owner.update(0, meta=harness.owner_meta()))
        assert isinstance(accepted, MirrorAccepted)
        refused = await apply(store, writer.update(0, meta=writer_meta))
        assert isinstance(refused, MirrorRefused) and refused.code is ErrorCode.QUOTA_EXCEEDED
        harness.now += 2 * int(TTL)
        assert [m.bytes for m in await collect(store)] == [60]
        assert store.statistics().bytes == 0
        assert await apply(store, writer.update(0, meta=writer_meta)) == MirrorAccepted(
            writer.key, 1, 0
        )
        assert store.statistics().bytes == 50


async def test_periodic_collection(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    async with open_store(harness, mirror_ttl_s=TTL, gc_interval_s=0.05) as (store, _):
        await apply(store, owner.update(0, meta=harness.owner_meta()))
        await trio.sleep(0.2)
        assert len(await mirrors(store)) == 1
        harness.now += 2 * int(TTL)
        for _ in range(100):
            if not await mirrors(store):
                break
            await trio.sleep(0.05)
        assert await mirrors(store) == ()
        assert store.statistics().collected == 1


def test_corestore_remove_closes_and_takes_out(tmp_path: Path, harness: Harness) -> None:
    with CoreStore.open(tmp_path / "store") as cores:
        harness.owner.core.append([b"a"])
        mirror = cores.mirror(harness.owner.core.identity)
        mirror.apply(harness.owner.core.export_update(0))
        key = harness.owner.core.key
        trash = cores.remove(key)
        assert trash.exists() and not cores.has(key)
        assert cores.open_mirror(key) is None
        with pytest.raises(CoreStoreError):
            cores.remove(key)
