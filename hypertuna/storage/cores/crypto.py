"""Hypercore 11 crypto: namespaces, manifests, keys, signables, signatures, block encryption.

Everything here is a pure function of its inputs and reproduces the bytes of the ``hypercore``
/ ``hypercore-crypto`` / ``corestore`` npm packages (checked against
``shared/vectors/hypercore``). All hashes are BLAKE2b-256; ``u64`` is 8 bytes little-endian.

Keys
    :class:`KeyPair` is an Ed25519 key pair (``KeyPair.from_seed(seed)``; ``sign``);
    :func:`corestore_key_pair` derives the key pair Corestore gives a named core.
    :func:`verify_signature` checks a bare 64-byte Ed25519 signature.

Manifests and core keys
    :class:`Manifest` is the manifest v1 with one Ed25519 signer that hypercore writes by
    default; ``encode()`` gives its 70 bytes, :meth:`Manifest.decode` reads them back strictly
    and ``key`` is the core key (``B2b(MANIFEST ‖ encoded manifest)``). A *compat* core (the
    hypercore 10 style) has no manifest and its key is the signer's public key.
    :func:`discovery_key` is the topic peers announce instead of the key. :class:`CoreIdentity`
    bundles a core's key with its signer and signs and verifies tree states.

Signatures
    :func:`signable` builds the bytes a writer signs for ``(tree hash, length, fork)``: 112
    bytes for manifest cores, 80 for compat cores. Manifest cores store the signature in a
    68-byte envelope (``01 00 ‖ signature ‖ 00 00``); compat cores store the bare 64 bytes.
    :func:`encode_signature` builds the stored form and :func:`decode_signature` accepts
    exactly that form and nothing else (``ValueError``).

Block encryption
    :class:`BlockCipher` turns plaintext block ``i`` into its stored form (8 bytes of padding
    that blind the fork, then XSalsa20 ciphertext) and back. The Merkle tree covers the stored
    form, so a mirror verifies an encrypted core without its encryption key.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Final

import attrs
import nacl._sodium
import nacl.bindings
import nacl.exceptions

__all__ = [
    "DEFAULT_ENCRYPTION",
    "DEFAULT_NAMESPACE",
    "MANIFEST",
    "NAMESPACES",
    "REPLICATE_INITIATOR",
    "REPLICATE_RESPONDER",
    "TREE",
    "BlockCipher",
    "CoreIdentity",
    "KeyPair",
    "Manifest",
    "corestore_key_pair",
    "decode_signature",
    "discovery_key",
    "encode_signature",
    "manifest_hash",
    "signable",
    "verify_signature",
    "xsalsa20_xor",
]

KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64
MANIFEST_SIGNATURE_BYTES: Final = 68
PADDING_BYTES: Final = 8


def _b2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


_HYPERCORE_NS: Final = _b2b(b"hypercore")

TREE: Final = _b2b(_HYPERCORE_NS + b"\x00")
REPLICATE_INITIATOR: Final = _b2b(_HYPERCORE_NS + b"\x01")
REPLICATE_RESPONDER: Final = _b2b(_HYPERCORE_NS + b"\x02")
MANIFEST: Final = _b2b(_HYPERCORE_NS + b"\x03")
DEFAULT_NAMESPACE: Final = _b2b(_HYPERCORE_NS + b"\x04")
DEFAULT_ENCRYPTION: Final = _b2b(_HYPERCORE_NS + b"\x05")

NAMESPACES: Final[dict[str, bytes]] = {
    "TREE": TREE,
    "REPLICATE_INITIATOR": REPLICATE_INITIATOR,
    "REPLICATE_RESPONDER": REPLICATE_RESPONDER,
    "MANIFEST": MANIFEST,
    "DEFAULT_NAMESPACE": DEFAULT_NAMESPACE,
    "DEFAULT_ENCRYPTION": DEFAULT_ENCRYPTION,
}
"""Hypercore's six namespaces by their hypercore-crypto names."""

_CORESTORE_NS: Final = _b2b(_b2b(b"corestore") + b"\x00")


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


