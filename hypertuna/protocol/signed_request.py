"""Signed HTTP requests: the canonical form both signing schemes cover, and replay protection.

Every signed request binds its method, its path (with the query string), a digest of its body,
a timestamp and a nonce (DESIGN §5). Two schemes sign that same canonical form:

- **Ed25519** (:func:`sign_ed25519` / :func:`verify_ed25519`): operators and workers, identified by
  their public keys — no shared secret.
- **HMAC-SHA256** (:func:`sign_hmac` / :func:`verify_hmac`): a client id and a shared secret, for
  the gateway's calls to a standalone escrow.

The headers carrying a signature are named in :data:`HEADER_KEY`, :data:`HEADER_TIMESTAMP`,
:data:`HEADER_NONCE` and :data:`HEADER_SIGNATURE` (prefix :data:`DEFAULT_HEADER_PREFIX`,
``X-Hypertuna-``). A request can carry two signatures under two prefixes: the standalone
escrow's HMAC scheme uses :data:`HMAC_HEADER_PREFIX` (``X-Escrow-Key``, ``X-Escrow-Timestamp``,
``X-Escrow-Nonce``, ``X-Escrow-Signature``) so that a deposit forwarded by the gateway keeps the
worker's Ed25519 ``X-Hypertuna-*`` signature next to the gateway's HMAC one.

A verifier checks the signature, then the timestamp against its clock
(:data:`DEFAULT_MAX_SKEW_S`), then remembers the nonce in a :class:`ReplayGuard`, so a replayed
or stale request is refused even when correctly signed.

Pure code: no I/O, no clock of its own (the caller passes ``now``).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Final

import attrs
import nacl.exceptions
import nacl.signing

__all__ = [
    "DEFAULT_HEADER_PREFIX",
    "DEFAULT_MAX_SKEW_S",
    "HEADER_KEY",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "HMAC_HEADER_PREFIX",
    "ReplayGuard",
    "SignedHeaders",
    "SignedRequestError",
    "SignedRequestReason",
    "body_digest",
    "canonical_request",
    "header_names",
    "new_nonce",
    "parse_headers",
    "sign_ed25519",
    "sign_hmac",
    "verify_ed25519",
    "verify_hmac",
]

#: Prefix of the signature headers of the Ed25519 scheme (operators, workers).
DEFAULT_HEADER_PREFIX: Final = "X-Hypertuna-"
#: Prefix of the signature headers of the HMAC scheme (the gateway's calls to the escrow).
HMAC_HEADER_PREFIX: Final = "X-Escrow-"
HEADER_KEY: Final = "X-Hypertuna-Key"
HEADER_TIMESTAMP: Final = "X-Hypertuna-Timestamp"
HEADER_NONCE: Final = "X-Hypertuna-Nonce"
HEADER_SIGNATURE: Final = "X-Hypertuna-Signature"


def header_names(prefix: str = DEFAULT_HEADER_PREFIX) -> tuple[str, str, str, str]:
    """The key, timestamp, nonce and signature header names under ``prefix``."""
    return f"{prefix}Key", f"{prefix}Timestamp", f"{prefix}Nonce", f"{prefix}Signature"


#: How far a request's timestamp may be from the verifier's clock, either way.
DEFAULT_MAX_SKEW_S: Final = 60

_DOMAIN: Final = b"hypertuna-signed-request-v1"
_NONCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_HEX128_RE: Final = re.compile(r"[0-9a-f]{128}")
_TIMESTAMP_RE: Final = re.compile(r"[0-9]{1,12}")


class SignedRequestReason(enum.Enum):
    """Why a signed request is refused (the value is the machine-readable reason)."""

    MISSING = "signature-missing"
    MALFORMED = "signature-malformed"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    STALE = "stale-timestamp"
    REPLAYED = "replayed-nonce"


class SignedRequestError(Exception):
    """A signed request is refused; :attr:`reason` says why, the message says it in words."""

    def __init__(self, reason: SignedRequestReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class SignedHeaders:
    """The four signature headers of one request, syntactically checked."""

    key: str
    timestamp: int
    nonce: str
    signature: str

    def as_dict(self, prefix: str = DEFAULT_HEADER_PREFIX) -> dict[str, str]:
        """The headers to send, named under ``prefix``."""
        key, timestamp, nonce, signature = header_names(prefix)
        return {
            key: self.key,
            timestamp: str(self.timestamp),
            nonce: self.nonce,
            signature: self.signature,
        }


def body_digest(body: bytes) -> str:
    """SHA-256 of the body, lowercase hex (the empty body has a digest too)."""
    return hashlib.sha256(body).hexdigest()


def canonical_request(
    method: str, path: str, body: bytes, timestamp: int, nonce: str, key: str
) -> bytes:
    """The bytes both schemes sign: a domain tag, then the method (upper case), the path with its
    query string, the body digest, the timestamp, the nonce and the signer's key id, one per
    line. Binding the key id stops a signature being replayed under another identity."""
    lines = [
        _DOMAIN.decode(),
        method.upper(),
        path,
        body_digest(body),
        str(timestamp),
        nonce,
        key,
    ]
    return "\n".join(lines).encode("utf-8")


def new_nonce() -> str:
    """A fresh random nonce (32 hex characters)."""
    return secrets.token_hex(16)


def sign_ed25519(
    signing_key: nacl.signing.SigningKey,
    method: str,
    path: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str | None = None,
) -> SignedHeaders:
    """Sign a request with an Ed25519 key; the key header is its public key in hex."""
    key = signing_key.verify_key.encode().hex()
    nonce = new_nonce() if nonce is None else nonce
    message = canonical_request(method, path, body, timestamp, nonce, key)
    signature = signing_key.sign(message).signature.hex()
    return SignedHeaders(key=key, timestamp=timestamp, nonce=nonce, signature=signature)


def sign_hmac(
    client_id: str,
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str | None = None,
) -> SignedHeaders:
    """Sign a request with HMAC-SHA256 under ``secret``; the key header is ``client_id``."""
    nonce = new_nonce() if nonce is None else nonce
    message = canonical_request(method, path, body, timestamp, nonce, client_id)
    signature = hmac.new(secret, message, hashlib.sha256).hexdigest()
    return SignedHeaders(key=client_id, timestamp=timestamp, nonce=nonce, signature=signature)


def parse_headers(headers: Mapping[str, str], prefix: str = DEFAULT_HEADER_PREFIX) -> SignedHeaders:
    """The signature headers named under ``prefix`` of a request (looked up
    case-insensitively). Raises :class:`SignedRequestError` (``MISSING`` or ``MALFORMED``)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    values: list[str] = []
    key_header, timestamp_header, nonce_header, signature_header = header_names(prefix)
    for name in (key_header, timestamp_header, nonce_header, signature_header):
        value = lowered.get(name.lower())
        if value is None:
            raise SignedRequestError(
                SignedRequestReason.MISSING, f"the request is not signed ({name} is missing)"
            )
        values.append(value)
    key, timestamp, nonce, signature = values
    if _KEY_RE.fullmatch(key) is None:
        raise SignedRequestError(SignedRequestReason.MALFORMED, f"{key_header} is malformed")
    if _TIMESTAMP_RE.fullmatch(timestamp) is None:
        raise SignedRequestError(
            SignedRequestReason.MALFORMED, f"{timestamp_header} must be whole seconds since 1970"
        )
    if _NONCE_RE.fullmatch(nonce) is None:
        raise SignedRequestError(
            SignedRequestReason.MALFORMED,
            f"{nonce_header} must be 16 to 128 characters of [A-Za-z0-9_-]",
        )
    if _HEX64_RE.fullmatch(signature) is None and _HEX128_RE.fullmatch(signature) is None:
        raise SignedRequestError(
            SignedRequestReason.MALFORMED, f"{signature_header} must be lowercase hex"
        )
    return SignedHeaders(key=key, timestamp=int(timestamp), nonce=nonce, signature=signature)


