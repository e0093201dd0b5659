"""The escrow's unlock policy: its settings, the evidence it judges, and the judgement.

Pure code: no I/O and no clock (every time is Unix milliseconds passed in by the caller).

Environment (all optional; durations in milliseconds):

==============================  ======================================================  =========
``ESCROW_LEASE_TTL_MS``         how long an issued lease lasts                          600000
``ESCROW_DEPOSIT_TTL_MS``       how long a deposit stays usable after it is made        86400000
``ESCROW_PEER_TIMEOUT_MS``      how long no worker may have been seen before unlocking  45000
``ESCROW_MIRROR_MAX_LAG_MS``    the most the gateway's mirror may lag behind            15000
``ESCROW_MIRROR_FRESHNESS_MS``  the mirror was current this close to the last peer      60000
``ESCROW_REQUIRE_REGISTRATION`` relay must be registered with its escrow flag (bool)    true
``ESCROW_MAX_UNLOCKS``          leases that one deposit may yield                       144
==============================  ======================================================  =========

The mirror rules compare the mirror with the relay's workers as they were last seen, not with
the clock: a lease is wanted precisely when workers have been gone a while, so "updated in the
last minute" could never hold by then. What matters is that the mirror holds what the workers
had: it lags at most ``mirror_max_lag_ms`` (``mirror-too-stale``), and it was last known current
(caught up with what its workers announced) at most ``mirror_freshness_ms`` before the last
peer contact (``mirror-window-expired``).

The default of 144 unlocks is what keeping a lease for a whole deposit TTL takes (24 h / 10 min);
a worker that comes back rotates to a fresh deposit anyway.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import attrs

from hypertuna.escrow.keys import fingerprint

__all__ = [
    "ENV_NAMES",
    "POLICY_VERSION",
    "DepositState",
    "DepositStatus",
    "Evidence",
    "Policy",
    "PolicyConfigError",
    "Reason",
    "evaluate",
    "policy_document",
]

POLICY_VERSION: Final = 1


class PolicyConfigError(ValueError):
    """An ``ESCROW_*`` policy variable has a value that cannot be used."""


class Reason(enum.Enum):
    """Why an unlock is refused; the value is the wire code. Declaration order is the order in
    which :func:`evaluate` reports reasons."""

    RECORD_NOT_FOUND = "record-not-found"
    RECORD_REVOKED = "record-revoked"
    RECORD_EXPIRED = "record-expired"
    REGISTRATION_FLAG_MISSING = "registration-flag-missing"
    PEERS_STILL_HEALTHY = "peers-still-healthy"
    PEER_TIMEOUT_NOT_REACHED = "peer-timeout-not-reached"
    MIRROR_TOO_STALE = "mirror-too-stale"
    MIRROR_WINDOW_EXPIRED = "mirror-window-expired"
    UNLOCK_LIMIT_REACHED = "unlock-limit-reached"
    LEASE_ALREADY_ACTIVE = "lease-already-active"


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value <= 0:
        raise PolicyConfigError(f"{attribute.name} must be a positive integer, not {value!r}")


def _non_negative(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value < 0:
        raise PolicyConfigError(f"{attribute.name} must be a non-negative integer, not {value!r}")


@attrs.frozen
class Policy:
    """The unlock policy (see the module docstring for the meaning and defaults)."""

    lease_ttl_ms: int = attrs.field(default=600_000, validator=_positive)
    deposit_ttl_ms: int = attrs.field(default=86_400_000, validator=_positive)
    peer_timeout_ms: int = attrs.field(default=45_000, validator=_non_negative)
    mirror_max_lag_ms: int = attrs.field(default=15_000, validator=_non_negative)
    mirror_freshness_ms: int = attrs.field(default=60_000, validator=_non_negative)
    require_registration: bool = True
    max_unlocks: int = attrs.field(default=144, validator=_positive)
    version: int = POLICY_VERSION

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Policy:
        """The defaults overridden by the ``ESCROW_*`` variables present in ``env``; raises
        :class:`PolicyConfigError` naming the variable on a bad value."""
        changes: dict[str, Any] = {}
        for field, name in ENV_NAMES.items():
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            text = raw.strip()
            if field == "require_registration":
                lowered = text.lower()
                if lowered in ("1", "true", "yes", "on"):
                    changes[field] = True
                elif lowered in ("0", "false", "no", "off"):
                    changes[field] = False
                else:
                    raise PolicyConfigError(f"{name} must be true or false, not {raw!r}")
                continue
            try:
                changes[field] = int(text, 10)
            except ValueError:
                raise PolicyConfigError(f"{name} must be an integer, not {raw!r}") from None
        try:
            return attrs.evolve(cls(), **changes)
        except PolicyConfigError as exc:
            raise PolicyConfigError(f"bad escrow policy from the environment: {exc}") from None


#: Policy field → environment variable.
ENV_NAMES: Final[Mapping[str, str]] = {
    "lease_ttl_ms": "ESCROW_LEASE_TTL_MS",
    "deposit_ttl_ms": "ESCROW_DEPOSIT_TTL_MS",
    "peer_timeout_ms": "ESCROW_PEER_TIMEOUT_MS",
    "mirror_max_lag_ms": "ESCROW_MIRROR_MAX_LAG_MS",
    "mirror_freshness_ms": "ESCROW_MIRROR_FRESHNESS_MS",
    "require_registration": "ESCROW_REQUIRE_REGISTRATION",
    "max_unlocks": "ESCROW_MAX_UNLOCKS",
}


def policy_document(policy: Policy, escrow_public_key: bytes) -> dict[str, object]:
    """The JSON body of ``GET /api/escrow/policy``: the policy, the escrow's X25519 public key
    (hex) and its fingerprint, which clients pin."""
    return {
        "version": policy.version,
        "leaseTtlMs": policy.lease_ttl_ms,
        "depositTtlMs": policy.deposit_ttl_ms,
        "peerTimeoutMs": policy.peer_timeout_ms,
        "mirrorMaxLagMs": policy.mirror_max_lag_ms,
        "mirrorFreshnessMs": policy.mirror_freshness_ms,
        "requireRegistration": policy.require_registration,
        "maxUnlocksPerDeposit": policy.max_unlocks,
        "publicKey": escrow_public_key.hex(),
        "fingerprint": fingerprint(escrow_public_key),
    }


def _optional_int(_instance: object, attribute: attrs.Attribute[int | None], value: object) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"{attribute.name} must be a non-negative integer or None")


def _optional_bool(
    _instance: object, attribute: attrs.Attribute[bool | None], value: object
) -> None:
    if value is not None and type(value) is not bool:
        raise ValueError(f"{attribute.name} must be a bool or None")


@attrs.frozen
class Evidence:
    """What the gateway observed about a relay. ``None`` means "not known", and every rule that
    needs an unknown value fails (fail closed). Times are Unix milliseconds.

    In the single binary this is gathered by the gateway from its own worker and mirror state;
    it is never taken from an HTTP caller.
    """

    relay_registered: bool | None = attrs.field(default=None, validator=_optional_bool)
    escrow_enabled: bool | None = attrs.field(default=None, validator=_optional_bool)
    healthy_peers: int | None = attrs.field(default=None, validator=_optional_int)
    last_peer_seen_ms: int | None = attrs.field(default=None, validator=_optional_int)
    #: How far the relay's mirrors are behind what their workers announced.
    mirror_lag_ms: int | None = attrs.field(default=None, validator=_optional_int)
    #: When the relay's mirrors were last known current (caught up with their workers).
    mirror_updated_ms: int | None = attrs.field(default=None, validator=_optional_int)

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


class DepositStatus(enum.Enum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


@attrs.frozen
class DepositState:
    """The facts about a relay's current deposit that the policy judges."""

    status: DepositStatus
    expires_at_ms: int
    unlock_count: int


