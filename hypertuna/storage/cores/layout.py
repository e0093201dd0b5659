"""The on-disk layout of a core: four files in one directory, owned by one process at a time.

``header``
    Written once when the core is created (temp file, fsync, rename, directory fsync), never
    changed: ``b"HTCORE01" ‖ u16 format = 1 ‖ u16 flags ‖ key ‖ public key ‖ u16 manifest
    length ‖ manifest ‖ [32-byte encryption key check] ‖ 16-byte BLAKE2b checksum``. Flag 1:
    compat core; flag 2: the key check is present. The process that opens the core holds an
    exclusive ``flock`` on it.
``blocks``
    The stored blocks (ciphertext with padding for encrypted cores) end to end. Only the first
    ``byte_length`` bytes count.
``nodes``
    48-byte records ``hash ‖ u64 size ‖ u64 byte offset`` of every Merkle node, in the order
    appends create them (:func:`~hypertuna.storage.cores.flat_tree.node_position`), so the
    nodes of length ``n`` are the first ``node_count(n)`` records and the file only grows at its
    end or is cut back.
``state``
    An append-only log of 320-byte slots, each holding two copies of a 160-byte
    :class:`StateRecord` with its own checksum; the last slot with a valid copy is the core's
    state. A slot only reaches the disk after the bytes it names, so any valid copy names a
    durable state, and the second copy keeps one damaged sector from losing the last write. The
    log is rewritten down to one slot (temp file + rename) when it grows past
    :data:`STATE_COMPACT_RECORDS` slots.

A write goes blocks and nodes first (``fdatasync``), then its state record (``fdatasync``), so a
state record never names bytes that are not on disk. Whatever lies past the last state record's
sizes was never acknowledged and is cut off when the core is opened.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

from hypertuna.storage.cores.crypto import CoreIdentity, Manifest
from hypertuna.storage.cores.log import CoreCorruptError, CoreError

__all__ = [
    "HEADER_FILE",
    "NODE_RECORD_BYTES",
    "STATE_COMPACT_RECORDS",
    "STATE_RECORD_BYTES",
    "STATE_SLOT_BYTES",
    "Header",
    "StateKind",
    "StateRecord",
    "decode_state_slot",
    "encode_state_slot",
]

HEADER_FILE: Final = "header"
BLOCKS_FILE: Final = "blocks"
NODES_FILE: Final = "nodes"
STATE_FILE: Final = "state"

NODE_RECORD_BYTES: Final = 48
STATE_RECORD_BYTES: Final = 160
STATE_SLOT_BYTES: Final = 2 * STATE_RECORD_BYTES
STATE_COMPACT_RECORDS: Final = 1024

_HEADER_MAGIC: Final = b"HTCORE01"
_HEADER_FORMAT: Final = 1
_FLAG_COMPAT: Final = 1
_FLAG_KEY_CHECK: Final = 2
_CHECKSUM_BYTES: Final = 16

_STATE_MAGIC: Final = b"HTST"
_STATE_HEAD: Final = struct.Struct("<4sBBHQQQ32s")
_STATE_SIGNATURE_ROOM: Final = 68
_STATE_BODY_BYTES: Final = STATE_RECORD_BYTES - _CHECKSUM_BYTES

NODE_TAIL: Final = struct.Struct("<QQ")
"""``u64 size ‖ u64 byte offset`` after the 32-byte hash of a node record."""


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM_BYTES).digest()


@attrs.frozen
class Header:
    """The immutable facts of a stored core."""

    identity: CoreIdentity
    key_check: bytes | None

    def encode(self) -> bytes:
        """The bytes of the ``header`` file."""
        manifest = b"" if self.identity.manifest is None else self.identity.manifest.encode()
        flags = (_FLAG_COMPAT if self.identity.manifest is None else 0) | (
            0 if self.key_check is None else _FLAG_KEY_CHECK
        )
        body = (
            _HEADER_MAGIC
            + struct.pack("<HH", _HEADER_FORMAT, flags)
            + self.identity.key
            + self.identity.public_key
            + struct.pack("<H", len(manifest))
            + manifest
            + (self.key_check or b"")
        )
        return body + _checksum(body)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Read a ``header`` file; :class:`CoreCorruptError` if it is damaged or foreign."""
        body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
        if len(data) < 78 + _CHECKSUM_BYTES or _checksum(body) != checksum:
            raise CoreCorruptError("the core header is damaged")
        if body[:8] != _HEADER_MAGIC:
            raise CoreCorruptError("not a core header")
        version, flags = struct.unpack_from("<HH", body, 8)
        if version != _HEADER_FORMAT:
            raise CoreCorruptError(f"unknown core format {version}")
        key, public_key = body[12:44], body[44:76]
        (manifest_len,) = struct.unpack_from("<H", body, 76)
        manifest_bytes = body[78 : 78 + manifest_len]
        rest = body[78 + manifest_len :]
        key_check = None
        if flags & _FLAG_KEY_CHECK:
            key_check, rest = rest[:32], rest[32:]
        if (
            rest
            or len(manifest_bytes) != manifest_len
            or (key_check is not None and len(key_check) != 32)
        ):
            raise CoreCorruptError("the core header has the wrong size")
        if flags & _FLAG_COMPAT and manifest_len:
            raise CoreCorruptError("a compat core header with a manifest")
        try:
            if flags & _FLAG_COMPAT:
                identity = CoreIdentity.compat(public_key)
            else:
                identity = CoreIdentity.for_manifest(Manifest.decode(manifest_bytes))
        except ValueError as exc:
            raise CoreCorruptError(f"the core header is inconsistent: {exc}") from None
        if identity.key != key or identity.public_key != public_key:
            raise CoreCorruptError("the core header's key does not match its manifest")
        return cls(identity=identity, key_check=key_check)


