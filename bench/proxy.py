"""What the gateway adds in front of a worker: the same load direct and through the gateway.

    .venv/bin/python bench/proxy.py [--quick]

One run spawns a gateway and a reference worker (fresh data directories, loopback ports, rate
limits lifted), creates a relay on the worker, waits until the gateway routes it, and then
measures, alternating direct and gateway rounds so that machine noise hits both alike:

- **EVENT→OK latency** at light load (one connection, one EVENT in flight): ``direct_ok_p50_ms``,
  ``gateway_ok_p50_ms`` and their difference ``added_ok_p50_ms``;
- **REQ→EOSE latency** of ``{"kinds":[1],"limit":100}`` once the relay holds events:
  ``added_eose_p50_ms`` (with ``direct_eose_p50_ms`` and ``gateway_eose_p50_ms``);
- **throughput** with the relay benchmark's publishing load (8 connections, 32 EVENTs in flight
  each): ``direct_events_per_s``, ``gateway_events_per_s`` and ``throughput_ratio``.

Each figure is the median over the rounds. Progress goes to stderr; the last stdout line is one
JSON object with the figures. Targets (issue 4): added p50 <= 1 ms for both latencies, ratio >=
0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from relay_load import (
    event_frames,
    free_port,
    gateway_command,
    load_events,
    log,
    measure_req,
    percentile,
    run_publish_phase,
    spawn_gateway,
    tail,
)

WORKER_RELAY = re.compile(r"\brelay\s+(\S+):\s+(wss?://\S+)")
CONNECTED = re.compile(r"connected to gateway")
BENCH_ENV = {
    "HYPERTUNA_LIMITS_EVENTS_PER_SECOND": "1000000",
    "HYPERTUNA_LIMITS_EVENTS_BURST": "1000000",
    "HYPERTUNA_LIMITS_MAX_SUBSCRIPTIONS": "64",
}


class Worker:
    """A spawned ``hypertuna worker`` with one relay ``bench``."""

    def __init__(self, gateway_url: str, wait_s: float = 30.0) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix="hypertuna-bench-worker-"))
        data = self.tmpdir / "data"
        env = {**os.environ, **BENCH_ENV}
        subprocess.run(
            [*gateway_command(), "worker", "relay", "create", "bench", "--data", str(data)],
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        self.log_path = self.tmpdir / "worker.log"
        cmd = [
            *gateway_command(),
            "worker",
            "--gateway",
            gateway_url,
            "--data",
            str(data),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
        log(f"spawning: {' '.join(cmd)}")
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + wait_s
        self.url = ""
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = WORKER_RELAY.search(text)
            if match and CONNECTED.search(text):
                self.url = match.group(2)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"worker did not come up; log tail:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def gateway_relay_url(gateway_relay: str, relay_key: str) -> str:
    """The gateway's URL for ``relay_key``: the demo relay's URL with the key swapped in."""
    return gateway_relay.rsplit("/", 1)[0] + "/" + relay_key


async def wait_routed(url: str, wait_s: float) -> None:
    """Until a REQ through the gateway gets an EOSE (the worker's registration arrived)."""
    deadline = trio.current_time() + wait_s
    while True:
        result = await measure_req(url, 1, 0, 2.0)
        if not result.error:
            return
        if trio.current_time() > deadline:
            raise RuntimeError(f"the gateway never routed {url}: {result.error}")
        await trio.sleep(0.2)


def publish(url: str, frames: Sequence[tuple[str, bytes]], connections: int, window: int) -> Any:
    result = run_publish_phase(
        url,
        frames,
        connections=connections,
        procs=min(2, connections),
        window=window,
        wait_s=10.0,
        phase_limit=300.0,
        server_pid=None,
    )
    if result.errors or result.accepted != len(frames):
        raise RuntimeError(
            f"publishing to {url} stored {result.accepted} of {len(frames)}: {result.errors}"
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="direct/gateway rounds")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    latency_events = 300 if args.quick else 1000
    load_events_per_round = 3000 if args.quick else 15000
    req_samples = 100 if args.quick else 300
    per_round = 2 * (latency_events + load_events_per_round)
    raws = load_events(rounds * per_round, max(1, os.cpu_count() or 1), use_cache=True)
    frames = event_frames(raws)
    figures: dict[str, Any] = {"quick": args.quick, "rounds": rounds}
    gateway = spawn_gateway(None)
    worker: Worker | None = None
    try:
        base = gateway.url.split("/relay/", 1)[0].replace("ws://", "http://", 1)
        worker = Worker(base)
        direct_url = worker.url
        relay_key = direct_url.rsplit("/", 1)[1]
        routed_url = gateway_relay_url(gateway.url, relay_key)
        trio.run(wait_routed, routed_url, 30.0)
        log(f"direct: {direct_url}\ngateway: {routed_url}")
        samples: dict[str, list[float]] = {
            key: []
            for key in (
                "direct_ok",
                "gateway_ok",
                "direct_eose",
                "gateway_eose",
                "direct_rate",
                "gateway_rate",
            )
        }
        cursor = 0
        for round_no in range(rounds):
            for side, url in (("direct", direct_url), ("gateway", routed_url)):
                light = frames[cursor : cursor + latency_events]
                cursor += latency_events
                result = publish(url, light, connections=1, window=1)
                samples[f"{side}_ok"].append(statistics.median(result.latencies_ms))
                heavy = frames[cursor : cursor + load_events_per_round]
                cursor += load_events_per_round
                samples[f"{side}_rate"].append(publish(url, heavy, connections=8, window=32).rate)
                req = trio.run(measure_req, url, req_samples, 5, 10.0)
                if req.error:
                    raise RuntimeError(f"REQ phase on {url}: {req.error}")
                p50 = percentile(req.latencies_ms, 50)
                assert p50 is not None
                samples[f"{side}_eose"].append(p50)
                log(
                    f"round {round_no + 1} {side}: ok p50 {samples[f'{side}_ok'][-1]:.3f} ms, "
                    f"eose p50 {p50:.3f} ms, {samples[f'{side}_rate'][-1]:,.0f} events/s"
                )
        median = {key: statistics.median(values) for key, values in samples.items()}
        figures.update(
            direct_ok_p50_ms=round(median["direct_ok"], 3),
            gateway_ok_p50_ms=round(median["gateway_ok"], 3),
            added_ok_p50_ms=round(median["gateway_ok"] - median["direct_ok"], 3),
            direct_eose_p50_ms=round(median["direct_eose"], 3),
            gateway_eose_p50_ms=round(median["gateway_eose"], 3),
            added_eose_p50_ms=round(median["gateway_eose"] - median["direct_eose"], 3),
            direct_events_per_s=round(median["direct_rate"], 1),
            gateway_events_per_s=round(median["gateway_rate"], 1),
            throughput_ratio=round(median["gateway_rate"] / median["direct_rate"], 3),
        )
        ok = True
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"proxy benchmark failed: {exc}")
        figures["error"] = str(exc)
        ok = False
    finally:
        if worker is not None:
            worker.stop()
        gateway.stop()
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
