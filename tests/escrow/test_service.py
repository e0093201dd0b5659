"""The escrow service on both backends (``escrow`` runs each test on SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from hypertuna.escrow import store
from hypertuna.escrow.keys import AuditKey, EscrowKey
from hypertuna.escrow.package import open_lease
from hypertuna.escrow.policy import Evidence, Policy, Reason
from hypertuna.escrow.service import (
    Actor,
    ActorKind,
    DepositReceipt,
    DepositRefusal,
    DepositRefused,
    DepositRequest,
    EscrowService,
    LeaseGrant,
    Revocation,
    RevokeRefusal,
    RevokeRefused,
    UnlockRejected,
    UnlockRequest,
    open_escrow_service,
)
from hypertuna.escrow.store import LeaseStatus
from hypertuna.storage.cores.crypto import KeyPair
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

EscrowDb = tuple[str | None, Path]
OPERATOR = Actor(ActorKind.OPERATOR, "ops")


async def _snapshot(escrow: EscrowService) -> Sequence[object]:
    return await escrow.db.read(store.all_rows)


async def _audit_actions(escrow: EscrowService) -> list[str]:
    return [e.action for e in await escrow.db.read(store.audit_entries)]


async def _deposit(
    escrow: EscrowService, owner: Owner, writer: KeyPair | None = None, **kw: object
) -> DepositReceipt:
    request = deposit_request(escrow.escrow_key, owner, writer or new_writer(), **kw)  # type: ignore[arg-type]
    receipt = await escrow.deposit(request, now_ms=NOW)
    assert isinstance(receipt, DepositReceipt), receipt
    return receipt


async def _unlock(
    escrow: EscrowService, relay_key: str, evidence: Evidence | None = None, now_ms: int = NOW
) -> LeaseGrant | UnlockRejected:
    request = UnlockRequest(
        relay_key=relay_key,
        session_public_key=bytes(session_key().public_key),
        requester_id="gateway-1",
    )
    return await escrow.unlock(request, evidence or good_evidence(now_ms), now_ms=now_ms)


async def _raw(escrow_db: EscrowDb, sql: str, params: Sequence[object]) -> None:
    """Change the database behind the service's back, as an intruder would."""
    url, path = escrow_db

    def run() -> None:
        if url is None:
            with contextlib.closing(sqlite3.connect(path)) as lite, lite:
                lite.execute(sql, params)
        else:
            with psycopg.connect(url, autocommit=True) as pg:
                pg.execute(sql.replace("?", "%s"), params)

    await trio.to_thread.run_sync(run)


# --- deposit ---------------------------------------------------------------------------------


async def test_deposit_is_stored_and_audited(escrow: EscrowService) -> None:
    owner, writer = new_owner(), new_writer()
    with trio.fail_after(DEADLINE_S):
        receipt = await _deposit(escrow, owner, writer)
        record = await escrow.current_deposit(owner.relay_key)
        health = await escrow.health()
    assert record is not None and record.deposit_id == receipt.deposit_id
    assert record.writer_public_key == writer.public_key.hex() == receipt.writer_public_key
    assert receipt.expires_at_ms == NOW + Policy().deposit_ttl_ms
    assert await _audit_actions(escrow) == ["deposit"]
    assert (health.deposits_active, health.leases_active, health.audit_entries) == (1, 0, 1)
    assert escrow.policy_document()["fingerprint"] == escrow.escrow_key.fingerprint


