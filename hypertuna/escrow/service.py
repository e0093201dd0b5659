"""The escrow's domain API: deposit, unlock, revoke, release, expiry, listing, audit.

Every state-changing call is one database transaction (run in a worker thread by the
:class:`~hypertuna.escrow.store.EscrowDatabase`) that also appends the audit entry recording it,
so a change and its audit entry commit or vanish together. Write transactions are serialized by
the database, so lease issuance for a relay is one-at-a-time even across processes.

Expected outcomes are values (:class:`DepositRefused`, :class:`UnlockRejected`,
:class:`RevokeRefused`), which the HTTP edge maps to status codes (:data:`HTTP_STATUS`); failures
(a lost database) are exceptions. Requests are frozen attrs classes validated when built, so the
edge turns a :class:`ValueError` while building one into a 400. Wall-clock times (Unix
milliseconds) are passed in by the caller.

Signatures on HTTP requests are the edge's business: :class:`DepositRequest.owner_key` is the
key that the edge verified the request's Ed25519 signature with.

Logs carry ids, digests and reason codes only — never secrets, packages or tokens.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

from hypertuna.escrow import store
from hypertuna.escrow.audit import (
    AuditAction,
    Checkpoint,
    VerifyResult,
    canonical_json,
    chain_entry,
    sign_checkpoint,
    verify_chain,
)
from hypertuna.escrow.keys import AuditKey, EscrowKey
from hypertuna.escrow.package import (
    SEALED_DEPOSIT_BYTES,
    DepositPackage,
    LeaseBinding,
    PackageError,
    open_deposit,
    seal_lease,
)
from hypertuna.escrow.policy import (
    DepositState,
    DepositStatus,
    Evidence,
    Policy,
    Reason,
    evaluate,
    policy_document,
)
from hypertuna.escrow.store import (
    DEFAULT_SQLITE_PATH,
    DepositRecord,
    EscrowDatabase,
    LeaseRecord,
    LeaseStatus,
    Runner,
    open_escrow_database,
)
from hypertuna.storage._event_sql import Statement

__all__ = [
    "HTTP_STATUS",
    "Actor",
    "ActorKind",
    "DepositReceipt",
    "DepositRefusal",
    "DepositRefused",
    "DepositRequest",
    "EscrowHealth",
    "EscrowService",
    "EscrowStatistics",
    "LeaseGrant",
    "ReleaseOutcome",
    "Revocation",
    "RevokeRefusal",
    "RevokeRefused",
    "UnlockRejected",
    "UnlockRequest",
    "open_escrow_service",
]

logger = logging.getLogger(__name__)

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ID: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_MAX_I64: Final = 2**63 - 1
#: How far in the future a package's creation time may be (clock skew between hosts).
PACKAGE_FUTURE_SKEW_MS: Final = 5 * 60 * 1000
#: After this long a pending idempotency claim is taken to belong to a crashed request.
IDEMPOTENCY_STALE_MS: Final = 60 * 1000
#: A checkpoint is signed after every this many audit entries (and on demand).
DEFAULT_CHECKPOINT_EVERY: Final = 100


def _hex64(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise ValueError(f"{attribute.name} must be 64 lowercase hex characters")


def _ident(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise ValueError(f"{attribute.name} must be 1-128 characters of [A-Za-z0-9_.:@-]")


def _optional_ident(
    _instance: object, attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is not None and (not isinstance(value, str) or _ID.fullmatch(value) is None):
        raise ValueError(f"{attribute.name} must be 1-128 characters of [A-Za-z0-9_.:@-]")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- requests and outcomes -------------------------------------------------------------------


@attrs.frozen(repr=False)
class DepositRequest:
    """``POST /api/escrow``: a sealed package for ``relay_key`` from the signer ``owner_key``."""

    owner_key: str = attrs.field(validator=_hex64)
    relay_key: str = attrs.field(validator=_hex64)
    package: bytes = attrs.field()
    idempotency_key: str | None = attrs.field(default=None, validator=_optional_ident)

    @package.validator
    def _check_package(self, _attribute: object, value: bytes) -> None:
        if not isinstance(value, bytes) or not 0 < len(value) <= 4 * SEALED_DEPOSIT_BYTES:
            raise ValueError("package must be a non-empty sealed box of sane size")

    def digest(self) -> str:
        """What an idempotency key is bound to: owner, relay and the exact package."""
        return _digest(canonical_json([self.owner_key, self.relay_key, _digest(self.package)]))

    def __repr__(self) -> str:
        return (
            f"DepositRequest(owner_key={self.owner_key}, relay_key={self.relay_key},"
            f" package_digest={_digest(self.package)})"
        )


class DepositRefusal(enum.Enum):
    """Why a deposit is refused (value = wire reason code)."""

    PACKAGE_UNREADABLE = "package-unreadable"
    PACKAGE_MALFORMED = "package-malformed"
    PACKAGE_RELAY_MISMATCH = "package-relay-mismatch"
    PACKAGE_OWNER_MISMATCH = "package-owner-mismatch"
    PACKAGE_SECRET_MISMATCH = "package-secret-mismatch"
    PACKAGE_EXPIRED = "package-expired"
    PACKAGE_IN_FUTURE = "package-in-future"
    OTHER_OWNER = "relay-owned-by-another-key"
    ROTATION_NOT_NEWER = "rotation-not-newer"
    IDEMPOTENCY_MISMATCH = "idempotency-key-reused"
    IDEMPOTENCY_IN_FLIGHT = "idempotency-key-in-flight"


@attrs.frozen
class DepositRefused:
    reason: DepositRefusal
    message: str


@attrs.frozen
class DepositReceipt:
    """An accepted deposit. ``replayed`` is True when this is the stored answer to an earlier
    request with the same idempotency key; ``ended_lease_ids`` are leases of the superseded
    deposit that the rotation ended (publish them like revocations)."""

    deposit_id: str
    relay_key: str
    owner_key: str
    writer_public_key: str
    rotation: int
    deposited_at_ms: int
    expires_at_ms: int
    superseded_deposit_id: str | None
    ended_lease_ids: tuple[str, ...]
    replayed: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "depositId": self.deposit_id,
            "relayKey": self.relay_key,
            "ownerKey": self.owner_key,
            "writerPublicKey": self.writer_public_key,
            "rotation": self.rotation,
            "depositedAt": self.deposited_at_ms,
            "expiresAt": self.expires_at_ms,
            "supersededDepositId": self.superseded_deposit_id,
            "endedLeaseIds": list(self.ended_lease_ids),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object], *, replayed: bool) -> DepositReceipt:
        ended = data["endedLeaseIds"]
        assert isinstance(ended, list)
        return cls(
            deposit_id=str(data["depositId"]),
            relay_key=str(data["relayKey"]),
            owner_key=str(data["ownerKey"]),
            writer_public_key=str(data["writerPublicKey"]),
            rotation=int(str(data["rotation"])),
            deposited_at_ms=int(str(data["depositedAt"])),
            expires_at_ms=int(str(data["expiresAt"])),
            superseded_deposit_id=(
                None if data["supersededDepositId"] is None else str(data["supersededDepositId"])
            ),
            ended_lease_ids=tuple(str(x) for x in ended),
            replayed=replayed,
        )


@attrs.frozen(repr=False)
class UnlockRequest:
    """``POST /api/escrow/unlock``: who wants a lease for which relay, and the fresh X25519
    session public key its secret is sealed to."""

    relay_key: str = attrs.field(validator=_hex64)
    session_public_key: bytes = attrs.field()
    requester_id: str = attrs.field(validator=_ident)

    @session_public_key.validator
    def _check_session(self, _attribute: object, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValueError("session_public_key must be 32 bytes")
        if value == bytes(32):
            raise ValueError("session_public_key must not be all zeros")

    def __repr__(self) -> str:
        return (
            f"UnlockRequest(relay_key={self.relay_key}, requester_id={self.requester_id},"
            f" session_key_digest={_digest(self.session_public_key)})"
        )


@attrs.frozen(repr=False)
class LeaseGrant:
    """An issued lease. ``sealed_secret`` is the lease package (sealed to the session key);
    only :func:`hypertuna.escrow.package.open_lease` with the session private key opens it."""

    lease: LeaseRecord
    binding: LeaseBinding
    sealed_secret: bytes

    def __repr__(self) -> str:
        return f"LeaseGrant(lease={self.lease!r})"


@attrs.frozen
class UnlockRejected:
    """The policy refused the unlock; every failing rule, in :class:`Reason` order."""

    relay_key: str
    reasons: tuple[Reason, ...]


class ActorKind(enum.Enum):
    OWNER = "owner"  # the relay's owner key (a verified Ed25519 signer)
    OPERATOR = "operator"  # an authenticated operator of the escrow or gateway
    GATEWAY = "gateway"  # the gateway itself (lease holder releasing its lease)
    SYSTEM = "system"  # the escrow's own housekeeping


@attrs.frozen
class Actor:
    """Who asks for a change, as recorded in the audit log."""

    kind: ActorKind
    id: str = attrs.field(validator=_ident)

    def audit_name(self) -> str:
        return f"{self.kind.value}:{self.id}"


class RevokeRefusal(enum.Enum):
    NOT_FOUND = "record-not-found"
    NOT_OWNER = "not-owner"


@attrs.frozen
class RevokeRefused:
    reason: RevokeRefusal
    message: str


@attrs.frozen
class Revocation:
    """What a revoke ended: publish it at once to whoever holds a lease of ``relay_key``.
    ``already_revoked`` means nothing changed (revoking twice is idempotent)."""

    relay_key: str
    deposit_ids: tuple[str, ...]
    lease_ids: tuple[str, ...]
    at_ms: int
    already_revoked: bool


@attrs.frozen
class ReleaseOutcome:
    """The lease after a release; ``released`` is False when it had already ended."""

    lease: LeaseRecord
    released: bool


@attrs.frozen
class EscrowHealth:
    ok: bool
    backend: str
    fingerprint: str
    deposits_active: int
    leases_active: int
    audit_entries: int
    last_checkpoint_seq: int | None
    audit_chain_valid: bool | None  # the last verification's result, None before the first


@attrs.frozen
class EscrowStatistics:
    """Counters since start, for metrics (``escrow_*``)."""

    deposits: int
    unlocks_issued: int
    unlocks_rejected: int
    rejections_by_reason: Mapping[str, int]
    revocations: int
    leases_ended: int
    audit_chain_valid: bool | None


#: Suggested HTTP status of each refusal code (the edge decides).
HTTP_STATUS: Final[Mapping[str, int]] = {
    **{r.value: 412 for r in Reason},
    DepositRefusal.PACKAGE_UNREADABLE.value: 400,
    DepositRefusal.PACKAGE_MALFORMED.value: 400,
    DepositRefusal.PACKAGE_RELAY_MISMATCH.value: 400,
    DepositRefusal.PACKAGE_OWNER_MISMATCH.value: 400,
    DepositRefusal.PACKAGE_SECRET_MISMATCH.value: 400,
    DepositRefusal.PACKAGE_EXPIRED.value: 400,
    DepositRefusal.PACKAGE_IN_FUTURE.value: 400,
    DepositRefusal.OTHER_OWNER.value: 403,
    DepositRefusal.ROTATION_NOT_NEWER.value: 409,
    DepositRefusal.IDEMPOTENCY_MISMATCH.value: 422,
    DepositRefusal.IDEMPOTENCY_IN_FLIGHT.value: 409,
    RevokeRefusal.NOT_FOUND.value: 404,
    RevokeRefusal.NOT_OWNER.value: 403,
}


class _Replay(Exception):
    """Internal: the idempotency claim found a stored answer or a conflict."""

    def __init__(self, outcome: DepositReceipt | DepositRefused) -> None:
        self.outcome = outcome


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# --- the service -----------------------------------------------------------------------------


class EscrowService:
    """The escrow core; build it with :func:`open_escrow_service` (or directly on an open
    database). Safe to call from many tasks at once."""

    def __init__(
        self,
        db: EscrowDatabase,
        escrow_key: EscrowKey,
        audit_key: AuditKey,
        policy: Policy,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        if checkpoint_every <= 0:
            raise ValueError("checkpoint_every must be positive")
        self.db = db
        self.escrow_key = escrow_key
        self.audit_key = audit_key
        self.policy = policy
        self.checkpoint_every = checkpoint_every
        self._in_flight: set[str] = set()
        self._audit_chain_valid: bool | None = None
        self._deposits = 0
        self._issued = 0
        self._rejected = 0
        self._rejections: dict[str, int] = {}
        self._revocations = 0
        self._leases_ended = 0

    # --- audit inside a transaction ---

    def _audit(
        self,
        db: Runner,
        now_ms: int,
        action: AuditAction,
        actor: str,
        *,
        relay_key: str | None = None,
        deposit_id: str | None = None,
        lease_id: str | None = None,
        details: Mapping[str, object] | None = None,
        with_statements: Sequence[Statement] = (),
    ) -> None:
        """Append an audit entry, together with ``with_statements`` (the change it records;
        see :meth:`~hypertuna.storage._event_sql.SqlRunner.execute_together`)."""
        entry = chain_entry(
            store.last_audit(db),
            at_ms=now_ms,
            action=action,
            actor=actor,
            relay_key=relay_key,
            deposit_id=deposit_id,
            lease_id=lease_id,
            details=details,
        )
        statements = [
            *with_statements,
            store.insert_audit(db, entry, canonical_json(entry.details).decode()),
        ]
        if entry.seq % self.checkpoint_every == 0:
            statements.append(
                store.insert_checkpoint(sign_checkpoint(self.audit_key, entry, now_ms))
            )
        db.execute_together(statements)

    def _end_lease(
        self, db: Runner, lease: LeaseRecord, status: LeaseStatus, now_ms: int, reason: str
    ) -> LeaseRecord:
        return store.end_lease(db, lease, status, now_ms, reason)

    def _expire_due(
        self,
        db: Runner,
        now_ms: int,
        relay_key: str | None,
        due: list[LeaseRecord] | None = None,
    ) -> list[LeaseRecord]:
        """Expire (and audit) the due active leases: ``due`` if given (already read), else those
        of ``relay_key`` (or of every relay)."""
        ended = []
        for lease in store.due_leases(db, now_ms, relay_key) if due is None else due:
            ended.append(self._end_lease(db, lease, LeaseStatus.EXPIRED, now_ms, "expired"))
            self._audit(
                db,
                now_ms,
                AuditAction.LEASE_EXPIRED,
                ActorKind.SYSTEM.value,
                relay_key=lease.relay_key,
                deposit_id=lease.deposit_id,
                lease_id=lease.lease_id,
                details={"leaseVersion": lease.lease_version, "expiresAt": lease.expires_at_ms},
            )
        return ended

    # --- policy ---

    def policy_document(self) -> dict[str, object]:
        """The body of ``GET /api/escrow/policy``."""
        return policy_document(self.policy, self.escrow_key.public_key)

    # --- deposit ---

    async def deposit(
        self, request: DepositRequest, *, now_ms: int
    ) -> DepositReceipt | DepositRefused:
        """Validate and store a deposit (superseding the relay's active one from the same
        owner). Refusals change nothing and write no audit entry. With an idempotency key, a
        retry gets the original receipt (``replayed``), the same key with another request gets
        ``idempotency-key-reused`` and a duplicate still in progress ``idempotency-key-in-flight``.
        """
        try:
            package = open_deposit(
                self.escrow_key,
                request.package,
                relay_key=request.relay_key,
                owner_key=request.owner_key,
            )
        except PackageError as exc:
            return self._refused(request, DepositRefusal(exc.reason.value), str(exc))
        if package.created_at_ms > _MAX_I64 or package.rotation > _MAX_I64:
            return self._refused(
                request, DepositRefusal.PACKAGE_MALFORMED, "package counters out of range"
            )
        if package.created_at_ms + self.policy.deposit_ttl_ms <= now_ms:
            return self._refused(
                request, DepositRefusal.PACKAGE_EXPIRED, "the package is older than the deposit TTL"
            )
        if package.created_at_ms > now_ms + PACKAGE_FUTURE_SKEW_MS:
            return self._refused(
                request, DepositRefusal.PACKAGE_IN_FUTURE, "the package is dated in the future"
            )
        key = request.idempotency_key
        if key is None:
            return await self.db.write(lambda db: self._store_deposit(db, request, package, now_ms))
        if key in self._in_flight:
            return self._refused(
                request, DepositRefusal.IDEMPOTENCY_IN_FLIGHT, "a request with this key is running"
            )
        self._in_flight.add(key)
        try:
            digest = request.digest()
            try:
                await self.db.write(lambda db: self._claim(db, key, digest, now_ms))
            except _Replay as replay:
                return replay.outcome
            try:
                return await self.db.write(
                    lambda db: self._store_deposit(db, request, package, now_ms)
                )
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(store.EscrowStorageError):
                    await self.db.write(lambda db: store.drop_idempotency_claim(db, key, digest))
                raise
        finally:
            self._in_flight.discard(key)

    def _refused(
        self, request: DepositRequest, reason: DepositRefusal, message: str
    ) -> DepositRefused:
        logger.info(
            "escrow deposit refused: relay=%s owner=%s reason=%s",
            request.relay_key,
            request.owner_key,
            reason.value,
        )
        return DepositRefused(reason, message)

    def _claim(self, db: Runner, key: str, digest: str, now_ms: int) -> None:
        row = store.get_idempotency(db, key)
        if row is not None:
            if row.request_digest != digest:
                raise _Replay(
                    DepositRefused(
                        DepositRefusal.IDEMPOTENCY_MISMATCH,
                        "this Idempotency-Key was used with another request",
                    )
                )
            if row.done and row.response is not None:
                raise _Replay(DepositReceipt.from_json(json.loads(row.response), replayed=True))
            if now_ms - row.claimed_at_ms < IDEMPOTENCY_STALE_MS:
                raise _Replay(
                    DepositRefused(
                        DepositRefusal.IDEMPOTENCY_IN_FLIGHT,
                        "a request with this Idempotency-Key is still in progress",
                    )
                )
        store.claim_idempotency(db, key, digest, now_ms)

    def _store_deposit(
        self, db: Runner, request: DepositRequest, package: DepositPackage, now_ms: int
    ) -> DepositReceipt | DepositRefused:
        key = request.idempotency_key

        def refuse(reason: DepositRefusal, message: str) -> DepositRefused:
            if key is not None:
                store.drop_idempotency_claim(db, key, request.digest())
            return self._refused(request, reason, message)

        owner = store.relay_owner(db, request.relay_key)
        if owner is not None and owner[0] != request.owner_key:
            return refuse(
                DepositRefusal.OTHER_OWNER, "this relay's deposits belong to another owner key"
            )
        highest = store.max_rotation(db, request.relay_key)
        if highest is not None and package.rotation <= highest:
            return refuse(
                DepositRefusal.ROTATION_NOT_NEWER,
                f"rotation {package.rotation} is not newer than {highest}",
            )
        if owner is None:
            store.insert_relay(db, request.relay_key, request.owner_key, now_ms)
        actor = f"{ActorKind.OWNER.value}:{request.owner_key}"
        deposit_id = _new_id("dep")
        previous = store.current_deposit(db, request.relay_key)
        superseded: str | None = None
        ended: list[str] = []
        if previous is not None and previous.status is DepositStatus.ACTIVE:
            superseded = previous.deposit_id
            for lease in store.active_leases_of_deposit(db, previous.deposit_id):
                self._end_lease(db, lease, LeaseStatus.SUPERSEDED, now_ms, "deposit superseded")
                ended.append(lease.lease_id)
            store.end_deposit(db, previous.deposit_id, DepositStatus.SUPERSEDED, now_ms, deposit_id)
            self._audit(
                db,
                now_ms,
                AuditAction.SUPERSEDE,
                actor,
                relay_key=request.relay_key,
                deposit_id=previous.deposit_id,
                details={
                    "supersededBy": deposit_id,
                    "rotation": previous.rotation,
                    "endedLeaseIds": ended,
                },
            )
        record = DepositRecord(
            deposit_id=deposit_id,
            relay_key=request.relay_key,
            owner_key=request.owner_key,
            writer_public_key=package.writer_public_key,
            package_digest=_digest(request.package),
            package_created_at_ms=package.created_at_ms,
            rotation=package.rotation,
            deposited_at_ms=now_ms,
            expires_at_ms=now_ms + self.policy.deposit_ttl_ms,
            status=DepositStatus.ACTIVE,
            unlock_count=0,
            ended_at_ms=None,
            superseded_by=None,
        )
        store.insert_deposit(db, record, request.package)
        self._audit(
            db,
            now_ms,
            AuditAction.DEPOSIT,
            actor,
            relay_key=request.relay_key,
            deposit_id=deposit_id,
            details={
                "writerPublicKey": package.writer_public_key,
                "packageDigest": record.package_digest,
                "rotation": package.rotation,
                "expiresAt": record.expires_at_ms,
                "supersedes": superseded,
            },
        )
        receipt = DepositReceipt(
            deposit_id=deposit_id,
            relay_key=request.relay_key,
            owner_key=request.owner_key,
            writer_public_key=package.writer_public_key,
            rotation=package.rotation,
            deposited_at_ms=now_ms,
            expires_at_ms=record.expires_at_ms,
            superseded_deposit_id=superseded,
            ended_lease_ids=tuple(ended),
        )
        if key is not None:
            store.finish_idempotency(db, key, json.dumps(receipt.to_json()))
        self._deposits += 1
        logger.info(
            "escrow deposit %s: relay=%s rotation=%d supersedes=%s",
            deposit_id,
            request.relay_key,
            package.rotation,
            superseded,
        )
        return receipt

    # --- unlock ---

    async def unlock(
        self, request: UnlockRequest, evidence: Evidence, *, now_ms: int
    ) -> LeaseGrant | UnlockRejected:
        """Judge an unlock by every policy rule on ``evidence`` and either issue a lease (its
        secret sealed to the session key, the lease version of the relay increased durably) or
        return every failing reason. Both outcomes are audited; leases of the relay that have
        expired are expired (and audited) first."""
        outcome = await self.db.write(lambda db: self._unlock(db, request, evidence, now_ms))
        if isinstance(outcome, UnlockRejected):
            self._rejected += 1
            for reason in outcome.reasons:
                self._rejections[reason.value] = self._rejections.get(reason.value, 0) + 1
            logger.info(
                "escrow unlock rejected: relay=%s requester=%s reasons=%s",
                request.relay_key,
                request.requester_id,
                ",".join(r.value for r in outcome.reasons),
            )
        else:
            self._issued += 1
            logger.info(
                "escrow lease %s issued: relay=%s version=%d expires=%d sealed=%s",
                outcome.lease.lease_id,
                outcome.lease.relay_key,
                outcome.lease.lease_version,
                outcome.lease.expires_at_ms,
                outcome.lease.sealed_digest,
            )
        return outcome

    def _unlock(
        self, db: Runner, request: UnlockRequest, evidence: Evidence, now_ms: int
    ) -> LeaseGrant | UnlockRejected:
        relay_key = request.relay_key
        actor = f"requester:{request.requester_id}"
        # One query for everything judged; the due leases (if any) are expired first.
        current = store.unlock_state(db, relay_key, now_ms)
        if current is not None and current.due_leases:
            self._expire_due(db, now_ms, relay_key)
        deposit = None if current is None else current.deposit
        active = current is not None and current.live_leases > 0
        state = (
            None
            if deposit is None
            else DepositState(deposit.status, deposit.expires_at_ms, deposit.unlock_count)
        )
        reasons = evaluate(self.policy, state, active, evidence, now_ms)
        if reasons:
            self._audit(
                db,
                now_ms,
                AuditAction.UNLOCK_REJECTED,
                actor,
                relay_key=relay_key,
                deposit_id=None if deposit is None else deposit.deposit_id,
                details={
                    "reasons": [r.value for r in reasons],
                    "evidence": evidence.to_json(),
                    "sessionKeyDigest": _digest(request.session_public_key),
                },
            )
            return UnlockRejected(relay_key, tuple(reasons))
        assert current is not None and deposit is not None
        package = current.package
        version = current.lease_version + 1
        lease_id = _new_id("lease")
        binding = LeaseBinding(
            lease_id=lease_id,
            relay_key=relay_key,
            deposit_id=deposit.deposit_id,
            lease_version=version,
            issued_at_ms=now_ms,
            # A lease never outlives the deposit it comes from.
            expires_at_ms=min(now_ms + self.policy.lease_ttl_ms, deposit.expires_at_ms),
            escrow_fingerprint=self.escrow_key.fingerprint,
            writer_public_key=deposit.writer_public_key,
        )
        sealed = seal_lease(self.escrow_key, package, binding, request.session_public_key)
        lease = LeaseRecord(
            lease_id=lease_id,
            relay_key=relay_key,
            deposit_id=deposit.deposit_id,
            lease_version=version,
            requester_id=request.requester_id,
            session_key_digest=_digest(request.session_public_key),
            sealed_digest=_digest(sealed),
            issued_at_ms=now_ms,
            expires_at_ms=binding.expires_at_ms,
            status=LeaseStatus.ACTIVE,
            ended_at_ms=None,
            end_reason=None,
        )
        # The relay, the new lease, the deposit and the audit log: distinct tables, so one
        # statement on PostgreSQL.
        self._audit(
            db,
            now_ms,
            AuditAction.UNLOCK_ISSUED,
            actor,
            relay_key=relay_key,
            deposit_id=deposit.deposit_id,
            lease_id=lease_id,
            details={
                "leaseVersion": version,
                "expiresAt": lease.expires_at_ms,
                "sealedDigest": lease.sealed_digest,
                "sessionKeyDigest": lease.session_key_digest,
                "evidence": evidence.to_json(),
            },
            with_statements=(
                store.set_lease_version(relay_key, version),
                store.insert_lease(lease),
                store.count_unlock(deposit.deposit_id),
            ),
        )
        return LeaseGrant(lease=lease, binding=binding, sealed_secret=sealed)

    # --- revoke, release, expiry ---

    async def revoke(
        self,
        *,
        actor: Actor,
        now_ms: int,
        relay_key: str | None = None,
        deposit_id: str | None = None,
    ) -> Revocation | RevokeRefused:
        """Revoke the relay's active deposit (``relay_key``) or one deposit (``deposit_id``)
        and end its active leases, synchronously. Only the relay's owner key or an operator may.
        Revoking what is already revoked returns ``already_revoked`` and changes nothing."""
        if (relay_key is None) == (deposit_id is None):
            raise ValueError("revoke takes exactly one of relay_key and deposit_id")
        if relay_key is not None and _HEX64.fullmatch(relay_key) is None:
            raise ValueError("relay_key must be 64 lowercase hex characters")
        if deposit_id is not None and _ID.fullmatch(deposit_id) is None:
            raise ValueError("deposit_id is malformed")
        if actor.kind not in (ActorKind.OWNER, ActorKind.OPERATOR):
            raise ValueError("only an owner or an operator revokes")
        outcome = await self.db.write(
            lambda db: self._revoke(db, actor, now_ms, relay_key, deposit_id)
        )
        if isinstance(outcome, Revocation) and not outcome.already_revoked:
            self._revocations += 1
            self._leases_ended += len(outcome.lease_ids)
            logger.info(
                "escrow revoked: relay=%s deposits=%s leases=%s by=%s",
                outcome.relay_key,
                ",".join(outcome.deposit_ids),
                ",".join(outcome.lease_ids),
                actor.audit_name(),
            )
        return outcome

    def _revoke(
        self,
        db: Runner,
        actor: Actor,
        now_ms: int,
        relay_key: str | None,
        deposit_id: str | None,
    ) -> Revocation | RevokeRefused:
        if deposit_id is not None:
            target = store.get_deposit(db, deposit_id)
        else:
            assert relay_key is not None
            target = store.current_deposit(db, relay_key)
        if target is None:
            return RevokeRefused(RevokeRefusal.NOT_FOUND, "no such deposit or relay")
        owner = store.relay_owner(db, target.relay_key)
        owner_key = target.owner_key if owner is None else owner[0]
        if actor.kind is ActorKind.OWNER and actor.id != owner_key:
            return RevokeRefused(RevokeRefusal.NOT_OWNER, "only the relay's owner may revoke it")
        # By relay, a relay without an active deposit is already revoked (or rotated away).
        if target.status is DepositStatus.REVOKED or (
            deposit_id is None and target.status is not DepositStatus.ACTIVE
        ):
            return Revocation(
                relay_key=target.relay_key,
                deposit_ids=(target.deposit_id,),
                lease_ids=(),
                at_ms=now_ms,
                already_revoked=True,
            )
        leases = store.active_leases_of_deposit(db, target.deposit_id)
        for lease in leases:
            self._end_lease(db, lease, LeaseStatus.REVOKED, now_ms, "deposit revoked")
        store.end_deposit(
            db, target.deposit_id, DepositStatus.REVOKED, now_ms, target.superseded_by
        )
        lease_ids = tuple(lease.lease_id for lease in leases)
        self._audit(
            db,
            now_ms,
            AuditAction.REVOKE,
            actor.audit_name(),
            relay_key=target.relay_key,
            deposit_id=target.deposit_id,
            details={
                "by": "relay" if deposit_id is None else "deposit",
                "previousStatus": target.status.value,
                "endedLeaseIds": list(lease_ids),
            },
        )
        return Revocation(
            relay_key=target.relay_key,
            deposit_ids=(target.deposit_id,),
            lease_ids=lease_ids,
            at_ms=now_ms,
            already_revoked=False,
        )

    async def release(
        self, lease_id: str, *, reason: str, actor: Actor, now_ms: int
    ) -> ReleaseOutcome | None:
        """End an active lease (workers back and resynced, or the holder is done); None if the
        lease is unknown. ``reason`` is a short code recorded in the audit log."""
        if _ID.fullmatch(lease_id) is None or _ID.fullmatch(reason) is None:
            raise ValueError("lease_id and reason must be 1-128 characters of [A-Za-z0-9_.:@-]")

        def work(db: Runner) -> ReleaseOutcome | None:
            ended = store.end_active_lease(db, lease_id, LeaseStatus.RELEASED, now_ms, reason)
            if ended is None:  # not active: unknown, or already ended
                lease = store.get_lease(db, lease_id)
                return None if lease is None else ReleaseOutcome(lease, released=False)
            lease = ended
            self._audit(
                db,
                now_ms,
                AuditAction.LEASE_RELEASED,
                actor.audit_name(),
                relay_key=lease.relay_key,
                deposit_id=lease.deposit_id,
                lease_id=lease.lease_id,
                details={"reason": reason, "leaseVersion": lease.lease_version},
            )
            return ReleaseOutcome(ended, released=True)

        outcome = await self.db.write(work)
        if outcome is not None and outcome.released:
            self._leases_ended += 1
            logger.info("escrow lease %s released: reason=%s", lease_id, reason)
        return outcome

    async def expire_leases(self, *, now_ms: int) -> list[LeaseRecord]:
        """Expire every active lease whose time has come (each audited); return them."""
        expired = await self.db.write(lambda db: self._expire_due(db, now_ms, None))
        self._leases_ended += len(expired)
        for lease in expired:
            logger.info("escrow lease %s expired: relay=%s", lease.lease_id, lease.relay_key)
        return expired

    # --- reads ---

    async def leases(
        self, *, relay_key: str | None = None, active_only: bool = False, limit: int = 100
    ) -> list[LeaseRecord]:
        """Leases, newest first: ids, relay, times, digests — never secrets."""
        if not 0 < limit <= 1000:
            raise ValueError("limit must be in 1..1000")
        return await self.db.read(
            lambda db: store.list_leases(
                db, relay_key=relay_key, active_only=active_only, limit=limit
            )
        )

    async def deposit_record(self, deposit_id: str) -> DepositRecord | None:
        return await self.db.read(lambda db: store.get_deposit(db, deposit_id))

    async def current_deposit(self, relay_key: str) -> DepositRecord | None:
        """The relay's active deposit, else its latest."""
        return await self.db.read(lambda db: store.current_deposit(db, relay_key))

    async def health(self) -> EscrowHealth:
        """Database reachability and counts (raises if the database is unreachable)."""
        deposits, leases, entries, last_checkpoint = await self.db.read(store.counts)
        return EscrowHealth(
            ok=self._audit_chain_valid is not False,
            backend=self.db.backend,
            fingerprint=self.escrow_key.fingerprint,
            deposits_active=deposits,
            leases_active=leases,
            audit_entries=entries,
            last_checkpoint_seq=last_checkpoint,
            audit_chain_valid=self._audit_chain_valid,
        )

    def statistics(self) -> EscrowStatistics:
        return EscrowStatistics(
            deposits=self._deposits,
            unlocks_issued=self._issued,
            unlocks_rejected=self._rejected,
            rejections_by_reason=dict(self._rejections),
            revocations=self._revocations,
            leases_ended=self._leases_ended,
            audit_chain_valid=self._audit_chain_valid,
        )

    # --- audit ---

    async def audit_verify(self) -> VerifyResult:
        """Recompute the whole chain and check every checkpoint against the audit key; the
        result is remembered for :meth:`health` (``escrow_audit_chain_valid``)."""
        entries, marks = await self.db.read(
            lambda db: (store.audit_entries(db), store.checkpoints(db))
        )
        result = await trio.to_thread.run_sync(
            verify_chain, entries, marks, self.audit_key.public_key
        )
        self._audit_chain_valid = result.valid
        if not result.valid:
            logger.error("escrow audit chain broken: %s", result.message)
        return result

    async def checkpoint(self, *, now_ms: int) -> Checkpoint | None:
        """Sign a checkpoint of the last entry now; None if there are no entries or the last
        one is already checkpointed."""

        def work(db: Runner) -> Checkpoint | None:
            last = store.last_audit(db)
            if last is None:
                return None
            done = store.checkpoints(db)
            if done and done[-1].seq >= last[0]:
                return None
            entry = store.get_audit_entry(db, last[0])
            assert entry is not None
            mark = sign_checkpoint(self.audit_key, entry, now_ms)
            db.execute(*store.insert_checkpoint(mark))
            return mark

        return await self.db.write(work)


@contextlib.asynccontextmanager
async def open_escrow_service(
    *,
    escrow_key: EscrowKey,
    audit_key: AuditKey,
    policy: Policy,
    database_url: str | None = None,
    sqlite_path: Path = DEFAULT_SQLITE_PATH,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> AsyncIterator[EscrowService]:
    """Open (and migrate) the escrow database — PostgreSQL at ``database_url``
    (``ESCROW_DATABASE_URL``) or SQLite at ``sqlite_path`` — and yield the service on it."""
    async with open_escrow_database(database_url, sqlite_path) as db:
        yield EscrowService(db, escrow_key, audit_key, policy, checkpoint_every=checkpoint_every)
