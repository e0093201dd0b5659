"""Relays the gateway hosts are written through their owner core: the relay key is the core
key, accepted events (and only those) are appended as records, the view is rebuildable from the
core, and a core append that was never committed to the view is applied on the next start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from hypertuna.storage.cores import Mirror
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.drives import drive_core_names
from hypertuna.storage.events import open_event_store
from hypertuna.storage.hosted import PFP_DRIVE, open_drive, owner_core_name
from hypertuna.storage.relay_records import EventRecord, decode_record, encode_record
from hypertuna.storage.relay_view import RelayView
from tests.storage.storage_factory import flt
from tests.support import TIMEOUT, Signer, connect, open_gateway


def owner_events(data_dir: Path, relay_name: str) -> tuple[bytes, list[str]]:
    """(core key, ids of the event records) of a hosted relay's owner core, read from disk."""
    with CoreStore.open(data_dir / "cores") as cores:
        core = cores.writable(owner_core_name(relay_name))
        ids = []
        for index in range(core.length):
            record = decode_record(core.get(index))
            assert isinstance(record, EventRecord)
            ids.append(record.event.id)
        return core.key, ids


async def test_accepted_events_and_only_those_go_to_the_owner_core(
    tmp_path: Path, store_url: tuple[str | None, Path]
) -> None:
    alice = Signer()
    note, profile_old, profile_new = (
        alice.event(content="note"),
        alice.event(kind=0, content="old", created_at=1_700_000_000),
        alice.event(kind=0, content="new", created_at=1_700_000_100),
    )
    expired = alice.event(tags=[["expiration", "1"]])
    with trio.fail_after(TIMEOUT):
        async with (
            open_gateway(tmp_path, database_url=store_url[0] or "") as gw,
            connect(gw.url) as relay,
        ):
            key_hex = gw.relay.key
            assert await relay.publish(note) == (True, "")
            assert (await relay.publish(note))[1].startswith("duplicate:")
            assert (await relay.publish(profile_new))[0]
            assert (await relay.publish(profile_old))[1].startswith("duplicate:")
            assert await relay.publish(expired) == (False, "invalid: event has expired")
            assert (await relay.publish(alice.event(kind=20_001)))[0]  # ephemeral
    key, ids = owner_events(tmp_path, "test")
    assert key.hex() == key_hex
    assert ids == [note.id, profile_new.id]


async def test_the_view_is_a_function_of_the_core(
    tmp_path: Path, store_url: tuple[str | None, Path]
) -> None:
    alice, bob = Signer(), Signer()
    events = [alice.event(content=str(i), created_at=1_700_000_000 + i) for i in range(5)]
    events += [
        bob.event(kind=30_023, tags=[["d", "a"]], created_at=1_700_000_000 + i) for i in range(3)
    ]
    deletion = alice.event(kind=5, tags=[["e", events[0].id]], created_at=1_700_000_100)
    with trio.fail_after(TIMEOUT):
        async with (
            open_gateway(tmp_path / "gw", database_url=store_url[0] or "") as gw,
            connect(gw.url) as relay,
        ):
            for event in [*events, deletion]:
                await relay.publish(event)
            served = await relay.fetch("all", {})
    with CoreStore.open(tmp_path / "gw" / "cores") as cores:
        owner = cores.writable(owner_core_name("test"))
        # A third party with only the key and manifest verifies the whole core.
        mirror = Mirror.create(tmp_path / "mirror", owner.identity)
        assert mirror.apply(owner.export_update(0)) == owner.length
        mirror.close()
        async with open_event_store(None, tmp_path / "rebuilt") as store:
            relay_record = await store.create_relay(
                key=owner.key.hex(), name="copy", description="", created_at=0
            )
            view = RelayView(
                relay_id=relay_record.id, owner=owner, writer_log=lambda _k: None, store=store
            )
            await view.rebuild()
            result = await store.query(relay_record.id, [flt()], now=1_700_000_200, max_limit=500)
    rebuilt = [json.loads(stored.raw) for stored in result.events]
    assert [e["id"] for e in rebuilt] == [e["id"] for e in served]
    assert events[0].id not in {e["id"] for e in served}


async def test_a_core_append_without_its_commit_is_applied_at_start(tmp_path: Path) -> None:
    alice = Signer()
    before, crashed = alice.event(content="committed"), alice.event(content="appended only")
    with trio.fail_after(TIMEOUT):
        async with open_gateway(tmp_path) as gw, connect(gw.url) as relay:
            assert (await relay.publish(before))[0]
        # As if the gateway died after appending to the core but before the view committed.
        with CoreStore.open(tmp_path / "cores") as cores:
            cores.writable(owner_core_name("test")).append([encode_record(EventRecord(crashed))])
        async with open_gateway(tmp_path) as gw, connect(gw.url) as relay:
            ids = {e["id"] for e in await relay.fetch("all", {})}
            assert ids == {before.id, crashed.id}
            assert (await relay.publish(crashed))[1].startswith("duplicate:")
    assert owner_events(tmp_path, "test")[1] == [before.id, crashed.id]


def test_cli_relay_create_makes_the_owner_core(tmp_path: Path) -> None:
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypertuna.cli",
            "relay",
            "create",
            "cli-made",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    with CoreStore.open(tmp_path / "cores") as cores:
        key = cores.key_for(owner_core_name("cli-made"))
        assert cores.has(key)
    assert key.hex() in created.stdout


async def test_each_hosted_relay_has_a_drive_and_there_is_a_pfp_drive(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_gateway(tmp_path) as gw:
            relay_key = gw.relay.key
            other = await gw.system.create_relay("other")
            assert other.key != relay_key
    with CoreStore.open(tmp_path / "cores") as cores:
        for name in ("test", "other"):
            key = cores.key_for(owner_core_name(name)).hex()
            names = drive_core_names(key)
            assert cores.has(cores.key_for(names.entries)) and cores.has(cores.key_for(names.blobs))
        pfp_names = drive_core_names(PFP_DRIVE)
        assert cores.has(cores.key_for(pfp_names.entries))
        drive = open_drive(cores, relay_key)
        version = drive.put(
            "/banner.png", b"\x89PNG" + bytes(70_000), metadata={"type": "image/png"}
        )
        pfp = open_drive(cores, PFP_DRIVE)
        pfp.put("/alice.jpg", b"jpeg")
    with CoreStore.open(tmp_path / "cores") as cores:
        drive = open_drive(cores, relay_key)
        assert drive.version == version
        found = drive.get("/banner.png")
        assert found is not None and len(found.content) == 70_004
        assert open_drive(cores, PFP_DRIVE).get("/alice.jpg") is not None
        assert open_drive(cores, PFP_DRIVE).get("/banner.png") is None
