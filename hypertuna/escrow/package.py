"""The two sealed packages of the escrow, as pure functions: the deposit (worker → escrow) and the
lease secret (escrow → lease holder).

Deposit package, version 1 — a libsodium sealed box (``crypto_box_seal``) to the escrow's X25519
public key of this fixed 149-byte plaintext (integers big-endian)::

    offset size
         0    4  magic b"HTED"
         4    1  version = 1
         5   32  relay key (the relay's owner core key)
        37   32  gateway writer Ed25519 public key
        69   32  gateway writer Ed25519 secret seed
       101   32  owner key (the worker's Ed25519 key that signs the deposit request)
       133    8  created_at, Unix milliseconds
       141    8  rotation counter

Sealed boxes do not authenticate their sender, so the deposit request itself is signed by the
owner key (checked at the edge); :func:`open_deposit` checks that the package names that same
owner and the relay of the request, and that the seed derives the stated public key.

Lease package, version 1 — a sealed box to the lease holder's fresh X25519 session key of::

    b"HTEL" ‖ version = 1 ‖ writer seed (32) ‖ canonical JSON of the LeaseBinding

so the binding (lease id, relay, deposit, lease version, times, escrow fingerprint, writer public
key) travels inside the same box as the secret and cannot be swapped for another lease's.

Plaintexts are only ever held in ``bytearray`` buffers filled by libsodium directly and are
overwritten before the functions return, as far as Python allows (no copy is made into immutable
``bytes`` by this module; the derived 64-byte secret key is zeroed too).
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import attrs
import nacl._sodium

from hypertuna.escrow.keys import EscrowKey
from hypertuna.storage.cores.crypto import KeyPair

__all__ = [
    "DEPOSIT_PLAINTEXT_BYTES",
    "SEALED_DEPOSIT_BYTES",
    "DepositPackage",
    "LeaseBinding",
    "OpenedLease",
    "PackageError",
    "PackageRefusal",
    "open_deposit",
    "open_lease",
    "seal_deposit",
    "seal_lease",
]

_ffi: Any = nacl._sodium.ffi
_lib: Any = nacl._sodium.lib

_DEPOSIT_MAGIC: Final = b"HTED"
_LEASE_MAGIC: Final = b"HTEL"
_VERSION: Final = 1
_SEAL_OVERHEAD: Final = int(_lib.crypto_box_sealbytes())
_TAIL: Final = struct.Struct(">QQ")
DEPOSIT_PLAINTEXT_BYTES: Final = 4 + 1 + 32 * 4 + _TAIL.size
SEALED_DEPOSIT_BYTES: Final = DEPOSIT_PLAINTEXT_BYTES + _SEAL_OVERHEAD
_LEASE_HEAD: Final = 4 + 1 + 32
# A binding is a few hundred bytes; refuse absurd boxes before allocating for them.
_MAX_LEASE_BOX: Final = 4096
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_U64: Final = 2**64 - 1


class PackageRefusal(enum.Enum):
    """Why a deposit package is refused (the value is the wire reason code)."""

    UNREADABLE = "package-unreadable"  # not a sealed box to this escrow's key
    MALFORMED = "package-malformed"  # opened, but not a version-1 deposit plaintext
    RELAY_MISMATCH = "package-relay-mismatch"
    OWNER_MISMATCH = "package-owner-mismatch"
    SECRET_MISMATCH = "package-secret-mismatch"  # the seed does not derive the public key


class PackageError(Exception):
    """A package cannot be opened or does not validate; ``reason`` says which check failed."""

    def __init__(self, reason: PackageRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _hex64(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise ValueError(f"{attribute.name} must be 64 lowercase hex characters")


def _u64(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise ValueError(f"{attribute.name} must be an integer in [0, 2**64)")


@attrs.frozen
class DepositPackage:
    """What a validated deposit package states, without its secret."""

    relay_key: str = attrs.field(validator=_hex64)
    writer_public_key: str = attrs.field(validator=_hex64)
    owner_key: str = attrs.field(validator=_hex64)
    created_at_ms: int = attrs.field(validator=_u64)
    rotation: int = attrs.field(validator=_u64)


@attrs.frozen
class LeaseBinding:
    """The lease a sealed lease secret belongs to; sealed together with the secret."""

    lease_id: str
    relay_key: str = attrs.field(validator=_hex64)
    deposit_id: str
    lease_version: int = attrs.field(validator=_u64)
    issued_at_ms: int = attrs.field(validator=_u64)
    expires_at_ms: int = attrs.field(validator=_u64)
    escrow_fingerprint: str = attrs.field(validator=_hex64)
    writer_public_key: str = attrs.field(validator=_hex64)

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    def canonical(self) -> bytes:
        """Sorted-key compact JSON, the form sealed into the lease package."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: object) -> LeaseBinding:
        """Parse :meth:`to_json` output; :class:`ValueError` on anything else."""
        if not isinstance(data, dict) or set(data) != {f.name for f in attrs.fields(cls)}:
            raise ValueError("not a lease binding")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"not a lease binding: {exc}") from exc


