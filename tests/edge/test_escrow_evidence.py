"""The unlock evidence the gateway gathers itself: worker liveness, mirrors, the gateway writer
admitted in the relay's own signed owner core — over a real worker connection and real cores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from hypertuna.actors.evidence import EvidenceGatherer
from hypertuna.escrow.policy import Evidence, Policy, Reason, evaluate
from hypertuna.protocol.worker import MirrorRequest, MirrorStatus
from hypertuna.storage.cores import KeyPair
from hypertuna.storage.relay_records import AddWriter, WriterRole, encode_record
from hypertuna.system import System
from tests.edge.test_blind_peer_link import owner_core, update
from tests.edge.test_workers import open_front, registered
from tests.edge.worker_support import Owner, open_worker
from tests.support import TIMEOUT


class Clock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[System]:
    async with open_front(tmp_path / "front") as system:
        yield system


async def _wait_for(gather: EvidenceGatherer, relay_key: str, check: object) -> Evidence:
    with trio.fail_after(TIMEOUT):
        while True:
            evidence = await gather(relay_key)
            if check(evidence):  # type: ignore[operator]
                return evidence
            await trio.sleep(0.01)


async def test_evidence_follows_workers_mirrors_and_the_owner_core(
    front: System, tmp_path: Path
) -> None:
    clock = Clock()
    gather = EvidenceGatherer(front.router, front.blind_peer, front.replicas, wall_clock_ms=clock)
    owner = Owner()
    unknown = await gather(owner.relay_key)
    assert (unknown.relay_registered, unknown.healthy_peers, unknown.mirror_lag_ms) == (
        False,
        0,
        None,
    )
    core = owner_core(owner, tmp_path / "owner")
    writer = KeyPair.from_seed(bytes(range(32)))
    core.append([encode_record(AddWriter(writer.public_key.hex(), WriterRole.GATEWAY))])
    async with open_worker(front.base_url) as worker:
        await registered(front, worker, owner)
        live = await gather(owner.relay_key)
        assert live.relay_registered is True and live.healthy_peers == 1
        assert live.last_peer_seen_ms == clock.ms
        assert live.escrow_enabled is False  # nothing mirrored yet
        await worker.send(MirrorRequest(core_key=owner.relay_key))
        assert await worker.reply() == MirrorStatus(owner.relay_key, 0, 0)
        await worker.send(update(core, 0, owner.relay_key))
        assert await worker.reply() == MirrorStatus(owner.relay_key, 1, 0)
        mirrored = await _wait_for(gather, owner.relay_key, lambda e: e.escrow_enabled)
        assert mirrored.mirror_lag_ms == 0 and mirrored.mirror_updated_ms == clock.ms
        # While the worker is there, the policy refuses for its health and recent contact.
        assert evaluate(Policy(), None, False, mirrored, clock.ms) == [
            Reason.RECORD_NOT_FOUND,
            Reason.PEERS_STILL_HEALTHY,
            Reason.PEER_TIMEOUT_NOT_REACHED,
        ]
        left_at = clock.ms
    gone = await _wait_for(gather, owner.relay_key, lambda e: e.healthy_peers == 0)
    assert gone.relay_registered is True  # the registration stays; only the worker went
    assert left_at - 1_000 <= gone.last_peer_seen_ms <= left_at
    # With the worker gone (and a policy whose peer timeout has passed), every rule about the
    # relay's workers, registration and mirror holds: only the deposit is missing.
    assert evaluate(Policy(peer_timeout_ms=0), None, False, gone, clock.ms) == [
        Reason.RECORD_NOT_FOUND
    ]
    assert evaluate(Policy(), None, False, gone, clock.ms) == [
        Reason.RECORD_NOT_FOUND,
        Reason.PEER_TIMEOUT_NOT_REACHED,
    ]
    core.close()
