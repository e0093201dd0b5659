"""End to end with real processes: a relay stays readable through the gateway's mirror.

A reference worker registers a relay and mirrors it to the gateway; clients publish through the
gateway; once the mirror has caught up the worker is SIGKILLed and the gateway answers the same
filters from its replica, a subscription opened before the kill lives on without duplicates, the
worker comes back on the same data and its new event reaches the replica subscriber, and after a
gateway restart the mirrors are still served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hypertuna.protocol.nostr import public_key_hex
from tests.support import TIMEOUT, Signer, connect, event_json
from tests.test_e2e_workers import REGISTRATIONS, WORKERS, cli, running, wait_metric

pytestmark = pytest.mark.slow

READY = 'gateway_blind_peer_mirror_state{state="ready"}'
SYNCING = 'gateway_blind_peer_mirror_state{state="syncing"}'
STALE = 'gateway_blind_peer_mirror_state{state="stale"}'
MIRROR_BYTES = "gateway_blind_peer_bytes"
#: The worker checks its cores every second; a mirror is caught up once its bytes stop growing
#: for longer than a few of those checks.
QUIET_S = 2.5


async def metrics(http: str) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{http}/metrics")).text
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)
    }


async def wait_mirrored(http: str, within: float = 30.0) -> None:
    """Until every mirror is ready and their bytes have not grown for ``QUIET_S`` seconds."""
    with trio.fail_after(within):
        last: float | None = None
        quiet_since = trio.current_time()
        while True:
            figures = await metrics(http)
            ready = figures.get(READY, 0) >= 1
            behind = figures.get(SYNCING, 0) + figures.get(STALE, 0)
            size = figures.get(MIRROR_BYTES, 0)
            if size != last or not ready or behind:
                last, quiet_since = size, trio.current_time()
            elif trio.current_time() - quiet_since >= QUIET_S:
                return
            await trio.sleep(0.1)


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [event["id"] for event in events]


async def test_relay_served_from_mirror_when_worker_dies(tmp_path: Path) -> None:
    data = tmp_path / "w"
    created = cli("worker", "relay", "create", "mirrored", "--data", str(data), cwd=tmp_path)
    key = re.search(r"key: ([0-9a-f]{64})", created)
    assert key is not None
    relay_key = key.group(1)
    alice, bob = Signer(), Signer()
    notes = [
        alice.event(content="one", created_at=1_700_000_001),
        alice.event(kind=7, content="+", created_at=1_700_000_002, tags=[["t", "x"]]),
        bob.event(content="two", created_at=1_700_000_003, tags=[["t", "x"]]),
        bob.event(content="three", created_at=1_700_000_004),
        alice.event(kind=30023, content="long", created_at=1_700_000_005, tags=[["d", "a"]]),
    ]
    filters: list[dict[str, Any]] = [
        {},
        {"kinds": [1]},
        {"authors": [public_key_hex(alice.secret)]},
        {"#t": ["x"]},
        {"kinds": [1], "limit": 2},
        {"since": 1_700_000_003},
        {"ids": [notes[0].id, notes[4].id]},
        {"kinds": [30023], "#d": ["a"]},
    ]
    gateway_args = ("gateway", "--port", "0", "--data-dir", str(tmp_path / "gw"))
    worker_args = ("worker", "--data", str(data))

    async with running(*gateway_args, cwd=tmp_path) as gw:
        http = (await gw.wait_for(r"listening on (http://\S+)")).group(1)
        relay_url = f"{http.replace('http://', 'ws://', 1)}/relay/{relay_key}"
        async with running(*worker_args, "--gateway", http, cwd=tmp_path) as worker:
            await worker.wait_for("connected to gateway")
            await wait_metric(http, REGISTRATIONS, 1, TIMEOUT)
            async with connect(relay_url) as writer:
                for note in notes:
                    assert await writer.publish(note) == (True, "")
                answers = [ids(await writer.fetch(f"q{i}", f)) for i, f in enumerate(filters)]
            assert sorted(answers[0]) == sorted(note.id for note in notes)
            await wait_mirrored(http)

            async with connect(relay_url) as subscriber:
                stored = await subscriber.query("live", {"kinds": [1]})
                assert sorted(ids(stored)) == sorted(answers[1])
                worker.process.kill()
                await worker.process.wait()
                await wait_metric(http, WORKERS, 0, TIMEOUT)

                # Every filter gets the answer the worker gave, now from the replica.
                async with connect(relay_url) as reader:
                    for i, query in enumerate(filters):
                        assert ids(await reader.fetch(f"r{i}", query)) == answers[i], query
                    assert await reader.count("c", {"kinds": [1]}) == len(answers[1])
                    # Read-only while no worker is there.
                    await reader.send("EVENT", event_json(alice.event(content="refused")))
                    replies = [await reader.recv(), await reader.recv()]
                    oks = [reply for reply in replies if reply[0] == "OK"]
                    assert len(oks) == 1 and oks[0][2] is False, replies
                    assert oks[0][3].startswith("blocked:"), replies

                # The worker returns on the same data; what it stores reaches the subscriber
                # opened before the kill, once, and a new query sees it.
                async with running(*worker_args, "--gateway", http, cwd=tmp_path) as back:
                    local = (await back.wait_for(r"relay mirrored: (ws://\S+)")).group(1)
                    await back.wait_for("connected to gateway")
                    late = bob.event(content="after the worker came back", created_at=1_700_000_009)
                    async with connect(local) as direct:
                        assert await direct.publish(late) == (True, "")
                    frame = await subscriber.recv()
                    assert frame == ["EVENT", "live", event_json(late)], frame
                    await subscriber.recv_nothing(QUIET_S)
                    answers[1] = [late.id, *answers[1]]
                    answers[0] = [late.id, *answers[0]]
                    async with connect(relay_url) as fresh:
                        assert ids(await fresh.fetch("f", {"kinds": [1]})) == answers[1]
                    await wait_mirrored(http)

    # A restarted gateway, no worker: the mirrors and their metadata are still served.
    async with running(*gateway_args, cwd=tmp_path) as gw:
        http = (await gw.wait_for(r"listening on (http://\S+)")).group(1)
        relay_url = f"{http.replace('http://', 'ws://', 1)}/relay/{relay_key}"
        figures = await metrics(http)
        assert figures.get(MIRROR_BYTES, 0) > 0, figures
        async with connect(relay_url) as reader:
            for i, query in enumerate(filters[:2]):
                assert ids(await reader.fetch(f"g{i}", query)) == answers[i], query