@attrs.frozen(repr=False)
class OpenedLease:
    """A lease package opened by its holder: the binding and the gateway writer key pair."""

    binding: LeaseBinding
    writer: KeyPair

    def __repr__(self) -> str:
        return f"OpenedLease(binding={self.binding!r})"


def _zero(buffer: bytearray) -> None:
    if buffer:
        _lib.sodium_memzero(_ffi.from_buffer(buffer), len(buffer))


@contextmanager
def _secret_buffer(size: int) -> Iterator[bytearray]:
    buffer = bytearray(size)
    try:
        yield buffer
    finally:
        _zero(buffer)


def _seal(plaintext: bytearray, public_key: bytes) -> bytes:
    if len(public_key) != 32:
        raise ValueError("a sealed box recipient key is 32 bytes")
    out = bytearray(len(plaintext) + _SEAL_OVERHEAD)
    rc = _lib.crypto_box_seal(
        _ffi.from_buffer(out), _ffi.from_buffer(plaintext), len(plaintext), bytes(public_key)
    )
    if rc != 0:
        raise ValueError("crypto_box_seal failed")
    return bytes(out)


def _seal_open_into(out: bytearray, sealed: bytes, public_key: bytes, secret_key: bytes) -> bool:
    """Open ``sealed`` into ``out`` (sized to the plaintext); False if it does not open."""
    if len(sealed) != len(out) + _SEAL_OVERHEAD:
        return False
    rc = _lib.crypto_box_seal_open(
        _ffi.from_buffer(out), bytes(sealed), len(sealed), public_key, secret_key
    )
    return bool(rc == 0)


def _derives(seed: memoryview, public_key: bytes) -> bool:
    """Whether the Ed25519 ``seed`` derives ``public_key`` (the derived secret is zeroed)."""
    derived_public = bytearray(32)
    with _secret_buffer(64) as derived_secret:
        _lib.crypto_sign_seed_keypair(
            _ffi.from_buffer(derived_public), _ffi.from_buffer(derived_secret), bytes(seed)
        )
    return bytes(derived_public) == public_key


def seal_deposit(
    escrow_public_key: bytes,
    *,
    relay_key: str,
    writer: KeyPair,
    owner_key: str,
    created_at_ms: int,
    rotation: int,
) -> bytes:
    """The sealed deposit package (worker side) for ``writer``'s secret."""
    stated = DepositPackage(
        relay_key=relay_key,
        writer_public_key=writer.public_key.hex(),
        owner_key=owner_key,
        created_at_ms=created_at_ms,
        rotation=rotation,
    )
    with _secret_buffer(DEPOSIT_PLAINTEXT_BYTES) as plain:
        plain[0:4] = _DEPOSIT_MAGIC
        plain[4] = _VERSION
        plain[5:37] = bytes.fromhex(stated.relay_key)
        plain[37:69] = writer.public_key
        plain[69:101] = writer.secret_key[:32]
        plain[101:133] = bytes.fromhex(stated.owner_key)
        _TAIL.pack_into(plain, 133, created_at_ms, rotation)
        return _seal(plain, escrow_public_key)


@contextmanager
def _opened_deposit(escrow_key: EscrowKey, sealed: bytes) -> Iterator[memoryview]:
    """The deposit plaintext, valid only inside the block (zeroed on exit)."""
    with _secret_buffer(DEPOSIT_PLAINTEXT_BYTES) as plain:
        if not _seal_open_into(plain, sealed, escrow_key.public_key, bytes(escrow_key.private_key)):
            raise PackageError(
                PackageRefusal.UNREADABLE, "the package is not a sealed box to this escrow's key"
            )
        view = memoryview(plain)
        try:
            if bytes(view[0:4]) != _DEPOSIT_MAGIC or view[4] != _VERSION:
                raise PackageError(
                    PackageRefusal.MALFORMED, "the package is not a version 1 deposit package"
                )
            yield view
        finally:
            view.release()


