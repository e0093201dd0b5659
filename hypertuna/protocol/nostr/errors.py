"""The NIP-01 machine-readable reason prefixes and the one exception the Nostr codec raises."""

from __future__ import annotations

import enum

__all__ = [
    "NostrError",
    "Prefix",
    "reason",
]


class Prefix(enum.StrEnum):
    """Standard prefixes of ``OK`` and ``CLOSED`` messages (NIP-01, NIP-42)."""

    INVALID = "invalid"
    DUPLICATE = "duplicate"
    BLOCKED = "blocked"
    RATE_LIMITED = "rate-limited"
    RESTRICTED = "restricted"
    ERROR = "error"
    AUTH_REQUIRED = "auth-required"


def reason(prefix: Prefix, text: str) -> str:
    """The wire form of a reason: ``"<prefix>: <text>"``."""
    return f"{prefix}: {text}"


class NostrError(Exception):
    """A Nostr message or value that cannot be accepted.

    ``str(err)`` is the prefixed reason, ready for an ``OK``, ``CLOSED`` or ``NOTICE`` message.
    ``event_id`` is set when the offending message carried an event whose ``id`` was well formed
    (so the relay can answer ``OK <id> false``); ``sub_id`` is set when it was a ``REQ``,
    ``COUNT`` or ``CLOSE`` whose subscription id was valid (so the relay can answer
    ``CLOSED <sub_id>``). The text never contains lone surrogates, so it can always be sent.
    """

    prefix: Prefix
    text: str
    event_id: str | None
    sub_id: str | None

    def __init__(
        self,
        prefix: Prefix,
        text: str,
        *,
        event_id: str | None = None,
        sub_id: str | None = None,
    ) -> None:
        super().__init__(prefix, text)
        self.prefix = prefix
        self.text = text
        self.event_id = event_id
        self.sub_id = sub_id

    def __str__(self) -> str:
        return reason(self.prefix, self.text)

    def __repr__(self) -> str:
        return (
            f"NostrError({self.prefix!r}, {self.text!r}, "
            f"event_id={self.event_id!r}, sub_id={self.sub_id!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # The default reduction replays only ``args`` and would drop the keyword-only ids, which
        # matters when an error crosses a process boundary (the worker).
        return (
            _rebuild_error,
            (type(self), self.prefix, self.text, self.event_id, self.sub_id),
        )


def _rebuild_error(
    cls: type[NostrError],
    prefix: Prefix,
    text: str,
    event_id: str | None,
    sub_id: str | None,
) -> NostrError:
    return cls(prefix, text, event_id=event_id, sub_id=sub_id)
