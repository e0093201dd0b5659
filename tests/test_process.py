"""The installed ``hypertuna`` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from hypertuna.storage.events import open_event_store
from hypertuna.storage.registrations import Registration, RegistrationOutcome
from tests.support import TIMEOUT, Signer, connect

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hypertuna.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_relay_create_list_and_errors(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = _cli("relay", "create", "my-relay", "--data-dir", data, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = re.search(r"key: ([0-9a-f]{64})", created.stdout)
    assert key is not None
    listed = _cli("relay", "list", "--data-dir", data, cwd=tmp_path)
    assert listed.returncode == 0
    assert f"my-relay\t{key.group(1)}" in listed.stdout

    again = _cli("relay", "create", "my-relay", "--data-dir", data, cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    bad = _cli("relay", "create", "Bad Name!", "--data-dir", data, cwd=tmp_path)
    assert bad.returncode == 2
    assert "invalid relay name" in bad.stderr


async def test_relay_create_refuses_a_name_workers_registered(
    store_url: tuple[str | None, Path],
) -> None:
    database_url, tmp_path = store_url
    data = str(tmp_path / "data")
    registration = Registration(
        action="register",
        relay_key="a" * 64,
        owner_key="b" * 64,
        worker_key="c" * 64,
        seq=1,
        name="chat",
        description="",
    )
    async with open_event_store(database_url, Path(data)) as store:
        outcome, _ = await store.apply_registration(registration, now=1)
        assert outcome is RegistrationOutcome.ACCEPTED
    args = ["--data-dir", data, *(["--database-url", database_url] if database_url else [])]
    refused = await trio.to_thread.run_sync(
        lambda: _cli("relay", "create", "chat", *args, cwd=tmp_path)
    )
    assert refused.returncode == 2
    assert "already exists: workers registered it" in refused.stderr
    listed = await trio.to_thread.run_sync(lambda: _cli("relay", "list", *args, cwd=tmp_path))
    assert listed.returncode == 0 and "chat" not in listed.stdout


def test_config_check_redacts_and_rejects(tmp_path: Path) -> None:
    shown = _cli("config", "check", "--database-url", "postgresql://u:hunter2@h/db", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "hunter2" not in shown.stdout and "u:***@h" in shown.stdout
    bad = _cli("config", "check", "--set", "limits.max_limit=lots", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("hypertuna: limits.max_limit")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_gateway_serves_and_stops_gracefully_on_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "hypertuna.cli",
            "gateway",
            "--demo",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(30):
            while b"relay demo: " not in output or not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, output
                output += chunk
        url = re.search(rb"relay demo: (ws://\S+)", output)
        assert url is not None
        signer = Signer()
        event = signer.event()
        async with connect(url.group(1).decode()) as client:
            assert (await client.publish(event))[0]
            assert len(await client.query("s", {})) == 1
            process.send_signal(signum)
            frames: list[list[object]] = []

            async def read_until_closed() -> None:
                while True:
                    frames.append(await client.recv())

            with pytest.raises(ConnectionClosed) as closed:
                await read_until_closed()
            assert closed.value.reason.code == 1001
            assert frames == [["CLOSED", "s", "error: gateway shutting down"]]
        with trio.fail_after(TIMEOUT):
            assert await process.wait() == 0
        rest = await process.stdout.receive_some()
        assert b"stopped" in output + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
