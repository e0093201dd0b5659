"""RemoteEscrow against a standalone escrow served in this process over real mutual TLS and HMAC:
typed unlock/release/leases/health, deposits passed through with the owner's signature, the
lease-event follower (a revocation on the bus within the bound, a restarted escrow's reset, an
escrow that is down and comes back), and refusals that stop the start."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import nacl.public
import pytest
import trio

from hypertuna.actors.runtime import ActorGone
from hypertuna.escrow.package import open_lease
from hypertuna.escrow.policy import Evidence, Reason
from hypertuna.escrow.service import (
    Actor,
    ActorKind,
    LeaseGrant,
    ReleaseOutcome,
    Revocation,
    UnlockRejected,
    UnlockRequest,
)
from hypertuna.escrow.store import LeaseStatus
from hypertuna.escrow_client import EscrowRefusedTlsError, EscrowTransport
from hypertuna.escrow_client.port import EscrowPort
from hypertuna.escrow_client.remote import (
    EscrowClientRefusedError,
    EscrowNotReadyError,
    RemoteEscrow,
    RemoteEscrowStatistics,
    RemoteState,
)
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores.crypto import KeyPair
from tests.escrow.conftest import good_evidence
from tests.escrow_transport import TIMEOUT, Pki
from tests.escrow_transport.remote_support import (
    FAST_BACKOFF,
    EscrowServer,
    SignedDeposit,
    TcpRelay,
    open_escrow_server,
    signed,
    signed_deposit,
)

#: The follower's long-poll wait in these tests (seconds).
WAIT_S = 2


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.define
class Setup:
    server: EscrowServer
    transport: EscrowTransport
    remote: RemoteEscrow
    relay: TcpRelay

    async def deposit(self, writer: KeyPair | None = None) -> SignedDeposit:
        deposit = signed_deposit(self.server.escrow_key, writer=writer)
        answer = await self.remote.forward(
            "POST", "/api/escrow", body=deposit.body, headers=deposit.headers
        )
        assert answer.status == 201, answer.json
        return deposit

    async def unlock(
        self, relay_key: str, evidence: Evidence | None = None
    ) -> tuple[LeaseGrant | UnlockRejected, nacl.public.PrivateKey]:
        session = nacl.public.PrivateKey.generate()
        request = UnlockRequest(
            relay_key=relay_key,
            session_public_key=bytes(session.public_key),
            requester_id="gateway-test",
        )
        outcome = await self.remote.unlock(request, evidence or good_evidence(_now_ms()))
        return outcome, session

    async def revoke(self, deposit: SignedDeposit) -> None:
        """Revoke at the escrow itself (not through the gateway's client)."""
        body, headers = signed(
            deposit.owner, "POST", "/api/escrow/revoke", {"relay_key": deposit.relay_key}
        )
        async with self.server.transport("owner-tool") as direct:
            answer = await direct.request(
                "POST", "/api/escrow/revoke", raw_body=body, headers=headers, retry=False
            )
        assert answer.status == 200, answer.json


async def wait_for(remote: RemoteEscrow, check: Callable[[RemoteEscrowStatistics], bool]) -> None:
    with trio.fail_after(TIMEOUT):
        await remote.wait_for(check)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    pki = Pki(tmp_path)
    async with open_escrow_server(tmp_path / "escrow", pki) as server, trio.open_nursery() as n:
        relay = TcpRelay(server.port)
        await n.start(relay.run)
        async with server.transport(url=f"https://127.0.0.1:{relay.port}") as transport:
            # The escrow's certificate names 127.0.0.1, so the relay's port is transparent.
            remote = RemoteEscrow(
                transport, wall_clock_ms=_now_ms, poll_wait_s=WAIT_S, backoff=FAST_BACKOFF
            )
            with trio.fail_after(TIMEOUT):
                await n.start(remote.run)
            assert remote.state is RemoteState.UP
            yield Setup(server, transport, remote, relay)
            n.cancel_scope.cancel()


async def test_the_typed_operations_parse_the_escrows_answers(setup: Setup) -> None:
    port: EscrowPort = setup.remote
    assert port.policy_document()["fingerprint"] == setup.server.escrow_key.fingerprint
    writer = KeyPair.from_seed(bytes(range(32)))
    with trio.fail_after(TIMEOUT):
        deposit = await setup.deposit(writer)
        rejected, _ = await setup.unlock(deposit.relay_key, Evidence(healthy_peers=2))
        assert isinstance(rejected, UnlockRejected)
        assert Reason.PEERS_STILL_HEALTHY in rejected.reasons
        assert Reason.REGISTRATION_FLAG_MISSING in rejected.reasons
        granted, session = await setup.unlock(deposit.relay_key)
        assert isinstance(granted, LeaseGrant)
        assert open_lease(bytes(session), granted.sealed_secret).writer == writer
        assert granted.binding.lease_id == granted.lease.lease_id
        running = setup.server.running
        assert running is not None
        [stored] = await running.actor.leases(relay_key=deposit.relay_key)
        assert await port.leases(relay_key=deposit.relay_key) == [stored] == [granted.lease]
        assert await port.leases(relay_key="f" * 64) == []
        health = await port.health()
        assert health.ok and health.leases_active == 1 and health.deposits_active == 1
        assert health.fingerprint == setup.server.escrow_key.fingerprint

        with port.bus.subscribe(deposit.relay_key) as ended:
            gateway = Actor(ActorKind.GATEWAY, "lease-vault")
            released = await port.release(granted.lease.lease_id, reason="done", actor=gateway)
            assert isinstance(released, ReleaseOutcome) and released.released
            assert released.lease.status is LeaseStatus.RELEASED
            ending = await ended.receive()
            assert ending.lease_ids == (granted.lease.lease_id,)
        again = await port.release(granted.lease.lease_id, reason="done", actor=gateway)
        assert again is not None and not again.released
        assert await port.release("lease_unknown", reason="done", actor=gateway) is None


async def test_a_deposit_passes_through_with_the_owners_signature(setup: Setup) -> None:
    deposit = signed_deposit(setup.server.escrow_key)
    headers = {**deposit.headers, "Idempotency-Key": "dep-1"}
    with trio.fail_after(TIMEOUT):
        first = await setup.remote.forward(
            "POST", "/api/escrow", body=deposit.body, headers=headers
        )
        assert first.status == 201, first.json
        # The same signed request again is a replay to the escrow: its nonce was used.
        replayed = await setup.remote.forward(
            "POST", "/api/escrow", body=deposit.body, headers=headers
        )
        assert replayed.status == 401 and replayed.json["reason"] == "replayed-nonce"
        # Signed afresh with the same key and body: the stored answer, marked replayed.
        headers = sign_ed25519(
            deposit.owner, "POST", "/api/escrow", deposit.body, timestamp=int(time.time())
        ).as_dict()
        again = await setup.remote.forward(
            "POST",
            "/api/escrow",
            body=deposit.body,
            headers={**headers, "Idempotency-Key": "dep-1"},
        )
        assert again.status == 201 and again.json == first.json
        assert again.headers.get("idempotent-replayed") == "true"


async def test_a_revocation_reaches_the_bus_within_the_bound(setup: Setup) -> None:
    with trio.fail_after(TIMEOUT):
        deposit = await setup.deposit()
        granted, _ = await setup.unlock(deposit.relay_key)
        assert isinstance(granted, LeaseGrant)
    await wait_for(setup.remote, lambda s: s.leases_tracked == 1)
    bound = setup.remote.staleness_bound_s
    assert bound == WAIT_S + 2 * 4.0 + FAST_BACKOFF.cap_s
    with setup.remote.bus.subscribe(deposit.relay_key) as ended:
        started = trio.current_time()
        await setup.revoke(deposit)
        with trio.fail_after(bound):
            ending = await ended.receive()
        # The long poll was up: one round trip, not a poll period.
        assert trio.current_time() - started < WAIT_S
    assert ending == Revocation(
        relay_key=deposit.relay_key,
        deposit_ids=ending.deposit_ids,
        lease_ids=(granted.lease.lease_id,),
        at_ms=ending.at_ms,
        already_revoked=False,
    )
    stats = setup.remote.statistics()
    assert stats.leases_tracked == 0 and stats.state is RemoteState.UP
    assert stats.lag_s <= setup.remote.lag_bound_s


async def test_a_restarted_escrow_is_listed_again_and_gone_leases_end(setup: Setup) -> None:
    """The revocation happens while the gateway cannot hear it, and the escrow restarts before
    the follower is back: the event is gone with the old process, so only listing the leases
    again shows the lease ended."""
    with trio.fail_after(TIMEOUT):
        kept = await setup.deposit()
        revoked = await setup.deposit()
        kept_grant, _ = await setup.unlock(kept.relay_key)
        revoked_grant, _ = await setup.unlock(revoked.relay_key)
        assert isinstance(kept_grant, LeaseGrant) and isinstance(revoked_grant, LeaseGrant)
    await wait_for(setup.remote, lambda s: s.leases_tracked == 2)
    old_epoch = setup.remote.statistics().epoch
    with setup.remote.bus.subscribe() as ended:
        setup.relay.cut()
        await wait_for(setup.remote, lambda s: s.state is RemoteState.UNAVAILABLE)
        await setup.revoke(revoked)
        await setup.server.stop()
        await setup.server.start()
        setup.relay.restore()
        await wait_for(setup.remote, lambda s: s.epoch != old_epoch and s.state is RemoteState.UP)
        ending = ended.receive_nowait()
        with pytest.raises(trio.WouldBlock):
            ended.receive_nowait()
    assert ending.lease_ids == (revoked_grant.lease.lease_id,)
    assert ending.relay_key == revoked.relay_key
    stats = setup.remote.statistics()
    assert stats.resets == 1 and stats.leases_tracked == 1
    assert setup.remote.policy_document()["fingerprint"] == setup.server.escrow_key.fingerprint


async def test_an_escrow_that_is_down_comes_back(setup: Setup) -> None:
    await setup.server.stop()
    await wait_for(setup.remote, lambda s: s.state is RemoteState.UNAVAILABLE)
    stats = setup.remote.statistics()
    assert stats.last_error and stats.poll_failures >= 1
    await setup.server.start()
    await wait_for(setup.remote, lambda s: s.state is RemoteState.UP)
    with trio.fail_after(TIMEOUT):
        deposit = await setup.deposit()
        granted, _ = await setup.unlock(deposit.relay_key)
    assert isinstance(granted, LeaseGrant)


async def test_the_gateway_starts_while_the_escrow_is_down(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with open_escrow_server(tmp_path / "escrow", pki) as server:
        await server.stop()
        async with server.transport() as transport, trio.open_nursery() as nursery:
            remote = RemoteEscrow(
                transport, wall_clock_ms=_now_ms, poll_wait_s=WAIT_S, backoff=FAST_BACKOFF
            )
            with trio.fail_after(TIMEOUT):
                await nursery.start(remote.run)
            assert remote.state is RemoteState.UNAVAILABLE
            with pytest.raises(EscrowNotReadyError):
                remote.policy_document()
            await server.start()
            await wait_for(remote, lambda s: s.state is RemoteState.UP)
            assert remote.policy_document()["fingerprint"] == server.escrow_key.fingerprint
            nursery.cancel_scope.cancel()


async def test_a_refused_certificate_or_secret_stops_the_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with open_escrow_server(tmp_path / "escrow", pki) as server:
        async with server.transport("intruder", ca=pki.other_ca, retries=0) as foreign:
            remote = RemoteEscrow(foreign, wall_clock_ms=_now_ms)
            with pytest.raises(EscrowRefusedTlsError) as refused, trio.fail_after(TIMEOUT):
                await remote.run()
        assert "unknown ca" in refused.value.reason
        async with server.transport(secret=b"\x07" * 32) as wrong:
            remote = RemoteEscrow(wrong, wall_clock_ms=_now_ms)
            with pytest.raises(EscrowClientRefusedError) as bad, trio.fail_after(TIMEOUT):
                await remote.run()
        assert bad.value.reason == "bad-signature"
        assert "escrow.hmac_secret" in str(bad.value)


async def test_requests_fail_at_once_when_it_stopped(setup: Setup) -> None:
    setup.remote.inbox.close()
    with pytest.raises(ActorGone):
        await setup.remote.health()