async def test_refused_deposits_change_nothing(escrow: EscrowService) -> None:
    owner, stranger = new_owner(), new_owner()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner, rotation=5)
        before = await _snapshot(escrow)
        key = escrow.escrow_key
        good = deposit_request(key, owner, new_writer(), rotation=6)
        honest = new_writer()
        liar = attrs.evolve(honest, secret_key=new_writer().secret_key[:32] + honest.public_key)
        cases = {
            DepositRefusal.PACKAGE_UNREADABLE: attrs.evolve(good, package=b"\x00" * 197),
            DepositRefusal.PACKAGE_SECRET_MISMATCH: deposit_request(key, owner, liar, rotation=6),
            DepositRefusal.PACKAGE_RELAY_MISMATCH: attrs.evolve(good, relay_key="ee" * 32),
            DepositRefusal.PACKAGE_OWNER_MISMATCH: attrs.evolve(good, owner_key="ee" * 32),
            DepositRefusal.OTHER_OWNER: deposit_request(
                key, Owner(stranger.key, owner.relay_key), new_writer(), rotation=9
            ),
            DepositRefusal.ROTATION_NOT_NEWER: deposit_request(
                key, owner, new_writer(), rotation=5
            ),
            DepositRefusal.PACKAGE_EXPIRED: deposit_request(
                key, owner, new_writer(), rotation=6, created_at_ms=NOW - 86_400_000
            ),
            DepositRefusal.PACKAGE_IN_FUTURE: deposit_request(
                key, owner, new_writer(), rotation=6, created_at_ms=NOW + 3_600_000
            ),
        }
        for reason, request in cases.items():
            outcome = await escrow.deposit(
                attrs.evolve(request, idempotency_key=f"k-{reason.value}"), now_ms=NOW
            )
            assert isinstance(outcome, DepositRefused), (reason, outcome)
            assert outcome.reason is reason
            assert await _snapshot(escrow) == before, reason


def test_malformed_requests_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="relay_key"):
        DepositRequest(owner_key="ab" * 32, relay_key="XYZ", package=b"x")
    with pytest.raises(ValueError, match="package"):
        DepositRequest(owner_key="ab" * 32, relay_key="ab" * 32, package=b"")
    with pytest.raises(ValueError, match="session_public_key"):
        UnlockRequest(relay_key="ab" * 32, session_public_key=b"short", requester_id="g")
    with pytest.raises(ValueError, match="requester_id"):
        UnlockRequest(relay_key="ab" * 32, session_public_key=b"\x01" * 32, requester_id="")


async def test_same_owner_supersedes_and_ends_the_old_deposits_lease(
    escrow: EscrowService,
) -> None:
    owner = new_owner()
    with trio.fail_after(DEADLINE_S):
        first = await _deposit(escrow, owner, rotation=1)
        grant = await _unlock(escrow, owner.relay_key)
        assert isinstance(grant, LeaseGrant)
        second = await _deposit(escrow, owner, rotation=2)
        old = await escrow.deposit_record(first.deposit_id)
        leases = await escrow.leases(relay_key=owner.relay_key)
    assert second.superseded_deposit_id == first.deposit_id
    assert second.ended_lease_ids == (grant.lease.lease_id,)
    assert old is not None and old.status.value == "superseded"
    assert old.superseded_by == second.deposit_id
    assert [lease.status for lease in leases] == [LeaseStatus.SUPERSEDED]
    assert await _audit_actions(escrow) == ["deposit", "unlock-issued", "supersede", "deposit"]