def _key32(_instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    _check_len(attribute.name, value, KEY_BYTES)


# -- keys ---------------------------------------------------------------------------------------


@attrs.frozen(repr=False)
class KeyPair:
    """An Ed25519 key pair. ``secret_key`` is libsodium's 64-byte form (seed ‖ public key)."""

    public_key: bytes = attrs.field(validator=_key32)
    secret_key: bytes = attrs.field()

    @secret_key.validator
    def _check_secret(self, _attribute: object, value: bytes) -> None:
        _check_len("secret_key", value, 64)
        if value[32:] != self.public_key:
            raise ValueError("secret_key does not belong to public_key")

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        """The key pair of a 32-byte seed (deterministic, as libsodium's seed key pair)."""
        _check_len("seed", seed, KEY_BYTES)
        public_key, secret_key = nacl.bindings.crypto_sign_seed_keypair(bytes(seed))
        return cls(public_key=public_key, secret_key=secret_key)

    @property
    def seed(self) -> bytes:
        """The 32-byte seed this key pair derives from."""
        return self.secret_key[:32]

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (deterministic)."""
        signed: bytes = nacl.bindings.crypto_sign(message, self.secret_key)
        return signed[:SIGNATURE_BYTES]

    def __repr__(self) -> str:
        # Never print the secret half.
        return f"KeyPair(public_key={self.public_key.hex()})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (64 bytes) is a valid Ed25519 signature of ``message``."""
    if len(signature) != SIGNATURE_BYTES or len(public_key) != KEY_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(bytes(signature) + message, bytes(public_key))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


def corestore_key_pair(primary_key: bytes, name: str, namespace: bytes = bytes(32)) -> KeyPair:
    """The key pair Corestore 7 gives the core named ``name`` under ``primary_key``.

    ``namespace`` is Corestore's namespace (32 zero bytes for a store that was not
    namespaced).
    """
    _check_len("primary_key", primary_key, KEY_BYTES)
    _check_len("namespace", namespace, KEY_BYTES)
    seed = hashlib.blake2b(
        _CORESTORE_NS + namespace + name.encode(), digest_size=32, key=primary_key
    ).digest()
    return KeyPair.from_seed(seed)


# -- manifests and keys -------------------------------------------------------------------------

# version 1, flags 0 (no patch, prologue, linked cores or user data), hash 0 (BLAKE2b), quorum 1,
# one signer, signer's signature scheme 0 (Ed25519).
_MANIFEST_V1_HEADER: Final = bytes([1, 0, 0, 1, 1, 0])
_MANIFEST_V1_BYTES: Final = len(_MANIFEST_V1_HEADER) + 2 * KEY_BYTES


def manifest_hash(encoded_manifest: bytes) -> bytes:
    """The core key of a manifest core: ``B2b(MANIFEST ‖ encoded manifest)``."""
    return _b2b(MANIFEST + encoded_manifest)


@attrs.frozen
class Manifest:
    """Hypercore's default manifest: version 1, BLAKE2b, quorum 1, one Ed25519 signer."""

    public_key: bytes = attrs.field(validator=_key32)
    namespace: bytes = attrs.field(default=DEFAULT_NAMESPACE, validator=_key32)

    def encode(self) -> bytes:
        """The 70 bytes hypercore stores and hashes into the core key."""
        return _MANIFEST_V1_HEADER + self.namespace + self.public_key

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Read an encoded manifest; ``ValueError`` for anything but a v1 single-signer one."""
        if len(data) != _MANIFEST_V1_BYTES or bytes(data[:6]) != _MANIFEST_V1_HEADER:
            raise ValueError("only version-1 manifests with one Ed25519 signer are supported")
        return cls(public_key=bytes(data[38:70]), namespace=bytes(data[6:38]))

    @property
    def key(self) -> bytes:
        """The core key this manifest names."""
        return manifest_hash(self.encode())


def discovery_key(core_key: bytes) -> bytes:
    """The discovery key of a core: BLAKE2b-256 of ``"hypercore"`` keyed by the core key."""
    _check_len("core key", core_key, KEY_BYTES)
    return hashlib.blake2b(b"hypercore", digest_size=32, key=core_key).digest()


# -- signatures ---------------------------------------------------------------------------------


def signable(tree_hash: bytes, length: int, fork: int, core_key: bytes | None) -> bytes:
    """The bytes a writer signs for a tree state.

    ``TREE ‖ core key ‖ tree hash ‖ u64 length ‖ u64 fork`` (112 bytes) for a manifest core;
    ``core_key=None`` gives the compat form without the key (80 bytes).
    """
    _check_len("tree hash", tree_hash, 32)
    tail = tree_hash + length.to_bytes(8, "little") + fork.to_bytes(8, "little")
    if core_key is None:
        return TREE + tail
    _check_len("core key", core_key, KEY_BYTES)
    return TREE + core_key + tail


# The envelope is hypercore's multisig proof list with one entry: 1 proof, signer 0, the
# signature, no patch; then 0 patches.
_ENVELOPE_HEAD: Final = b"\x01\x00"
_ENVELOPE_TAIL: Final = b"\x00\x00"


def encode_signature(signature: bytes, *, compat: bool) -> bytes:
    """The stored form of a 64-byte signature: bare for compat cores, else the 68-byte
    envelope."""
    _check_len("signature", signature, SIGNATURE_BYTES)
    if compat:
        return bytes(signature)
    return _ENVELOPE_HEAD + signature + _ENVELOPE_TAIL


def decode_signature(stored: bytes, *, compat: bool) -> bytes:
    """The 64-byte signature inside a stored signature; ``ValueError`` unless ``stored`` is
    exactly what :func:`encode_signature` produces."""
    if compat:
        if len(stored) != SIGNATURE_BYTES:
            raise ValueError(f"a compat signature is {SIGNATURE_BYTES} bytes, got {len(stored)}")
        return bytes(stored)
    if (
        len(stored) != MANIFEST_SIGNATURE_BYTES
        or stored[:2] != _ENVELOPE_HEAD
        or stored[-2:] != _ENVELOPE_TAIL
    ):
        raise ValueError("a manifest signature must be 01 00 ‖ 64 bytes ‖ 00 00")
    return bytes(stored[2:66])


# -- block encryption ---------------------------------------------------------------------------

# pynacl does not wrap crypto_stream_xsalsa20_xor, but the libsodium it ships (or links) exports
# it; calling that same library keeps the cipher in C without a new dependency.
nacl.bindings.sodium_init()
_SODIUM: Final = ctypes.CDLL(nacl._sodium.__file__)
_xsalsa20_xor = _SODIUM.crypto_stream_xsalsa20_xor
_xsalsa20_xor.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_ulonglong,
    ctypes.c_char_p,
    ctypes.c_char_p,
]
_xsalsa20_xor.restype = ctypes.c_int


def xsalsa20_xor(message: bytes, nonce: bytes, key: bytes) -> bytes:
    """``message`` XOR the XSalsa20 key stream of ``(nonce, key)`` (24- and 32-byte)."""
    _check_len("nonce", nonce, 24)
    _check_len("key", key, 32)
    out = bytearray(len(message))
    if out:
        buffer = (ctypes.c_char * len(out)).from_buffer(out)
        if _xsalsa20_xor(buffer, bytes(message), len(out), nonce, key) != 0:
            raise RuntimeError("crypto_stream_xsalsa20_xor failed")
    return bytes(out)


@attrs.frozen(repr=False)
class BlockCipher:
    """Hypercore's default block encryption for one core.

    ``block_key = B2b(DEFAULT_ENCRYPTION ‖ core key ‖ encryption key)``. The stored form of block
    ``i`` is ``padding ‖ XSalsa20(plaintext, nonce = u64(i) ‖ padding ‖ 8 zero bytes)`` with
    ``padding = XSalsa20(u64(fork), nonce = u64(i) ‖ 16 zero bytes, key = B2b(block_key))``,
    the fork blinded so that the same index never reuses a nonce across forks.
    """

    block_key: bytes = attrs.field(validator=_key32)
    blinding_key: bytes = attrs.field(validator=_key32)

    @classmethod
    def for_core(cls, encryption_key: bytes, core_key: bytes) -> BlockCipher:
        """The cipher of the manifest core ``core_key`` under ``encryption_key``."""
        _check_len("encryption key", encryption_key, KEY_BYTES)
        _check_len("core key", core_key, KEY_BYTES)
        block_key = _b2b(DEFAULT_ENCRYPTION + core_key + encryption_key)
        return cls(block_key=block_key, blinding_key=_b2b(block_key))

    def encrypt(self, index: int, fork: int, plaintext: bytes) -> bytes:
        """The stored form of plaintext block ``index`` written on ``fork``."""
        index_bytes = index.to_bytes(8, "little")
        padding = xsalsa20_xor(
            fork.to_bytes(8, "little"), index_bytes + bytes(16), self.blinding_key
        )
        nonce = index_bytes + padding + bytes(8)
        return padding + xsalsa20_xor(plaintext, nonce, self.block_key)

    def decrypt(self, index: int, stored: bytes) -> bytes:
        """The plaintext of stored block ``index``; ``ValueError`` if it is shorter than its
        padding."""
        if len(stored) < PADDING_BYTES:
            raise ValueError(f"an encrypted block is at least {PADDING_BYTES} bytes")
        padding = bytes(stored[:PADDING_BYTES])
        nonce = index.to_bytes(8, "little") + padding + bytes(8)
        return xsalsa20_xor(bytes(stored[PADDING_BYTES:]), nonce, self.block_key)

    def key_check(self) -> bytes:
        """A value that identifies the block key without revealing it (stored by cores so that
        opening with a wrong encryption key fails instead of returning garbage)."""
        return _b2b(b"hypertuna-core-key-check" + self.block_key)


# -- the identity of a core ---------------------------------------------------------------------


@attrs.frozen
class CoreIdentity:
    """What anyone needs to verify a core: its key and its signer.

    Build it with :meth:`for_manifest` (a manifest core, key = manifest hash), :meth:`compat`
    (key = public key) or :meth:`for_key_pair`; :meth:`from_key` checks a claimed manifest against
    a known key.
    """

    key: bytes = attrs.field(validator=_key32)
    public_key: bytes = attrs.field(validator=_key32)
    manifest: Manifest | None
    """``None`` for a compat core."""

    def __attrs_post_init__(self) -> None:
        if self.manifest is None:
            if self.key != self.public_key:
                raise ValueError("a compat core's key is its public key")
        elif self.manifest.public_key != self.public_key or self.manifest.key != self.key:
            raise ValueError("the key and public key do not match the manifest")

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> CoreIdentity:
        """The identity of a manifest core."""
        return cls(key=manifest.key, public_key=manifest.public_key, manifest=manifest)

    @classmethod
    def compat(cls, public_key: bytes) -> CoreIdentity:
        """The identity of a compat core signed by ``public_key``."""
        return cls(key=public_key, public_key=public_key, manifest=None)

    @classmethod
    def for_key_pair(cls, key_pair: KeyPair, *, compat: bool = False) -> CoreIdentity:
        """The identity of a core written with ``key_pair`` (default manifest unless
        ``compat``)."""
        if compat:
            return cls.compat(key_pair.public_key)
        return cls.for_manifest(Manifest(public_key=key_pair.public_key))

    @classmethod
    def from_key(
        cls, key: bytes, *, manifest: Manifest | bytes | None = None, compat: bool = False
    ) -> CoreIdentity:
        """The identity of the core ``key``: a compat core if ``compat``, else the core of
        ``manifest`` (decoded form or encoded bytes). ``ValueError`` if the manifest does not
        hash to ``key`` or if neither is given."""
        _check_len("core key", key, KEY_BYTES)
        if compat:
            if manifest is not None:
                raise ValueError("a compat core has no manifest")
            return cls.compat(key)
        if manifest is None:
            raise ValueError("a manifest core needs its manifest (or pass compat=True)")
        if not isinstance(manifest, Manifest):
            manifest = Manifest.decode(manifest)
        if manifest.key != key:
            raise ValueError("the manifest does not hash to the core key")
        return cls.for_manifest(manifest)

    @property
    def compat_core(self) -> bool:
        """Whether this is a compat core (no manifest; 80-byte signable, bare signature)."""
        return self.manifest is None

    @property
    def discovery_key(self) -> bytes:
        """The discovery key of the core."""
        return discovery_key(self.key)

    def signable(self, tree_hash: bytes, length: int, fork: int) -> bytes:
        """The bytes this core's writer signs for ``(tree hash, length, fork)``."""
        return signable(tree_hash, length, fork, None if self.manifest is None else self.key)

    def sign(self, key_pair: KeyPair, tree_hash: bytes, length: int, fork: int) -> bytes:
        """The stored signature of a tree state; ``ValueError`` for a foreign key pair."""
        if key_pair.public_key != self.public_key:
            raise ValueError("the key pair is not this core's signer")
        signature = key_pair.sign(self.signable(tree_hash, length, fork))
        return encode_signature(signature, compat=self.manifest is None)

    def verify(self, stored_signature: bytes, tree_hash: bytes, length: int, fork: int) -> bool:
        """Whether ``stored_signature`` (stored form) signs ``(tree hash, length, fork)``."""
        try:
            signature = decode_signature(stored_signature, compat=self.manifest is None)
        except ValueError:
            return False
        return verify_signature(self.public_key, self.signable(tree_hash, length, fork), signature)
