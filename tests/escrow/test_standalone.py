"""``hypertuna escrow serve`` as a real process behind mutual TLS (trustme certificates) and HMAC,
driven by the gateway's :class:`~hypertuna.escrow_client.EscrowTransport`: deposit, unlock with
the gateway's evidence, revoke, the lease-event long poll, metrics; a certificate of another CA
is refused at the handshake and a request without the HMAC signature gets 401."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import httpx
import nacl.public
import nacl.signing
import pytest
import trio

from hypertuna.escrow.package import open_lease, seal_deposit
from hypertuna.escrow_client import EscrowRefusedTlsError, EscrowResponse, EscrowTransport
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores.crypto import KeyPair
from tests.escrow.conftest import good_evidence, new_writer
from tests.escrow.standalone_support import Server, running_escrow
from tests.escrow_transport import CLIENT_ID, SECRET, TIMEOUT, Pki

pytestmark = pytest.mark.slow


def _now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_escrow(tmp_path, Pki(tmp_path)) as running:
        yield running


@pytest.fixture
async def transport(server: Server) -> AsyncIterator[EscrowTransport]:
    async with server.transport() as client:
        yield client


def _signed(
    key: nacl.signing.SigningKey, method: str, path: str, body: object
) -> tuple[object, dict[str, str]]:
    raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    return body, sign_ed25519(key, method, path, raw, timestamp=int(time.time())).as_dict()


async def _deposit(
    transport: EscrowTransport,
    server: Server,
    owner: nacl.signing.SigningKey,
    relay_key: str,
    writer: KeyPair,
) -> EscrowResponse:
    package = seal_deposit(
        server.escrow_key.public_key,
        relay_key=relay_key,
        writer=writer,
        owner_key=owner.verify_key.encode().hex(),
        created_at_ms=_now_ms(),
        rotation=1,
    )
    body, headers = _signed(
        owner,
        "POST",
        "/api/escrow",
        {
            "relay_key": relay_key,
            "owner_key": owner.verify_key.encode().hex(),
            "package": base64.b64encode(package).decode(),
        },
    )
    return await transport.request(
        "POST", "/api/escrow", body, {**headers, "Idempotency-Key": "first"}
    )


async def test_deposit_unlock_revoke_and_the_lease_stream(
    server: Server, transport: EscrowTransport
) -> None:
    owner = nacl.signing.SigningKey.generate()
    relay_key = nacl.signing.SigningKey.generate().verify_key.encode().hex()
    writer = new_writer()
    with trio.fail_after(TIMEOUT * 3):
        policy = await transport.request("GET", "/api/escrow/policy")
        assert policy.status == 200
        assert policy.json["fingerprint"] == server.escrow_key.fingerprint

        deposited = await _deposit(transport, server, owner, relay_key, writer)
        assert deposited.status == 201, deposited.json

        session = nacl.public.PrivateKey.generate()
        evidence = attrs.asdict(good_evidence(_now_ms()))
        unlock = {
            "relay_key": relay_key,
            "session_public_key": bytes(session.public_key).hex(),
            "requester_id": "gateway-1",
            "evidence": evidence,
        }
        rejected = await transport.request(
            "POST", "/api/escrow/unlock", {**unlock, "evidence": {"healthy_peers": 2}}
        )
        assert rejected.status == 412
        assert "peers-still-healthy" in rejected.json["reasons"]
        granted = await transport.request("POST", "/api/escrow/unlock", unlock)
        assert granted.status == 200, granted.json
        opened = open_lease(bytes(session), base64.b64decode(granted.json["sealed_lease"]))
        assert opened.writer.public_key == writer.public_key
        lease_id = granted.json["lease"]["leaseId"]

        leases = await transport.request("GET", f"/api/escrow/leases?relay_key={relay_key}")
        assert [lease["leaseId"] for lease in leases.json["leases"]] == [lease_id]

        start = await transport.request("GET", "/api/escrow/leases/events?wait=0")
        assert start.json["events"] == []
        answers: list[EscrowResponse] = []

        async def follow() -> None:
            path = f"/api/escrow/leases/events?since=0&epoch={start.json['epoch']}&wait=20"
            answers.append(await transport.request("GET", path))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.sleep(0.3)
            assert answers == []
            stranger = nacl.signing.SigningKey.generate()
            body, headers = _signed(
                stranger, "POST", "/api/escrow/revoke", {"relay_key": relay_key}
            )
            refused = await transport.request("POST", "/api/escrow/revoke", body, headers)
            assert refused.status == 403
            body, headers = _signed(owner, "POST", "/api/escrow/revoke", {"relay_key": relay_key})
            revoked = await transport.request("POST", "/api/escrow/revoke", body, headers)
            assert revoked.status == 200, revoked.json
            assert revoked.json["leaseIds"] == [lease_id]
        [answer] = answers
        assert answer.status == 200
        [event] = answer.json["events"]
        assert event["kind"] == "revoked" and event["leaseIds"] == [lease_id]

        body, headers = _signed(
            server.operator, "POST", "/api/escrow/revoke", {"relay_key": relay_key}
        )
        again = await transport.request("POST", "/api/escrow/revoke", body, headers)
        assert again.status == 200 and again.json["alreadyRevoked"] is True

        health = await transport.request("GET", "/api/escrow/health")
        assert health.status == 200 and health.json["database"]["status"] == "ok"

    def scrape() -> httpx.Response:
        context = server.pki.client_context("prometheus")
        with httpx.Client(verify=context, timeout=TIMEOUT) as client:
            return client.get(server.url + "/metrics")

    metrics = (await trio.to_thread.run_sync(scrape)).text
    assert 'escrow_unlock_total{result="issued"} 1.0' in metrics
    assert 'escrow_policy_rejections_total{reason="peers-still-healthy"} 1.0' in metrics
    assert "escrow_audit_chain_valid" in metrics
    logs = "".join(server.output)
    assert SECRET.hex() not in logs
    assert writer.secret_key[:32].hex() not in logs
    assert granted.json["sealed_lease"] not in logs


async def test_requests_without_hmac_or_with_a_foreign_certificate_are_refused(
    server: Server, tmp_path: Path
) -> None:
    def unsigned() -> httpx.Response:
        context = server.pki.client_context("curious")
        with httpx.Client(verify=context, timeout=TIMEOUT) as client:
            return client.get(server.url + "/api/escrow/policy")

    response = await trio.to_thread.run_sync(unsigned)
    assert response.status_code == 401
    assert response.json()["reason"] == "signature-missing"

    async with server.transport("intruder", ca=server.pki.other_ca, retries=0) as foreign:
        with pytest.raises(EscrowRefusedTlsError):
            await foreign.request("GET", "/api/escrow/policy")

    async with server.transport() as client:
        # An owner's Ed25519 headers alone are not the HMAC signature, and a wrong secret fails.
        wrong = EscrowTransport(
            server.url,
            client_id=CLIENT_ID,
            secret=b"\x01" * 32,
            ssl_context_holder=server.pki.client_holder("gateway-2"),
            wall_clock=time.time,
            retries=0,
        )
        async with wrong:
            refused = await wrong.request("GET", "/api/escrow/health")
        assert refused.status == 401 and refused.json["reason"] == "bad-signature"
        stale = EscrowTransport(
            server.url,
            client_id=CLIENT_ID,
            secret=SECRET,
            ssl_context_holder=server.pki.client_holder("gateway-3"),
            wall_clock=lambda: time.time() - 3600,
            retries=0,
        )
        async with stale:
            old = await stale.request("GET", "/api/escrow/health")
        assert old.status == 401 and old.json["reason"] == "stale-timestamp"
        fine = await client.request("GET", "/api/escrow/health")
        assert fine.status == 200
