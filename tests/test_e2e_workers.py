"""End to end with real processes: a gateway, two reference workers and third-party clients.

A worker registers its relay; a client publishes, queries and keeps a live subscription through
the gateway; a second worker of the same relay takes over when the first is killed mid-
subscription, which the gateway notices within its liveness timeout; and the relay URL never
changes. (With no worker left the relay is served from its mirror: tests/test_e2e_replica.py.)
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from hypertuna.protocol.nostr import public_key_hex
from tests.support import TIMEOUT, Signer, connect, event_json

pytestmark = pytest.mark.slow

LIVENESS_S = 2.0
_LOG_NUMBERS = itertools.count()
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "HYPERTUNA_WORKERS_HEARTBEAT_INTERVAL_S": "0.3",
    "HYPERTUNA_WORKERS_LIVENESS_TIMEOUT_S": str(LIVENESS_S),
    "HYPERTUNA_LIMITS_EVENTS_PER_SECOND": "1000",
}


def cli(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hypertuna.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=True,
    )
    return done.stdout


class Process:
    """A running ``hypertuna`` process whose stdout is read as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = ""

    async def wait_for(self, pattern: str) -> re.Match[str]:
        assert self.process.stdout is not None
        with trio.fail_after(TIMEOUT * 2):
            while (match := re.search(pattern, self.output)) is None:
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"process ended; output so far:\n{self.output}"
                self.output += chunk.decode()
        return match


@asynccontextmanager
async def running(*args: str, cwd: Path) -> AsyncIterator[Process]:
    log_path = cwd / f"{args[0]}-{next(_LOG_NUMBERS)}.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypertuna.cli", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            env=ENV,
            cwd=cwd,
        )
    try:
        yield Process(process)
    except BaseException:
        # A failure shows what the process said on stderr (its log), not only the assertion.
        print(f"--- {log_path.name} ---\n{log_path.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def metric(http: str, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{http}/metrics")).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


async def wait_metric(http: str, name: str, value: float, within: float) -> float:
    """Seconds until the metric ``name`` reads ``value`` (fails after ``within`` seconds)."""
    started = trio.current_time()
    with trio.fail_after(within):
        while await metric(http, name) != value:  # noqa: ASYNC110 - polling another process
            await trio.sleep(0.05)
    return trio.current_time() - started


WORKERS = "gateway_workers_connected"
REGISTRATIONS = 'gateway_actor_stat{actor="peer-router",stat="registrations"}'


async def test_gateway_routes_to_workers_and_fails_over(tmp_path: Path) -> None:
    first, second = tmp_path / "w1", tmp_path / "w2"
    created = cli("worker", "relay", "create", "shared", "--data", str(first), cwd=tmp_path)
    key = re.search(r"key: ([0-9a-f]{64})", created)
    assert key is not None
    relay_key = key.group(1)
    # A standby worker for the same relay holds the same owner key: here, the same primary key.
    (second / "cores").mkdir(parents=True)
    shutil.copy2(first / "cores" / "primary-key", second / "cores" / "primary-key")
    cli("worker", "relay", "create", "shared", "--data", str(second), cwd=tmp_path)

    alice = Signer()
    author = public_key_hex(alice.secret)
    async with running(
        "gateway", "--port", "0", "--data-dir", str(tmp_path / "gw"), cwd=tmp_path
    ) as gw:
        http = (await gw.wait_for(r"listening on (http://\S+)")).group(1)
        relay_url = f"{http.replace('http://', 'ws://', 1)}/relay/{relay_key}"
        async with running("worker", "--gateway", http, "--data", str(first), cwd=tmp_path) as w1:
            await w1.wait_for("connected to gateway")
            await wait_metric(http, REGISTRATIONS, 1, TIMEOUT)
            first_note = alice.event(content="through the gateway")
            async with connect(relay_url) as reader, connect(relay_url) as writer:
                assert await writer.publish(first_note) == (True, "")
                stored = await reader.query("live", {"authors": [author]})
                assert [e["id"] for e in stored] == [first_note.id]
                live_note = alice.event(content="live")
                assert (await writer.publish(live_note))[0]
                assert await reader.recv() == ["EVENT", "live", event_json(live_note)]

                async with running(
                    "worker", "--gateway", http, "--data", str(second), cwd=tmp_path
                ) as w2:
                    await w2.wait_for("connected to gateway")
                    await wait_metric(http, REGISTRATIONS, 2, TIMEOUT)
                    # The first worker freezes: its connection stays open but it says nothing,
                    # so only the liveness timeout can tell the gateway it is gone.
                    w1.process.send_signal(signal.SIGSTOP)
                    detected = await wait_metric(http, WORKERS, 1, LIVENESS_S + 3)
                    assert detected <= LIVENESS_S + 3
                    # Same URL, same open subscription: now served by the second worker.
                    after = alice.event(content="after failover")
                    assert await writer.publish(after) == (True, "")
                    frame = await reader.recv()
                    while frame[0] == "EOSE" or frame[2] != event_json(after):
                        frame = await reader.recv()
                    assert frame == ["EVENT", "live", event_json(after)]
                    async with connect(relay_url) as fresh:
                        ids = [e["id"] for e in await fresh.fetch("s", {"authors": [author]})]
                        assert after.id in ids
                w1.process.kill()
