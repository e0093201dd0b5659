"""The unlock policy: defaults, environment, and every rule alone and together."""

from __future__ import annotations

import attrs
import pytest

from hypertuna.escrow.policy import (
    DepositState,
    DepositStatus,
    Evidence,
    Policy,
    PolicyConfigError,
    Reason,
    evaluate,
    policy_document,
)
from tests.escrow.conftest import NOW, good_evidence

ACTIVE = DepositState(DepositStatus.ACTIVE, expires_at_ms=NOW + 1000, unlock_count=0)


def test_defaults_match_the_plan() -> None:
    policy = Policy()
    assert policy.lease_ttl_ms == 600_000
    assert policy.deposit_ttl_ms == 24 * 3600 * 1000
    assert policy.peer_timeout_ms == 45_000
    assert policy.mirror_max_lag_ms == 15_000
    assert policy.mirror_freshness_ms == 60_000
    assert policy.require_registration is True


def test_environment_overrides_and_bad_values_name_the_variable() -> None:
    policy = Policy.from_env(
        {
            "ESCROW_LEASE_TTL_MS": "1000",
            "ESCROW_DEPOSIT_TTL_MS": "2000",
            "ESCROW_PEER_TIMEOUT_MS": "3",
            "ESCROW_MIRROR_MAX_LAG_MS": "4",
            "ESCROW_MIRROR_FRESHNESS_MS": "5",
            "ESCROW_REQUIRE_REGISTRATION": "false",
            "ESCROW_MAX_UNLOCKS": "6",
            "UNRELATED": "x",
        }
    )
    assert policy == Policy(
        lease_ttl_ms=1000,
        deposit_ttl_ms=2000,
        peer_timeout_ms=3,
        mirror_max_lag_ms=4,
        mirror_freshness_ms=5,
        require_registration=False,
        max_unlocks=6,
    )
    with pytest.raises(PolicyConfigError, match="ESCROW_LEASE_TTL_MS"):
        Policy.from_env({"ESCROW_LEASE_TTL_MS": "ten"})
    with pytest.raises(PolicyConfigError, match="ESCROW_REQUIRE_REGISTRATION"):
        Policy.from_env({"ESCROW_REQUIRE_REGISTRATION": "maybe"})
    with pytest.raises(PolicyConfigError, match="lease_ttl_ms"):
        Policy.from_env({"ESCROW_LEASE_TTL_MS": "0"})


def test_policy_document_publishes_the_key_and_its_fingerprint() -> None:
    doc = policy_document(Policy(), b"\x01" * 32)
    assert doc["publicKey"] == "01" * 32
    assert doc["fingerprint"] == "72cd6e8422c407fb6d098690f1130b7ded7ec2f7f5e1d30bd9d521f015363793"
    assert doc["leaseTtlMs"] == 600_000
    assert doc["version"] == 1
    assert doc["maxUnlocksPerDeposit"] == 144


def test_good_evidence_passes() -> None:
    assert evaluate(Policy(), ACTIVE, False, good_evidence(), NOW) == []


CASES = [
    ({"deposit": None}, Reason.RECORD_NOT_FOUND),
    ({"deposit": attrs.evolve(ACTIVE, status=DepositStatus.REVOKED)}, Reason.RECORD_REVOKED),
    ({"deposit": attrs.evolve(ACTIVE, expires_at_ms=NOW)}, Reason.RECORD_EXPIRED),
    ({"relay_registered": False}, Reason.REGISTRATION_FLAG_MISSING),
    ({"escrow_enabled": False}, Reason.REGISTRATION_FLAG_MISSING),
    ({"healthy_peers": 1}, Reason.PEERS_STILL_HEALTHY),
    ({"last_peer_seen_ms": NOW - 44_999}, Reason.PEER_TIMEOUT_NOT_REACHED),
    ({"mirror_lag_ms": 15_001}, Reason.MIRROR_TOO_STALE),
    # Last known current more than 60 s before the last peer contact (60 s ago).
    ({"mirror_updated_ms": NOW - 120_001}, Reason.MIRROR_WINDOW_EXPIRED),
    ({"deposit": attrs.evolve(ACTIVE, unlock_count=144)}, Reason.UNLOCK_LIMIT_REACHED),
    ({"lease_active": True}, Reason.LEASE_ALREADY_ACTIVE),
]