def open_deposit(
    escrow_key: EscrowKey, sealed: bytes, *, relay_key: str, owner_key: str
) -> DepositPackage:
    """Open and validate a deposit package (escrow side) and return what it states; the
    plaintext is zeroed before returning. Raises :class:`PackageError` if it does not open, is
    malformed, names another relay or owner than the request, or its seed does not derive its
    writer public key."""
    with _opened_deposit(escrow_key, sealed) as view:
        package_relay = bytes(view[5:37]).hex()
        writer_public = bytes(view[37:69])
        package_owner = bytes(view[101:133]).hex()
        created_at_ms, rotation = _TAIL.unpack_from(view, 133)
        if package_relay != relay_key:
            raise PackageError(
                PackageRefusal.RELAY_MISMATCH, "the package is for another relay than the request"
            )
        if package_owner != owner_key:
            raise PackageError(
                PackageRefusal.OWNER_MISMATCH,
                "the package names another owner key than the one that signed the request",
            )
        if not _derives(view[69:101], writer_public):
            raise PackageError(
                PackageRefusal.SECRET_MISMATCH,
                "the package's secret key does not derive its writer public key",
            )
    return DepositPackage(
        relay_key=package_relay,
        writer_public_key=writer_public.hex(),
        owner_key=package_owner,
        created_at_ms=created_at_ms,
        rotation=rotation,
    )


def seal_lease(
    escrow_key: EscrowKey, sealed_deposit: bytes, binding: LeaseBinding, session_public_key: bytes
) -> bytes:
    """Re-seal the writer secret of ``sealed_deposit`` to ``session_public_key`` together with
    ``binding`` (escrow side). The deposit must already have passed :func:`open_deposit`;
    :class:`PackageError` if it no longer opens or states another writer than the binding."""
    if binding.escrow_fingerprint != escrow_key.fingerprint:
        raise ValueError("the binding names another escrow key")
    body = binding.canonical()
    with _opened_deposit(escrow_key, sealed_deposit) as view:
        if bytes(view[37:69]).hex() != binding.writer_public_key:
            raise PackageError(
                PackageRefusal.MALFORMED, "the deposit states another writer than the binding"
            )
        with _secret_buffer(_LEASE_HEAD + len(body)) as plain:
            plain[0:4] = _LEASE_MAGIC
            plain[4] = _VERSION
            plain[5:37] = view[69:101]
            plain[37:] = body
            return _seal(plain, session_public_key)


def open_lease(session_private_key: bytes, sealed: bytes) -> OpenedLease:
    """Open a lease package with the session's X25519 private key (holder side) and check that
    the secret derives the writer public key named in the binding. The caller compares the
    binding with the lease it asked for. Raises :class:`PackageError` otherwise."""
    if len(session_private_key) != 32:
        raise ValueError("an X25519 private key is 32 bytes")
    size = len(sealed) - _SEAL_OVERHEAD
    if not _LEASE_HEAD < size <= _MAX_LEASE_BOX:
        raise PackageError(PackageRefusal.UNREADABLE, "not a lease package")
    session_public = bytes(_ffi.buffer(_scalarmult_base(session_private_key)))
    with _secret_buffer(size) as plain:
        if not _seal_open_into(plain, sealed, session_public, bytes(session_private_key)):
            raise PackageError(PackageRefusal.UNREADABLE, "not a sealed box to this session key")
        view = memoryview(plain)
        try:
            if bytes(view[0:4]) != _LEASE_MAGIC or view[4] != _VERSION:
                raise PackageError(PackageRefusal.MALFORMED, "not a version 1 lease package")
            try:
                binding = LeaseBinding.from_json(json.loads(bytes(view[_LEASE_HEAD:])))
            except ValueError as exc:
                raise PackageError(PackageRefusal.MALFORMED, f"bad lease binding: {exc}") from exc
            if not _derives(view[5:37], bytes.fromhex(binding.writer_public_key)):
                raise PackageError(
                    PackageRefusal.SECRET_MISMATCH,
                    "the lease secret does not derive the bound writer public key",
                )
            # The holder needs the key itself; from here on it is the vault's to protect.
            writer = KeyPair.from_seed(bytes(view[5:37]))
        finally:
            view.release()
    return OpenedLease(binding=binding, writer=writer)


def _scalarmult_base(private_key: bytes) -> Any:
    out = _ffi.new("unsigned char[]", 32)
    if _lib.crypto_scalarmult_base(out, private_key) != 0:
        raise ValueError("bad X25519 private key")
    return out
