"""Crypto primitives reproduce the hypercore vectors byte for byte and decode strictly."""

from __future__ import annotations

import pytest

from hypertuna.storage.cores import (
    NAMESPACES,
    BlockCipher,
    CoreIdentity,
    KeyPair,
    Manifest,
    VectorSet,
    corestore_key_pair,
    decode_signature,
    discovery_key,
    encode_signature,
    manifest_hash,
    signable,
    verify_signature,
)
from hypertuna.storage.cores.crypto import xsalsa20_xor
from tests.storage.cores.conftest import LETTERS, key_pair_for


def test_namespaces(vectors: VectorSet) -> None:
    assert dict(NAMESPACES) == dict(vectors.namespaces)
    assert len(vectors.namespaces) == 6


@pytest.mark.parametrize("letter", LETTERS)
def test_keys_and_manifest(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    key_pair = key_pair_for(vectors, core)
    assert key_pair.public_key == core.public_key
    manifest = Manifest(public_key=key_pair.public_key)
    assert manifest == core.manifest
    assert manifest.encode() == core.encoded_manifest
    assert Manifest.decode(core.encoded_manifest) == manifest
    identity = CoreIdentity.for_key_pair(key_pair, compat=core.compat)
    assert identity.key == core.key
    assert identity.discovery_key == core.discovery_key == discovery_key(core.key)
    if core.compat:
        assert core.key == core.public_key
    else:
        assert manifest_hash(core.encoded_manifest) == core.key == manifest.key


def test_corestore_key_pair(vectors: VectorSet) -> None:
    core = vectors.core("C")
    assert core.primary_key is not None and core.name is not None
    key_pair = corestore_key_pair(core.primary_key, core.name)
    assert key_pair.secret_key == core.secret_key
    assert key_pair.public_key == core.public_key
    # A different name or primary key gives a different key pair.
    assert corestore_key_pair(core.primary_key, "other").public_key != core.public_key
    assert corestore_key_pair(bytes(32), core.name).public_key != core.public_key


@pytest.mark.parametrize("letter", LETTERS)
def test_signable_and_signature(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    identity = CoreIdentity.for_key_pair(key_pair_for(vectors, core), compat=core.compat)
    signed = identity.signable(core.tree_hash, core.length, core.fork)
    assert signed == core.signed_bytes
    assert len(signed) == (80 if core.compat else 112)
    assert signed == signable(
        core.tree_hash, core.length, core.fork, None if core.compat else core.key
    )
    stored = identity.sign(key_pair_for(vectors, core), core.tree_hash, core.length, core.fork)
    assert stored == core.signature
    assert identity.verify(core.signature, core.tree_hash, core.length, core.fork)
    assert not identity.verify(core.signature, core.tree_hash, core.length + 1, core.fork)
    assert not identity.verify(core.signature, core.tree_hash, core.length, core.fork + 1)
    assert not identity.verify(core.signature, bytes(32), core.length, core.fork)


def test_tampered_signature_is_rejected(tampered: VectorSet) -> None:
    core = tampered.core("C")
    identity = CoreIdentity.from_key(core.key, manifest=core.encoded_manifest)
    inner = decode_signature(core.signature, compat=False)
    assert not verify_signature(core.public_key, core.signed_bytes, inner)
    assert not identity.verify(core.signature, core.tree_hash, core.length, core.fork)


def test_signature_envelope_is_strict() -> None:
    signature = bytes(range(64))
    envelope = encode_signature(signature, compat=False)
    assert envelope == b"\x01\x00" + signature + b"\x00\x00"
    assert decode_signature(envelope, compat=False) == signature
    assert encode_signature(signature, compat=True) == signature
    assert decode_signature(signature, compat=True) == signature
    for bad in (
        signature,
        envelope[:-1],
        envelope + b"\x00",
        b"\x02" + envelope[1:],
        b"\x01\x01" + envelope[2:],
        envelope[:-1] + b"\x01",
        envelope[:-2] + b"\x01\x00",
    ):
        with pytest.raises(ValueError, match="01 00"):
            decode_signature(bad, compat=False)
    with pytest.raises(ValueError, match="64 bytes"):
        decode_signature(envelope, compat=True)
    with pytest.raises(ValueError, match="64 bytes"):
        encode_signature(signature[:63], compat=False)


def test_manifest_decode_is_strict(vectors: VectorSet) -> None:
    encoded = vectors.core("A").encoded_manifest
    for bad in (
        encoded[:-1],
        encoded + b"\x00",
        b"\x02" + encoded[1:],
        encoded[:1] + b"\x01" + encoded[2:],
    ):
        with pytest.raises(ValueError, match="version-1"):
            Manifest.decode(bad)


def test_identity_checks_key_against_manifest(vectors: VectorSet) -> None:
    a = vectors.core("A")
    assert CoreIdentity.from_key(a.key, manifest=a.encoded_manifest).public_key == a.public_key
    with pytest.raises(ValueError, match="does not hash"):
        CoreIdentity.from_key(vectors.core("C").key, manifest=a.encoded_manifest)
    with pytest.raises(ValueError, match="needs its manifest"):
        CoreIdentity.from_key(a.key)
    assert CoreIdentity.from_key(a.public_key, compat=True).compat_core


def test_key_pair_never_prints_its_secret(vectors: VectorSet) -> None:
    key_pair = KeyPair.from_seed(vectors.seed)
    assert vectors.seed.hex() not in repr(key_pair)
    assert key_pair.seed == vectors.seed
    with pytest.raises(ValueError, match="does not belong"):
        KeyPair(public_key=bytes(32), secret_key=key_pair.secret_key)


def test_block_cipher_reproduces_core_d(vectors: VectorSet) -> None:
    core = vectors.core("D")
    assert core.encryption_key is not None and core.plaintext_blocks is not None
    cipher = BlockCipher.for_core(core.encryption_key, core.key)
    for index, (stored, plaintext) in enumerate(
        zip(core.blocks, core.plaintext_blocks, strict=True)
    ):
        assert cipher.decrypt(index, stored) == plaintext
        assert cipher.encrypt(index, core.fork, plaintext) == stored
    # The padding blinds the fork: another fork gives other bytes that still decrypt.
    other = cipher.encrypt(0, 1, core.plaintext_blocks[0])
    assert other != core.blocks[0]
    assert cipher.decrypt(0, other) == core.plaintext_blocks[0]
    with pytest.raises(ValueError, match="at least 8"):
        cipher.decrypt(0, b"short")


def test_xsalsa20_is_an_involution_and_keyed() -> None:
    message = bytes(range(200))
    nonce, key = bytes(24), bytes(range(32))
    encrypted = xsalsa20_xor(message, nonce, key)
    assert encrypted != message
    assert xsalsa20_xor(encrypted, nonce, key) == message
    assert xsalsa20_xor(message, bytes(23) + b"\x01", key) != encrypted
    assert xsalsa20_xor(b"", nonce, key) == b""
