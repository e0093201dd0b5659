"""Staged shutdown of the in-process system."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.support import TIMEOUT, Signer, connect, open_gateway


async def test_exit_closes_websockets_with_1001_and_keeps_acknowledged_events(
    tmp_path: Path,
) -> None:
    signer = Signer()
    events = [signer.event(content=str(i)) for i in range(20)]
    close_codes: list[int] = []
    ready = trio.Event()

    async def client(url: str) -> None:
        async with connect(url) as relay:
            for event in events:
                assert (await relay.publish(event))[0]
            await relay.query("live", {})
            await relay.query("second", {"kinds": [1]})
            ready.set()
            # The relay ends: each open subscription gets CLOSED, then the close frame comes.
            closed_subs = {tuple(await relay.recv()) for _ in range(2)}
            assert closed_subs == {
                ("CLOSED", "live", "error: gateway shutting down"),
                ("CLOSED", "second", "error: gateway shutting down"),
            }
            with pytest.raises(ConnectionClosed) as closed:
                await relay.ws.get_message()
            close_codes.append(closed.value.reason.code)

    with trio.fail_after(TIMEOUT):
        # The gateway exits first (staged shutdown) while the client task is still subscribed.
        async with trio.open_nursery() as nursery, open_gateway(tmp_path / "d") as gw:
            relay_key = gw.relay.key
            nursery.start_soon(client, gw.url)
            await ready.wait()
    assert close_codes == [1001]
    async with open_gateway(tmp_path / "d") as gw:
        relay = await gw.system.lookup_relay(relay_key)
        assert relay is not None
        assert await gw.system.store.event_count(relay.id) == len(events)


async def test_new_connections_refused_while_stopping(tmp_path: Path) -> None:
    async with open_gateway(tmp_path / "d") as gw:
        gw.system.stopping.set()
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionRejected) as rejected:
            async with connect(gw.url):
                pass
        assert rejected.value.status_code == 503


async def test_a_failing_connection_handler_ends_only_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hypertuna.edge import server

    real = server._Dispatcher._serve_relay
    failures = 0

    async def fail_once(self: server._Dispatcher, stream: trio.SocketStream, head: bytes) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("injected handler bug")
        await real(self, stream, head)

    # Fault injection: the first relay connection hits a bug in its handler.
    monkeypatch.setattr(server._Dispatcher, "_serve_relay", fail_once)
    signer = Signer()
    with trio.fail_after(TIMEOUT):
        async with open_gateway(tmp_path) as gw:
            # A raw upgrade request: the failed handler closes the connection (EOF, no answer).
            host, port = gw.system.http_urls[0].removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            path = gw.url.split(port, 1)[1]
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert await stream.receive_some() == b""
            await stream.aclose()
            # The gateway is still up and the next connection is served normally.
            async with connect(gw.url) as relay:
                assert (await relay.publish(signer.event()))[0]
    assert failures == 1
    assert "injected handler bug" in caplog.text
