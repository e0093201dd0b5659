"""The escrow audit log as a hash chain with signed checkpoints (pure code).

Entry ``n`` (``seq`` counts from 1 with no gaps) has::

    hash = SHA-256(b"hypertuna-escrow-audit-v1\\n" ‖ canonical JSON of
                   {seq, at_ms, action, relay_key, deposit_id, lease_id, actor, details, prev_hash})

where ``prev_hash`` is the hash of entry ``n-1`` (64 zeros for the first) and canonical JSON is
compact with sorted keys. Changing, removing or reordering any entry breaks every hash after it.

A checkpoint signs ``b"hypertuna-escrow-audit-checkpoint-v1\\n" ‖ canonical JSON of {seq, hash,
at_ms}`` with the dedicated audit Ed25519 key, so even a rewrite that recomputes every hash is
caught by the last checkpoint it crosses — and the key that signs checkpoints is not the database.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from hypertuna.escrow.keys import AuditKey
from hypertuna.storage.cores.crypto import verify_signature

__all__ = [
    "GENESIS_HASH",
    "AuditAction",
    "AuditEntry",
    "Checkpoint",
    "VerifyResult",
    "canonical_json",
    "chain_entry",
    "sign_checkpoint",
    "verify_chain",
]

GENESIS_HASH: Final = "0" * 64
_ENTRY_DOMAIN: Final = b"hypertuna-escrow-audit-v1\n"
_CHECKPOINT_DOMAIN: Final = b"hypertuna-escrow-audit-checkpoint-v1\n"


class AuditAction(enum.Enum):
    """What an audit entry records."""

    DEPOSIT = "deposit"
    SUPERSEDE = "supersede"
    UNLOCK_ISSUED = "unlock-issued"
    UNLOCK_REJECTED = "unlock-rejected"
    REVOKE = "revoke"
    LEASE_RELEASED = "lease-released"
    LEASE_EXPIRED = "lease-expired"


def canonical_json(value: object) -> bytes:
    """Compact, sorted-key, ASCII JSON: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@attrs.frozen
class AuditEntry:
    """One audit log row. ``details`` holds ids, digests and reason codes, never secrets."""

    seq: int
    at_ms: int
    action: str
    relay_key: str | None
    deposit_id: str | None
    lease_id: str | None
    actor: str
    details: Mapping[str, object]
    prev_hash: str
    hash: str

    def computed_hash(self) -> str:
        """The hash this entry's fields and ``prev_hash`` call for."""
        return _entry_hash(
            seq=self.seq,
            at_ms=self.at_ms,
            action=self.action,
            relay_key=self.relay_key,
            deposit_id=self.deposit_id,
            lease_id=self.lease_id,
            actor=self.actor,
            details=self.details,
            prev_hash=self.prev_hash,
        )


def _entry_hash(**fields: object) -> str:
    return hashlib.sha256(_ENTRY_DOMAIN + canonical_json(fields)).hexdigest()


def chain_entry(
    previous: tuple[int, str] | None,
    *,
    at_ms: int,
    action: AuditAction,
    actor: str,
    relay_key: str | None = None,
    deposit_id: str | None = None,
    lease_id: str | None = None,
    details: Mapping[str, object] | None = None,
) -> AuditEntry:
    """The entry that follows ``previous`` (``(seq, hash)`` of the last entry, None for the
    first), with its hash computed."""
    seq, prev_hash = (1, GENESIS_HASH) if previous is None else (previous[0] + 1, previous[1])
    body = dict(details or {})
    # Round-trip through JSON so the stored (parsed) form hashes exactly as this one does.
    body = json.loads(canonical_json(body))
    digest = _entry_hash(
        seq=seq,
        at_ms=at_ms,
        action=action.value,
        relay_key=relay_key,
        deposit_id=deposit_id,
        lease_id=lease_id,
        actor=actor,
        details=body,
        prev_hash=prev_hash,
    )
    return AuditEntry(
        seq=seq,
        at_ms=at_ms,
        action=action.value,
        relay_key=relay_key,
        deposit_id=deposit_id,
        lease_id=lease_id,
        actor=actor,
        details=body,
        prev_hash=prev_hash,
        hash=digest,
    )


