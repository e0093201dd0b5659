"""The signed operator API (``/api/blind-peer...``) over real sockets, with real Ed25519
signatures: what a signed call returns, and that every refused call gets 401 and changes
nothing."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import nacl.signing
import pytest
import trio

from hypertuna.actors.blind_peer import ApplyMirror, Hold, MirrorAccepted, Release
from hypertuna.config import BlindPeerConfig, Config, OperatorsConfig
from hypertuna.protocol.signed_request import HEADER_NONCE, HEADER_SIGNATURE, sign_ed25519
from hypertuna.storage.cores import Core, KeyPair
from hypertuna.storage.registrations import Registration, RegistrationOutcome
from hypertuna.system import System, open_system, system_wall_clock
from tests.actors.test_blind_peer import Writer, from_core_update
from tests.edge.test_workers import registered
from tests.edge.worker_support import Owner, open_worker
from tests.support import TIMEOUT, FakeWallClock, gateway_config

WORKER = "aa" * 32
OWNER = "cc" * 32
TTL = 1000


@attrs.define
class Admin:
    """A running gateway, its operator key, and a few mirrors to look at."""

    system: System
    clock: FakeWallClock
    key: nacl.signing.SigningKey
    owner: Writer
    writer: Writer

    @property
    def url(self) -> str:
        return self.system.base_url

    def headers(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        key: nacl.signing.SigningKey | None = None,
        timestamp: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        signed = sign_ed25519(
            key or self.key,
            method,
            path,
            body,
            timestamp=self.clock.now if timestamp is None else timestamp,
            nonce=nonce,
        )
        return signed.as_dict()

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        def fetch() -> httpx.Response:
            return httpx.request(
                method, self.url + path, content=body, headers=headers or {}, timeout=TIMEOUT
            )

        return await trio.to_thread.run_sync(fetch)

    async def call(self, method: str, path: str, body: bytes = b"") -> httpx.Response:
        return await self.send(method, path, body, self.headers(method, path, body))

    async def mirror_keys(self) -> set[str]:
        return {m.core_key for m in self.system.blind_peer.mirrors()}


async def _mirror(system: System, core: Writer, meta: dict[str, str | int | bool]) -> None:
    update = core.update(0, meta=meta)
    outcome = await system.blind_peer.inbox.request(lambda r: ApplyMirror(WORKER, update, r))
    assert isinstance(outcome, MirrorAccepted), outcome


@contextlib.asynccontextmanager
async def open_admin(
    tmp_path: Path, *, keys: tuple[str, ...] | None = None
) -> AsyncIterator[Admin]:
    key = nacl.signing.SigningKey.generate()
    clock = FakeWallClock()
    base = gateway_config(tmp_path / "data")
    config: Config = attrs.evolve(
        base,
        blind_peer=BlindPeerConfig(max_bytes=10_000, max_bytes_per_owner=5_000, mirror_ttl_s=TTL),
        operators=OperatorsConfig(keys=(key.verify_key.encode().hex(),) if keys is None else keys),
    )
    owner, writer = Writer(tmp_path / "worker" / "owner"), Writer(tmp_path / "worker" / "writer")
    owner.core.append([b"one", b"two"])
    writer.core.append([b"w" * 10])
    async with open_system(config, wall_clock=clock) as system:
        outcome, _ = await system.store.apply_registration(
            Registration(
                action="register",
                relay_key=owner.key,
                owner_key=OWNER,
                worker_key=WORKER,
                seq=1,
                name="mirrored",
                description="",
            ),
            now=clock.now,
        )
        assert outcome is RegistrationOutcome.ACCEPTED
        relay = {"relay_key": owner.key, "relay_id": "npub-chat"}
        await _mirror(system, owner, {**relay, "type": "owner", "length": 2})
        # The worker says it has 3 blocks: the mirror is behind (syncing).
        await _mirror(system, writer, {**relay, "type": "writer", "length": 3})
        yield Admin(system, clock, key, owner, writer)


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Admin]:
    async with open_admin(tmp_path) as running:
        yield running


async def test_summary_per_owner(admin: Admin) -> None:
    response = await admin.call("GET", "/api/blind-peer")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mirrors"] == 2
    assert body["bytes"] == 6 + 10
    assert body["quota"] == {"max_bytes": 10_000, "max_bytes_per_owner": 5_000, "free_bytes": 9984}
    assert body["states"] == {"ready": 1, "syncing": 1, "stale": 0}
    assert body["accepted"] == 2 and body["refused_total"] == 0
    assert body["gc"]["collected"] == 0 and body["gc"]["mirror_ttl_s"] == TTL
    assert body["owners"] == {
        OWNER: {"mirrors": 2, "bytes": 16, "quota": 5_000, "relays": [admin.owner.key]}
    }


async def test_replicas_per_relay(admin: Admin) -> None:
    response = await admin.call("GET", "/api/blind-peer/replicas")
    assert response.status_code == 200, response.text
    (relay,) = response.json()["relays"]
    assert relay["relay_key"] == admin.owner.key
    assert relay["identifier"] == "npub-chat"
    assert relay["owner_key"] == OWNER
    assert relay["name"] == "mirrored"
    owner_core, writer_core = relay["cores"]
    assert owner_core == {
        "core_key": admin.owner.key,
        "type": "owner",
        "length": 2,
        "announced_length": 2,
        "fork": 0,
        "bytes": 6,
        "lag_ms": 0,
        "state": "ready",
        "last_activity": admin.clock.now,
    }
    assert writer_core["core_key"] == admin.writer.key and writer_core["type"] == "writer"
    assert writer_core["length"] == 1 and writer_core["announced_length"] == 3
    assert writer_core["state"] == "syncing"
    assert relay["lag_ms"] == max(owner_core["lag_ms"], writer_core["lag_ms"])
    # No worker is connected; no client asked for a replica.
    assert relay["healthy"] is False and relay["workers_healthy"] == 0
    assert relay["workers_registered"] == 1
    assert relay["opened"] is False and relay["sessions"] == 0 and relay["opened_at"] is None
    assert relay["last_activity"] == admin.clock.now
    assert relay["held"] is False
    assert relay["lease"] == {
        "active": False,
        "lease_id": None,
        "expires_at": None,
        "lease_version": None,
    }


async def test_replica_open_and_healthy_worker(admin: Admin, tmp_path: Path) -> None:
    session = await admin.system.replicas.open(admin.owner.key)
    assert session is not None
    try:
        (relay,) = (await admin.call("GET", "/api/blind-peer/replicas")).json()["relays"]
        assert relay["opened"] is True and relay["sessions"] == 1
        assert relay["opened_at"] == admin.clock.now and relay["held"] is True
        # A replica reads the relay's mirrors: they cannot be removed under it.
        held = await admin.call("DELETE", f"/api/blind-peer/mirrors/{admin.owner.key}")
        assert held.status_code == 409 and held.json()["reason"] == "relay-held"
    finally:
        await session.close("test over")

    # A relay that a connected worker registered (through the router) and mirrors.
    alice = Owner()
    async with open_worker(admin.system.base_url) as worker:
        await registered(admin.system, worker, alice)
        core = Core.create(tmp_path / "alice", KeyPair.from_seed(bytes(alice.key)))
        assert core.key.hex() == alice.relay_key and core.manifest is not None
        core.append([b"hello"])
        update = from_core_update(
            alice.relay_key,
            core.export_update(0),
            {"relay_key": alice.relay_key, "type": "owner", "length": 1},
            core.manifest.encode(),
        )
        outcome = await admin.system.blind_peer.inbox.request(
            lambda r: ApplyMirror(worker.public, update, r)
        )
        assert isinstance(outcome, MirrorAccepted), outcome
        core.close()
        relays = (await admin.call("GET", "/api/blind-peer/replicas")).json()["relays"]
        served = next(r for r in relays if r["relay_key"] == alice.relay_key)
        assert served["healthy"] is True and served["workers_healthy"] == 1
        assert served["owner_key"] == alice.public and served["opened"] is False
        summary = (await admin.call("GET", "/api/blind-peer")).json()
        assert summary["owners"][alice.public]["relays"] == [alice.relay_key]


async def test_delete_removes_one_mirror(admin: Admin) -> None:
    path = f"/api/blind-peer/mirrors/{admin.writer.key}"
    response = await admin.call("DELETE", path)
    assert response.status_code == 200, response.text
    assert response.json()["removed"] == {
        "core_key": admin.writer.key,
        "relay_key": admin.owner.key,
        "type": "writer",
        "bytes": 10,
        "last_activity": admin.clock.now,
    }
    assert await admin.mirror_keys() == {admin.owner.key}
    assert not admin.system.cores.has(bytes.fromhex(admin.writer.key))
    again = await admin.call("DELETE", path)
    assert again.status_code == 404
    assert again.json()["reason"] == "not-mirrored"


async def test_delete_bad_key_unknown_and_held(admin: Admin) -> None:
    for bad in ("abc", "AB" * 32, "g" * 64):
        response = await admin.call("DELETE", f"/api/blind-peer/mirrors/{bad}")
        assert response.status_code == 400, bad
        assert response.json()["reason"] == "invalid-core-key"
    response = await admin.call("DELETE", f"/api/blind-peer/mirrors/{'dd' * 32}")
    assert response.status_code == 404
    assert response.json() == {
        "error": "not-found",
        "reason": "not-mirrored",
        "message": f"no mirror of {'dd' * 32}",
    }
    await admin.system.blind_peer.inbox.send(Hold(admin.owner.key, "lease"))
    held = await admin.call("DELETE", f"/api/blind-peer/mirrors/{admin.owner.key}")
    assert held.status_code == 409
    assert held.json()["reason"] == "relay-held"
    assert await admin.mirror_keys() == {admin.owner.key, admin.writer.key}
    replicas = (await admin.call("GET", "/api/blind-peer/replicas")).json()["relays"]
    assert replicas[0]["held"] is True
    await admin.system.blind_peer.inbox.send(Release(admin.owner.key, "lease"))
    removed = await admin.call("DELETE", f"/api/blind-peer/mirrors/{admin.owner.key}")
    assert removed.status_code == 200
    assert await admin.mirror_keys() == {admin.writer.key}


async def test_gc_removes_idle_mirrors(admin: Admin) -> None:
    nothing = await admin.call("POST", "/api/blind-peer/gc")
    assert nothing.status_code == 200
    assert nothing.json() == {"removed": [], "count": 0}
    admin.clock.now += TTL + 1
    response = await admin.call("POST", "/api/blind-peer/gc")
    assert response.status_code == 200, response.text
    removed = response.json()
    assert removed["count"] == 2
    assert {m["core_key"] for m in removed["removed"]} == {admin.owner.key, admin.writer.key}
    assert await admin.mirror_keys() == set()
    summary = (await admin.call("GET", "/api/blind-peer")).json()
    assert summary["mirrors"] == 0 and summary["gc"]["collected"] == 2
    assert summary["owners"] == {}


async def test_query_string_is_signed(admin: Admin) -> None:
    signed = await admin.send(
        "GET",
        "/api/blind-peer?verbose=1",
        headers=admin.headers("GET", "/api/blind-peer?verbose=1"),
    )
    assert signed.status_code == 200
    unsigned_query = await admin.send(
        "GET", "/api/blind-peer?verbose=1", headers=admin.headers("GET", "/api/blind-peer")
    )
    assert unsigned_query.status_code == 401
    assert unsigned_query.json()["reason"] == "bad-signature"


def _refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "unauthorized"
    assert body["reason"] == reason
    assert body["message"]


async def test_refused_calls_change_nothing(admin: Admin) -> None:
    path = f"/api/blind-peer/mirrors/{admin.writer.key}"
    everything = {admin.owner.key, admin.writer.key}
    admin.clock.now += TTL + 1  # both mirrors are collectable: a GC that ran would show

    _refused(await admin.send("DELETE", path), "signature-missing")
    _refused(await admin.send("POST", "/api/blind-peer/gc"), "signature-missing")
    _refused(await admin.send("GET", "/api/blind-peer"), "signature-missing")
    _refused(await admin.send("GET", "/api/blind-peer/replicas"), "signature-missing")

    other = nacl.signing.SigningKey.generate()
    _refused(
        await admin.send("DELETE", path, headers=admin.headers("DELETE", path, key=other)),
        "unknown-key",
    )
    # Signed for another mirror, sent for this one.
    elsewhere = admin.headers("DELETE", f"/api/blind-peer/mirrors/{admin.owner.key}")
    _refused(await admin.send("DELETE", path, headers=elsewhere), "bad-signature")
    # Signed as a GET, sent as a DELETE.
    _refused(await admin.send("DELETE", path, headers=admin.headers("GET", path)), "bad-signature")
    # Body changed after signing.
    gc_headers = admin.headers("POST", "/api/blind-peer/gc", b"{}")
    _refused(
        await admin.send("POST", "/api/blind-peer/gc", b'{"x":1}', gc_headers), "bad-signature"
    )
    forged = admin.headers("DELETE", path)
    forged[HEADER_SIGNATURE] = ("00" if forged[HEADER_SIGNATURE][:2] != "00" else "11") + forged[
        HEADER_SIGNATURE
    ][2:]
    _refused(await admin.send("DELETE", path, headers=forged), "bad-signature")
    malformed = {**admin.headers("DELETE", path), HEADER_SIGNATURE: "not hex"}
    _refused(await admin.send("DELETE", path, headers=malformed), "signature-malformed")
    for skew in (-61, 61):
        stale = admin.headers("DELETE", path, timestamp=admin.clock.now + skew)
        _refused(await admin.send("DELETE", path, headers=stale), "stale-timestamp")
    assert await admin.mirror_keys() == everything

    # A correctly signed call works once; its replay is refused and does nothing again.
    once = admin.headers("DELETE", path)
    assert (await admin.send("DELETE", path, headers=once)).status_code == 200
    _refused(await admin.send("DELETE", path, headers=once), "replayed-nonce")
    assert await admin.mirror_keys() == {admin.owner.key}
    # The same nonce under a fresh timestamp is still a replay.
    reused = admin.headers("DELETE", path, timestamp=admin.clock.now + 1, nonce=once[HEADER_NONCE])
    _refused(await admin.send("DELETE", path, headers=reused), "replayed-nonce")
    assert admin.system.blind_peer.statistics().collected == 0


async def test_without_operator_keys_everything_is_refused(tmp_path: Path) -> None:
    async with open_admin(tmp_path, keys=()) as admin:
        for method, path in (
            ("GET", "/api/blind-peer"),
            ("GET", "/api/blind-peer/replicas"),
            ("POST", "/api/blind-peer/gc"),
            ("DELETE", f"/api/blind-peer/mirrors/{admin.writer.key}"),
        ):
            response = await admin.call(method, path)
            _refused(response, "unknown-key")
            assert "no operator keys are configured" in response.json()["message"]
        assert len(await admin.mirror_keys()) == 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hypertuna.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_cli_keygen_and_call(tmp_path: Path) -> None:
    key_file = tmp_path / "operator.key"
    made = await trio.to_thread.run_sync(
        lambda: _cli("admin", "keygen", "--out", str(key_file), cwd=tmp_path)
    )
    assert made.returncode == 0, made.stderr
    public_key = made.stdout.strip()
    assert len(public_key) == 64 and int(public_key, 16) >= 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    refused = await trio.to_thread.run_sync(
        lambda: _cli("admin", "keygen", "--out", str(key_file), cwd=tmp_path)
    )
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert len(key_file.read_bytes()) == 32

    config: Config = attrs.evolve(
        gateway_config(tmp_path / "data"), operators=OperatorsConfig(keys=(public_key,))
    )
    # The CLI signs with the real time: the gateway must use it too.
    async with open_system(config, wall_clock=system_wall_clock) as system:

        def admin(*args: str) -> subprocess.CompletedProcess[str]:
            return _cli(
                "admin",
                "call",
                *args,
                "--key",
                str(key_file),
                "--url",
                system.base_url,
                cwd=tmp_path,
            )

        summary = await trio.to_thread.run_sync(admin, "GET", "/api/blind-peer")
        assert summary.returncode == 0, summary.stderr
        assert json.loads(summary.stdout)["mirrors"] == 0
        gc = await trio.to_thread.run_sync(admin, "POST", "/api/blind-peer/gc", "--body", "{}")
        assert gc.returncode == 0, gc.stderr
        assert json.loads(gc.stdout) == {"count": 0, "removed": []}
        missing = await trio.to_thread.run_sync(
            admin, "DELETE", f"/api/blind-peer/mirrors/{'dd' * 32}"
        )
        assert missing.returncode == 1
        assert "HTTP 404" in missing.stderr and "not-mirrored" in missing.stderr

        other = tmp_path / "other.key"
        await trio.to_thread.run_sync(
            lambda: _cli("admin", "keygen", "--out", str(other), cwd=tmp_path)
        )
        stranger = await trio.to_thread.run_sync(
            lambda: _cli(
                "admin",
                "call",
                "GET",
                "/api/blind-peer",
                "--key",
                str(other),
                "--url",
                system.base_url,
                cwd=tmp_path,
            )
        )
        assert stranger.returncode == 1
        assert "HTTP 401" in stranger.stderr and "unknown-key" in stranger.stderr
        bad_body = await trio.to_thread.run_sync(
            admin, "POST", "/api/blind-peer/gc", "--body", "{nope"
        )
        assert bad_body.returncode == 2 and "not JSON" in bad_body.stderr