def evaluate(
    policy: Policy,
    deposit: DepositState | None,
    lease_active: bool,
    evidence: Evidence,
    now_ms: int,
) -> list[Reason]:
    """Every rule of ``policy`` that refuses an unlock now, in :class:`Reason` order; an empty
    list means the unlock is allowed. ``deposit`` is the relay's latest deposit (None if it has
    none) and ``lease_active`` whether a lease for the relay is active and unexpired."""
    reasons: set[Reason] = set()
    if deposit is None:
        reasons.add(Reason.RECORD_NOT_FOUND)
    else:
        if deposit.status is not DepositStatus.ACTIVE:
            reasons.add(Reason.RECORD_REVOKED)
        if now_ms >= deposit.expires_at_ms:
            reasons.add(Reason.RECORD_EXPIRED)
        if deposit.unlock_count >= policy.max_unlocks:
            reasons.add(Reason.UNLOCK_LIMIT_REACHED)
    if policy.require_registration and not (
        evidence.relay_registered is True and evidence.escrow_enabled is True
    ):
        reasons.add(Reason.REGISTRATION_FLAG_MISSING)
    if evidence.healthy_peers is None or evidence.healthy_peers > 0:
        reasons.add(Reason.PEERS_STILL_HEALTHY)
    if (
        evidence.last_peer_seen_ms is None
        or now_ms - evidence.last_peer_seen_ms < policy.peer_timeout_ms
    ):
        reasons.add(Reason.PEER_TIMEOUT_NOT_REACHED)
    if evidence.mirror_lag_ms is None or evidence.mirror_lag_ms > policy.mirror_max_lag_ms:
        reasons.add(Reason.MIRROR_TOO_STALE)
    if (
        evidence.mirror_updated_ms is None
        or evidence.last_peer_seen_ms is None
        or evidence.last_peer_seen_ms - evidence.mirror_updated_ms > policy.mirror_freshness_ms
    ):
        reasons.add(Reason.MIRROR_WINDOW_EXPIRED)
    if lease_active:
        reasons.add(Reason.LEASE_ALREADY_ACTIVE)
    return [reason for reason in Reason if reason in reasons]
