"""RFC 6455 behaviour of the relay sockets, driven byte by byte with wsproto as the client."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.support import TIMEOUT, Gateway, Signer, connect, event_json


class RawClient:
    """A WebSocket client on a plain TCP stream, for frames trio-websocket will not send."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[Event] = []

    @classmethod
    async def open(cls, gw: Gateway, path: str, *, head: bytes = b"") -> RawClient:
        host, port = gw.http.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        if head:
            await stream.send_all(head)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=host, target=path)))
        return cls(stream, ws)

    async def event(self) -> Event:
        with trio.fail_after(TIMEOUT):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def message(self) -> list[object]:
        while True:
            event = await self.event()
            if isinstance(event, TextMessage):
                decoded: list[object] = json.loads(event.data)
                return decoded


async def _accepted(gw: Gateway) -> RawClient:
    client = await RawClient.open(gw, f"/relay/{gw.relay.key}")
    assert isinstance(await client.event(), AcceptConnection)
    return client


async def test_ping_is_answered(gw: Gateway) -> None:
    client = await _accepted(gw)
    await client.send(Ping(payload=b"are you there"))
    pong = await client.event()
    assert isinstance(pong, Pong) and pong.payload == b"are you there"


async def test_fragmented_message_is_reassembled(gw: Gateway, alice: Signer) -> None:
    client = await _accepted(gw)
    event = alice.event(content="in three pieces")
    text = json.dumps(["EVENT", event_json(event)])
    third = len(text) // 3
    await client.send(TextMessage(data=text[:third], message_finished=False))
    await client.send(Ping(payload=b"between fragments"))  # control frames may interleave
    await client.send(TextMessage(data=text[third : 2 * third], message_finished=False))
    await client.send(TextMessage(data=text[2 * third :], message_finished=True))
    replies = [await client.event(), await client.event()]
    assert any(isinstance(r, Pong) for r in replies)
    [ok] = [json.loads(r.data) for r in replies if isinstance(r, TextMessage)]
    assert ok == ["OK", event.id, True, ""]


async def test_binary_message_is_read_as_utf8_json(gw: Gateway, alice: Signer) -> None:
    client = await _accepted(gw)
    event = alice.event(content="binary frame")
    await client.send(BytesMessage(data=json.dumps(["EVENT", event_json(event)]).encode()))
    assert await client.message() == ["OK", event.id, True, ""]


async def test_invalid_utf8_closes_with_1007(gw: Gateway) -> None:
    client = await _accepted(gw)
    # A text frame whose payload is not UTF-8: wsproto cannot express that, so build it.
    payload = b'["REQ","\xff\xfe",{}]'
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await client.stream.send_all(bytes((0x81, 0x80 | len(payload))) + mask + masked)
    close = await client.event()
    assert isinstance(close, CloseConnection) and close.code == 1007


async def test_client_close_is_answered(gw: Gateway) -> None:
    client = await _accepted(gw)
    await client.send(CloseConnection(code=1000, reason="bye"))
    reply = await client.event()
    assert isinstance(reply, CloseConnection) and reply.code == 1000


async def test_bad_upgrade_gets_400(gw: Gateway) -> None:
    host, port = gw.http.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        f"GET /relay/{gw.relay.key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\n\r\n".encode()
    )
    with trio.fail_after(TIMEOUT):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


async def test_upgrade_after_keep_alive_request_is_served_too(gw: Gateway, alice: Signer) -> None:
    """A client that first makes an HTTP request on the connection and then upgrades is
    served by hypercorn's WebSocket support, with the same relay behaviour."""
    host = gw.http.removeprefix("http://").rsplit(":", 1)[0]
    head = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    client = await RawClient.open(gw, f"/relay/{gw.relay.key}", head=head)
    with trio.fail_after(TIMEOUT):
        data = b""
        # Read the /health response; the rest belongs to the upgrade.
        while b"\r\n\r\n" not in data:
            data += await client.stream.receive_some(1)
        assert data.startswith(b"HTTP/1.1 200")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in data.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        body = b""
        while len(body) < length:
            body += await client.stream.receive_some(length - len(body))
    assert json.loads(body)["status"] == "ok"
    assert isinstance(await client.event(), AcceptConnection)
    event = alice.event(content="via hypercorn")
    await client.send(TextMessage(data=json.dumps(["EVENT", event_json(event)])))
    assert await client.message() == ["OK", event.id, True, ""]
    await client.send(TextMessage(data=json.dumps(["REQ", "s", {"ids": [event.id]}])))
    assert await client.message() == ["EVENT", "s", event_json(event)]
    assert await client.message() == ["EOSE", "s"]


async def test_unknown_relay_rejection_has_json_body(gw: Gateway) -> None:
    client = await RawClient.open(gw, "/relay/" + "ef" * 32)
    rejection = await client.event()
    assert isinstance(rejection, RejectConnection) and rejection.status_code == 404
    body = b""
    while True:
        part = await client.event()
        assert isinstance(part, RejectData)
        body += part.data
        if part.body_finished:
            break
    assert json.loads(body)["error"].startswith("no relay")


async def test_pipelined_frames_right_after_handshake(gw: Gateway, alice: Signer) -> None:
    """Frames sent in the same packet as the upgrade request are not lost."""
    host, port = gw.http.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    ws = WSConnection(ConnectionType.CLIENT)
    event = alice.event(content="eager")
    handshake = ws.send(Request(host=host, target=f"/relay/{gw.relay.key}"))
    # wsproto will not frame before the 101 arrives; build the masked frame by hand.
    payload = json.dumps(["EVENT", event_json(event)]).encode()
    assert len(payload) < 65536
    mask = b"\x05\x06\x07\x08"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = b"\x81\xfe" + len(payload).to_bytes(2, "big") + mask + masked
    await stream.send_all(handshake + frame)
    client = RawClient(stream, ws)
    assert isinstance(await client.event(), AcceptConnection)
    assert await client.message() == ["OK", event.id, True, ""]


async def test_many_frames_in_one_write_are_all_answered(gw: Gateway, alice: Signer) -> None:
    events = [alice.event(content=f"burst {i}") for i in range(200)]
    async with connect(gw.url) as client:
        for event in events:
            await client.send("EVENT", event_json(event))
        oks = [await client.recv() for _ in events]
    assert sorted(ok[1] for ok in oks) == sorted(e.id for e in events)
    assert all(ok[2] is True for ok in oks)


async def test_large_req_answer_arrives_whole(gw: Gateway, alice: Signer) -> None:
    """Hundreds of stored events leave as one corked write and arrive intact, in order."""
    events = [
        alice.event(content="x" * 2000 + str(i), created_at=1_600_000_000 + i) for i in range(300)
    ]
    async with connect(gw.url) as client:
        for event in events:
            await client.send("EVENT", event_json(event))
        for _ in events:
            assert (await client.recv())[2] is True
        got = await client.query("all", {"limit": 500})
    assert [e["id"] for e in got] == [e.id for e in reversed(events)]


async def test_close_frame_reaches_client_before_hangup(gw: Gateway) -> None:
    async with connect(gw.url) as client:
        await gw.system.sessions.close_all(4000, "test close")
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.reason.code == 4000
