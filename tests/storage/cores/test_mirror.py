"""Verified mirrors: built from the vectors' blocks and signature they reproduce the vector
cores; anything that does not verify is rejected and leaves the mirror exactly as it was."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from hypertuna.storage.cores import (
    Core,
    CoreError,
    CoreIdentity,
    CoreUpdate,
    CoreVerificationError,
    KeyPair,
    Mirror,
    VectorCore,
    VectorSet,
    verify_proof,
)
from hypertuna.storage.cores import core as core_module
from tests.storage.cores.conftest import LETTERS, write_vector_core

KEY_PAIR = KeyPair.from_seed(bytes([17]) * 32)


def _identity(core: VectorCore) -> CoreIdentity:
    if core.compat:
        return CoreIdentity.from_key(core.key, compat=True)
    return CoreIdentity.from_key(core.key, manifest=core.encoded_manifest)


def _update(core: VectorCore) -> CoreUpdate:
    return CoreUpdate(start=0, blocks=core.blocks, fork=core.fork, signature=core.signature)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("letter", LETTERS)
def test_mirror_of_vector_core(tmp_path: Path, vectors: VectorSet, letter: str) -> None:
    expected = vectors.core(letter)
    with Mirror.create(tmp_path / "m", _identity(expected)) as mirror:
        assert mirror.apply(_update(expected)) == expected.length
    with Mirror.open(tmp_path / "m", encryption_key=expected.encryption_key) as mirror:
        assert (mirror.key, mirror.discovery_key) == (expected.key, expected.discovery_key)
        assert (mirror.length, mirror.byte_length, mirror.fork) == (
            expected.length,
            expected.byte_length,
            expected.fork,
        )
        assert mirror.roots == expected.roots
        assert mirror.tree_hash == expected.tree_hash
        assert mirror.signature == expected.signature
        assert tuple(mirror.tree_node(node.index) for node in expected.nodes) == expected.nodes
        assert tuple(mirror.get_stored(i) for i in range(mirror.length)) == expected.blocks
        plaintext = expected.plaintext_blocks or expected.blocks
        assert tuple(mirror.get(i) for i in range(mirror.length)) == plaintext
        assert mirror.prove(2) == expected.proof
        assert mirror.verify_all().ok


def test_blind_mirror_serves_stored_blocks(tmp_path: Path, vectors: VectorSet) -> None:
    d = vectors.core("D")
    with Mirror.create(tmp_path / "m", _identity(d)) as mirror:
        mirror.apply(_update(d))
        assert not mirror.encrypted
        assert tuple(mirror.get(i) for i in range(d.length)) == d.blocks


def _tampered_updates(core: VectorCore, other: VectorCore) -> dict[str, CoreUpdate]:
    genuine = _update(core)
    blocks = list(core.blocks)
    updates = {
        "dropped last block": attrs.evolve(genuine, blocks=tuple(blocks[:-1])),
        "extra block": attrs.evolve(genuine, blocks=(*blocks, b"extra")),
        "swapped blocks": attrs.evolve(genuine, blocks=(blocks[1], blocks[0], *blocks[2:])),
        "fork": attrs.evolve(genuine, fork=core.fork + 1),
        "start": attrs.evolve(genuine, start=1, blocks=tuple(blocks[1:])),
        "signature byte": attrs.evolve(
            genuine, signature=genuine.signature[:-5] + b"\xff" + genuine.signature[-4:]
        ),
        "other core's signature": attrs.evolve(genuine, signature=other.signature),
        "no signature": attrs.evolve(genuine, signature=b""),
    }
    for index, block in enumerate(blocks):
        changed = bytes([block[0] ^ 1]) + block[1:] if block else b"\x00"
        updates[f"block {index}"] = attrs.evolve(
            genuine, blocks=(*blocks[:index], changed, *blocks[index + 1 :])
        )
    return updates


@pytest.mark.parametrize("letter", LETTERS)
def test_every_tampered_update_is_rejected_and_changes_nothing(
    tmp_path: Path, vectors: VectorSet, letter: str
) -> None:
    core = vectors.core(letter)
    other = vectors.core("B" if letter != "B" else "A")
    with Mirror.create(tmp_path / "m", _identity(core)) as mirror:
        before = _snapshot(tmp_path / "m")
        for what, update in _tampered_updates(core, other).items():
            with pytest.raises(CoreVerificationError):
                mirror.apply(update)
            assert _snapshot(tmp_path / "m") == before, what
            assert (mirror.length, mirror.signature) == (0, None), what
        assert mirror.apply(_update(core)) == core.length


def test_tampered_continuations_are_rejected(tmp_path: Path) -> None:
    with (
        Core.create(tmp_path / "w", KEY_PAIR) as writer,
        Mirror.create(tmp_path / "m", writer.identity) as mirror,
    ):
        writer.append([f"old {i}".encode() for i in range(5)])
        mirror.apply(writer.export_update(0))
        writer.append([f"new {i}".encode() for i in range(6)])
        genuine = writer.export_update(5)
        blocks = genuine.blocks
        before = _snapshot(tmp_path / "m")
        for update in (
            attrs.evolve(genuine, blocks=(b"evil", *blocks[1:])),
            attrs.evolve(genuine, blocks=blocks[:-1]),
            attrs.evolve(genuine, start=4, blocks=(b"old 4", *blocks)),
            attrs.evolve(genuine, start=6, blocks=blocks[1:]),
            attrs.evolve(genuine, fork=1),
            attrs.evolve(genuine, signature=writer.export_update(0).signature[:-1] + b"\x01"),
        ):
            with pytest.raises(CoreVerificationError):
                mirror.apply(update)
            assert _snapshot(tmp_path / "m") == before
            assert mirror.length == 5
        assert mirror.apply(genuine) == 11
        assert mirror.verify_all().ok


def test_ranges_exported_later_verify_in_bounded_steps(tmp_path: Path) -> None:
    with (
        Core.create(tmp_path / "w", KEY_PAIR) as writer,
        Mirror.create(tmp_path / "m", writer.identity) as mirror,
    ):
        writer.append([f"block {i}".encode() for i in range(10)])
        # Each range is signed now for the prefix it ends at, which the core passed long ago.
        for start, end in ((0, 3), (3, 3), (3, 7), (7, 10)):
            update = writer.export_range(start, end)
            assert (update.start, update.length) == (start, end)
            assert mirror.apply(update) == max(end, mirror.length)
        assert mirror.length == 10 and mirror.signature == writer.signature
        assert mirror.verify_all().ok
        for start, end in ((-1, 2), (4, 3), (5, 11)):
            with pytest.raises(ValueError, match="not within length"):
                writer.export_range(start, end)


def test_tampered_vectors_are_rejected(tmp_path: Path, tampered: VectorSet) -> None:
    for letter in ("A", "C"):
        core = tampered.core(letter)
        with Mirror.create(tmp_path / letter, _identity(core)) as mirror:
            before = _snapshot(tmp_path / letter)
            with pytest.raises(CoreVerificationError, match="signature does not sign"):
                mirror.apply(_update(core))
            assert _snapshot(tmp_path / letter) == before
            assert mirror.length == 0
    # The untouched cores of the tampered file still mirror fine.
    with Mirror.create(tmp_path / "B", _identity(tampered.core("B"))) as mirror:
        assert mirror.apply(_update(tampered.core("B"))) == 7


def test_mirror_with_the_wrong_identity_rejects(tmp_path: Path, vectors: VectorSet) -> None:
    a, b = vectors.core("A"), vectors.core("B")
    # Same signer, but a compat mirror expects bare signatures over the 80-byte signable.
    with Mirror.create(tmp_path / "m", _identity(b)) as mirror:
        with pytest.raises(CoreVerificationError):
            mirror.apply(_update(a))
        assert mirror.length == 0


def test_mirror_follows_a_writer_through_appends_and_truncation(tmp_path: Path) -> None:
    with (
        Core.create(tmp_path / "w", KEY_PAIR) as writer,
        Mirror.create(tmp_path / "m", writer.identity) as mirror,
    ):
        writer.append([f"first {i}".encode() for i in range(7)])
        assert mirror.apply(writer.export_update(mirror.length)) == 7
        writer.append([b"eighth"])
        assert mirror.apply(writer.export_update(mirror.length)) == 8
        # Re-sending the same state is harmless; an old state is not.
        stale = writer.export_update(0)
        assert mirror.apply(writer.export_update(8)) == 8

        writer.truncate(4)
        writer.append([b"new 4", b"new 5"])
        # A truncation cannot come as an update on the old fork...
        with pytest.raises(CoreVerificationError, match="without a new fork"):
            mirror.apply(attrs.evolve(writer.export_update(4), fork=0))
        # ...nor as a plain append after the mirror's length.
        with pytest.raises(CoreVerificationError, match="signature"):
            mirror.apply(CoreUpdate(start=8, blocks=(), fork=1, signature=writer.signature or b""))
        assert mirror.length == 8
        assert mirror.apply(writer.export_update(4)) == 6
        assert (mirror.fork, mirror.signature, mirror.roots) == (
            writer.fork,
            writer.signature,
            writer.roots,
        )
        assert [mirror.get(i) for i in range(6)] == [writer.get(i) for i in range(6)]
        with pytest.raises(CoreVerificationError, match="fork 0"):
            mirror.apply(stale)

        # A truncation with nothing after it.
        writer.truncate(2)
        assert mirror.apply(writer.export_update(2)) == 2
        assert mirror.fork == writer.fork == 2
        assert mirror.verify_all().ok
        identity = writer.identity
    with Mirror.open(tmp_path / "m") as mirror:
        assert (mirror.length, mirror.fork, mirror.key) == (2, 2, identity.key)


def test_interrupted_truncating_update_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Core.create(tmp_path / "w", KEY_PAIR) as writer:
        writer.append([f"block {i}".encode() for i in range(9)])
        mirror = Mirror.create(tmp_path / "m", writer.identity)
        mirror.apply(writer.export_update(0))
        writer.truncate(3)
        writer.append([b"x", b"y", b"z"])
        update = writer.export_update(3)

        def crash(*_args: object) -> None:
            raise OSError("disk went away")

        # The mirror writes the truncation, then fails to write the new blocks.
        monkeypatch.setattr(core_module, "pwritev_all", crash)
        with pytest.raises(OSError, match="went away"):
            mirror.apply(update)
        monkeypatch.undo()
        with pytest.raises(CoreError, match="reopen"):
            mirror.apply(update)
        mirror.close()

        with Mirror.open(tmp_path / "m") as mirror:
            # The durable state is the verified prefix on the new fork, not yet signed.
            assert (mirror.length, mirror.fork, mirror.signature) == (3, 1, None)
            assert [mirror.get(i) for i in range(3)] == [f"block {i}".encode() for i in range(3)]
            with pytest.raises(CoreError, match="not signed"):
                mirror.prove(0)
            assert mirror.apply(update) == 6
            assert mirror.signature == writer.signature
            assert mirror.verify_all().ok


def test_mirror_proofs_verify_for_readers(tmp_path: Path, vectors: VectorSet) -> None:
    with (
        write_vector_core(tmp_path / "w", vectors, vectors.core("C")) as writer,
        Mirror.create(tmp_path / "m", writer.identity) as mirror,
    ):
        mirror.apply(writer.export_update(0))
        for index in range(mirror.length):
            assert verify_proof(mirror.prove(index), writer.identity).index == index


def test_identity_must_match_the_manifest(vectors: VectorSet) -> None:
    a, c = vectors.core("A"), vectors.core("C")
    with pytest.raises(ValueError, match="does not hash"):
        CoreIdentity.from_key(a.key, manifest=c.encoded_manifest)
