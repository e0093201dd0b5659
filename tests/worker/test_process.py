"""``hypertuna worker`` as a user runs it: real processes, a real (scripted) gateway, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from hypertuna.protocol.worker import SessionOpen, SessionReady
from tests.support import TIMEOUT, Signer, connect
from tests.worker.support import open_test_gateway

pytestmark = pytest.mark.slow

_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hypertuna.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV,
    )


def test_worker_relay_create_and_list(tmp_path: Path) -> None:
    data = str(tmp_path / "w")
    created = _cli("worker", "relay", "create", "alpha", "--data", data, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = re.search(r"key: ([0-9a-f]{64})", created.stdout)
    assert key is not None
    listed = _cli("worker", "relay", "list", "--data", data, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == f"alpha\t{key.group(1)}\n"
    again = _cli("worker", "relay", "create", "alpha", "--data", data, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = _cli("worker", "relay", "list", cwd=tmp_path)
    assert missing.returncode == 2 and "--data DIR is required" in missing.stderr
    never = _cli("worker", "status", "--data", data, cwd=tmp_path)
    assert never.returncode == 2 and "has not run" in never.stderr
    bad_url = _cli("worker", "--gateway", "nowhere", "--data", data, cwd=tmp_path)
    assert bad_url.returncode == 2 and "gateway URL" in bad_url.stderr
    gateway = ("--gateway", "http://127.0.0.1:9", "--data", data)
    bad_pin = _cli("worker", *gateway, "--escrow-fingerprint", "f00", cwd=tmp_path)
    assert bad_pin.returncode == 2 and "escrow_fingerprint must be" in bad_pin.stderr


def test_worker_refuses_an_identity_readable_by_others(tmp_path: Path) -> None:
    data = tmp_path / "w"
    data.mkdir()
    (data / "identity.key").write_bytes(b"k" * 32)
    os.chmod(data / "identity.key", 0o644)
    run = _cli("worker", "--gateway", "http://127.0.0.1:9", "--data", str(data), cwd=tmp_path)
    assert run.returncode == 2
    assert "chmod 600" in run.stderr


async def test_worker_process_connects_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "w"
    assert (
        _cli("worker", "relay", "create", "alpha", "--data", str(data), cwd=tmp_path).returncode
        == 0
    )
    async with open_test_gateway() as gateway:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "hypertuna.cli",
                "worker",
                "--gateway",
                gateway.url,
                "--data",
                str(data),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_ENV,
            cwd=tmp_path,
        )
        assert process.stdout is not None
        try:
            conn = await gateway.accept(patience=30)
            hello = await conn.handshake()
            register = await conn.registration()
            output = b""
            with trio.fail_after(TIMEOUT):
                while b"connected to gateway" not in output or not output.endswith(b"\n"):
                    chunk = await process.stdout.receive_some()
                    assert chunk, output
                    output += chunk
            text = output.decode()
            assert f"worker {hello.worker_key} serving on http://127.0.0.1:" in text
            assert f"connected to gateway {gateway.url} as {hello.worker_key}" in text
            url = re.search(r"relay alpha: (ws://\S+)", text)
            assert url is not None and url.group(1).endswith(register.statement.relay_key)

            # A direct client on the worker's local endpoint.
            event = Signer().event()
            async with connect(url.group(1)) as client:
                assert (await client.publish(event))[0]
                assert [e["id"] for e in await client.fetch("s", {})] == [event.id]

            # `worker status`, another process, reads what the running worker wrote.
            relay_key = register.statement.relay_key
            with trio.fail_after(TIMEOUT):
                while True:
                    status = await trio.to_thread.run_sync(
                        lambda: _cli("worker", "status", "--data", str(data), cwd=tmp_path)
                    )
                    if status.returncode == 0 and relay_key in status.stdout:
                        break
                    await trio.sleep(0.2)
            assert f"gateway: {gateway.url} (connected)" in status.stdout
            assert "owner" in status.stdout and "drive-entries" in status.stdout

            await conn.send(SessionOpen(session=1, relay_key=register.statement.relay_key))
            await conn.expect(SessionReady)
            process.send_signal(signal.SIGTERM)
            assert await conn.close_code() == 1001
            with trio.fail_after(TIMEOUT):
                assert await process.wait() == 0
            rest = await process.stdout.receive_some()
            assert b"worker stopped" in output + rest
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _read_until(
    stream: trio.abc.ReceiveStream, pattern: str, seen: list[bytes | bytearray]
) -> str:
    """Read ``stream`` (keeping what was read in ``seen``) until ``pattern`` matches."""
    with trio.fail_after(TIMEOUT * 3):
        while (match := re.search(pattern, b"".join(seen).decode())) is None:
            chunk = await stream.receive_some()
            assert chunk, b"".join(seen).decode()
            seen.append(chunk)
    return match.group(1)


async def test_worker_process_deposits_in_the_gateway_process_escrow(tmp_path: Path) -> None:
    data = tmp_path / "w"
    keys = tmp_path / "escrow-keys"
    init = _cli("escrow", "init", "--dir", str(keys), cwd=tmp_path)
    pinned = re.search(r"escrow key:.*\n.*\n  fingerprint: ([0-9a-f]{64})", init.stdout)
    assert init.returncode == 0 and pinned is not None, init.stdout
    assert (
        _cli("worker", "relay", "create", "alpha", "--data", str(data), cwd=tmp_path).returncode
        == 0
    )
    env = {**_ENV, "HYPERTUNA_ESCROW_ENABLED": "true", "HYPERTUNA_ESCROW_KEY_DIR": str(keys)}
    command = [sys.executable, "-m", "hypertuna.cli"]
    gateway = await trio.lowlevel.open_process(
        [*command, "gateway", "--port", "0", "--data-dir", str(tmp_path / "gw")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    worker: trio.Process | None = None
    try:
        assert gateway.stdout is not None
        url = await _read_until(gateway.stdout, r"listening on (http://\S+)\n", [])
        # The operator's published fingerprint, pinned up front (no trust on first use).
        worker = await trio.lowlevel.open_process(
            [*command, "worker", "--gateway", url, "--data", str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**_ENV, "HYPERTUNA_WORKER_ESCROW_FINGERPRINT": pinned.group(1)},
            cwd=tmp_path,
        )
        assert worker.stdout is not None
        await _read_until(worker.stdout, r"(connected to gateway)", [])
        # `worker status --json`, another process, shows the deposit the running worker made.
        with trio.fail_after(TIMEOUT * 3):
            while True:
                status = await trio.to_thread.run_sync(
                    lambda: _cli("worker", "status", "--data", str(data), "--json", cwd=tmp_path)
                )
                relays = json.loads(status.stdout)["relays"] if status.returncode == 0 else []
                escrow = relays[0].get("escrow") if relays else None
                if escrow is not None and escrow["state"] == "deposited":
                    break
                await trio.sleep(0.2)
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            policy = (await client.get(f"{url}/api/escrow/policy")).json()
        assert escrow["escrow_fingerprint"] == policy["fingerprint"] == pinned.group(1)
        assert not (data / "escrow-pins.json").exists()
        assert escrow["rotation"] == 1 and escrow["admitted"] is True
        assert escrow["deposit_id"] and escrow["last_error"] == ""
        table = _cli("worker", "status", "--data", str(data), cwd=tmp_path).stdout
        assert f"escrow: deposited, rotation 1, deposit {escrow['deposit_id']}" in table
    finally:
        for process in (worker, gateway):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
