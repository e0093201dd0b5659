"""Key files: created once with 0600, never overwritten, and clear fatal errors on load."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hypertuna.escrow.keys import (
    EscrowKeyError,
    create_audit_key,
    create_escrow_key,
    fingerprint,
    load_audit_key,
    load_escrow_key,
)


def test_created_key_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "escrow.key"
    created = create_escrow_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    loaded = load_escrow_key(path)
    assert loaded.public_key == created.public_key
    assert loaded.fingerprint == fingerprint(created.public_key) == created.fingerprint
    assert len(created.fingerprint) == 64
    assert [p.name for p in path.parent.iterdir()] == ["escrow.key"]  # no temp file left


def test_audit_key_signs_with_the_stored_seed(tmp_path: Path) -> None:
    created = create_audit_key(tmp_path / "audit.key")
    loaded = load_audit_key(tmp_path / "audit.key")
    assert loaded.public_key == created.public_key
    assert loaded.sign(b"x") == created.sign(b"x")


@pytest.mark.parametrize("create", [create_escrow_key, create_audit_key])
def test_an_existing_key_is_never_regenerated(tmp_path: Path, create: object) -> None:
    path = tmp_path / "k"
    first = create_escrow_key(path)
    before = path.read_bytes()
    with pytest.raises(EscrowKeyError, match="never regenerated"):
        create(path)  # type: ignore[operator]
    assert path.read_bytes() == before
    assert load_escrow_key(path).public_key == first.public_key


def test_missing_key_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "escrow.key"
    with pytest.raises(EscrowKeyError, match=r"missing.*hypertuna escrow init"):
        load_escrow_key(path)
    with pytest.raises(EscrowKeyError, match="missing"):
        load_audit_key(path)
    assert not path.exists()


def test_too_permissive_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "escrow.key"
    create_escrow_key(path)
    path.chmod(0o644)
    with pytest.raises(EscrowKeyError, match=r"other users.*chmod 600"):
        load_escrow_key(path)


def test_wrong_size_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "escrow.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(EscrowKeyError, match="5 bytes, not 32"):
        load_escrow_key(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "escrow.key"
    create_escrow_key(path)
    path.chmod(0o000)
    try:
        with pytest.raises(EscrowKeyError, match="unreadable"):
            load_escrow_key(path)
    finally:
        path.chmod(0o600)


def test_a_directory_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "escrow.key").mkdir(mode=0o700)
    with pytest.raises(EscrowKeyError, match="not a regular file"):
        load_escrow_key(tmp_path / "escrow.key")


def test_key_repr_shows_no_secret(tmp_path: Path) -> None:
    key = create_escrow_key(tmp_path / "escrow.key")
    secret = (tmp_path / "escrow.key").read_bytes().hex()
    assert secret not in repr(key)
    assert key.fingerprint in repr(key)


def test_a_key_path_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(EscrowKeyError, match="unreadable"):
        load_escrow_key(tmp_path / "file" / "escrow.key")
