"""The worker's identity key and statement counter on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypertuna.worker.identity import (
    IDENTITY_FILE,
    SEQ_FILE,
    IdentityError,
    StatementSeq,
    load_or_create_identity,
    worker_key,
)


def test_identity_is_created_once_with_0600(tmp_path: Path) -> None:
    data = tmp_path / "new" / "dir"
    key = load_or_create_identity(data)
    path = data / IDENTITY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32
    assert worker_key(load_or_create_identity(data)) == worker_key(key)
    assert [p.name for p in data.iterdir()] == [IDENTITY_FILE]  # no temporary file left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_identity_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / IDENTITY_FILE, mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


@pytest.mark.parametrize("content", [b"", b"x" * 31, b"x" * 33, b"x" * 64])
def test_malformed_identity_is_refused_not_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / IDENTITY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityError, match="32-byte Ed25519 seed"):
        load_or_create_identity(tmp_path)
    assert path.read_bytes() == content


def test_statement_seq_grows_across_instances(tmp_path: Path) -> None:
    seq = StatementSeq(tmp_path)
    assert seq.last == 0
    assert [seq.next(), seq.next()] == [1, 2]
    again = StatementSeq(tmp_path)
    assert again.last == 2 and again.next() == 3
    (tmp_path / SEQ_FILE).write_text("nonsense")
    with pytest.raises(IdentityError, match="decimal number"):
        StatementSeq(tmp_path)
