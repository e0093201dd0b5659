"""How fast clients get served from the gateway's replica when their worker dies.

    .venv/bin/python bench/failover.py [--quick]

One run spawns a gateway and a reference worker (fresh data directories, loopback ports, rate
limits lifted), creates a relay on the worker, fills it with events (100k; quick: 20k) published
directly to the worker, and waits until the gateway's blind-peer mirror has caught up (every
mirror ``ready`` and ``gateway_blind_peer_bytes`` still for a few of the worker's mirror polls).
Then:

- **failover**: N clients (200; quick: 50) connect through the gateway and hold a live
  subscription (REQ answered with EOSE). The worker is SIGKILLed; right after, every client
  sends a new REQ on its connection and times its EOSE from the moment of the kill. The session
  loses its worker, sweeps, finds none and switches to the replica, which answers the REQ:
  ``failover_p50_s``, ``failover_p99_s`` (and ``failover_max_s``, ``failover_failed``);
- **replica REQ latency**: ``{"kinds":[1],"limit":100}`` to its EOSE on the replica of the full
  relay, one REQ in flight: ``replica_req_p50_ms``, ``replica_req_p99_ms``.

Progress goes to stderr; the last stdout line is one JSON object with the figures. Targets
(issue 5): failover p99 <= 1.5 s, replica REQ p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import trio
from proxy import Worker, gateway_relay_url, publish, wait_routed
from relay_load import (
    HandshakeFailed,
    WsConn,
    event_frames,
    load_events,
    log,
    measure_req,
    percentile,
    raise_nofile,
    rounded,
    spawn_gateway,
    text_frame,
    wait_for_end,
    ws_connect,
)

METRIC_LINE = re.compile(r"^(\S+) (\S+)$", re.MULTILINE)
READY = 'gateway_blind_peer_mirror_state{state="ready"}'
BEHIND = (
    'gateway_blind_peer_mirror_state{state="syncing"}',
    'gateway_blind_peer_mirror_state{state="stale"}',
)
MIRROR_BYTES = "gateway_blind_peer_bytes"
DIRTY_VIEWS = 'gateway_actor_stat{actor="replica-manager",stat="dirty_views"}'
VIEW_SYNCS = 'gateway_actor_stat{actor="replica-manager",stat="background_syncs"}'

WORKERS = "gateway_workers_connected"
#: The worker checks its cores for new blocks every second: a mirror whose bytes stay the same
#: for longer than a few checks has caught up.
QUIET_S = 3.0


def gateway_metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in METRIC_LINE.finditer(text)}


def wait_mirrored(base: str, wait_s: float) -> float:
    """Seconds until every mirror is ready, their bytes have stopped growing and the replica
    views built from them in the background have caught up (as on a gateway that has mirrored
    the relay for a while)."""
    started = time.monotonic()
    last: float | None = None
    quiet_since = started
    while time.monotonic() - started < wait_s:
        figures = gateway_metrics(base)
        size = figures.get(MIRROR_BYTES, 0.0)
        behind = sum(figures.get(name, 0.0) for name in BEHIND) + figures.get(DIRTY_VIEWS, 0.0)
        if figures.get(VIEW_SYNCS, 0.0) < 1:
            behind += 1
        if size != last or figures.get(READY, 0.0) < 1 or behind:
            last, quiet_since = size, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            log(f"mirror caught up: {size / 1e6:.1f} MB")
            return quiet_since - started
        time.sleep(0.2)
    raise RuntimeError(f"the mirror did not catch up within {wait_s:g} s")


async def subscribe(url: str, index: int, wait_s: float) -> WsConn:
    conn = await ws_connect(url, wait_s)
    sub = f"live{index}"
    await conn.send_raw(text_frame(["REQ", sub, {"kinds": [1], "limit": 1}]))
    with trio.fail_after(wait_s):
        await wait_for_end(conn, sub.encode())
    return conn


async def probe(conn: WsConn, killed_at: float, wait_s: float) -> float | None:
    """Seconds from the kill to the EOSE of a new REQ on ``conn`` (None: no EOSE)."""
    await conn.send_raw(text_frame(["REQ", "probe", {"kinds": [1], "limit": 1}]))
    with trio.move_on_after(wait_s):
        try:
            _, arrived = await wait_for_end(conn, b"probe")
        except RuntimeError as exc:
            log(f"probe failed: {exc}")
            return None
        return arrived - killed_at
    return None


async def failover(url: str, clients: int, worker: Worker, wait_s: float) -> list[float | None]:
    conns: list[WsConn] = [None] * clients  # type: ignore[list-item]

    async def open_one(index: int, limit: trio.CapacityLimiter) -> None:
        async with limit:
            conns[index] = await subscribe(url, index, wait_s)

    limit = trio.CapacityLimiter(32)
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(open_one, index, limit)
    log(f"{clients} clients subscribed through the gateway; SIGKILL to the worker")
    results: list[float | None] = [None] * clients
    killed_at = time.perf_counter()
    worker.process.kill()

    async def probe_one(index: int) -> None:
        results[index] = await probe(conns[index], killed_at, wait_s)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(probe_one, index)
    finally:
        for conn in conns:
            await conn.aclose()
    return results


def run(quick: bool, clients: int | None) -> dict[str, Any]:
    count = 20_000 if quick else 100_000
    clients = clients or (50 if quick else 200)
    samples = 200 if quick else 500
    raise_nofile()
    raws = load_events(count, max(1, os.cpu_count() or 1), use_cache=True)
    figures: dict[str, Any] = {"quick": quick, "events": count, "clients": clients}
    gateway = spawn_gateway(None)
    worker: Worker | None = None
    try:
        base = gateway.url.split("/relay/", 1)[0].replace("ws://", "http://", 1)
        worker = Worker(base)
        relay_key = worker.url.rsplit("/", 1)[1]
        routed_url = gateway_relay_url(gateway.url, relay_key)
        trio.run(wait_routed, routed_url, 30.0)
        started = time.monotonic()
        publish(worker.url, event_frames(raws), connections=8, window=32)
        log(f"published {count} events to the worker in {time.monotonic() - started:.1f} s")
        figures["mirror_catch_up_s"] = round(wait_mirrored(base, 600.0), 2)
        times = trio.run(failover, routed_url, clients, worker, 30.0)
        served = sorted(t for t in times if t is not None)
        figures["failover_failed"] = clients - len(served)
        figures["failover_p50_s"] = rounded(percentile(served, 50))
        figures["failover_p99_s"] = rounded(percentile(served, 99))
        figures["failover_max_s"] = rounded(served[-1] if served else None)
        log(f"failover: {figures}")
        if gateway_metrics(base).get(WORKERS, 0.0) != 0:
            raise RuntimeError("the gateway still counts the killed worker")
        req = trio.run(measure_req, routed_url, samples, 20, 10.0)
        if req.error:
            raise RuntimeError(f"replica REQ phase: {req.error}")
        if req.events_min != 100:
            raise RuntimeError(f"replica REQs got {req.events_min}..{req.events_max} events")
        figures["replica_req_p50_ms"] = rounded(percentile(req.latencies_ms, 50))
        figures["replica_req_p99_ms"] = rounded(percentile(req.latencies_ms, 99))
    finally:
        if worker is not None:
            worker.stop()
        gateway.stop()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k events, 50 clients")
    parser.add_argument("--clients", type=int, default=None, help="subscribed clients")
    args = parser.parse_args(argv)
    try:
        figures = run(args.quick, args.clients)
        ok = not figures["failover_failed"]
    except (RuntimeError, OSError, subprocess.SubprocessError, HandshakeFailed) as exc:
        log(f"failover benchmark failed: {exc}")
        figures = {"quick": args.quick, "error": str(exc)}
        ok = False
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