async def test_idempotent_retry_conflict_and_in_flight(escrow: EscrowService) -> None:
    owner = new_owner()
    request = deposit_request(escrow.escrow_key, owner, new_writer(), idempotency_key="idem-1")
    with trio.fail_after(DEADLINE_S):
        first = await escrow.deposit(request, now_ms=NOW)
        retry = await escrow.deposit(request, now_ms=NOW + 10)
        other = deposit_request(
            escrow.escrow_key, owner, new_writer(), rotation=2, idempotency_key="idem-1"
        )
        conflict = await escrow.deposit(other, now_ms=NOW)
    assert isinstance(first, DepositReceipt) and isinstance(retry, DepositReceipt)
    assert retry == attrs.evolve(first, replayed=True)
    assert isinstance(conflict, DepositRefused)
    assert conflict.reason is DepositRefusal.IDEMPOTENCY_MISMATCH
    assert await _audit_actions(escrow) == ["deposit"]

    # Concurrent duplicates in this process: one runs, the others are told it is in flight.
    dup = deposit_request(escrow.escrow_key, new_owner(), new_writer(), idempotency_key="idem-2")
    outcomes: list[object] = []

    async def send() -> None:
        outcomes.append(await escrow.deposit(dup, now_ms=NOW))

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(send)
    receipts = [o for o in outcomes if isinstance(o, DepositReceipt)]
    assert len(receipts) == 1 and not receipts[0].replayed
    assert all(
        isinstance(o, DepositRefused) and o.reason is DepositRefusal.IDEMPOTENCY_IN_FLIGHT
        for o in outcomes
        if o not in receipts
    )

    # A claim held by another process (pending row) is in flight too, until it goes stale.
    third = deposit_request(escrow.escrow_key, new_owner(), new_writer(), idempotency_key="k3")
    digest = third.digest()
    with trio.fail_after(DEADLINE_S):
        await escrow.db.write(lambda db: store.claim_idempotency(db, "k3", digest, NOW))
        busy = await escrow.deposit(third, now_ms=NOW + 1000)
        taken_over = await escrow.deposit(third, now_ms=NOW + 120_000)
    assert isinstance(busy, DepositRefused)
    assert busy.reason is DepositRefusal.IDEMPOTENCY_IN_FLIGHT
    assert isinstance(taken_over, DepositReceipt)


# --- unlock ----------------------------------------------------------------------------------


async def test_unlock_issues_a_lease_only_the_session_key_opens(escrow: EscrowService) -> None:
    owner, writer = new_owner(), new_writer()
    session = session_key()
    with trio.fail_after(DEADLINE_S):
        receipt = await _deposit(escrow, owner, writer)
        grant = await escrow.unlock(
            UnlockRequest(
                relay_key=owner.relay_key,
                session_public_key=bytes(session.public_key),
                requester_id="gateway-1",
            ),
            good_evidence(),
            now_ms=NOW,
        )
    assert isinstance(grant, LeaseGrant)
    opened = open_lease(bytes(session), grant.sealed_secret)
    assert opened.writer.secret_key == writer.secret_key
    assert opened.binding == grant.binding
    binding = grant.binding
    assert (binding.lease_id, binding.relay_key) == (grant.lease.lease_id, owner.relay_key)
    assert binding.deposit_id == receipt.deposit_id
    assert binding.lease_version == grant.lease.lease_version == 1
    assert binding.expires_at_ms == NOW + Policy().lease_ttl_ms == grant.lease.expires_at_ms
    assert binding.escrow_fingerprint == escrow.escrow_key.fingerprint
    with pytest.raises(Exception, match="session key"):
        open_lease(bytes(session_key()), grant.sealed_secret)
    assert await _audit_actions(escrow) == ["deposit", "unlock-issued"]
    assert escrow.statistics().unlocks_issued == 1


async def test_rejections_report_every_reason_and_are_audited(escrow: EscrowService) -> None:
    owner = new_owner()
    with trio.fail_after(DEADLINE_S):
        unknown = await _unlock(escrow, owner.relay_key)
        await _deposit(escrow, owner)
        blind = await _unlock(escrow, owner.relay_key, Evidence())
        first = await _unlock(escrow, owner.relay_key)
        second = await _unlock(escrow, owner.relay_key)
        late = await _unlock(escrow, owner.relay_key, now_ms=NOW + 86_400_000)
    assert isinstance(unknown, UnlockRejected)
    assert Reason.RECORD_NOT_FOUND in unknown.reasons
    assert isinstance(blind, UnlockRejected)
    assert blind.reasons == (
        Reason.REGISTRATION_FLAG_MISSING,
        Reason.PEERS_STILL_HEALTHY,
        Reason.PEER_TIMEOUT_NOT_REACHED,
        Reason.MIRROR_TOO_STALE,
        Reason.MIRROR_WINDOW_EXPIRED,
    )
    assert isinstance(first, LeaseGrant)
    assert isinstance(second, UnlockRejected)
    assert second.reasons == (Reason.LEASE_ALREADY_ACTIVE,)
    # A day later the lease has expired (and is expired in the same transaction) but so has
    # the deposit.
    assert isinstance(late, UnlockRejected) and late.reasons == (Reason.RECORD_EXPIRED,)
    entries = await escrow.db.read(store.audit_entries)
    assert [e.action for e in entries] == [
        "unlock-rejected",
        "deposit",
        "unlock-rejected",
        "unlock-issued",
        "unlock-rejected",
        "lease-expired",
        "unlock-rejected",
    ]
    assert entries[-1].details["reasons"] == ["record-expired"]
    assert escrow.statistics().rejections_by_reason["lease-already-active"] == 1


