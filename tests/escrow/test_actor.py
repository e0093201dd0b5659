"""The EscrowActor on both backends: concurrent requests, publication of every lease ending (bus
and lease-event log), the expiry loop, audit verification and checkpoints, metrics, and a start
without keys."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, generate_latest

from hypertuna.actors.escrow import EscrowActor, LeaseEventKind
from hypertuna.actors.runtime import ActorGone
from hypertuna.escrow.keys import AuditKey, EscrowKey, EscrowKeyError
from hypertuna.escrow.policy import Policy
from hypertuna.escrow.service import (
    Actor,
    ActorKind,
    DepositReceipt,
    EscrowService,
    LeaseGrant,
    UnlockRejected,
    UnlockRequest,
    open_escrow_service,
)
from hypertuna.escrow.settings import EscrowSettings, open_service
from hypertuna.escrow.store import EscrowStorageError
from tests.escrow.conftest import (
    DEADLINE_S,
    NOW,
    Owner,
    deposit_request,
    good_evidence,
    new_owner,
    new_writer,
    session_key,
)

GATEWAY = Actor(ActorKind.GATEWAY, "gateway-1")


class Clock:
    def __init__(self) -> None:
        self.ms = NOW

    def __call__(self) -> int:
        return self.ms


@contextlib.asynccontextmanager
async def running(
    service: EscrowService, clock: Clock, **options: object
) -> AsyncIterator[EscrowActor]:
    actor = EscrowActor(service, wall_clock_ms=clock, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield actor
        nursery.cancel_scope.cancel()


@pytest.fixture
async def service(
    escrow_db: tuple[str | None, Path], escrow_key: EscrowKey, audit_key: AuditKey
) -> AsyncIterator[EscrowService]:
    url, path = escrow_db
    async with open_escrow_service(
        escrow_key=escrow_key,
        audit_key=audit_key,
        policy=Policy(lease_ttl_ms=1_000),
        database_url=url,
        sqlite_path=path,
        checkpoint_every=1000,
    ) as opened:
        yield opened


async def _deposit(actor: EscrowActor, service: EscrowService, owner: Owner, **kw: int) -> str:
    receipt = await actor.deposit(deposit_request(service.escrow_key, owner, new_writer(), **kw))
    assert isinstance(receipt, DepositReceipt), receipt
    return receipt.deposit_id


async def _unlock(actor: EscrowActor, relay_key: str, now_ms: int) -> LeaseGrant | UnlockRejected:
    request = UnlockRequest(
        relay_key=relay_key,
        session_public_key=bytes(session_key().public_key),
        requester_id="gateway-1",
    )
    return await actor.unlock(request, good_evidence(now_ms))


async def test_concurrent_unlocks_run_together_and_give_one_lease(service: EscrowService) -> None:
    clock = Clock()
    with trio.fail_after(DEADLINE_S):
        async with running(service, clock, max_concurrent=16) as actor:
            owner = new_owner()
            await _deposit(actor, service, owner)
            outcomes: list[LeaseGrant | UnlockRejected] = []
            peak = 0

            async def one() -> None:
                outcomes.append(await _unlock(actor, owner.relay_key, clock.ms))

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, actor.statistics().running)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as unlocks:
                    for _ in range(50):
                        unlocks.start_soon(one)
                nursery.cancel_scope.cancel()
            assert sum(isinstance(o, LeaseGrant) for o in outcomes) == 1
            assert peak > 1
            metrics = generate_latest(actor.metrics.registry).decode()
            assert 'escrow_unlock_total{result="issued"} 1.0' in metrics
            assert 'escrow_unlock_total{result="rejected"} 49.0' in metrics
            assert "escrow_active_leases 1.0" in metrics
            assert 'escrow_db_latency_seconds_count{operation="write"}' in metrics


async def test_every_lease_ending_is_published(service: EscrowService) -> None:
    clock = Clock()
    with trio.fail_after(DEADLINE_S):
        async with running(service, clock) as actor:
            owner = new_owner()
            await _deposit(actor, service, owner)
            with actor.bus.subscribe(owner.relay_key) as published:
                # Released.
                grant = await _unlock(actor, owner.relay_key, clock.ms)
                assert isinstance(grant, LeaseGrant)
                released = await actor.release(
                    grant.lease.lease_id, reason="resynced", actor=GATEWAY
                )
                assert released is not None and released.released
                assert published.receive_nowait().lease_ids == (grant.lease.lease_id,)
                # Superseded by a rotation.
                grant = await _unlock(actor, owner.relay_key, clock.ms)
                assert isinstance(grant, LeaseGrant)
                await _deposit(actor, service, owner, rotation=2)
                assert published.receive_nowait().lease_ids == (grant.lease.lease_id,)
                # Expired (the lease TTL is 1 s here).
                grant = await _unlock(actor, owner.relay_key, clock.ms)
                assert isinstance(grant, LeaseGrant)
                clock.ms += 2_000
                expired = await actor.expire_leases()
                assert [lease.lease_id for lease in expired] == [grant.lease.lease_id]
                assert published.receive_nowait().lease_ids == (grant.lease.lease_id,)
                # Revoked.
                grant = await _unlock(actor, owner.relay_key, clock.ms)
                assert isinstance(grant, LeaseGrant)
                await actor.revoke(
                    actor=Actor(ActorKind.OWNER, owner.key_hex), relay_key=owner.relay_key
                )
                assert published.receive_nowait().lease_ids == (grant.lease.lease_id,)
            log = actor.lease_events_since(0)
            assert [event.kind for event in log.events] == [
                LeaseEventKind.RELEASED,
                LeaseEventKind.SUPERSEDED,
                LeaseEventKind.EXPIRED,
                LeaseEventKind.REVOKED,
            ]
            assert log.last_seq == 4 and not log.reset
            assert actor.lease_events_since(2).events == log.events[2:]
            assert actor.lease_events_since(0, epoch="0badc0de").reset
            assert actor.statistics().active_leases == 0


async def test_the_expiry_loop_expires_and_publishes(service: EscrowService) -> None:
    clock = Clock()
    with trio.fail_after(DEADLINE_S):
        async with running(service, clock, expiry_interval_s=0.05) as actor:
            owner = new_owner()
            await _deposit(actor, service, owner)
            grant = await _unlock(actor, owner.relay_key, clock.ms)
            assert isinstance(grant, LeaseGrant)
            with actor.bus.subscribe() as published:
                clock.ms += 5_000
                revocation = await published.receive()
            assert revocation.lease_ids == (grant.lease.lease_id,)
            found = await actor.wait_lease_events(0, timeout_s=1)
            assert [event.kind for event in found.events] == [LeaseEventKind.EXPIRED]


async def test_audit_verification_checkpoint_and_gateway_registry(
    service: EscrowService,
) -> None:
    clock = Clock()
    with trio.fail_after(DEADLINE_S):
        async with running(service, clock) as actor:
            await _deposit(actor, service, new_owner())
            result = await actor.verify_audit()
            assert result.valid
            checkpoint = await actor.checkpoint()
            assert checkpoint is not None and checkpoint.seq == 1
            assert await actor.checkpoint() is None
            health = await actor.health()
            assert health.ok and health.audit_chain_valid is True
            assert health.last_checkpoint_seq == 1
            assert actor.policy_document()["fingerprint"] == service.escrow_key.fingerprint
            gateway = CollectorRegistry(auto_describe=True)
            gateway.register(actor.metrics)
            assert "escrow_audit_chain_valid 1.0" in generate_latest(gateway).decode()
            await service.db.aclose()
            with pytest.raises(EscrowStorageError):
                await actor.health()
            metrics = generate_latest(actor.metrics.registry).decode()
            assert 'escrow_db_errors_total{operation="read"} 1.0' in metrics


async def test_a_missing_key_fails_the_start(tmp_path: Path) -> None:
    settings = EscrowSettings(key_dir=tmp_path / "none", sqlite_path=tmp_path / "escrow.db")
    actor = EscrowActor(lambda: open_service(settings), wall_clock_ms=Clock())
    with trio.fail_after(DEADLINE_S), pytest.raises(EscrowKeyError, match="escrow init"):
        await actor.run()
    with trio.fail_after(DEADLINE_S), pytest.raises(ActorGone):
        await actor.health()
