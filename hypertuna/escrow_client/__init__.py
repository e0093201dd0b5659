"""The gateway's client of a standalone escrow: signed HTTPS requests over mutual TLS."""

from __future__ import annotations

from hypertuna.escrow_client.transport import (
    EscrowRefusedTlsError,
    EscrowResponse,
    EscrowTransport,
    EscrowTransportError,
    EscrowUnavailableError,
    open_escrow_transport,
)

__all__ = [
    "EscrowRefusedTlsError",
    "EscrowResponse",
    "EscrowTransport",
    "EscrowTransportError",
    "EscrowUnavailableError",
    "open_escrow_transport",
]