async def test_an_expired_lease_is_ended_before_the_next_one_is_issued(
    escrow: EscrowService,
) -> None:
    owner = new_owner()
    after_expiry = NOW + Policy().lease_ttl_ms + 1
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner)
        first = await _unlock(escrow, owner.relay_key)
        early = await _unlock(escrow, owner.relay_key, now_ms=after_expiry - 2)
        second = await _unlock(escrow, owner.relay_key, now_ms=after_expiry)
        leases = await escrow.leases(relay_key=owner.relay_key)
    assert isinstance(first, LeaseGrant) and isinstance(second, LeaseGrant)
    assert isinstance(early, UnlockRejected)
    assert early.reasons == (Reason.LEASE_ALREADY_ACTIVE,)
    assert (first.lease.lease_version, second.lease.lease_version) == (1, 2)
    statuses = {lease.lease_id: lease.status for lease in leases}
    assert statuses == {
        first.lease.lease_id: LeaseStatus.EXPIRED,
        second.lease.lease_id: LeaseStatus.ACTIVE,
    }
    assert (await _audit_actions(escrow))[-2:] == ["lease-expired", "unlock-issued"]


async def test_unlock_limit_and_revoked_record(escrow: EscrowService) -> None:
    escrow.policy = Policy(max_unlocks=1)
    owner = new_owner()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner)
        grant = await _unlock(escrow, owner.relay_key)
        assert isinstance(grant, LeaseGrant)
        await escrow.release(grant.lease.lease_id, reason="resynced", actor=OPERATOR, now_ms=NOW)
        limited = await _unlock(escrow, owner.relay_key)
        await escrow.revoke(relay_key=owner.relay_key, actor=OPERATOR, now_ms=NOW)
        revoked = await _unlock(escrow, owner.relay_key)
    assert isinstance(limited, UnlockRejected)
    assert limited.reasons == (Reason.UNLOCK_LIMIT_REACHED,)
    assert isinstance(revoked, UnlockRejected)
    assert revoked.reasons == (Reason.RECORD_REVOKED, Reason.UNLOCK_LIMIT_REACHED)


async def test_fifty_concurrent_unlocks_issue_exactly_one_lease(escrow: EscrowService) -> None:
    owner = new_owner()
    outcomes: list[LeaseGrant | UnlockRejected] = []

    async def one() -> None:
        outcomes.append(await _unlock(escrow, owner.relay_key))

    with trio.fail_after(120):
        await _deposit(escrow, owner)
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        active = await escrow.leases(relay_key=owner.relay_key, active_only=True)
    grants = [o for o in outcomes if isinstance(o, LeaseGrant)]
    assert len(outcomes) == 50 and len(grants) == 1 and len(active) == 1
    assert all(
        o.reasons == (Reason.LEASE_ALREADY_ACTIVE,)
        for o in outcomes
        if isinstance(o, UnlockRejected)
    )
    assert (await escrow.audit_verify()).valid


