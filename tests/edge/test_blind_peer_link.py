"""``mirror-request`` / ``mirror-update`` over a real worker connection, real cores, real
signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from hypertuna.edge.worker_link import MAX_MIRROR_REFUSALS
from hypertuna.protocol.worker import (
    ErrorCode,
    ErrorMessage,
    MirrorRequest,
    MirrorStatus,
    MirrorUpdate,
)
from hypertuna.storage.cores import Core, CoreIdentity, KeyPair
from hypertuna.system import System
from tests.edge.test_workers import metric, open_front, registered
from tests.edge.worker_support import Owner, open_worker
from tests.support import TIMEOUT


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[System]:
    async with open_front(tmp_path / "front") as system:
        yield system


def owner_core(owner: Owner, directory: Path) -> Core:
    core = Core.create(directory, KeyPair.from_seed(bytes(owner.key)))
    assert core.key.hex() == owner.relay_key
    return core


def update(core: Core, start: int, relay_key: str, core_type: str = "owner") -> MirrorUpdate:
    exported = core.export_update(start)
    assert core.manifest is not None
    return MirrorUpdate(
        core_key=core.key.hex(),
        manifest=core.manifest.encode(),
        start=exported.start,
        fork=exported.fork,
        blocks=exported.blocks,
        signature=exported.signature,
        meta={"relay_key": relay_key, "type": core_type, "length": core.length},
    )


async def test_mirror_update_accepted_then_refused_with_typed_errors(
    front: System, tmp_path: Path
) -> None:
    owner = Owner()
    core = owner_core(owner, tmp_path / "worker-core")
    core.append([b"one", b"two"])
    async with open_worker(front.base_url) as worker:
        await registered(front, worker, owner)
        await worker.send(MirrorRequest(core_key=owner.relay_key))
        assert await worker.reply() == MirrorStatus(owner.relay_key, 0, 0)
        await worker.send(update(core, 0, owner.relay_key))
        assert await worker.reply() == MirrorStatus(owner.relay_key, 2, 0)
        mirror = front.cores.mirror(CoreIdentity.from_key(core.key, manifest=core.manifest))
        assert [mirror.get(0), mirror.get(1)] == [b"one", b"two"]

        # Forged signature: refused, typed, nothing stored, connection continues.
        core.append([b"three"])
        good = update(core, 2, owner.relay_key)
        forged = bytearray(good.signature)
        forged[10] ^= 0xFF
        await worker.send(
            MirrorUpdate(
                good.core_key,
                good.manifest,
                good.start,
                good.fork,
                good.blocks,
                bytes(forged),
                good.meta,
            )
        )
        error = await worker.reply()
        assert isinstance(error, ErrorMessage)
        assert error.code is ErrorCode.VERIFICATION_FAILED
        assert error.message.startswith(f"mirror {owner.relay_key}:")
        assert mirror.length == 2

        # Wrong-typed metadata.
        bad_meta = MirrorUpdate(
            good.core_key,
            good.manifest,
            good.start,
            good.fork,
            good.blocks,
            good.signature,
            {"relay_key": owner.relay_key, "type": "owner", "length": True},
        )
        await worker.send(bad_meta)
        error = await worker.reply()
        assert isinstance(error, ErrorMessage) and error.code is ErrorCode.MALFORMED

        # A relay this worker did not register.
        stranger = Owner()
        stranger_core = owner_core(stranger, tmp_path / "stranger")
        stranger_core.append([b"x"])
        await worker.send(update(stranger_core, 0, stranger.relay_key))
        error = await worker.reply()
        assert isinstance(error, ErrorMessage) and error.code is ErrorCode.UNAUTHORIZED
        assert not front.cores.has(stranger_core.key)

        # The good update still goes through on the same connection.
        await worker.send(good)
        assert await worker.reply() == MirrorStatus(owner.relay_key, 3, 0)
        assert metric(front, "gateway_blind_peer_updates_total", result="accepted") == 2
        assert metric(front, "gateway_blind_peer_updates_total", result="unauthorized") == 1
        assert metric(front, "gateway_blind_peer_mirror_state", state="ready") == 1
        assert metric(front, "gateway_blind_peer_mirror_lag_ms") == 0


async def test_another_worker_of_the_gateway_cannot_mirror_the_relay(
    front: System, tmp_path: Path
) -> None:
    owner = Owner()
    core = owner_core(owner, tmp_path / "worker-core")
    core.append([b"one"])
    async with open_worker(front.base_url) as worker, open_worker(front.base_url) as other:
        await registered(front, worker, owner)
        await other.send(update(core, 0, owner.relay_key))
        error = await other.reply()
        assert isinstance(error, ErrorMessage) and error.code is ErrorCode.UNAUTHORIZED
        assert not front.cores.has(core.key)
        await worker.send(update(core, 0, owner.relay_key))
        assert await worker.reply() == MirrorStatus(owner.relay_key, 1, 0)


async def test_a_worker_that_keeps_sending_refused_updates_is_disconnected(
    front: System, tmp_path: Path
) -> None:
    stranger = Owner()
    core = owner_core(stranger, tmp_path / "stranger")
    core.append([b"x"])
    bad = update(core, 0, stranger.relay_key)
    async with open_worker(front.base_url) as worker:
        for _ in range(MAX_MIRROR_REFUSALS):
            await worker.send(bad)
            error = await worker.reply()
            assert isinstance(error, ErrorMessage) and error.code is ErrorCode.UNAUTHORIZED
        await worker.send(bad)
        with trio.fail_after(TIMEOUT):
            while worker.ws.closed is None:  # noqa: ASYNC110 - the worker's reader sees the close
                await trio.sleep(0.01)
        reason = worker.ws.closed
        assert (reason.code, reason.reason) == (1008, "too many refused mirror updates")
    assert not front.cores.has(core.key)
