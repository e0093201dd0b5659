"""The audit hash chain and its signed checkpoints (pure)."""

from __future__ import annotations

import secrets

import attrs

from hypertuna.escrow.audit import (
    AuditAction,
    AuditEntry,
    chain_entry,
    sign_checkpoint,
    verify_chain,
)
from hypertuna.escrow.keys import AuditKey
from hypertuna.storage.cores.crypto import KeyPair


def _key() -> AuditKey:
    return AuditKey(KeyPair.from_seed(secrets.token_bytes(32)))


def _chain(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    for i in range(n):
        last = None if not entries else (entries[-1].seq, entries[-1].hash)
        entries.append(
            chain_entry(
                last, at_ms=i, action=AuditAction.DEPOSIT, actor="owner:x", details={"i": i}
            )
        )
    return entries


def test_an_intact_chain_with_checkpoints_verifies() -> None:
    key, entries = _key(), _chain(6)
    marks = [sign_checkpoint(key, entries[2], 10), sign_checkpoint(key, entries[5], 11)]
    result = verify_chain(entries, marks, key.public_key)
    assert result.valid, result.message
    assert (result.entries, result.checkpoints, result.first_broken_seq) == (6, 2, None)


def test_an_edited_entry_is_reported_by_its_seq() -> None:
    key, entries = _key(), _chain(6)
    entries[3] = attrs.evolve(entries[3], details={"i": 99})
    result = verify_chain(entries, [], key.public_key)
    assert not result.valid
    assert result.first_broken_seq == 4
    assert "entry 4" in result.message


def test_a_rewritten_tail_is_caught_by_the_checkpoint() -> None:
    key, entries = _key(), _chain(4)
    marks = [sign_checkpoint(key, entries[3], 1)]
    forged = entries[:2]
    for i in (2, 3):  # recompute every hash after the change, as a careful attacker would
        forged.append(
            chain_entry(
                (forged[-1].seq, forged[-1].hash),
                at_ms=i,
                action=AuditAction.REVOKE,
                actor="owner:x",
            )
        )
    assert verify_chain(forged, [], key.public_key).valid
    result = verify_chain(forged, marks, key.public_key)
    assert (result.valid, result.first_broken_seq) == (False, 4)


def test_missing_entries_and_forged_checkpoints_are_detected() -> None:
    key, entries = _key(), _chain(5)
    result = verify_chain(entries[:2] + entries[3:], [], key.public_key)
    assert (result.valid, result.first_broken_seq) == (False, 3)
    truncated = verify_chain(entries[:3], [sign_checkpoint(key, entries[4], 1)], key.public_key)
    assert (truncated.valid, truncated.first_broken_seq) == (False, 5)
    other = sign_checkpoint(_key(), entries[1], 1)
    assert not verify_chain(entries, [other], key.public_key).valid
    tampered = attrs.evolve(sign_checkpoint(key, entries[1], 1), at_ms=2)
    result = verify_chain(entries, [tampered], key.public_key)
    assert (result.valid, result.first_broken_seq) == (False, 2)
    assert "not signed" in result.message