async def test_lease_version_increases_across_restarts(
    escrow: EscrowService, escrow_db: EscrowDb, escrow_key: EscrowKey, audit_key: AuditKey
) -> None:
    owner = new_owner()
    url, path = escrow_db
    versions = []
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner)
        for restart in range(3):
            async with open_escrow_service(
                escrow_key=escrow_key,
                audit_key=audit_key,
                policy=Policy(),
                database_url=url,
                sqlite_path=path,
            ) as service:
                assert service.db.applied_migrations == []  # already applied: idempotent
                grant = await _unlock(service, owner.relay_key)
                assert isinstance(grant, LeaseGrant), grant
                versions.append(grant.lease.lease_version)
                await service.release(
                    grant.lease.lease_id, reason=f"done-{restart}", actor=OPERATOR, now_ms=NOW
                )
    assert versions == [1, 2, 3]


# --- revoke, release, expiry, listing --------------------------------------------------------


async def test_revoke_by_relay_or_deposit_ends_leases_idempotently(escrow: EscrowService) -> None:
    a, b = new_owner(), new_owner()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, a)
        dep_b = await _deposit(escrow, b)
        grant_a = await _unlock(escrow, a.relay_key)
        grant_b = await _unlock(escrow, b.relay_key)
        assert isinstance(grant_a, LeaseGrant) and isinstance(grant_b, LeaseGrant)
        stranger = Actor(ActorKind.OWNER, b.key_hex)
        before = await _snapshot(escrow)
        refused = await escrow.revoke(relay_key=a.relay_key, actor=stranger, now_ms=NOW)
        missing = await escrow.revoke(deposit_id="dep_nope", actor=OPERATOR, now_ms=NOW)
        assert await _snapshot(escrow) == before
        by_relay = await escrow.revoke(
            relay_key=a.relay_key, actor=Actor(ActorKind.OWNER, a.key_hex), now_ms=NOW
        )
        again = await escrow.revoke(relay_key=a.relay_key, actor=OPERATOR, now_ms=NOW + 1)
        by_deposit = await escrow.revoke(deposit_id=dep_b.deposit_id, actor=OPERATOR, now_ms=NOW)
        again_b = await escrow.revoke(deposit_id=dep_b.deposit_id, actor=OPERATOR, now_ms=NOW)
        active = await escrow.leases(active_only=True)
    assert isinstance(refused, RevokeRefused) and refused.reason is RevokeRefusal.NOT_OWNER
    assert isinstance(missing, RevokeRefused) and missing.reason is RevokeRefusal.NOT_FOUND
    assert isinstance(by_relay, Revocation) and not by_relay.already_revoked
    assert by_relay.lease_ids == (grant_a.lease.lease_id,)
    assert isinstance(again, Revocation) and again.already_revoked and again.lease_ids == ()
    assert isinstance(by_deposit, Revocation)
    assert by_deposit.lease_ids == (grant_b.lease.lease_id,)
    assert isinstance(again_b, Revocation) and again_b.already_revoked
    assert active == []
    assert (await _audit_actions(escrow)).count("revoke") == 2
    with pytest.raises(ValueError, match="owner or an operator"):
        await escrow.revoke(relay_key=a.relay_key, actor=Actor(ActorKind.GATEWAY, "g"), now_ms=1)


async def test_release_and_expiry_are_audited(escrow: EscrowService) -> None:
    a, b = new_owner(), new_owner()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, a)
        await _deposit(escrow, b)
        grant_a = await _unlock(escrow, a.relay_key)
        grant_b = await _unlock(escrow, b.relay_key)
        assert isinstance(grant_a, LeaseGrant) and isinstance(grant_b, LeaseGrant)
        released = await escrow.release(
            grant_a.lease.lease_id, reason="resync-complete", actor=OPERATOR, now_ms=NOW + 1
        )
        twice = await escrow.release(
            grant_a.lease.lease_id, reason="resync-complete", actor=OPERATOR, now_ms=NOW + 2
        )
        unknown = await escrow.release("lease_x", reason="r", actor=OPERATOR, now_ms=NOW)
        early = await escrow.expire_leases(now_ms=NOW + 1000)
        expired = await escrow.expire_leases(now_ms=grant_b.lease.expires_at_ms)
    assert released is not None and released.released
    assert released.lease.status is LeaseStatus.RELEASED
    assert twice is not None and not twice.released
    assert unknown is None and early == []
    assert [lease.lease_id for lease in expired] == [grant_b.lease.lease_id]
    assert (await _audit_actions(escrow))[-2:] == ["lease-released", "lease-expired"]


