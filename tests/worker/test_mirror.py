"""The reference worker mirrors its relays' cores into a real gateway's blind-peer store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from hypertuna.actors.blind_peer import MirrorInfo
from hypertuna.protocol.worker import ErrorCode, ErrorMessage, Message
from hypertuna.storage.cores import Mirror
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.drives import drive_core_names
from hypertuna.storage.hosted import open_drive, owner_core_name
from hypertuna.system import System
from hypertuna.worker.mirror import MirrorFeed, _batch
from tests.edge.test_workers import open_front
from tests.support import TIMEOUT, Signer, connect
from tests.worker.support import RunningWorker, fast_settings, open_worker


async def wait_for(condition: Callable[[], bool]) -> None:
    with trio.fail_after(TIMEOUT):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.02)


def held(front: System) -> dict[str, MirrorInfo]:
    return {info.core_key: info for info in front.blind_peer.mirrors()}


async def publish(worker: RunningWorker, signer: Signer, contents: list[str]) -> None:
    async with connect(worker.system.relay_url(worker.relay)) as client:
        for content in contents:
            ok, message = await client.publish(signer.event(content=content))
            assert ok, message


async def test_worker_mirrors_its_relay_and_resumes_without_resending(tmp_path: Path) -> None:
    signer = Signer()
    async with open_front(tmp_path / "front") as front:
        settings = fast_settings(front.base_url, mirror_poll_s=0.05)
        async with open_worker(tmp_path / "worker", settings) as worker:
            relay = worker.relay
            cores = worker.system.cores
            owner = cores.writable(owner_core_name(relay.name))
            drive_names = drive_core_names(relay.key)
            expected = {
                owner.key.hex(): "owner",
                cores.key_for(drive_names.entries).hex(): "drive-entries",
                cores.key_for(drive_names.blobs).hex(): "drive-blobs",
            }
            await publish(worker, signer, ["one", "two", "three"])
            await wait_for(
                lambda: (
                    held(front).get(owner.key.hex()) is not None
                    and held(front)[owner.key.hex()].length == owner.length
                )
            )
            assert owner.length >= 3
            # The drive cores are followed too; empty (unsigned) cores have nothing to mirror.
            mirrors = held(front)
            assert set(mirrors) == {owner.key.hex()}
            info = mirrors[owner.key.hex()]
            assert info.core_type == "owner"
            assert (info.relay_key, info.relay_id, info.state) == (relay.key, relay.name, "ready")
            mirror = front.cores.mirror(owner.identity)
            assert [mirror.get(i) for i in range(owner.length)] == [
                owner.get(i) for i in range(owner.length)
            ]
            # Streaming: a new event shows up as a new mirrored block.
            before = owner.length
            await publish(worker, signer, ["four"])
            await wait_for(lambda: held(front)[owner.key.hex()].length == before + 1)
            statuses = worker.control.statistics().mirrors
            assert {s.core_key: s.core_type for s in statuses} == expected
            assert {s.core_key: s.gateway_length for s in statuses} == {
                owner.key.hex(): owner.length,
                cores.key_for(drive_names.entries).hex(): 0,
                cores.key_for(drive_names.blobs).hex(): 0,
            }
            # A drive file: its entry and blob cores are mirrored as they grow.
            drive = await trio.to_thread.run_sync(open_drive, cores, relay.key)
            await trio.to_thread.run_sync(drive.put, "/avatar.png", b"\x89PNG" * 100)
            entries_key = cores.key_for(drive_names.entries).hex()
            blobs_key = cores.key_for(drive_names.blobs).hex()
            await wait_for(lambda: {entries_key, blobs_key} <= set(held(front)))
            mirrors = held(front)
            assert (mirrors[entries_key].core_type, mirrors[blobs_key].core_type) == (
                "drive-entries",
                "drive-blobs",
            )
            await worker.shutdown()
            received = front.blind_peer.statistics().blocks
            length_at_disconnect = owner.length

        # The worker comes back with more events: only the new blocks travel.
        async with open_worker(tmp_path / "worker", settings) as worker:
            await publish(worker, signer, ["five", "six"])
            owner = worker.system.cores.writable(owner_core_name(worker.relay.name))
            new_blocks = owner.length - length_at_disconnect
            assert new_blocks >= 2
            await wait_for(lambda: held(front)[owner.key.hex()].length == owner.length)
            await trio.sleep(0.2)  # a few more polls: nothing else is sent
            assert front.blind_peer.statistics().blocks - received == new_blocks
            await worker.shutdown()


def test_backlog_is_cut_into_signed_batches_that_verify(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path / "cores") as cores:
        core = cores.writable("relay/big")
        core.append([bytes([i]) * 100 for i in range(50)])
        mirror = Mirror.create(tmp_path / "mirror", core.identity)
        starts = []
        while mirror.length < core.length:
            update = _batch(core, mirror.length, budget=1000)
            assert update is not None
            assert sum(len(block) for block in update.blocks) <= 1000
            starts.append(update.start)
            mirror.apply(update)
        # 50 blocks of 100 bytes (139 in a JSON base64 string): 7 per batch, 8 batches.
        assert starts == [0, 7, 14, 21, 28, 35, 42, 49]
        assert [mirror.get(i) for i in range(50)] == [core.get(i) for i in range(50)]
        # A block that can never fit is reported, not sent.
        assert _batch(core, 0, budget=10) is None
        mirror.close()


async def test_a_gateway_without_mirroring_ends_it_for_the_connection(tmp_path: Path) -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with CoreStore.open(tmp_path / "cores") as cores:
        feed = MirrorFeed(cores, send, max_message_bytes=65536, poll_s=0.01)
        old_gateway = ErrorMessage(
            id=None, code=ErrorCode.UNKNOWN_TYPE, message="unknown message type 'mirror-request'"
        )
        unrelated = ErrorMessage(id=None, code=ErrorCode.UNEXPECTED, message="something else")
        assert not feed.on_error(unrelated)
        assert feed.on_error(old_gateway)
        assert feed.disabled
        with trio.fail_after(TIMEOUT):
            await feed.run()  # returns at once
        assert sent == []


async def test_mirrors_survive_a_gateway_restart_and_sync_resumes(tmp_path: Path) -> None:
    signer = Signer()
    async with (
        open_front(tmp_path / "front") as front,
        open_worker(
            tmp_path / "worker", fast_settings(front.base_url, mirror_poll_s=0.05)
        ) as worker,
    ):
        owner = worker.system.cores.writable(owner_core_name(worker.relay.name))
        await publish(worker, signer, ["one", "two"])
        await wait_for(lambda: held(front).get(owner.key.hex()) is not None)
        await wait_for(lambda: held(front)[owner.key.hex()].length == owner.length)
        before = held(front)[owner.key.hex()]
        await worker.shutdown()
    async with open_front(tmp_path / "front") as front:
        assert held(front)[before.core_key] == before
        async with open_worker(
            tmp_path / "worker", fast_settings(front.base_url, mirror_poll_s=0.05)
        ) as worker:
            owner = worker.system.cores.writable(owner_core_name(worker.relay.name))
            await publish(worker, signer, ["three"])
            await wait_for(lambda: held(front)[owner.key.hex()].length == owner.length)
            assert front.blind_peer.statistics().blocks == owner.length - before.length
            await worker.shutdown()
