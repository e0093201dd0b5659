"""BlindPeerStore with real cores on disk and real signatures."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import trio

from hypertuna.actors.blind_peer import (
    META_FILE,
    ApplyMirror,
    BlindPeerStore,
    ListMirrors,
    MirrorAccepted,
    MirrorInfo,
    MirrorLength,
    MirrorOutcome,
    MirrorRefused,
)
from hypertuna.actors.runtime import Reply
from hypertuna.protocol.worker import ErrorCode, MirrorUpdate
from hypertuna.storage.cores import Core, CoreUpdate, KeyPair
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.registrations import WorkerRelay

WORKER = "aa" * 32
OTHER_WORKER = "bb" * 32


class Writer:
    """A worker-side core and the relay it belongs to."""

    def __init__(self, directory: Path) -> None:
        self.core = Core.create(directory, KeyPair.from_seed(secrets.token_bytes(32)))
        self.key = self.core.key.hex()
        assert self.core.manifest is not None
        self.manifest = self.core.manifest.encode()

    def update(
        self, start: int, *, meta: Mapping[str, str | int | bool], manifest: bool = True
    ) -> MirrorUpdate:
        core_update = self.core.export_update(start)
        return from_core_update(self.key, core_update, meta, self.manifest if manifest else None)


def from_core_update(
    key: str, update: CoreUpdate, meta: Mapping[str, str | int | bool], manifest: bytes | None
) -> MirrorUpdate:
    return MirrorUpdate(
        core_key=key,
        manifest=manifest,
        start=update.start,
        fork=update.fork,
        blocks=update.blocks,
        signature=update.signature,
        meta=dict(meta),
    )


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.owner = Writer(root / "worker" / "owner")
        self.writer = Writer(root / "worker" / "writer")
        self.relays = [
            WorkerRelay(
                relay_key=self.owner.key,
                owner_key="cc" * 32,
                name="chat",
                description="",
                workers=frozenset({WORKER}),
            )
        ]
        self.grown: list[tuple[bytes, int]] = []
        self.now = 1_700_000_000

    def owner_meta(self, **extra: str | int | bool) -> dict[str, str | int | bool]:
        meta: dict[str, str | int | bool] = {
            "relay_key": self.owner.key,
            "type": "owner",
            "length": self.owner.core.length,
        }
        meta.update(extra)
        return meta

    async def list_relays(self) -> list[WorkerRelay]:
        return self.relays


@contextlib.asynccontextmanager
async def open_store(
    harness: Harness, **limits: int | float
) -> AsyncIterator[tuple[BlindPeerStore, CoreStore]]:
    cores = CoreStore.open(harness.root / "gateway")
    store = BlindPeerStore(
        cores,
        harness.list_relays,
        wall_clock=lambda: harness.now,
        max_bytes=int(limits.pop("max_bytes", 10**9)),
        on_grow=lambda key, length, _relay: harness.grown.append((key, length)),
        **limits,  # type: ignore[arg-type]
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store, cores
            store.inbox.close()
    finally:
        cores.close()


async def apply(store: BlindPeerStore, update: MirrorUpdate, worker: str = WORKER) -> MirrorOutcome:
    return await store.inbox.request(lambda r: ApplyMirror(worker, update, r))


async def mirrors(store: BlindPeerStore) -> tuple[MirrorInfo, ...]:
    def build(reply: Reply[tuple[MirrorInfo, ...]]) -> ListMirrors:
        return ListMirrors(reply)

    return await store.inbox.request(build)


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_accepts_verified_blocks_and_calls_on_grow(harness: Harness) -> None:
    harness.owner.core.append([b"one", b"two"])
    async with open_store(harness) as (store, cores):
        outcome = await apply(store, harness.owner.update(0, meta=harness.owner_meta()))
        assert outcome == MirrorAccepted(harness.owner.key, 2, 0)
        harness.owner.core.append([b"three"])
        outcome = await apply(
            store, harness.owner.update(2, meta=harness.owner_meta(), manifest=False)
        )
        assert outcome == MirrorAccepted(harness.owner.key, 3, 0)
        mirror = cores.mirror(harness.owner.core.identity)
        assert [mirror.get(i) for i in range(3)] == [b"one", b"two", b"three"]
        key = bytes.fromhex(harness.owner.key)
        assert harness.grown == [(key, 2), (key, 3)]
        (info,) = await mirrors(store)
        assert (info.core_type, info.owner_key, info.length, info.state) == (
            "owner",
            "cc" * 32,
            3,
            "ready",
        )
        stats = store.statistics()
        assert stats.accepted == 2
        assert dict(stats.states) == {"ready": 1, "syncing": 0, "stale": 0}
        length = await store.inbox.request(lambda r: MirrorLength(harness.owner.key, r))
        assert length == (3, 0)


async def test_writer_core_of_a_registered_relay_is_accepted(harness: Harness) -> None:
    harness.writer.core.append([b"w"])
    meta = {"relay_key": harness.owner.key, "type": "writer", "priority": 2, "announce": False}
    async with open_store(harness) as (store, _):
        outcome = await apply(store, harness.writer.update(0, meta=meta))
        assert isinstance(outcome, MirrorAccepted)
        (info,) = await mirrors(store)
        assert (info.core_type, info.priority, info.announce) == ("writer", 2, False)


async def assert_refused(
    store: BlindPeerStore,
    cores: CoreStore,
    update: MirrorUpdate,
    code: ErrorCode,
    worker: str = WORKER,
) -> None:
    before = cores.has(bytes.fromhex(update.core_key))
    held_before = await mirrors(store)
    outcome = await apply(store, update, worker)
    assert isinstance(outcome, MirrorRefused), outcome
    assert outcome.code is code, outcome
    assert outcome.message.startswith(f"mirror {update.core_key}:")
    assert cores.has(bytes.fromhex(update.core_key)) == before
    assert await mirrors(store) == held_before


async def test_bad_input_is_refused_and_nothing_stored(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a", b"b"])
    good = owner.update(0, meta=harness.owner_meta())
    async with open_store(harness, max_block_bytes=100) as (store, cores):
        # A forged signature.
        forged = bytearray(good.signature)
        forged[-5] ^= 1
        await assert_refused(
            store,
            cores,
            from_core_update(
                owner.key,
                CoreUpdate(0, good.blocks, 0, bytes(forged)),
                good.meta,
                good.manifest,
            ),
            ErrorCode.VERIFICATION_FAILED,
        )
        # Blocks that do not match the signature.
        await assert_refused(
            store,
            cores,
            from_core_update(
                owner.key, CoreUpdate(0, (b"a", b"X"), 0, good.signature), good.meta, good.manifest
            ),
            ErrorCode.VERIFICATION_FAILED,
        )
        # Another core's manifest.
        await assert_refused(
            store,
            cores,
            from_core_update(
                owner.key,
                CoreUpdate(0, good.blocks, 0, good.signature),
                good.meta,
                harness.writer.manifest,
            ),
            ErrorCode.VERIFICATION_FAILED,
        )
        # Wrong-typed metadata.
        for meta in (
            {"relay_key": owner.key, "type": "owner", "length": "2"},
            {"relay_key": owner.key, "type": "owner", "announce": 1},
            {"relay_key": owner.key, "type": "sideways"},
            {"relay_key": 7, "type": "owner"},
        ):
            await assert_refused(
                store,
                cores,
                owner.update(0, meta=meta),  # type: ignore[arg-type]
                ErrorCode.MALFORMED,
            )
        # A relay the sender did not register, and a core posing as the owner core.
        await assert_refused(store, cores, good, ErrorCode.UNAUTHORIZED, worker=OTHER_WORKER)
        harness.writer.core.append([b"x"])
        posing = harness.writer.update(0, meta={"relay_key": owner.key, "type": "owner"})
        await assert_refused(store, cores, posing, ErrorCode.UNAUTHORIZED)
        # An oversized block.
        owner.core.append([b"z" * 101])
        await assert_refused(
            store, cores, owner.update(0, meta=harness.owner_meta()), ErrorCode.TOO_LARGE
        )
        assert dict(store.statistics().refused) == {
            "malformed": 4,
            "too-large": 1,
            "unauthorized": 2,
            "verification-failed": 3,
        }
        # The connection's next good update still goes through.
        owner.core.truncate(2)
        assert isinstance(
            await apply(store, owner.update(0, meta=harness.owner_meta())), MirrorAccepted
        )
    assert harness.grown == [(bytes.fromhex(owner.key), 2)]


async def test_fork_without_signed_truncation_is_refused(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a", b"b", b"c"])
    async with open_store(harness) as (store, cores):
        assert isinstance(
            await apply(store, owner.update(0, meta=harness.owner_meta())), MirrorAccepted
        )
        # A writer that rewrites block 2 on the same fork: signed, but not a signed truncation.
        other = Core.create(harness.root / "rewrite", owner.core._signer())
        other.append([b"a", b"b", b"C"])
        rewrite = other.export_update(2)
        await assert_refused(
            store,
            cores,
            from_core_update(owner.key, rewrite, harness.owner_meta(), None),
            ErrorCode.VERIFICATION_FAILED,
        )
        # A real truncation (new fork, signed) is accepted.
        owner.core.truncate(2)
        owner.core.append([b"C"])
        outcome = await apply(store, owner.update(2, meta=harness.owner_meta(), manifest=False))
        assert outcome == MirrorAccepted(owner.key, 3, 1)
        assert cores.mirror(owner.core.identity).get(2) == b"C"


async def test_quotas_refuse_cleanly(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"x" * 60])
    async with open_store(harness, max_bytes=100) as (store, cores):
        assert isinstance(
            await apply(store, owner.update(0, meta=harness.owner_meta())), MirrorAccepted
        )
        owner.core.append([b"y" * 60])
        await assert_refused(
            store,
            cores,
            owner.update(1, meta=harness.owner_meta(), manifest=False),
            ErrorCode.QUOTA_EXCEEDED,
        )
        assert cores.mirror(owner.core.identity).length == 1
    harness.root.joinpath("gateway").rename(harness.root / "old")
    async with open_store(harness, max_bytes_per_owner=150) as (store, cores):
        assert isinstance(
            await apply(store, owner.update(0, meta=harness.owner_meta())), MirrorAccepted
        )
        harness.writer.core.append([b"w" * 50])
        meta = {"relay_key": owner.key, "type": "writer"}
        await assert_refused(
            store, cores, harness.writer.update(0, meta=meta), ErrorCode.QUOTA_EXCEEDED
        )


async def test_metadata_survives_reopen(harness: Harness) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    async with open_store(harness) as (store, _):
        await apply(store, owner.update(0, meta=harness.owner_meta(relay_id="chat", priority=3)))
        (before,) = await mirrors(store)
    harness.now += 100
    harness.grown.clear()
    async with open_store(harness) as (store, cores):
        # Every mirror is announced at start, so that replica views catch up after a restart.
        assert harness.grown == [(bytes.fromhex(owner.key), 1)]
        (after,) = await mirrors(store)
        assert after == before
        assert (after.relay_id, after.priority, after.last_activity) == ("chat", 3, 1_700_000_000)
        meta_file = cores.directory_for(bytes.fromhex(owner.key)) / META_FILE
        assert json.loads(meta_file.read_text())["relay_key"] == owner.key
        # The mirror continues where it was, without the manifest again.
        owner.core.append([b"b"])
        outcome = await apply(store, owner.update(1, meta=harness.owner_meta(), manifest=False))
        assert outcome == MirrorAccepted(owner.key, 2, 0)
        (info,) = await mirrors(store)
        assert info.last_activity == 1_700_000_100


async def test_lag_counts_while_behind_the_announced_length(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    owner = harness.owner
    owner.core.append([b"a"])
    async with open_store(harness, stale_after_s=10.0) as (store, _):
        await apply(store, owner.update(0, meta=harness.owner_meta(length=5)))
        (info,) = await mirrors(store)
        assert (info.state, info.lag_ms) == ("syncing", 0)
        await trio.sleep(3)
        assert store.statistics().max_lag_ms == 3000
        await trio.sleep(8)
        (info,) = await mirrors(store)
        assert (info.state, info.lag_ms) == ("stale", 11000)
        owner.core.append([b"b"])
        await apply(store, owner.update(1, meta=harness.owner_meta(), manifest=False))
        (info,) = await mirrors(store)
        assert (info.state, info.lag_ms) == ("ready", 0)