@pytest.mark.parametrize(("change", "reason"), CASES, ids=[c[1].value for c in CASES])
def test_each_rule_alone(change: dict[str, object], reason: Reason) -> None:
    change = dict(change)
    deposit = change.pop("deposit", ACTIVE)
    lease_active = bool(change.pop("lease_active", False))
    evidence = attrs.evolve(good_evidence(), **change)  # type: ignore[arg-type]
    result = evaluate(Policy(), deposit, lease_active, evidence, NOW)  # type: ignore[arg-type]
    assert result == [reason]


def test_boundaries_pass() -> None:
    evidence = attrs.evolve(
        good_evidence(),
        last_peer_seen_ms=NOW - 45_000,
        mirror_lag_ms=15_000,
        mirror_updated_ms=NOW - 105_000,
    )
    assert evaluate(Policy(), ACTIVE, False, evidence, NOW) == []


def test_every_failing_reason_is_reported_in_a_stable_order() -> None:
    deposit = DepositState(DepositStatus.REVOKED, expires_at_ms=NOW, unlock_count=500)
    bad = Evidence(
        relay_registered=True,
        escrow_enabled=False,
        healthy_peers=2,
        last_peer_seen_ms=NOW,
        mirror_lag_ms=99_999,
        mirror_updated_ms=0,
    )
    assert evaluate(Policy(), deposit, True, bad, NOW) == list(Reason)[1:]
    assert evaluate(Policy(), None, True, bad, NOW) == [
        Reason.RECORD_NOT_FOUND,
        Reason.REGISTRATION_FLAG_MISSING,
        Reason.PEERS_STILL_HEALTHY,
        Reason.PEER_TIMEOUT_NOT_REACHED,
        Reason.MIRROR_TOO_STALE,
        Reason.MIRROR_WINDOW_EXPIRED,
        Reason.LEASE_ALREADY_ACTIVE,
    ]


def test_missing_evidence_fails_closed() -> None:
    assert evaluate(Policy(), ACTIVE, False, Evidence(), NOW) == [
        Reason.REGISTRATION_FLAG_MISSING,
        Reason.PEERS_STILL_HEALTHY,
        Reason.PEER_TIMEOUT_NOT_REACHED,
        Reason.MIRROR_TOO_STALE,
        Reason.MIRROR_WINDOW_EXPIRED,
    ]


def test_registration_rule_can_be_switched_off() -> None:
    evidence = attrs.evolve(good_evidence(), relay_registered=None, escrow_enabled=None)
    assert evaluate(Policy(require_registration=False), ACTIVE, False, evidence, NOW) == []


def test_evidence_is_validated() -> None:
    with pytest.raises(ValueError, match="healthy_peers"):
        Evidence(healthy_peers=-1)
    with pytest.raises(ValueError, match="relay_registered"):
        Evidence(relay_registered=1)  # type: ignore[arg-type]


def test_mirror_freshness_is_judged_against_the_last_peer_contact() -> None:
    """Workers gone for ten minutes: the mirror, current until shortly before they left, still
    qualifies — a lease is wanted exactly when no worker has updated it for a while."""
    evidence = attrs.evolve(
        good_evidence(), last_peer_seen_ms=NOW - 600_000, mirror_updated_ms=NOW - 630_000
    )
    assert evaluate(Policy(), ACTIVE, False, evidence, NOW) == []
    missing_peer = attrs.evolve(evidence, last_peer_seen_ms=None)
    assert Reason.MIRROR_WINDOW_EXPIRED in evaluate(Policy(), ACTIVE, False, missing_peer, NOW)