class StateKind(enum.IntEnum):
    """Why a state record was written."""

    CREATE = 0
    APPEND = 1
    TRUNCATE = 2


@attrs.frozen
class StateRecord:
    """One state of a core: ``length`` blocks taking ``byte_length`` bytes on ``fork``, whose
    roots hash to ``tree_hash``, signed by ``signature`` (stored form).

    ``signature`` is ``None`` only for a new core and for the moment between the two records a
    mirror writes when it replaces blocks (a truncation followed by new blocks signed as a
    whole); the tree hash still guards the roots then.
    """

    kind: StateKind
    length: int
    fork: int
    byte_length: int
    tree_hash: bytes
    signature: bytes | None

    def encode(self) -> bytes:
        """The 160 bytes of this record."""
        signature = self.signature or b""
        if len(signature) > _STATE_SIGNATURE_ROOM:
            raise ValueError("signature too long for a state record")
        body = _STATE_HEAD.pack(
            _STATE_MAGIC,
            int(self.kind),
            len(signature),
            0,
            self.length,
            self.fork,
            self.byte_length,
            self.tree_hash,
        ) + signature.ljust(_STATE_SIGNATURE_ROOM, b"\x00")
        body = body.ljust(_STATE_BODY_BYTES, b"\x00")
        return body + _checksum(body)

    @classmethod
    def decode(cls, data: bytes) -> StateRecord | None:
        """The record in ``data`` (160 bytes), or ``None`` if it is torn or damaged."""
        if len(data) != STATE_RECORD_BYTES:
            return None
        body = data[:_STATE_BODY_BYTES]
        if _checksum(body) != data[_STATE_BODY_BYTES:]:
            return None
        magic, kind, sig_len, _, length, fork, byte_length, tree_hash = _STATE_HEAD.unpack_from(
            body
        )
        if magic != _STATE_MAGIC or sig_len > _STATE_SIGNATURE_ROOM:
            return None
        try:
            state_kind = StateKind(kind)
        except ValueError:
            return None
        start = _STATE_HEAD.size
        signature = bytes(body[start : start + sig_len]) if sig_len else None
        return cls(
            kind=state_kind,
            length=length,
            fork=fork,
            byte_length=byte_length,
            tree_hash=bytes(tree_hash),
            signature=signature,
        )


def encode_state_slot(state: StateRecord) -> bytes:
    """The two-copy slot of ``state`` in the ``state`` log."""
    record = state.encode()
    return record + record


def decode_state_slot(data: bytes) -> StateRecord | None:
    """The record of a slot from whichever copy is intact; ``None`` if neither is."""
    first = StateRecord.decode(data[:STATE_RECORD_BYTES])
    if first is not None:
        return first
    return StateRecord.decode(data[STATE_RECORD_BYTES:STATE_SLOT_BYTES])


# -- file helpers -------------------------------------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """Make renames and creations in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(directory: Path, name: str, data: bytes) -> None:
    """Replace ``directory/name`` by ``data``: all of it or none of it survives a crash."""
    temp = directory / f"{name}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, directory / name)
    fsync_directory(directory)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# Linux accepts up to 1024 buffers per pwritev.
_IOV_MAX: Final = 1024


def pwritev_all(fd: int, buffers: Sequence[bytes], offset: int) -> None:
    """Write ``buffers`` back to back from ``offset`` without joining them first."""
    for first in range(0, len(buffers), _IOV_MAX):
        group = buffers[first : first + _IOV_MAX]
        total = sum(len(buffer) for buffer in group)
        written = os.pwritev(fd, group, offset) if total else 0
        if written < total:
            # Rare short write: finish it the simple way.
            pwrite_all(fd, memoryview(b"".join(group))[written:], offset + written)
        offset += total


def pread_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    """``size`` bytes at ``offset``; :class:`CoreCorruptError` if the file ends first."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise CoreCorruptError(f"{what} is missing from the core files")
        data += more
    return data


def lock_exclusively(fd: int, directory: Path) -> None:
    """Take the exclusive ``flock`` that makes one process (and one object) own a core."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CoreError(f"the core at {directory} is already open") from None
        raise