def verify_ed25519(
    signed: SignedHeaders,
    method: str,
    path: str,
    body: bytes,
    allowed_keys: frozenset[str],
) -> None:
    """Check an Ed25519-signed request against the public keys (hex) allowed to make it. Raises
    :class:`SignedRequestError` (``UNKNOWN_KEY``, ``BAD_SIGNATURE``). Timestamp and nonce are the
    :class:`ReplayGuard`'s business."""
    if signed.key not in allowed_keys:
        raise SignedRequestError(
            SignedRequestReason.UNKNOWN_KEY, "the signing key is not allowed to make this request"
        )
    if _HEX128_RE.fullmatch(signed.signature) is None or _HEX64_RE.fullmatch(signed.key) is None:
        raise SignedRequestError(SignedRequestReason.BAD_SIGNATURE, "the signature does not verify")
    message = canonical_request(method, path, body, signed.timestamp, signed.nonce, signed.key)
    try:
        nacl.signing.VerifyKey(bytes.fromhex(signed.key)).verify(
            message, bytes.fromhex(signed.signature)
        )
    except (nacl.exceptions.BadSignatureError, ValueError) as exc:
        raise SignedRequestError(
            SignedRequestReason.BAD_SIGNATURE, "the signature does not verify"
        ) from exc


def verify_hmac(
    signed: SignedHeaders,
    method: str,
    path: str,
    body: bytes,
    secrets_by_client: Mapping[str, bytes],
) -> None:
    """Check an HMAC-signed request against the shared secret of its client id, in constant
    time. Raises :class:`SignedRequestError` (``UNKNOWN_KEY``, ``BAD_SIGNATURE``)."""
    secret = secrets_by_client.get(signed.key)
    if secret is None:
        raise SignedRequestError(SignedRequestReason.UNKNOWN_KEY, "unknown client id")
    message = canonical_request(method, path, body, signed.timestamp, signed.nonce, signed.key)
    expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signed.signature):
        raise SignedRequestError(SignedRequestReason.BAD_SIGNATURE, "the signature does not verify")