@attrs.frozen
class Checkpoint:
    """A signed statement "entry ``seq`` has hash ``hash``", by the audit key ``public_key``."""

    seq: int
    hash: str
    at_ms: int
    public_key: str
    signature: str

    def signed_message(self) -> bytes:
        return _checkpoint_message(self.seq, self.hash, self.at_ms)


def _checkpoint_message(seq: int, entry_hash: str, at_ms: int) -> bytes:
    return _CHECKPOINT_DOMAIN + canonical_json({"at_ms": at_ms, "hash": entry_hash, "seq": seq})


def sign_checkpoint(key: AuditKey, entry: AuditEntry, at_ms: int) -> Checkpoint:
    """A checkpoint of ``entry`` signed with ``key``."""
    signature = key.sign(_checkpoint_message(entry.seq, entry.hash, at_ms))
    return Checkpoint(
        seq=entry.seq,
        hash=entry.hash,
        at_ms=at_ms,
        public_key=key.public_key.hex(),
        signature=signature.hex(),
    )


@attrs.frozen
class VerifyResult:
    """The outcome of :func:`verify_chain`. ``first_broken_seq`` is the first entry (or
    checkpointed entry) that fails, None when ``valid``."""

    valid: bool
    entries: int
    checkpoints: int
    first_broken_seq: int | None
    message: str


def verify_chain(
    entries: Sequence[AuditEntry], checkpoints: Sequence[Checkpoint], public_key: bytes
) -> VerifyResult:
    """Recompute the chain of ``entries`` (in any order; sorted by seq here) and check every
    checkpoint's signature against ``public_key`` and its hash against the entry it names.
    Reports the lowest broken seq with a message saying what is wrong."""
    rows = sorted(entries, key=lambda e: e.seq)
    broken: list[tuple[int, str]] = []
    prev_hash = GENESIS_HASH
    expected_seq = 1
    by_seq: dict[int, AuditEntry] = {}
    for entry in rows:
        by_seq[entry.seq] = entry
        if entry.seq != expected_seq:
            broken.append((expected_seq, f"entry {expected_seq} is missing (next is {entry.seq})"))
            break
        if entry.prev_hash != prev_hash:
            broken.append((entry.seq, f"entry {entry.seq} does not link to entry {entry.seq - 1}"))
            break
        if entry.computed_hash() != entry.hash:
            broken.append((entry.seq, f"entry {entry.seq} does not match its hash"))
            break
        prev_hash = entry.hash
        expected_seq += 1
    for checkpoint in checkpoints:
        try:
            signature = bytes.fromhex(checkpoint.signature)
        except ValueError:
            signature = b""
        if checkpoint.public_key != public_key.hex() or not verify_signature(
            public_key, checkpoint.signed_message(), signature
        ):
            broken.append(
                (
                    checkpoint.seq,
                    f"checkpoint at entry {checkpoint.seq} is not signed by the audit key",
                )
            )
            continue
        target = by_seq.get(checkpoint.seq)
        if target is None:
            broken.append(
                (checkpoint.seq, f"checkpoint names entry {checkpoint.seq}, which is missing")
            )
        elif target.hash != checkpoint.hash:
            broken.append(
                (checkpoint.seq, f"entry {checkpoint.seq} differs from its signed checkpoint")
            )
    if broken:
        seq, message = min(broken)
        return VerifyResult(
            valid=False,
            entries=len(rows),
            checkpoints=len(checkpoints),
            first_broken_seq=seq,
            message=message,
        )
    return VerifyResult(
        valid=True,
        entries=len(rows),
        checkpoints=len(checkpoints),
        first_broken_seq=None,
        message=f"{len(rows)} entries and {len(checkpoints)} checkpoints verified",
    )
