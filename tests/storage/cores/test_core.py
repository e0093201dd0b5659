"""Writable cores on disk: written from the vectors' seeds they reproduce every vector value,
and they keep their promises across reopening."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypertuna.storage.cores import (
    Core,
    CoreError,
    CoreIdentity,
    KeyPair,
    Mirror,
    VectorSet,
    verify_proof,
)
from hypertuna.storage.cores import core as core_module
from hypertuna.storage.cores.layout import STATE_FILE, STATE_SLOT_BYTES
from tests.storage.cores.conftest import LETTERS, key_pair_for, write_vector_core

SEED = bytes([9]) * 32


@pytest.mark.parametrize("letter", LETTERS)
def test_written_core_reproduces_vectors(tmp_path: Path, vectors: VectorSet, letter: str) -> None:
    expected = vectors.core(letter)
    with write_vector_core(tmp_path / letter, vectors, expected) as core:
        _assert_matches(core, vectors, letter)
    # Everything survives closing and reopening.
    key_pair = key_pair_for(vectors, expected)
    with Core.open(tmp_path / letter, key_pair, encryption_key=expected.encryption_key) as core:
        _assert_matches(core, vectors, letter)


def _assert_matches(core: Core, vectors: VectorSet, letter: str) -> None:
    expected = vectors.core(letter)
    assert core.key == expected.key
    assert core.discovery_key == expected.discovery_key
    assert core.identity.public_key == expected.public_key
    assert core.compat is expected.compat
    if expected.compat:
        assert core.manifest is None
    else:
        assert core.manifest is not None
        assert core.manifest.encode() == expected.encoded_manifest
    assert (core.length, core.byte_length, core.fork) == (
        expected.length,
        expected.byte_length,
        expected.fork,
    )
    assert core.roots == expected.roots
    assert core.tree_hash == expected.tree_hash
    assert core.signature == expected.signature
    assert core.identity.signable(core.tree_hash, core.length, core.fork) == expected.signed_bytes
    assert tuple(core.tree_node(node.index) for node in expected.nodes) == expected.nodes
    assert tuple(core.get_stored(i) for i in range(core.length)) == expected.blocks
    plaintext = expected.plaintext_blocks or expected.blocks
    assert tuple(core.get(i) for i in range(core.length)) == plaintext
    assert core.prove(2) == expected.proof
    assert verify_proof(core.prove(core.length - 1), core.identity).index == core.length - 1
    assert core.verify_all().ok


def test_append_returns_lengths_and_reads_back(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    with Core.create(tmp_path / "c", key_pair) as core:
        assert (core.length, core.signature, core.roots) == (0, None, ())
        assert core.append([]) == 0
        assert core.append([b"a", b"", bytearray(b"ccc")]) == 3
        assert core.append([memoryview(b"dddd")]) == 4
        assert [core.get(i) for i in range(4)] == [b"a", b"", b"ccc", b"dddd"]
        assert core.byte_length == 8
        with pytest.raises(IndexError):
            core.get(4)
        with pytest.raises(IndexError):
            core.get(-1)
        with pytest.raises(IndexError):
            core.tree_node(7)
        signature = core.signature
        assert signature is not None
        assert core.identity.verify(signature, core.tree_hash, 4, 0)


def test_truncate_signs_a_new_fork_and_appends_continue(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    with Core.create(tmp_path / "c", key_pair) as core:
        core.append([bytes([i]) * (i + 1) for i in range(9)])
        assert core.truncate(5) == 1
        assert (core.length, core.fork) == (5, 1)
        assert core.byte_length == sum(range(1, 6))
        with pytest.raises(IndexError):
            core.get(5)
        assert core.append([b"x", b"y"]) == 7
        assert core.truncate(7) == 2  # same length, still a new fork
        with pytest.raises(ValueError, match="cannot truncate"):
            core.truncate(8)
        assert core.truncate(0) == 3
        assert (core.length, core.byte_length, core.roots) == (0, 0, ())
        assert core.append([b"again"]) == 1
    with Core.open(tmp_path / "c", key_pair) as core:
        assert (core.length, core.fork) == (1, 3)
        assert core.get(0) == b"again"
        assert core.verify_all().ok


def test_open_checks_key_pair_and_encryption_key(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    secret = bytes([3]) * 32
    Core.create(tmp_path / "enc", key_pair, encryption_key=secret).close()
    Core.create(tmp_path / "plain", key_pair).close()
    with pytest.raises(ValueError, match="signer"):
        Core.open(tmp_path / "plain", KeyPair.from_seed(bytes(32)))
    with pytest.raises(ValueError, match="wrong encryption key"):
        Core.open(tmp_path / "enc", key_pair, encryption_key=bytes(32))
    with pytest.raises(ValueError, match="encryption key is needed"):
        Core.open(tmp_path / "enc", key_pair)
    with pytest.raises(ValueError, match="not encrypted"):
        Core.open(tmp_path / "plain", key_pair, encryption_key=secret)
    with pytest.raises(ValueError, match="compat"):
        Core.create(tmp_path / "compat", key_pair, compat=True, encryption_key=secret)
    with pytest.raises(FileExistsError):
        Core.create(tmp_path / "plain", key_pair)
    # After the failed opens the directories are not left locked.
    Core.open(tmp_path / "plain", key_pair).close()


def test_one_open_object_per_directory(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    with Core.create(tmp_path / "c", key_pair):
        with pytest.raises(CoreError, match="already open"):
            Core.open(tmp_path / "c", key_pair)
        with pytest.raises(CoreError, match="already open"):
            Mirror.open(tmp_path / "c")
    with Core.open_or_create(tmp_path / "c", key_pair) as core:
        assert core.length == 0
    with Core.open_or_create(tmp_path / "new", key_pair, compat=True) as core:
        assert core.compat


def test_closed_core_refuses_work(tmp_path: Path) -> None:
    core = Core.create(tmp_path / "c", KeyPair.from_seed(SEED))
    core.append([b"a"])
    core.close()
    core.close()
    with pytest.raises(CoreError, match="closed"):
        core.append([b"b"])
    with pytest.raises(CoreError, match="closed"):
        core.get(0)


def test_state_log_is_compacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "STATE_COMPACT_RECORDS", 4)
    key_pair = KeyPair.from_seed(SEED)
    with Core.create(tmp_path / "c", key_pair) as core:
        for i in range(10):
            core.append([bytes([i])])
            assert os.path.getsize(tmp_path / "c" / STATE_FILE) < 4 * STATE_SLOT_BYTES
        core.truncate(6)
    with Core.open(tmp_path / "c", key_pair) as core:
        assert (core.length, core.fork) == (6, 1)
        assert [core.get(i) for i in range(6)] == [bytes([i]) for i in range(6)]


def test_encrypted_core_stores_ciphertext(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    secret = bytes([3]) * 32
    with Core.create(tmp_path / "c", key_pair, encryption_key=secret) as core:
        core.append([b"secret words"])
        assert core.get(0) == b"secret words"
        stored = core.get_stored(0)
        assert len(stored) == 8 + len(b"secret words")
        assert b"secret" not in (tmp_path / "c" / "blocks").read_bytes()
        # A truncation moves to fork 1: the same index gets other padding.
        core.truncate(0)
        core.append([b"secret words"])
        assert core.get_stored(0) != stored
        assert core.get(0) == b"secret words"


def test_proofs_verify_without_the_core(tmp_path: Path) -> None:
    key_pair = KeyPair.from_seed(SEED)
    with Core.create(tmp_path / "c", key_pair) as core:
        core.append([f"block {i}".encode() for i in range(23)])
        identity = CoreIdentity.from_key(core.key, manifest=core.manifest)
        for index in range(23):
            verified = verify_proof(core.prove(index), identity)
            assert verified.value == f"block {index}".encode()
            assert (verified.length, verified.fork) == (23, 0)


def test_a_batch_is_one_signature_and_one_sync_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Core.create(tmp_path / "c", KeyPair.from_seed(SEED)) as core:
        synced: list[str] = []
        signatures: list[bytes] = []
        names = {
            os.stat(tmp_path / "c" / name).st_ino: name for name in ("blocks", "nodes", "state")
        }
        real_sync, real_sign = os.fdatasync, KeyPair.sign

        def fdatasync(fd: int) -> None:
            synced.append(names[os.fstat(fd).st_ino])
            real_sync(fd)

        def sign(key_pair: KeyPair, message: bytes) -> bytes:
            signatures.append(message)
            return real_sign(key_pair, message)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(KeyPair, "sign", sign)
        core.append([bytes([i % 256]) * 100 for i in range(500)])
        # Blocks and nodes reach the disk before the state that names them.
        assert synced == ["blocks", "nodes", "state"]
        assert len(signatures) == 1
