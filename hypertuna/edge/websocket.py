"""The relay WebSocket fast path: a lean RFC 6455 server connection on a trio stream.

Why not through hypercorn: there every outgoing message is its own ASGI event, its own wsproto
frame and its own ``send()`` system call. A REQ answer is a hundred small frames and a group
commit answers hundreds of EVENTs at once, so that path spent most of the gateway's CPU in
per-frame overhead. Here frames written in the same scheduling round are *corked* into one
buffer and leave in one ``send_all``; a REQ's stored events and EOSE are one write.

wsproto does the handshake; frames are parsed and built by :mod:`hypertuna.edge.frames`.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable

import trio
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from hypertuna.edge.frames import (
    BinaryMessage,
    FrameReader,
    Ping,
    ProtocolViolation,
    Received,
    TextMessage,
    binary_frame,
    close_frame,
    pong_frame,
    text_frame,
    text_frames,
)
from hypertuna.edge.session import ClientGone

__all__ = ["RelayWebSocket", "WebSocketHandshake", "accept_websocket"]

_RECEIVE_CHUNK = 65536
#: Buffered outgoing bytes above which senders wait for the socket (per connection).
_HIGH_WATER = 256 * 1024


class WebSocketHandshake:
    """The client's upgrade request, parsed but not yet answered."""

    def __init__(self, handshake: H11Handshake, request: Request, trailing: bytes) -> None:
        self._handshake = handshake
        self.request = request
        self._trailing = trailing

    @property
    def path(self) -> str:
        return self.request.target.split("?", 1)[0]

    def reject(self, status: int, reason: str) -> bytes:
        """The bytes of an HTTP refusal with a JSON ``{"error": reason}`` body."""
        body = json.dumps({"error": reason}, ensure_ascii=False).encode()
        head = self._handshake.send(
            RejectConnection(
                status_code=status,
                headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
                has_body=True,
            )
        )
        return head + self._handshake.send(RejectData(data=body, body_finished=True))

    def accept(self) -> tuple[bytes, bytes]:
        """The 101 response bytes, and the bytes that followed the request head (a client may
        pipeline its first frames right behind the upgrade)."""
        return self._handshake.send(AcceptConnection()), self._trailing


def _bad_request(reason: str) -> bytes:
    body = json.dumps({"error": reason}).encode()
    return (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


def accept_websocket(head: bytes) -> WebSocketHandshake | bytes:
    """Parse an upgrade request from ``head`` (all bytes read so far). Returns the handshake,
    or the bytes of an HTTP 400 answer when the request is not a valid WebSocket upgrade."""
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(head)
        for event in handshake.events():
            if isinstance(event, Request):
                # An upgrade request has no body: everything after the head is frames.
                trailing = head[head.index(b"\r\n\r\n") + 4 :]
                return WebSocketHandshake(handshake, event, trailing)
    except RemoteProtocolError as exc:
        return _bad_request(f"bad WebSocket upgrade: {exc}")
    return _bad_request("incomplete WebSocket upgrade request")


class RelayWebSocket:
    """A server-side WebSocket on ``stream`` implementing the session's transport protocol.

    ``receive`` returns whole messages (fragments reassembled, pings answered) and raises
    :class:`ClientGone` when the client closes or breaks the protocol (after sending the close
    frame RFC 6455 asks for: 1002, 1007, or 1009 for a message over ``max_message_bytes``).
    ``send`` queues a frame and returns at once unless ``_HIGH_WATER`` bytes are already
    waiting; the first sender of a scheduling round flushes everything queued in that round
    with one write.
    """

    __slots__ = (
        "_drained",
        "_flushing",
        "_open",
        "_out",
        "_out_bytes",
        "_pending",
        "_reader",
        "_stream",
        "broken",
    )

    def __init__(self, stream: trio.abc.Stream, trailing: bytes, *, max_message_bytes: int) -> None:
        self._stream = stream
        self._reader = FrameReader(max_message_bytes)
        self._reader.feed(trailing)
        self._pending: deque[Received] = deque()
        self._open = True
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flushing = False
        self._drained: trio.Event | None = None
        #: The stream failed while writing; nothing more can be sent.
        self.broken = False

    @property
    def open(self) -> bool:
        return self._open

    async def receive(self) -> str | bytes:
        while True:
            if not self._pending:
                try:
                    self._pending.extend(self._reader.messages())
                except ProtocolViolation as violation:
                    await self.close(violation.code, violation.reason)
                    raise ClientGone() from None
            while self._pending:
                message = self._pending.popleft()
                if isinstance(message, TextMessage):
                    return message.text
                if isinstance(message, BinaryMessage):
                    return message.data
                if isinstance(message, Ping):
                    await self._write(pong_frame(message.payload))
                    continue
                # The client's close: answer it (RFC 6455 5.5.1) and end.
                await self.close(message.code or 1000, "")
                raise ClientGone()
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ClientGone() from None
            if not data:
                raise ClientGone()
            self._reader.feed(data)

    def receive_buffered(self, limit: int) -> list[str]:
        """Text messages that the last read already brought (at most ``limit``), without
        waiting; stops at the first message that is not text (``receive`` handles it)."""
        out: list[str] = []
        pending = self._pending
        while pending and len(out) < limit:
            message = pending[0]
            if not isinstance(message, TextMessage):
                break
            pending.popleft()
            out.append(message.text)
        return out

    async def send(self, data: str) -> None:
        if not self._open:
            raise ClientGone()
        await self._write(text_frame(data))

    async def send_binary(self, data: bytes) -> None:
        if not self._open:
            raise ClientGone()
        await self._write(binary_frame(data))

    async def send_many(self, texts: Iterable[str]) -> None:
        """Queue several text messages as one write."""
        if not self._open:
            raise ClientGone()
        await self._write(text_frames(texts))

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame (once); later sends raise :class:`ClientGone`."""
        if not self._open:
            return
        self._open = False
        try:
            await self._write(close_frame(code, reason))
        except ClientGone:
            pass

    async def _write(self, data: bytes) -> None:
        if self.broken:
            raise ClientGone()
        self._out.append(data)
        self._out_bytes += len(data)
        if self._flushing:
            # Someone else is flushing and will take this too; only wait when the client is
            # not reading and too much is queued.
            while self._flushing and self._out_bytes > _HIGH_WATER:
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
            if self.broken:
                raise ClientGone()
            return
        self._flushing = True
        try:
            # One scheduling round: every task woken with this one (the answers of one group
            # commit, say) queues its frame before the write.
            await trio.lowlevel.checkpoint()
            while self._out:
                chunk = b"".join(self._out)
                self._out.clear()
                self._out_bytes = 0
                if self._drained is not None:
                    self._drained.set()
                    self._drained = None
                await self._stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled) as exc:
            self.broken = True
            self._out.clear()
            if isinstance(exc, trio.Cancelled):
                raise
            raise ClientGone() from None
        finally:
            self._flushing = False
            if self._drained is not None:
                self._drained.set()
                self._drained = None
