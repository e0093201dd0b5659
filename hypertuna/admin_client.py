"""The operator side of the signed operator API: ``hypertuna admin keygen`` and
``hypertuna admin call`` (stdlib HTTP only).

A key file holds the 32-byte Ed25519 seed, raw, readable by its owner only (0600). Its public
key (64 hex) is what goes into ``operators.keys`` of the gateway's config.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import nacl.signing

from hypertuna.protocol.signed_request import sign_ed25519

__all__ = ["AdminError", "AdminResponse", "call", "describe_failure", "generate_key", "load_key"]

SEED_BYTES = 32


class AdminError(Exception):
    """The operator's mistake or an unreachable gateway, said in one line."""


@attrs.frozen
class AdminResponse:
    status: int
    body: object
    """The decoded JSON body (or the text when it is not JSON)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def generate_key(path: Path) -> str:
    """Write a new seed to ``path`` (created 0600; an existing file is never overwritten) and
    return its public key in hex."""
    signing_key = nacl.signing.SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AdminError(f"{path} already exists: not overwriting a key") from None
    except OSError as exc:
        raise AdminError(f"{path}: {exc.strerror}") from None
    try:
        os.write(fd, bytes(signing_key))
        os.fsync(fd)
    finally:
        os.close(fd)
    return signing_key.verify_key.encode().hex()


def load_key(path: Path) -> nacl.signing.SigningKey:
    """The signing key whose seed ``path`` holds (raw 32 bytes, or 64 hex characters)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdminError(f"{path}: {exc.strerror}") from None
    if len(data) != SEED_BYTES:
        try:
            data = bytes.fromhex(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            data = b""
    if len(data) != SEED_BYTES:
        raise AdminError(f"{path}: not a key file (a 32-byte Ed25519 seed)")
    return nacl.signing.SigningKey(data)


def call(
    signing_key: nacl.signing.SigningKey,
    method: str,
    base_url: str,
    path: str,
    body: bytes = b"",
    *,
    timeout: float = 30.0,
    now: int | None = None,
) -> AdminResponse:
    """Send one signed request; any HTTP status is returned, not raised."""
    if not path.startswith("/"):
        raise AdminError(f"{path!r}: the path must start with /")
    method = method.upper()
    url = base_url.rstrip("/") + path
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AdminError(f"{base_url!r}: the gateway URL must be http:// or https://")
    # What the gateway sees: the path of the final URL (a base URL may carry a prefix).
    signed_path = parts.path + (f"?{parts.query}" if parts.query else "")
    timestamp = int(time.time()) if now is None else now
    headers = sign_ed25519(signing_key, method, signed_path, body, timestamp=timestamp).as_dict()
    headers["Accept"] = "application/json"
    if body:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return AdminResponse(response.status, _decode(response.read()))
    except urllib.error.HTTPError as exc:
        with exc:
            return AdminResponse(exc.code, _decode(exc.read()))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach {base_url}: {reason}") from None


def _decode(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def describe_failure(response: AdminResponse) -> str:
    """One line saying why a non-2xx answer failed."""
    body = response.body
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "reason", "message") if body.get(k)]
        if parts:
            return f"HTTP {response.status}: " + ": ".join(parts)
    return f"HTTP {response.status}: {body}"
