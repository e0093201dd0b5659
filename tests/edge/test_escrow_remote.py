"""A gateway using a standalone escrow (``escrow.url``): ``hypertuna escrow serve`` as a real
process behind mutual TLS (trustme certificates) and HMAC, the gateway a real System with a real
worker. Deposits pass through the gateway with the worker's own signature, operator unlocks are
judged on the gateway's evidence, a revocation at the escrow reaches the gateway's revocation bus
within the follower's bound, a restarted escrow is listed again, an escrow that cannot be reached
is a 503 and an unhealthy /health until it is back, and a refused client certificate stops the
start with the reason."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import nacl.public
import nacl.signing
import pytest
import trio

from hypertuna.cli import _operator_fix
from hypertuna.config import Config, EscrowConfig, OperatorsConfig
from hypertuna.escrow.package import open_lease
from hypertuna.escrow.policy import Evidence
from hypertuna.escrow.service import LeaseGrant, UnlockRequest
from hypertuna.escrow_client.remote import RemoteEscrow, RemoteEscrowStatistics, RemoteState
from hypertuna.escrow_client.transport import EscrowUnavailableError
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.protocol.worker import MirrorRequest, MirrorStatus
from hypertuna.storage.cores import KeyPair
from hypertuna.storage.relay_records import AddWriter, WriterRole, encode_record
from hypertuna.system import System, open_system
from tests.edge.test_blind_peer_link import owner_core, update
from tests.edge.test_escrow_embedded import register_relay
from tests.edge.test_workers import WORKERS, registered
from tests.edge.worker_support import Owner, open_worker
from tests.escrow.conftest import good_evidence
from tests.escrow.standalone_support import Server, running_escrow
from tests.escrow_transport import CLIENT_ID, SECRET, TIMEOUT, Pki
from tests.escrow_transport.remote_support import TcpRelay, signed_deposit
from tests.support import gateway_config

pytestmark = pytest.mark.slow

#: The follower's long-poll wait (seconds) and request timeout in these tests.
WAIT_S = 2
REQUEST_TIMEOUT_S = 2.0


def remote_config(
    directory: Path, pki: Pki, url: str, operator: nacl.signing.SigningKey, **changes: object
) -> Config:
    cert, key = pki.client_files("gateway-1")
    escrow = EscrowConfig(
        enabled=True,
        url=url,
        tls_ca=str(pki.server_ca),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        hmac_client_id=CLIENT_ID,
        hmac_secret=SECRET.hex(),
        poll_wait_s=WAIT_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    return attrs.evolve(
        gateway_config(directory),
        workers=WORKERS,
        operators=OperatorsConfig(keys=(operator.verify_key.encode().hex(),)),
        escrow=attrs.evolve(escrow, **changes),
    )


async def post(
    client: httpx.AsyncClient, path: str, data: object, key: nacl.signing.SigningKey
) -> httpx.Response:
    body = json.dumps(data).encode()
    signed = sign_ed25519(key, "POST", path, body, timestamp=int(time.time()))
    return await client.post(path, content=body, headers=signed.as_dict())


async def get(client: httpx.AsyncClient, path: str, key: nacl.signing.SigningKey) -> httpx.Response:
    signed = sign_ed25519(key, "GET", path, b"", timestamp=int(time.time()))
    return await client.get(path, headers=signed.as_dict())


def remote_of(system: System) -> RemoteEscrow:
    assert system.escrow is None and system.remote_escrow is not None
    return system.remote_escrow


async def wait_for(system: System, check: object) -> None:
    def holds(stats: RemoteEscrowStatistics) -> bool:
        return bool(check(stats))  # type: ignore[operator]

    with trio.fail_after(TIMEOUT):
        await remote_of(system).wait_for(holds)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # A peer timeout of 0: a relay is unlockable as soon as its last worker is gone.
    with running_escrow(
        tmp_path / "escrow", Pki(tmp_path), {"ESCROW_PEER_TIMEOUT_MS": "0"}
    ) as running:
        yield running


async def test_deposit_unlock_and_revoke_through_the_gateway(
    server: Server, tmp_path: Path
) -> None:
    operator = nacl.signing.SigningKey.generate()
    config = remote_config(tmp_path / "gateway", server.pki, server.url, operator)
    owner = Owner()
    writer = KeyPair.from_seed(bytes(range(32)))
    core = owner_core(owner, tmp_path / "owner-core")
    core.append([encode_record(AddWriter(writer.public_key.hex(), WriterRole.GATEWAY))])
    async with (
        open_system(config) as system,
        httpx.AsyncClient(base_url=system.base_url, timeout=TIMEOUT) as client,
    ):
        remote = remote_of(system)
        assert remote.state is RemoteState.UP
        policy = await client.get("/api/escrow/policy")
        assert policy.status_code == 200
        assert policy.json()["fingerprint"] == server.escrow_key.fingerprint
        health = (await client.get("/health")).json()["checks"]["escrow"]
        assert (health["ok"], health["mode"], health["state"]) == (True, "remote", "up")

        # A deposit for a relay no worker registered here never reaches the escrow.
        stranger = signed_deposit(server.escrow_key)
        refused = await client.post("/api/escrow", content=stranger.body, headers=stranger.headers)
        assert refused.status_code == 404 and refused.json()["reason"] == "relay-not-registered"

        async with open_worker(system.base_url) as worker:
            await registered(system, worker, owner)
            await worker.send(MirrorRequest(core_key=owner.relay_key))
            assert await worker.reply() == MirrorStatus(owner.relay_key, 0, 0)
            await worker.send(update(core, 0, owner.relay_key))
            assert await worker.reply() == MirrorStatus(owner.relay_key, 1, 0)
            # The worker's deposit: its exact body and signature headers reach the escrow.
            deposit = signed_deposit(server.escrow_key, owner.key, owner.relay_key, writer)
            headers = {**deposit.headers, "Idempotency-Key": "deposit-1"}
            accepted = await client.post("/api/escrow", content=deposit.body, headers=headers)
            assert accepted.status_code == 201, accepted.text
            assert accepted.json()["relayKey"] == owner.relay_key
            # The same signed request again: the gateway already saw its nonce.
            again = await client.post("/api/escrow", content=deposit.body, headers=headers)
            assert again.status_code == 401 and again.json()["reason"] == "replayed-nonce"
            # Signed afresh with the same Idempotency-Key: the escrow's stored answer.
            fresh = sign_ed25519(
                owner.key, "POST", "/api/escrow", deposit.body, timestamp=int(time.time())
            ).as_dict()
            replayed = await client.post(
                "/api/escrow",
                content=deposit.body,
                headers={**fresh, "Idempotency-Key": "deposit-1"},
            )
            assert replayed.status_code == 201 and replayed.json() == accepted.json()
            assert replayed.headers["idempotent-replayed"] == "true"

            session = nacl.public.PrivateKey.generate()
            unlock = {
                "relay_key": owner.relay_key,
                "session_public_key": bytes(session.public_key).hex(),
                "requester_id": "operator-test",
            }
            # The worker is still there: the gateway's evidence says so.
            busy = await post(client, "/api/escrow/unlock", unlock, operator)
            assert busy.status_code == 412, busy.text
            assert "peers-still-healthy" in busy.json()["reasons"]
            forged = await post(client, "/api/escrow/unlock", {**unlock, "evidence": {}}, operator)
            assert forged.status_code == 400
            assert forged.json()["reason"] == "evidence-not-accepted"
            stranger_key = nacl.signing.SigningKey.generate()
            assert (
                await post(client, "/api/escrow/unlock", unlock, stranger_key)
            ).status_code == 401

        # The worker gone, the gateway's own evidence lets the unlock through.
        with trio.fail_after(TIMEOUT):
            while True:
                granted = await post(client, "/api/escrow/unlock", unlock, operator)
                if granted.status_code == 200:
                    break
                assert granted.status_code == 412, granted.text
                await trio.sleep(0.1)
        lease = granted.json()["lease"]
        sealed = granted.json()["sealed_lease"]
        assert open_lease(bytes(session), base64.b64decode(sealed)).writer == writer
        leases = await get(client, f"/api/escrow/leases?relay_key={owner.relay_key}", operator)
        assert leases.status_code == 200
        assert [x["leaseId"] for x in leases.json()["leases"]] == [lease["leaseId"]]
        assert (
            await client.get(f"/api/escrow/leases?relay_key={owner.relay_key}")
        ).status_code == 401

        # Revoked at the escrow itself: the gateway's bus hears of it within the bound.
        with remote.bus.subscribe(owner.relay_key) as ended:
            body, revoke_headers = _signed(owner.key, "/api/escrow/revoke", owner.relay_key)
            async with server.transport("owner-tool") as direct:
                revoked = await direct.request(
                    "POST", "/api/escrow/revoke", raw_body=body, headers=revoke_headers
                )
            assert revoked.status == 200, revoked.json
            with trio.fail_after(remote.staleness_bound_s):
                ending = await ended.receive()
        assert ending.lease_ids == (lease["leaseId"],)
        # Through the gateway, the escrow's answer is passed on.
        body, revoke_headers = _signed(owner.key, "/api/escrow/revoke", owner.relay_key)
        repeat = await client.post("/api/escrow/revoke", content=body, headers=revoke_headers)
        assert repeat.status_code == 200 and repeat.json()["alreadyRevoked"] is True

        health = await client.get("/api/escrow/health")
        assert health.status_code == 200 and health.json()["depositsActive"] == 0
        metrics = (await client.get("/metrics")).text
        assert "gateway_escrow_lease_lag_seconds " in metrics
        assert "gateway_escrow_remote_up 1.0" in metrics
        assert "gateway_escrow_lease_endings_total 1.0" in metrics
    core.close()


async def _start(config: Config) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_system(config):
            pass


def _signed(
    key: nacl.signing.SigningKey, path: str, relay_key: str
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"relay_key": relay_key}).encode()
    return body, sign_ed25519(key, "POST", path, body, timestamp=int(time.time())).as_dict()


async def test_a_restarted_or_unreachable_escrow(server: Server, tmp_path: Path) -> None:
    """Between the gateway and the escrow, a TCP relay the test cuts: while it is cut the lease
    is revoked and the escrow restarts (its events gone with the old process), so only listing
    the leases again tells the gateway the lease ended."""
    operator = nacl.signing.SigningKey.generate()
    owner = Owner()
    async with trio.open_nursery() as nursery:
        relay = TcpRelay(server.port)
        await nursery.start(relay.run)
        config = remote_config(
            tmp_path / "gateway", server.pki, f"https://127.0.0.1:{relay.port}", operator
        )
        await register_relay(config, owner)
        async with (
            open_system(config) as system,
            httpx.AsyncClient(base_url=system.base_url, timeout=TIMEOUT) as client,
        ):
            remote = remote_of(system)
            deposit = signed_deposit(server.escrow_key, owner.key, owner.relay_key)
            accepted = await client.post(
                "/api/escrow", content=deposit.body, headers=deposit.headers
            )
            assert accepted.status_code == 201, accepted.text
            # As the lease vault will: an unlock judged on evidence the gateway gathered.
            session = nacl.public.PrivateKey.generate()
            request = UnlockRequest(
                relay_key=owner.relay_key,
                session_public_key=bytes(session.public_key),
                requester_id="lease-vault",
            )
            granted = await remote.unlock(request, good_evidence(time.time_ns() // 1_000_000))
            assert isinstance(granted, LeaseGrant)
            epoch = remote.statistics().epoch

            with remote.bus.subscribe(owner.relay_key) as ended:
                relay.cut()
                await wait_for(system, lambda s: s.state is RemoteState.UNAVAILABLE)
                health = await client.get("/health")
                assert health.status_code == 503
                check = health.json()["checks"]["escrow"]
                assert (check["ok"], check["state"]) == (False, "unavailable") and check["error"]
                down = await client.get("/api/escrow/policy")
                assert down.status_code == 503 and down.json()["reason"] == "escrow-unreachable"
                again = signed_deposit(server.escrow_key, owner.key, owner.relay_key)
                refused = await client.post(
                    "/api/escrow", content=again.body, headers=again.headers
                )
                assert refused.status_code == 503
                assert refused.json()["reason"] == "escrow-unreachable"
                with pytest.raises(EscrowUnavailableError):
                    await remote.unlock(request, Evidence())

                # Meanwhile at the escrow: the lease is revoked, then the escrow restarts.
                body, headers = _signed(owner.key, "/api/escrow/revoke", owner.relay_key)
                async with server.transport("owner-tool") as direct:
                    revoked = await direct.request(
                        "POST", "/api/escrow/revoke", raw_body=body, headers=headers
                    )
                assert revoked.status == 200 and revoked.json["leaseIds"] == [
                    granted.lease.lease_id
                ]
                await trio.to_thread.run_sync(server.stop)
                await trio.to_thread.run_sync(server.start)
                relay.restore()
                await wait_for(system, lambda s: s.state is RemoteState.UP and s.epoch != epoch)
                with trio.fail_after(TIMEOUT):
                    ending = await ended.receive()
            assert ending.lease_ids == (granted.lease.lease_id,)
            assert remote.statistics().resets == 1
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/api/escrow/policy")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_the_gateway_starts_while_the_escrow_is_down(server: Server, tmp_path: Path) -> None:
    await trio.to_thread.run_sync(server.stop)
    config = remote_config(
        tmp_path / "gateway", server.pki, server.url, nacl.signing.SigningKey.generate()
    )
    async with (
        open_system(config) as system,
        httpx.AsyncClient(base_url=system.base_url, timeout=TIMEOUT) as client,
    ):
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["escrow"]["state"] == "unavailable"
        unreachable = await client.get("/api/escrow/health")
        assert unreachable.status_code == 503
        assert unreachable.json()["reason"] == "escrow-unreachable"
        await trio.to_thread.run_sync(server.start)
        await wait_for(system, lambda s: s.state is RemoteState.UP)
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/api/escrow/health")).status_code == 200


async def test_a_refused_certificate_or_secret_stops_the_start(
    server: Server, tmp_path: Path
) -> None:
    operator = nacl.signing.SigningKey.generate()
    cert, key = server.pki.client_files("intruder", server.pki.other_ca)
    cases = [
        ({"tls_client_cert": str(cert), "tls_client_key": str(key)}, "refused TLS"),
        ({"hmac_secret": "07" * 32}, "escrow.hmac_secret"),
        ({"tls_ca": str(tmp_path / "missing.pem")}, "escrow client TLS files"),
        ({"hmac_secret": f"@{tmp_path / 'missing-secret'}"}, "escrow.hmac_secret: cannot read"),
    ]
    for index, (changes, words) in enumerate(cases):
        config = remote_config(
            tmp_path / f"gateway-{index}", server.pki, server.url, operator, **changes
        )
        with pytest.raises(BaseException) as raised:
            await _start(config)
        message = _operator_fix(raised.value)
        assert message is not None and words in message, (words, raised.value)


async def _start(config: Config) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_system(config):
            pass


def _signed(
    key: nacl.signing.SigningKey, path: str, relay_key: str
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"relay_key": relay_key}).encode()
    return body, sign_ed25519(key, "POST", path, body, timestamp=int(time.time())).as_dict()
