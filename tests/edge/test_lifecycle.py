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
