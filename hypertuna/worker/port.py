"""The transport of one forwarded client session: a :class:`WebSocketPort` over the control
connection, so :class:`~hypertuna.edge.session.RelaySession` serves a client that reaches the
worker through the gateway exactly as it serves a direct one.

``receive`` takes the next client frame the gateway forwarded (``client-frames``) from a bounded
queue; ``send``/``send_many`` send one ``relay-frames`` message per call (split only when the
batch would exceed the gateway's message size); ``close`` sends ``session-close``. Every method
raises :class:`ClientGone` once the gateway closed the session or the control connection is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Final

import trio

from hypertuna.edge.session import ClientGone
from hypertuna.protocol.worker import (
    MAX_FRAMES_PER_MESSAGE,
    Message,
    RelayFrames,
    SessionClose,
    binary_size,
)

__all__ = ["ForwardedPort", "split_frames"]

log = logging.getLogger(__name__)

#: A character costs at most 4 bytes in UTF-8; batches that fit even at that cost need no exact
#: measurement.
_WORST_UTF8: Final = 4
_REASON_MAX: Final = 1024

SendMessage = Callable[[Message], Awaitable[None]]


def split_frames(session: int, frames: Sequence[str], max_bytes: int) -> Iterator[tuple[str, ...]]:
    """``frames`` in order, grouped so each ``relay-frames`` message of ``session`` (in its
    binary form, :func:`~hypertuna.protocol.worker.encode_binary`) is at most ``max_bytes`` long
    and holds at most :data:`MAX_FRAMES_PER_MESSAGE` frames. A frame too large for any message
    is left out (and logged): sending it would make the gateway close the whole control
    connection."""
    empty = binary_size(())
    per_frame = binary_size(("",)) - empty
    if (
        len(frames) <= MAX_FRAMES_PER_MESSAGE
        and empty + sum(len(f) for f in frames) * _WORST_UTF8 + per_frame * len(frames) <= max_bytes
    ):
        yield tuple(frames)
        return
    batch: list[str] = []
    size = empty
    for frame in frames:
        cost = per_frame + len(frame.encode("utf-8"))
        if empty + cost > max_bytes:
            log.warning(
                "session %d: dropped a %d-byte frame larger than the gateway's message limit",
                session,
                len(frame),
            )
            continue
        if batch and (size + cost > max_bytes or len(batch) >= MAX_FRAMES_PER_MESSAGE):
            yield tuple(batch)
            batch, size = [], empty
        batch.append(frame)
        size += cost
    if batch:
        yield tuple(batch)


class ForwardedPort:
    """One forwarded session's transport (see the module docstring). The control connection
    feeds it with :meth:`deliver` and ends it with :meth:`peer_closed`."""

    def __init__(
        self, session: int, send_message: SendMessage, *, max_message_bytes: int, queue_frames: int
    ) -> None:
        self.session = session
        self._send_message = send_message
        self._max_message_bytes = max_message_bytes
        self._to_session, self._from_gateway = trio.open_memory_channel[str](queue_frames)
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether either side ended the session (nothing more is sent for it)."""
        return self._closed

    # -- WebSocketPort -------------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        if self._closed:
            raise ClientGone()
        try:
            return await self._from_gateway.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ClientGone() from None

    async def send(self, data: str) -> None:
        await self.send_many((data,))

    async def send_many(self, texts: Iterable[str]) -> None:
        frames = texts if isinstance(texts, list | tuple) else list(texts)
        if not frames:
            return
        for batch in split_frames(self.session, frames, self._max_message_bytes):
            if self._closed:
                raise ClientGone()
            await self._send_message(RelayFrames(session=self.session, frames=batch))

    async def close(self, code: int, reason: str) -> None:
        """Send ``session-close`` (once). The close code has no place in the protocol: the
        gateway closes its client the way it sees fit."""
        if self._closed:
            return
        self._closed = True
        self._to_session.close()
        try:
            await self._send_message(
                SessionClose(session=self.session, reason=reason[:_REASON_MAX])
            )
        except ClientGone:
            pass

    # -- fed by the control connection ---------------------------------------------------------

    async def deliver(self, frames: Sequence[str], stall_s: float) -> bool:
        """Queue client frames for the session; False if the queue stayed full for ``stall_s``
        (the session does not keep up). Frames for an ended session are dropped."""
        for frame in frames:
            try:
                try:
                    self._to_session.send_nowait(frame)
                except trio.WouldBlock:
                    with trio.move_on_after(stall_s):
                        await self._to_session.send(frame)
                        continue
                    return False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return True
        return True

    def peer_closed(self) -> None:
        """The gateway closed the session (or the connection is gone): the session's next
        receive or send raises :class:`ClientGone`, and no ``session-close`` is sent."""
        self._closed = True
        self._to_session.close()
