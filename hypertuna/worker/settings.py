"""Settings of the reference worker (the gateway's own config does not describe workers)."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import attrs

from hypertuna.worker.backoff import BackoffPolicy

__all__ = ["CONTROL_PATH", "WorkerSettings", "control_url", "http_base_url"]

CONTROL_PATH: Final = "/gateway/worker"
_FINGERPRINT: Final = re.compile("[0-9a-f]{64}")


def control_url(gateway_url: str) -> str:
    """The ``ws(s)://host:port/.../gateway/worker`` URL of a gateway given by its base URL
    (``http``, ``https``, ``ws`` or ``wss``, with an optional path prefix); ``ValueError`` if it
    is not such a URL."""
    parts = urlsplit(gateway_url.strip())
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(
            f"gateway URL {gateway_url!r} must be http://, https://, ws:// or wss://host[:port]"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"gateway URL {gateway_url!r} must not have a query or fragment")
    path = parts.path.rstrip("/")
    if not path.endswith(CONTROL_PATH):
        path += CONTROL_PATH
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, "", ""))


def http_base_url(gateway_url: str) -> str:
    """The ``http(s)://host:port/...`` base of the gateway's HTTP API (the escrow's routes are
    under it), from the same URL :func:`control_url` takes; ``ValueError`` likewise."""
    parts = urlsplit(control_url(gateway_url))
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.removesuffix(CONTROL_PATH), "", ""))


def _fingerprint(value: str | None) -> str | None:
    if value is None:
        return None
    text = value.strip().lower()
    if not _FINGERPRINT.fullmatch(text):
        raise ValueError(
            "escrow_fingerprint must be the 64 hex characters 'hypertuna escrow init' and"
            " GET /api/escrow/policy show"
        )
    return text


@attrs.frozen
class WorkerSettings:
    """How the worker talks to its gateway."""

    gateway_url: str = attrs.field()
    backoff: BackoffPolicy = attrs.field(factory=BackoffPolicy)
    #: Seconds to open the WebSocket, and then to finish the challenge/hello/welcome exchange.
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    #: Seconds to wait for the close handshake before dropping the socket.
    disconnect_timeout_s: float = 2.0
    #: Seconds to wait for a registration's ack or error.
    register_timeout_s: float = 10.0
    #: How often the hosted relays are listed again, to register relays created meanwhile
    #: (by ``hypertuna worker relay create`` in another process).
    rescan_interval_s: float = 10.0
    #: Largest message accepted from the gateway (trio-websocket closes with 1009 above it).
    max_receive_bytes: int = 16 * 1024 * 1024
    #: Client frames queued per forwarded session, and how long the reader waits for room
    #: before closing a session that does not keep up (so one session cannot stall the rest).
    session_queue_frames: int = 1024
    session_stall_s: float = 5.0
    #: Forwarded sessions served at once; more are refused.
    max_sessions: int = 4096
    #: Seconds forwarded sessions get to close at shutdown.
    graceful_timeout_s: float = 5.0
    agent: str = "hypertuna-worker"
    #: How often mirrored cores are checked for new blocks to send to the gateway.
    mirror_poll_s: float = 1.0
    #: Deposit each registered relay's gateway writer in the gateway's escrow.
    deposit_escrow: bool = True
    #: The escrow fingerprint to trust (hex SHA-256 of its public key). When None, the first
    #: one seen at this gateway is pinned in the data directory (trust on first use).
    escrow_fingerprint: str | None = attrs.field(default=None, converter=_fingerprint)
    #: Seconds for each escrow HTTP request (connect, read, write).
    escrow_timeout_s: float = 10.0

    @gateway_url.validator
    def _check_url(self, _attribute: object, value: str) -> None:
        control_url(value)

    @property
    def ws_url(self) -> str:
        return control_url(self.gateway_url)

    @property
    def http_url(self) -> str:
        return http_base_url(self.gateway_url)
