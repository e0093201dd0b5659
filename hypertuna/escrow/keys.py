"""The escrow's long-lived key files: the X25519 key pair that deposits are sealed to, and the
Ed25519 key that signs audit checkpoints.

Each file holds the raw 32-byte secret (the X25519 private key, or the Ed25519 seed) and nothing
else, with mode 0600. A file is created once (``hypertuna escrow init``) and never replaced:
creation writes a temporary file and hard-links it to the final name, which fails if the name
exists, so two concurrent inits cannot both win and an existing key is never overwritten.

Loading never creates anything. A missing, unreadable, wrongly sized or group/other-accessible
file raises :class:`EscrowKeyError` with a message that says what to do; callers treat it as fatal
at start (a silently regenerated escrow key would orphan every deposit).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Final

import attrs
import nacl.public

from hypertuna.storage.cores.crypto import KeyPair

__all__ = [
    "KEY_FILE_BYTES",
    "AuditKey",
    "EscrowKey",
    "EscrowKeyError",
    "create_audit_key",
    "create_escrow_key",
    "fingerprint",
    "load_audit_key",
    "load_escrow_key",
]

KEY_FILE_BYTES: Final = 32
_FILE_MODE: Final = 0o600


class EscrowKeyError(Exception):
    """A key file is missing, unreadable, malformed, too permissive, or already exists."""


def fingerprint(public_key: bytes) -> str:
    """The fingerprint clients pin: lowercase hex SHA-256 of the raw 32-byte public key."""
    if len(public_key) != KEY_FILE_BYTES:
        raise ValueError("a public key is 32 bytes")
    return hashlib.sha256(public_key).hexdigest()


@attrs.frozen(repr=False)
class EscrowKey:
    """The escrow's X25519 key pair (deposits are sealed boxes to ``public_key``)."""

    private_key: nacl.public.PrivateKey

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte X25519 public key."""
        return bytes(self.private_key.public_key)

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of :attr:`public_key`."""
        return fingerprint(self.public_key)

    def __repr__(self) -> str:
        return f"EscrowKey(fingerprint={self.fingerprint})"


@attrs.frozen(repr=False)
class AuditKey:
    """The Ed25519 key that signs audit checkpoints."""

    key_pair: KeyPair

    @property
    def public_key(self) -> bytes:
        return self.key_pair.public_key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self.key_pair.sign(message)

    def __repr__(self) -> str:
        return f"AuditKey(fingerprint={self.fingerprint})"


def _write_once(path: Path, secret: bytes, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        raise EscrowKeyError(
            f"{what} {path} already exists; it is never regenerated (move it away yourself "
            "only if you mean to orphan everything it protects)"
        )
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # the umask may have removed bits; never added any
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() refuses an existing name: a concurrent init loses instead of overwriting.
            os.link(temp, path)
        except FileExistsError as exc:
            raise EscrowKeyError(f"{what} {path} already exists; it is never regenerated") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    with contextlib.suppress(OSError):  # directory fsync is not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_secret(path: Path, what: str) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise EscrowKeyError(
            f"{what} {path} is missing; create it once with `hypertuna escrow init` "
            "(it is never created at start)"
        ) from None
    except OSError as exc:
        raise EscrowKeyError(f"{what} {path} is unreadable: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise EscrowKeyError(f"{what} {path} is not a regular file")
    if info.st_mode & 0o077:
        raise EscrowKeyError(
            f"{what} {path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o});"
            f" run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EscrowKeyError(f"{what} {path} is unreadable: {exc.strerror or exc}") from None
    if len(data) != KEY_FILE_BYTES:
        raise EscrowKeyError(
            f"{what} {path} holds {len(data)} bytes, not {KEY_FILE_BYTES}; it is not a key file"
        )
    return data


def create_escrow_key(path: Path) -> EscrowKey:
    """Create the escrow key pair file at ``path`` (0600) and return it. Raises
    :class:`EscrowKeyError` if the file exists (it is never overwritten)."""
    key = nacl.public.PrivateKey.generate()
    _write_once(path, bytes(key), "escrow key file")
    return EscrowKey(key)


def load_escrow_key(path: Path) -> EscrowKey:
    """The escrow key pair stored at ``path``; :class:`EscrowKeyError` if it is missing,
    unreadable, not 32 bytes, or readable by group/others."""
    return EscrowKey(nacl.public.PrivateKey(_read_secret(path, "escrow key file")))


def create_audit_key(path: Path) -> AuditKey:
    """Create the audit checkpoint signing key file at ``path`` (0600, the Ed25519 seed).
    Raises :class:`EscrowKeyError` if the file exists."""
    seed = secrets.token_bytes(KEY_FILE_BYTES)
    _write_once(path, seed, "audit key file")
    return AuditKey(KeyPair.from_seed(seed))


def load_audit_key(path: Path) -> AuditKey:
    """The audit checkpoint signing key at ``path``; same errors as :func:`load_escrow_key`."""
    return AuditKey(KeyPair.from_seed(_read_secret(path, "audit key file")))