class ReplayGuard:
    """Refuses stale timestamps and nonces seen before.

    A nonce is remembered for as long as its timestamp could still pass the skew check, so
    memory stays bounded by the request rate within ``2 * max_skew_s``; past ``max_entries`` the
    guard refuses new requests rather than forget nonces that could still be replayed.
    Call :meth:`check` only after the signature verified, so that forged requests cannot fill it.
    """

    def __init__(self, *, max_skew_s: int = DEFAULT_MAX_SKEW_S, max_entries: int = 100_000):
        if max_skew_s <= 0 or max_entries <= 0:
            raise ValueError("max_skew_s and max_entries must be positive")
        self._max_skew_s = max_skew_s
        self._max_entries = max_entries
        # (expiry, key, nonce) in insertion order; expiries are not monotonic, so expired entries
        # are dropped from the front only while the front has expired (others wait their turn).
        self._order: collections.deque[tuple[float, str, str]] = collections.deque()
        self._seen: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, signed: SignedHeaders, now: float) -> None:
        """Accept ``signed`` once, at wall-clock time ``now`` (seconds). Raises
        :class:`SignedRequestError` (``STALE`` or ``REPLAYED``)."""
        self._expire(now)
        if abs(signed.timestamp - now) > self._max_skew_s:
            raise SignedRequestError(
                SignedRequestReason.STALE,
                f"the request timestamp is more than {self._max_skew_s} s from the server's clock",
            )
        ident = (signed.key, signed.nonce)
        if ident in self._seen:
            raise SignedRequestError(SignedRequestReason.REPLAYED, "the nonce was already used")
        if len(self._seen) >= self._max_entries:
            raise SignedRequestError(
                SignedRequestReason.REPLAYED, "too many recent requests; retry shortly"
            )
        expiry = signed.timestamp + self._max_skew_s
        self._seen[ident] = expiry
        self._order.append((expiry, signed.key, signed.nonce))

    def _expire(self, now: float) -> None:
        while self._order and self._order[0][0] < now:
            _expiry, key, nonce = self._order.popleft()
            self._seen.pop((key, nonce), None)
