"""The worker's ``mirror-status.json``: writer, reader and the table ``worker status`` prints."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from hypertuna.cli import main
from hypertuna.worker.escrow import EscrowRelayStatus, EscrowState
from hypertuna.worker.mirror import MirrorCoreStatus
from hypertuna.worker.status import (
    STATUS_FILE,
    format_status,
    read_status,
    status_document,
    write_status_periodically,
)

RELAY = "ab" * 32
OWNER = MirrorCoreStatus(RELAY, RELAY, "owner", 10, 7, "", last_sent=1000.0)
DRIVE = MirrorCoreStatus("cd" * 32, RELAY, "drive-entries", 3, None, "")


def test_document_groups_cores_by_relay_with_lag() -> None:
    document = status_document("http://gw", True, "g1", [DRIVE, OWNER])
    assert document["connected"] is True
    [relay] = document["relays"]  # type: ignore[misc]
    assert relay["relay_key"] == RELAY
    by_type = {core["type"]: core for core in relay["cores"]}
    assert by_type["owner"]["lag"] == 3 and by_type["owner"]["last_sent"] == 1000.0
    assert by_type["drive-entries"]["gateway_length"] is None
    assert by_type["drive-entries"]["lag"] is None


def test_table() -> None:
    document = {**status_document("http://gw", True, "g1", [OWNER, DRIVE]), "updated_at": 1005}
    text = format_status(document, now=1010.0)
    assert "gateway: http://gw (connected)" in text
    assert f"relay {RELAY}" in text
    owner_line = next(line for line in text.splitlines() if "owner" in line)
    assert owner_line.split()[:6] == [RELAY[:16], "owner", "10", "7", "3", "10s"]
    never = format_status({**status_document("http://gw", False, None, []), "updated_at": 1})
    assert "not connected" in never and "has not connected" in never


async def test_writer_writes_on_change_at_most_once_per_interval(tmp_path: Path) -> None:
    state = {"connected": False}
    writes: list[float] = []

    def snapshot() -> dict[str, object]:
        return status_document("http://gw", state["connected"], None, [OWNER])

    def wall() -> float:
        writes.append(trio.current_time())
        return 1.0

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: write_status_periodically(
                    tmp_path, snapshot, interval_s=0.05, wall_clock=wall
                )
            )
            await trio.sleep(0.3)
            state["connected"] = True
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()

    await scenario()
    assert len(writes) == 2
    document = read_status(tmp_path)
    assert document is not None and document["connected"] is True
    assert document["updated_at"] == 1.0
    names = await trio.to_thread.run_sync(lambda: [p.name for p in tmp_path.iterdir()])
    assert names == [STATUS_FILE]


def test_cli_reads_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "status", "--data", str(tmp_path)]) == 2
    assert "has not run" in capsys.readouterr().err
    document = {**status_document("http://gw", True, "g1", [OWNER]), "updated_at": 5}
    (tmp_path / STATUS_FILE).write_text(json.dumps(document))
    assert main(["worker", "status", "--data", str(tmp_path)]) == 0
    assert f"relay {RELAY}" in capsys.readouterr().out
    assert main(["worker", "status", "--data", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == document


def test_escrow_state_per_relay() -> None:
    refused = EscrowRelayStatus(
        relay_key="ef" * 32,
        state=EscrowState.FINGERPRINT_MISMATCH,
        rotation=1,
        writer_public_key="12" * 32,
        writer_core_key="34" * 32,
        last_error="pinned another fingerprint",
    )
    deposited = attrs.evolve(
        refused, relay_key=RELAY, state=EscrowState.DEPOSITED, deposit_id="dep_1", last_error=""
    )
    document = status_document("http://gw", True, "g1", [OWNER], [refused, deposited])
    by_key = {relay["relay_key"]: relay for relay in document["relays"]}  # type: ignore[attr-defined]
    assert by_key[RELAY]["escrow"]["state"] == "deposited"
    assert by_key[RELAY]["cores"][0]["type"] == "owner"
    # A relay with no mirrored core yet still shows its escrow state.
    assert by_key["ef" * 32]["cores"] == []
    assert by_key["ef" * 32]["escrow"]["last_error"] == "pinned another fingerprint"
    assert status_document("http://gw", True, "g1", [OWNER])["relays"][0]["escrow"] is None  # type: ignore[index]
    text = format_status({**document, "updated_at": 1})
    assert f"escrow: deposited, rotation 1, deposit dep_1, gateway writer {'12' * 8}" in text
    assert "escrow: fingerprint-mismatch, rotation 1, gateway writer" in text
    assert text.endswith(": pinned another fingerprint")
