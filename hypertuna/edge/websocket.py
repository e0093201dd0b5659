"""The relay WebSocket fast path: a lean RFC 6455 server connection on a trio stream.

Why not through hypercorn: there every outgoing message is its own ASGI event, its own wsproto
frame and its own ``send()`` system call. A REQ answer is a hundred small frames and a group
commit answers hundreds of EVENTs at once, so that path spent most of the gateway's CPU in
per-frame overhead. Here frames written in the same scheduling round are *corked* into one
buffer and leave in one ``send_all``; a REQ's stored events and EOSE are one write.

wsproto does the handshake and parses (and validates) incoming frames; outgoing server frames
are unmasked and trivially framed here.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from hypertuna.edge.session import ClientGone

__all__ = ["RelayWebSocket", "WebSocketHandshake", "accept_websocket", "text_frame"]

CLOSE_MESSAGE_TOO_BIG = 1009
_RECEIVE_CHUNK = 65536
#: Buffered outgoing bytes above which senders wait for the socket (per connection).
_HIGH_WATER = 256 * 1024


def text_frame(text: str) -> bytes:
    """One unfragmented, unmasked server text frame."""
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


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

    def accept(self) -> tuple[bytes, Connection]:
        """The 101 response bytes and the open frame-level connection."""
        data = self._handshake.send(AcceptConnection())
        connection = self._handshake.connection
        assert connection is not None
        # wsproto's server side drops what followed the request head; a client may pipeline
        # its first frames right behind the upgrade, so hand them over.
        if self._trailing:
            connection.receive_data(self._trailing)
        return data, connection


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
        body = json.dumps({"error": f"bad WebSocket upgrade: {exc}"}).encode()
        return (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
    body = b'{"error": "incomplete WebSocket upgrade request"}'
    return (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


class RelayWebSocket:
    """A server-side WebSocket on ``stream`` implementing the session's transport protocol.

    ``receive`` returns whole messages (fragments reassembled, pings answered) and raises
    :class:`ClientGone` when the client closes or breaks the protocol; a message larger than
    ``max_message_bytes`` closes the connection with 1009. ``send`` queues a frame and returns
    at once unless ``_HIGH_WATER`` bytes are already waiting; the first sender of a scheduling
    round flushes everything queued in that round with one write.
    """

    __slots__ = (
        "_conn",
        "_drained",
        "_events",
        "_flushing",
        "_max_message",
        "_out",
        "_out_bytes",
        "_part_chars",
        "_parts",
        "_stream",
        "broken",
    )

    def __init__(
        self, stream: trio.abc.Stream, connection: Connection, *, max_message_bytes: int
    ) -> None:
        self._stream = stream
        self._conn = connection
        self._max_message = max_message_bytes
        self._events: deque[Event] = deque(connection.events())
        self._parts: list[str | bytes | bytearray] = []
        self._part_chars = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flushing = False
        self._drained: trio.Event | None = None
        #: The stream failed while writing; nothing more can be sent.
        self.broken = False

    @property
    def open(self) -> bool:
        return self._conn.state is ConnectionState.OPEN

    async def receive(self) -> str | bytes:
        while True:
            while self._events:
                message = await self._handle(self._events.popleft())
                if message is not None:
                    return message
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ClientGone() from None
            if not data:
                raise ClientGone()
            try:
                self._conn.receive_data(bytes(data))
            except LocalProtocolError:
                raise ClientGone() from None
            self._events.extend(self._conn.events())

    async def _handle(self, event: Event) -> str | bytes | None:
        if isinstance(event, TextMessage | BytesMessage):
            # wsproto hands over partial frames as they arrive, so this bounds the memory a
            # client can make us hold to one message plus one receive chunk.
            self._parts.append(event.data)
            self._part_chars += len(event.data)
            # A character is at most 4 UTF-8 bytes: count exact bytes only near the limit.
            if self._part_chars * 4 > self._max_message and self._part_bytes() > self._max_message:
                await self._close_too_big()
            if not event.message_finished:
                return None
            parts, self._parts = self._parts, []
            self._part_chars = 0
            if isinstance(event, TextMessage):
                return "".join(p for p in parts if isinstance(p, str))
            return b"".join(p for p in parts if isinstance(p, bytes | bytearray))
        if isinstance(event, Ping):
            await self._write(self._conn.send(event.response()))
            return None
        if isinstance(event, CloseConnection):
            # The client's close (or a protocol error wsproto turned into one): answer it.
            if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                await self._write(self._conn.send(event.response()))
            raise ClientGone()
        return None

    def _part_bytes(self) -> int:
        return sum(len(p.encode("utf-8")) if isinstance(p, str) else len(p) for p in self._parts)

    async def _close_too_big(self) -> None:
        await self.close(CLOSE_MESSAGE_TOO_BIG, "message too big")
        raise ClientGone()

    async def send(self, data: str) -> None:
        if not self.open:
            raise ClientGone()
        await self._write(text_frame(data))

    async def send_many(self, texts: Iterable[str]) -> None:
        """Queue several text messages as one write."""
        if not self.open:
            raise ClientGone()
        await self._write(b"".join(text_frame(text) for text in texts))

    async def close(self, code: int, reason: str) -> None:
        if not self.open:
            return
        try:
            await self._write(self._conn.send(CloseConnection(code=code, reason=reason)))
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
