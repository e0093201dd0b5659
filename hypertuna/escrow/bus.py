"""In-process fan-out of revocations (the single binary's event bus for the escrow).

Whoever holds a lease subscribes (to one relay, or to all) and receives every
:class:`~hypertuna.escrow.service.Revocation` published after it subscribed. Each subscriber has
a bounded buffer; one that falls that far behind is disconnected (its channel ends) rather than
silently missing a revocation or blocking the publisher, so it must treat the end of its channel
as "resynchronise: your lease may be gone".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import trio

from hypertuna.escrow.service import Revocation

__all__ = ["RevocationBus", "RevocationBusStatistics"]

DEFAULT_SUBSCRIBER_BUFFER = 64


@attrs.frozen
class RevocationBusStatistics:
    subscribers: int
    published: int
    dropped_subscribers: int


@attrs.define(eq=False)
class _Subscriber:
    relay_key: str | None
    send: trio.MemorySendChannel[Revocation]


class RevocationBus:
    """Fan-out of revocations to subscribers; never blocks the publisher."""

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self._published = 0
        self._dropped = 0

    @contextlib.contextmanager
    def subscribe(
        self, relay_key: str | None = None, *, buffer: int = DEFAULT_SUBSCRIBER_BUFFER
    ) -> Iterator[trio.MemoryReceiveChannel[Revocation]]:
        """A channel of the revocations of ``relay_key`` (all relays when None), from now on,
        until the block exits or the subscriber falls ``buffer`` messages behind."""
        if buffer <= 0:
            raise ValueError("buffer must be positive")
        send, receive = trio.open_memory_channel[Revocation](buffer)
        subscriber = _Subscriber(relay_key, send)
        self._subscribers.append(subscriber)
        try:
            with receive:
                yield receive
        finally:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
            send.close()

    def publish(self, revocation: Revocation) -> None:
        """Deliver ``revocation`` to every matching subscriber at once (no waiting)."""
        self._published += 1
        for subscriber in list(self._subscribers):
            if subscriber.relay_key not in (None, revocation.relay_key):
                continue
            try:
                subscriber.send.send_nowait(revocation)
            except trio.WouldBlock:
                self._dropped += 1
                self._subscribers.remove(subscriber)
                subscriber.send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(subscriber)

    def statistics(self) -> RevocationBusStatistics:
        return RevocationBusStatistics(
            subscribers=len(self._subscribers),
            published=self._published,
            dropped_subscribers=self._dropped,
        )