async def test_lease_listing_and_logs_carry_no_secret(
    escrow: EscrowService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    owner, writer = new_owner(), new_writer()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner, writer, idempotency_key="log-check")
        grant = await _unlock(escrow, owner.relay_key)
        assert isinstance(grant, LeaseGrant)
        await escrow.unlock(
            UnlockRequest(
                relay_key=owner.relay_key,
                session_public_key=bytes(session_key().public_key),
                requester_id="gateway-1",
            ),
            good_evidence(),
            now_ms=NOW,
        )
        leases = await escrow.leases()
        entries = await escrow.db.read(store.audit_entries)
        await escrow.revoke(relay_key=owner.relay_key, actor=OPERATOR, now_ms=NOW)
    seed = writer.secret_key[:32]
    forbidden = [
        seed.hex(),
        writer.secret_key.hex(),
        base64.b64encode(seed).decode(),
        base64.b64encode(writer.secret_key).decode(),
        grant.sealed_secret.hex(),
        base64.b64encode(grant.sealed_secret).decode(),
    ]
    listed = json.dumps([lease.to_json() for lease in leases])
    audit = json.dumps([[e.details, e.actor] for e in entries])
    logs = caplog.text + repr(grant) + repr(escrow.escrow_key)
    assert "escrow lease" in caplog.text  # the logs were captured at all
    for text in (listed, audit, logs):
        for secret in forbidden:
            assert secret not in text


# --- audit -----------------------------------------------------------------------------------


async def test_audit_chain_checkpoints_and_tampering(
    escrow: EscrowService, escrow_db: EscrowDb
) -> None:
    owner = new_owner()
    with trio.fail_after(DEADLINE_S):
        for rotation in range(1, 8):  # 13 entries (deposit + 6 x supersede, deposit)
            await _deposit(escrow, owner, rotation=rotation)
        on_demand = await escrow.checkpoint(now_ms=NOW)
        nothing_new = await escrow.checkpoint(now_ms=NOW)
        marks = await escrow.db.read(store.checkpoints)
        good = await escrow.audit_verify()
    assert [m.seq for m in marks] == [5, 10, 13]  # every 5 entries, then on demand
    assert on_demand is not None and on_demand.seq == 13 and nothing_new is None
    assert good.valid and good.entries == 13 and good.checkpoints == 3
    assert (await escrow.health()).audit_chain_valid is True

    with trio.fail_after(DEADLINE_S):
        await _raw(escrow_db, "UPDATE escrow_audit SET actor = ? WHERE seq = ?", ("owner:me", 4))
        tampered = await escrow.audit_verify()
        health = await escrow.health()
    assert not tampered.valid and tampered.first_broken_seq == 4
    assert health.audit_chain_valid is False and not health.ok
    assert escrow.statistics().audit_chain_valid is False


async def test_a_forged_checkpoint_is_detected(escrow: EscrowService, escrow_db: EscrowDb) -> None:
    owner = new_owner()
    with trio.fail_after(DEADLINE_S):
        await _deposit(escrow, owner)
        await _deposit(escrow, owner, rotation=2)
        mark = await escrow.checkpoint(now_ms=NOW)
        assert mark is not None
        await _raw(
            escrow_db,
            "UPDATE escrow_checkpoints SET at_ms = ? WHERE seq = ?",
            (mark.at_ms + 1, mark.seq),
        )
        result = await escrow.audit_verify()
    assert not result.valid and result.first_broken_seq == mark.seq
    assert "not signed" in result.message
