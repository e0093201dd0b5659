"""Sealed packages: deposits validate every claim they make, leases open only with the session
key and carry their binding."""

from __future__ import annotations

import secrets

import attrs
import nacl.public
import pytest

from hypertuna.escrow.keys import EscrowKey
from hypertuna.escrow.package import (
    SEALED_DEPOSIT_BYTES,
    LeaseBinding,
    PackageError,
    PackageRefusal,
    open_deposit,
    open_lease,
    seal_deposit,
    seal_lease,
)
from hypertuna.storage.cores.crypto import KeyPair
from tests.escrow.conftest import NOW, hex_key, new_writer

RELAY = "ab" * 32
OWNER = "cd" * 32


def _escrow_key() -> EscrowKey:
    return EscrowKey(nacl.public.PrivateKey.generate())


def _sealed(key: EscrowKey, writer: KeyPair, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "relay_key": RELAY,
        "writer": writer,
        "owner_key": OWNER,
        "created_at_ms": NOW,
        "rotation": 3,
    }
    fields.update(overrides)
    return seal_deposit(key.public_key, **fields)  # type: ignore[arg-type]


def test_deposit_round_trip_states_everything_but_the_secret() -> None:
    key, writer = _escrow_key(), new_writer()
    sealed = _sealed(key, writer)
    assert len(sealed) == SEALED_DEPOSIT_BYTES
    package = open_deposit(key, sealed, relay_key=RELAY, owner_key=OWNER)
    assert package.writer_public_key == writer.public_key.hex()
    assert (package.relay_key, package.owner_key) == (RELAY, OWNER)
    assert (package.created_at_ms, package.rotation) == (NOW, 3)
    assert writer.secret_key[:32].hex() not in repr(package)


def test_package_sealed_to_another_escrow_does_not_open() -> None:
    sealed = _sealed(_escrow_key(), new_writer())
    with pytest.raises(PackageError) as info:
        open_deposit(_escrow_key(), sealed, relay_key=RELAY, owner_key=OWNER)
    assert info.value.reason is PackageRefusal.UNREADABLE


@pytest.mark.parametrize("garbage", [b"", b"x" * 10, secrets.token_bytes(SEALED_DEPOSIT_BYTES)])
def test_garbage_does_not_open(garbage: bytes) -> None:
    with pytest.raises(PackageError) as info:
        open_deposit(_escrow_key(), garbage, relay_key=RELAY, owner_key=OWNER)
    assert info.value.reason is PackageRefusal.UNREADABLE


def test_a_sealed_box_of_something_else_is_malformed() -> None:
    key = _escrow_key()
    other = nacl.public.SealedBox(key.private_key.public_key).encrypt(b"\0" * 149)
    with pytest.raises(PackageError) as info:
        open_deposit(key, other, relay_key=RELAY, owner_key=OWNER)
    assert info.value.reason is PackageRefusal.MALFORMED


def test_package_for_another_relay_or_owner_is_refused() -> None:
    key = _escrow_key()
    sealed = _sealed(key, new_writer())
    with pytest.raises(PackageError) as info:
        open_deposit(key, sealed, relay_key=hex_key(), owner_key=OWNER)
    assert info.value.reason is PackageRefusal.RELAY_MISMATCH
    with pytest.raises(PackageError) as info:
        open_deposit(key, sealed, relay_key=RELAY, owner_key=hex_key())
    assert info.value.reason is PackageRefusal.OWNER_MISMATCH


def test_secret_that_does_not_derive_the_public_key_is_refused() -> None:
    key = _escrow_key()
    honest, other = new_writer(), new_writer()
    # A key pair object whose halves disagree, as a broken or lying worker could send.
    liar = attrs.evolve(honest, secret_key=other.secret_key[:32] + honest.public_key)
    sealed = _sealed(key, liar)
    with pytest.raises(PackageError) as info:
        open_deposit(key, sealed, relay_key=RELAY, owner_key=OWNER)
    assert info.value.reason is PackageRefusal.SECRET_MISMATCH


def _binding(key: EscrowKey, writer: KeyPair) -> LeaseBinding:
    return LeaseBinding(
        lease_id="lease_1",
        relay_key=RELAY,
        deposit_id="dep_1",
        lease_version=7,
        issued_at_ms=NOW,
        expires_at_ms=NOW + 600_000,
        escrow_fingerprint=key.fingerprint,
        writer_public_key=writer.public_key.hex(),
    )


def test_lease_opens_only_with_the_session_key_and_carries_its_binding() -> None:
    key, writer = _escrow_key(), new_writer()
    session = nacl.public.PrivateKey.generate()
    binding = _binding(key, writer)
    box = seal_lease(key, _sealed(key, writer), binding, bytes(session.public_key))
    opened = open_lease(bytes(session), box)
    assert opened.binding == binding
    assert opened.writer.secret_key == writer.secret_key
    assert writer.secret_key.hex() not in repr(opened)
    with pytest.raises(PackageError) as info:
        open_lease(bytes(nacl.public.PrivateKey.generate()), box)
    assert info.value.reason is PackageRefusal.UNREADABLE
    with pytest.raises(PackageError):
        open_lease(bytes(session), box[:-1])


def test_lease_binding_must_name_this_escrow_and_the_deposits_writer() -> None:
    key, writer = _escrow_key(), new_writer()
    session = nacl.public.PrivateKey.generate()
    with pytest.raises(ValueError, match="another escrow"):
        seal_lease(
            key,
            _sealed(key, writer),
            attrs.evolve(_binding(key, writer), escrow_fingerprint="0" * 64),
            bytes(session.public_key),
        )
    with pytest.raises(PackageError):
        seal_lease(
            key,
            _sealed(key, writer),
            attrs.evolve(_binding(key, writer), writer_public_key=hex_key()),
            bytes(session.public_key),
        )
