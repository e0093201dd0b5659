"""The worker's files in its data directory: its identity key and its statement counter.

``identity.key`` holds the 32-byte Ed25519 seed of the worker's identity (the key the gateway
knows it by). It is created once, with 0600 permissions, and never replaced: a file that is
readable by others or not exactly 32 bytes is refused with :class:`IdentityError`, because a
silently regenerated identity would make the worker a stranger to every gateway.

``statement-seq`` holds the last ``seq`` used in a signed relay statement. The gateway refuses a
statement whose ``seq`` does not grow for its (relay, worker) pair, so the counter must survive
restarts: each value is written durably *before* a statement carrying it is sent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import nacl.signing

__all__ = [
    "IDENTITY_FILE",
    "SEQ_FILE",
    "IdentityError",
    "StatementSeq",
    "load_or_create_identity",
    "worker_key",
    "write_durably",
]

IDENTITY_FILE: Final = "identity.key"
SEQ_FILE: Final = "statement-seq"
_SEED_BYTES: Final = 32


class IdentityError(Exception):
    """The worker's identity or state file cannot be used (the message says how to fix it)."""


def write_durably(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write ``data`` to ``path`` through a 0600 temporary file, then rename it into place (or,
    with ``exclusive``, link it, so an existing file is never replaced); durable (file and
    directory synced) when this returns. Blocks: call it from a thread in async code."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            os.link(temp, path)
        else:
            os.replace(temp, path)
    finally:
        if exclusive:
            temp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _ensure_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create the data directory {data_dir}: {exc}") from exc


def load_or_create_identity(data_dir: Path) -> nacl.signing.SigningKey:
    """The worker's identity key from ``data_dir/identity.key``, created on first use."""
    _ensure_dir(data_dir)
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        try:
            write_durably(path, os.urandom(_SEED_BYTES), exclusive=True)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            raise IdentityError(f"cannot create the identity key {path}: {exc}") from exc
    try:
        mode = path.stat().st_mode & 0o777
        seed = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read the identity key {path}: {exc}") from exc
    if mode & 0o077:
        raise IdentityError(
            f"{path} is accessible by others (mode {mode:03o}); run chmod 600 on it"
        )
    if len(seed) != _SEED_BYTES:
        raise IdentityError(
            f"{path} holds {len(seed)} bytes, an identity key is a {_SEED_BYTES}-byte Ed25519 "
            "seed; restore it from a backup (a new one would be a different worker)"
        )
    return nacl.signing.SigningKey(seed)


def worker_key(identity: nacl.signing.SigningKey) -> str:
    """The worker's public key (hex), as the gateway knows it."""
    return bytes(identity.verify_key).hex()


class StatementSeq:
    """The durable counter behind every relay statement's ``seq``.

    One counter for all relays: it grows for each (relay, worker) pair because it grows for
    all of them. Not safe for two processes at once; one worker process owns its directory.
    """

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / SEQ_FILE
        self._last = self._load()

    def _load(self) -> int:
        try:
            text = self._path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"cannot read {self._path}: {exc}") from exc
        if not text.isdigit():
            raise IdentityError(
                f"{self._path} must hold one decimal number (the last statement seq)"
            )
        return int(text)

    @property
    def last(self) -> int:
        return self._last

    def next(self) -> int:
        """A new, larger seq, durable on disk when this returns (blocks: call it from a
        thread)."""
        value = self._last + 1
        write_durably(self._path, f"{value}\n".encode("ascii"), exclusive=False)
        self._last = value
        return value
