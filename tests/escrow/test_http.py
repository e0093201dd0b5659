"""The embedded escrow HTTP API over a real socket (each test on SQLite and PostgreSQL), with real
Ed25519 signatures: deposits with idempotency, operator-only unlocks whose evidence comes from the
gateway, revocation by owner or operator (and its publication), lease listing without secrets,
health and policy, and every malformed or unauthorised request refused with a JSON reason and no
state change."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import hypercorn.config
import hypercorn.trio
import nacl.public
import nacl.signing
import pytest
import trio
from quart_trio import QuartTrio

from hypertuna.actors.escrow import EscrowActor
from hypertuna.escrow import store
from hypertuna.escrow.http import register_escrow_routes
from hypertuna.escrow.keys import AuditKey, EscrowKey
from hypertuna.escrow.package import open_lease, seal_deposit
from hypertuna.escrow.policy import Evidence, Policy, Reason
from hypertuna.escrow.service import EscrowService, open_escrow_service
from hypertuna.escrow_client.port import RelayRefusal, RelayRefused
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores.crypto import KeyPair
from tests.escrow.conftest import DEADLINE_S, NOW, good_evidence, new_writer

NOW_S = NOW // 1000


class Clock:
    """The one wall clock of a test: milliseconds for the escrow, seconds for signatures."""

    def __init__(self) -> None:
        self.ms = NOW

    def seconds(self) -> int:
        return self.ms // 1000


@attrs.define
class Worker:
    """A worker's Ed25519 owner key and a relay it deposits for."""

    key: nacl.signing.SigningKey
    relay_key: str

    @property
    def key_hex(self) -> str:
        return self.key.verify_key.encode().hex()


def new_worker() -> Worker:
    return Worker(
        nacl.signing.SigningKey.generate(),
        nacl.signing.SigningKey.generate().verify_key.encode().hex(),
    )


@attrs.define
class Api:
    """The escrow routes on a real socket, the actor behind them and the evidence they use."""

    url: str
    client: httpx.AsyncClient
    actor: EscrowActor
    service: EscrowService
    clock: Clock
    operator: nacl.signing.SigningKey
    evidence: dict[str, Evidence]
    asked: list[str]
    #: The relays workers registered at the gateway, with their owner keys (the relay check's).
    registered: dict[str, str]

    def worker(self) -> Worker:
        """A new worker whose relay is registered at the gateway under its key."""
        worker = new_worker()
        self.registered[worker.relay_key] = worker.key_hex
        return worker

    def package(self, worker: Worker, writer: KeyPair | None = None, rotation: int = 1) -> bytes:
        return seal_deposit(
            self.service.escrow_key.public_key,
            relay_key=worker.relay_key,
            writer=writer or new_writer(),
            owner_key=worker.key_hex,
            created_at_ms=self.clock.ms,
            rotation=rotation,
        )

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        key: nacl.signing.SigningKey | None = None,
        headers: dict[str, str] | None = None,
        timestamp: int | None = None,
    ) -> httpx.Response:
        sent = dict(headers or {})
        if key is not None:
            signed = sign_ed25519(
                key,
                method,
                path,
                body,
                timestamp=self.clock.seconds() if timestamp is None else timestamp,
            )
            sent.update(signed.as_dict())
        return await self.client.request(method, path, content=body, headers=sent)

    async def post(
        self, path: str, data: object, key: nacl.signing.SigningKey | None, **kw: Any
    ) -> httpx.Response:
        return await self.send("POST", path, json.dumps(data).encode(), key=key, **kw)

    async def deposit(
        self, worker: Worker, *, idempotency_key: str | None = None, rotation: int = 1
    ) -> httpx.Response:
        body = {
            "relay_key": worker.relay_key,
            "owner_key": worker.key_hex,
            "package": base64.b64encode(self.package(worker, rotation=rotation)).decode(),
        }
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        return await self.post("/api/escrow", body, worker.key, headers=headers)

    async def unlock(
        self, relay_key: str, session: nacl.public.PrivateKey | None = None
    ) -> httpx.Response:
        session = session or nacl.public.PrivateKey.generate()
        body = {
            "relay_key": relay_key,
            "session_public_key": bytes(session.public_key).hex(),
            "requester_id": "gateway-1",
        }
        return await self.post("/api/escrow/unlock", body, self.operator)

    async def state(self) -> Sequence[object]:
        """Every row of every escrow table (the audit log included)."""
        return await self.service.db.read(store.all_rows)


def assert_error(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["reason"] == reason, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    return body


@contextlib.asynccontextmanager
async def open_api(
    escrow_db: tuple[str | None, Path],
    escrow_key: EscrowKey,
    audit_key: AuditKey,
    **actor_options: Any,
) -> AsyncIterator[Api]:
    url, path = escrow_db
    clock = Clock()
    operator = nacl.signing.SigningKey.generate()
    evidence: dict[str, Evidence] = {}
    asked: list[str] = []

    registered: dict[str, str] = {}

    async def gather(relay_key: str) -> Evidence:
        asked.append(relay_key)
        return evidence.get(relay_key, Evidence())

    async def check(relay_key: str, owner_key: str) -> RelayRefused | None:
        owner = registered.get(relay_key)
        if owner is None:
            return RelayRefused(RelayRefusal.NOT_REGISTERED, "not registered here")
        if owner != owner_key:
            return RelayRefused(RelayRefusal.OTHER_OWNER, "registered by another key")
        return None

    async with (
        open_escrow_service(
            escrow_key=escrow_key,
            audit_key=audit_key,
            policy=Policy(),
            database_url=url,
            sqlite_path=path,
            checkpoint_every=5,
        ) as service,
        trio.open_nursery() as nursery,
    ):
        actor = EscrowActor(service, wall_clock_ms=lambda: clock.ms, **actor_options)
        await nursery.start(actor.run)
        app = QuartTrio("escrow-test")
        register_escrow_routes(
            app,
            actor,
            evidence=gather,
            hmac=None,
            operator_keys=frozenset({operator.verify_key.encode().hex()}),
            wall_clock=clock.seconds,
            relay_check=check,
        )
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        binds = await nursery.start(hypercorn.trio.serve, app, config)
        base = binds[0]
        async with httpx.AsyncClient(base_url=base, timeout=DEADLINE_S) as client:
            yield Api(base, client, actor, service, clock, operator, evidence, asked, registered)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def api(
    escrow_db: tuple[str | None, Path], escrow_key: EscrowKey, audit_key: AuditKey
) -> AsyncIterator[Api]:
    async with open_api(escrow_db, escrow_key, audit_key) as running:
        yield running


# --- policy and health -----------------------------------------------------------------------


async def test_policy_is_public_and_names_the_key(api: Api) -> None:
    response = await api.send("GET", "/api/escrow/policy")
    assert response.status_code == 200
    doc = response.json()
    assert doc["publicKey"] == api.service.escrow_key.public_key.hex()
    assert doc["fingerprint"] == api.service.escrow_key.fingerprint
    assert doc["leaseTtlMs"] == 600_000


async def test_health_reports_database_key_and_audit(api: Api) -> None:
    response = await api.send("GET", "/api/escrow/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"]["status"] == "ok"
    assert body["key"]["fingerprint"] == api.service.escrow_key.fingerprint
    assert body["audit"]["status"] in ("valid", "unverified")
    await api.actor.verify_audit()
    body = (await api.send("GET", "/api/escrow/health")).json()
    assert body["audit"]["status"] == "valid"


# --- deposit ---------------------------------------------------------------------------------


async def test_deposit_with_idempotency(api: Api) -> None:
    worker = api.worker()
    first = await api.deposit(worker, idempotency_key="dep-1")
    assert first.status_code == 201, first.text
    receipt = first.json()
    assert receipt["relayKey"] == worker.relay_key
    assert receipt["ownerKey"] == worker.key_hex
    # The retry sends a package sealed afresh, so it is another body: 422 — but the very same
    # body again gets the original answer.
    before = await api.state()
    other = await api.deposit(worker, idempotency_key="dep-1")
    assert_error(other, 422, "idempotency-key-reused")
    assert await api.state() == before


async def test_a_retried_deposit_gets_the_original_answer(api: Api) -> None:
    worker = api.worker()
    body = json.dumps(
        {
            "relay_key": worker.relay_key,
            "owner_key": worker.key_hex,
            "package": base64.b64encode(api.package(worker)).decode(),
        }
    ).encode()
    headers = {"Idempotency-Key": "retry-me"}
    first = await api.send("POST", "/api/escrow", body, key=worker.key, headers=headers)
    assert first.status_code == 201
    before = await api.state()
    again = await api.send("POST", "/api/escrow", body, key=worker.key, headers=headers)
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert await api.state() == before


async def test_a_deposit_signed_by_another_key_is_refused(api: Api) -> None:
    worker, stranger = api.worker(), new_worker()
    before = await api.state()
    body = {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(api.package(worker)).decode(),
    }
    signed_by_stranger = await api.post("/api/escrow", body, stranger.key)
    assert_error(signed_by_stranger, 403, "signer-not-owner")
    unsigned = await api.post("/api/escrow", body, None)
    assert_error(unsigned, 401, "signature-missing")
    assert await api.state() == before


async def test_another_owner_cannot_deposit_for_a_relay(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    thief = Worker(nacl.signing.SigningKey.generate(), worker.relay_key)
    before = await api.state()
    assert_error(await api.deposit(thief, rotation=2), 403, "relay-owned-by-another-key")
    assert await api.state() == before


async def test_deposits_for_relays_the_gateway_does_not_know_are_refused(api: Api) -> None:
    """The gateway vouches for the relay: registered here by workers, under the deposit's owner
    key. Anything else is refused before the escrow is asked, and changes nothing."""
    stranger = new_worker()
    before = await api.state()
    assert_error(await api.deposit(stranger), 404, "relay-not-registered")
    worker = api.worker()
    thief = Worker(nacl.signing.SigningKey.generate(), worker.relay_key)
    assert_error(await api.deposit(thief), 403, "relay-owned-by-another-key")
    assert await api.state() == before
    assert (await api.deposit(worker)).status_code == 201


# --- unlock ----------------------------------------------------------------------------------


async def test_unlock_uses_the_gateways_evidence_and_seals_the_secret(api: Api) -> None:
    worker = api.worker()
    writer = new_writer()
    body = {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(api.package(worker, writer)).decode(),
    }
    assert (await api.post("/api/escrow", body, worker.key)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    session = nacl.public.PrivateKey.generate()
    response = await api.unlock(worker.relay_key, session)
    assert response.status_code == 200, response.text
    assert api.asked == [worker.relay_key]
    grant = response.json()
    opened = open_lease(bytes(session), base64.b64decode(grant["sealed_lease"]))
    assert opened.writer.public_key == writer.public_key
    assert opened.binding.lease_id == grant["lease"]["leaseId"]
    assert grant["lease"]["relayKey"] == worker.relay_key


async def test_unlock_lists_every_failing_reason(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    response = await api.unlock(worker.relay_key)  # no evidence known: fails closed
    body = assert_error(response, 412, "policy-rejected")
    assert body["reasons"] == [
        Reason.REGISTRATION_FLAG_MISSING.value,
        Reason.PEERS_STILL_HEALTHY.value,
        Reason.PEER_TIMEOUT_NOT_REACHED.value,
        Reason.MIRROR_TOO_STALE.value,
        Reason.MIRROR_WINDOW_EXPIRED.value,
    ]
    unknown = await api.unlock(new_worker().relay_key)
    assert Reason.RECORD_NOT_FOUND.value in assert_error(unknown, 412, "policy-rejected")["reasons"]


async def test_unlock_is_for_operators_only_and_never_takes_evidence(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    before = await api.state()
    body: dict[str, object] = {
        "relay_key": worker.relay_key,
        "session_public_key": bytes(nacl.public.PrivateKey.generate().public_key).hex(),
        "requester_id": "gateway-1",
    }
    assert_error(await api.post("/api/escrow/unlock", body, worker.key), 401, "unknown-key")
    assert_error(await api.post("/api/escrow/unlock", body, None), 401, "signature-missing")
    with_evidence = {**body, "evidence": attrs.asdict(good_evidence(api.clock.ms))}
    refused = await api.post("/api/escrow/unlock", with_evidence, api.operator)
    assert_error(refused, 400, "evidence-not-accepted")
    assert await api.state() == before
    assert api.asked == []


# --- revoke ----------------------------------------------------------------------------------


async def test_revoke_by_owner_twice_is_idempotent_and_published(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    lease_id = (await api.unlock(worker.relay_key)).json()["lease"]["leaseId"]
    with api.actor.bus.subscribe(worker.relay_key) as revocations:
        first = await api.post("/api/escrow/revoke", {"relay_key": worker.relay_key}, worker.key)
        assert first.status_code == 200, first.text
        assert first.json()["leaseIds"] == [lease_id]
        assert first.json()["alreadyRevoked"] is False
        published = revocations.receive_nowait()
        assert published.lease_ids == (lease_id,)
        again = await api.post("/api/escrow/revoke", {"relay_key": worker.relay_key}, worker.key)
        assert again.status_code == 200
        assert again.json()["alreadyRevoked"] is True
        with pytest.raises(trio.WouldBlock):
            revocations.receive_nowait()
    leases = (await api.send("GET", "/api/escrow/leases", key=api.operator)).json()["leases"]
    assert [lease["status"] for lease in leases] == ["revoked"]


async def test_revoke_by_operator_and_not_by_a_stranger(api: Api) -> None:
    worker = api.worker()
    receipt = (await api.deposit(worker)).json()
    before = await api.state()
    stranger = await api.post(
        "/api/escrow/revoke", {"relay_key": worker.relay_key}, new_worker().key
    )
    assert_error(stranger, 403, "not-owner")
    assert_error(
        await api.post("/api/escrow/revoke", {"relay_key": worker.relay_key}, None),
        401,
        "signature-missing",
    )
    assert await api.state() == before
    by_deposit = await api.post(
        "/api/escrow/revoke", {"deposit_id": receipt["depositId"]}, api.operator
    )
    assert by_deposit.status_code == 200
    assert by_deposit.json()["depositIds"] == [receipt["depositId"]]
    unknown = await api.post(
        "/api/escrow/revoke", {"relay_key": new_worker().relay_key}, api.operator
    )
    assert_error(unknown, 404, "record-not-found")


# --- leases ----------------------------------------------------------------------------------


async def test_leases_list_holds_no_secret(api: Api) -> None:
    worker = api.worker()
    writer = new_writer()
    body = {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(api.package(worker, writer)).decode(),
    }
    assert (await api.post("/api/escrow", body, worker.key)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    grant = (await api.unlock(worker.relay_key)).json()
    path = f"/api/escrow/leases?relay_key={worker.relay_key}&active=1"
    listing = await api.send("GET", path, key=api.operator)
    assert listing.status_code == 200
    leases = listing.json()["leases"]
    assert [lease["leaseId"] for lease in leases] == [grant["lease"]["leaseId"]]
    text = listing.text
    assert writer.secret_key[:32].hex() not in text
    assert grant["sealed_lease"] not in text
    assert body["package"] not in text
    assert_error(await api.send("GET", "/api/escrow/leases"), 401, "signature-missing")
    assert_error(await api.send("GET", "/api/escrow/leases", key=worker.key), 401, "unknown-key")


# --- bad input -------------------------------------------------------------------------------


def _valid_deposit(api: Api, worker: Worker) -> dict[str, object]:
    return {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(api.package(worker)).decode(),
    }


async def test_bad_deposits_are_refused_and_change_nothing(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    before = await api.state()
    good = _valid_deposit(api, worker)
    other_escrow = seal_deposit(
        nacl.public.PrivateKey.generate().public_key.encode(),
        relay_key=worker.relay_key,
        writer=new_writer(),
        owner_key=worker.key_hex,
        created_at_ms=api.clock.ms,
        rotation=5,
    )
    mismatched = seal_deposit(
        api.service.escrow_key.public_key,
        relay_key=new_worker().relay_key,
        writer=new_writer(),
        owner_key=worker.key_hex,
        created_at_ms=api.clock.ms,
        rotation=5,
    )
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "malformed-json"),
        (b"[1, 2]", 400, "not-an-object"),
        (json.dumps({**good, "relay_key": 7}).encode(), 400, "wrong-type"),
        (json.dumps({**good, "relay_key": "XY" * 32}).encode(), 400, "bad-hex"),
        (json.dumps({**good, "package": "***not base64***"}).encode(), 400, "bad-base64"),
        (
            json.dumps({k: v for k, v in good.items() if k != "package"}).encode(),
            400,
            "missing-field",
        ),
        (json.dumps({**good, "extra": 1}).encode(), 400, "unknown-field"),
        (
            json.dumps({**good, "package": base64.b64encode(b"x" * 200).decode()}).encode(),
            400,
            "package-unreadable",
        ),
        (
            json.dumps({**good, "package": base64.b64encode(other_escrow).decode()}).encode(),
            400,
            "package-unreadable",
        ),
        (
            json.dumps({**good, "package": base64.b64encode(mismatched).decode()}).encode(),
            400,
            "package-relay-mismatch",
        ),
    ]
    for body, status, reason in cases:
        response = await api.send("POST", "/api/escrow", body, key=worker.key)
        assert_error(response, status, reason)
    stale = await api.send(
        "POST",
        "/api/escrow",
        json.dumps(good).encode(),
        key=worker.key,
        timestamp=api.clock.seconds() - 3600,
    )
    assert_error(stale, 401, "stale-timestamp")
    bad_key = await api.send(
        "POST",
        "/api/escrow",
        json.dumps(good).encode(),
        key=worker.key,
        headers={"Idempotency-Key": "spaces are not allowed"},
    )
    assert_error(bad_key, 400, "invalid-request")
    assert await api.state() == before


async def test_a_secret_that_does_not_derive_its_public_key_is_refused(api: Api) -> None:
    worker = api.worker()
    writer, other = new_writer(), new_writer()
    # Halves that disagree, as a broken or lying worker could send.
    forged = attrs.evolve(writer, secret_key=other.secret_key[:32] + writer.public_key)
    package = seal_deposit(
        api.service.escrow_key.public_key,
        relay_key=worker.relay_key,
        writer=forged,
        owner_key=worker.key_hex,
        created_at_ms=api.clock.ms,
        rotation=1,
    )
    before = await api.state()
    body = {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(package).decode(),
    }
    assert_error(await api.post("/api/escrow", body, worker.key), 400, "package-secret-mismatch")
    assert await api.state() == before


async def test_bad_unlocks_and_revokes_are_refused_and_change_nothing(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    before = await api.state()
    session = bytes(nacl.public.PrivateKey.generate().public_key).hex()
    good = {"relay_key": worker.relay_key, "session_public_key": session, "requester_id": "gw"}
    unlock_cases: list[tuple[object, str]] = [
        ({**good, "session_public_key": "zz"}, "bad-hex"),
        ({**good, "session_public_key": "00" * 32}, "invalid-request"),
        ({**good, "requester_id": 5}, "wrong-type"),
        ({**good, "requester_id": "has space"}, "invalid-request"),
        ({**good, "relay_key": None}, "missing-field"),
    ]
    for body, reason in unlock_cases:
        assert_error(await api.post("/api/escrow/unlock", body, api.operator), 400, reason)
    revoke_cases: list[tuple[object, str]] = [
        ({}, "invalid-request"),
        ({"relay_key": worker.relay_key, "deposit_id": "dep_x"}, "invalid-request"),
        ({"relay_key": "nothex"}, "bad-hex"),
        ({"deposit_id": "bad id!"}, "invalid-request"),
    ]
    for body, reason in revoke_cases:
        assert_error(await api.post("/api/escrow/revoke", body, worker.key), 400, reason)
    assert await api.state() == before
    assert api.asked == []


async def test_an_operator_releases_a_lease_once_and_it_is_published(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    lease_id = (await api.unlock(worker.relay_key)).json()["lease"]["leaseId"]
    body = {"lease_id": lease_id, "reason": "workers-back"}
    before = await api.state()
    assert_error(await api.post("/api/escrow/release", body, worker.key), 401, "unknown-key")
    assert_error(
        await api.post("/api/escrow/release", {**body, "reason": "no spaces"}, api.operator),
        400,
        "invalid-request",
    )
    assert await api.state() == before
    with api.actor.bus.subscribe(worker.relay_key) as ended:
        released = await api.post("/api/escrow/release", body, api.operator)
        assert released.status_code == 200, released.text
        assert released.json()["released"] is True
        assert released.json()["lease"]["status"] == "released"
        assert ended.receive_nowait().lease_ids == (lease_id,)
    again = await api.post("/api/escrow/release", body, api.operator)
    assert again.status_code == 200 and again.json()["released"] is False
    unknown = await api.post("/api/escrow/release", {**body, "lease_id": "lease_x"}, api.operator)
    assert_error(unknown, 404, "lease-not-found")


async def test_the_lease_event_stream_returns_a_revocation(api: Api) -> None:
    worker = api.worker()
    assert (await api.deposit(worker)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    lease_id = (await api.unlock(worker.relay_key)).json()["lease"]["leaseId"]
    first = (await api.send("GET", "/api/escrow/leases/events?wait=0", key=api.operator)).json()
    assert first["events"] == [] and first["lastSeq"] == 0 and first["reset"] is False
    answers: list[dict[str, Any]] = []

    async def follow() -> None:
        path = f"/api/escrow/leases/events?since=0&epoch={first['epoch']}&wait=20"
        answers.append((await api.send("GET", path, key=api.operator)).json())

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await trio.sleep(0.2)
            assert answers == []
            revoked = await api.post(
                "/api/escrow/revoke", {"relay_key": worker.relay_key}, worker.key
            )
            assert revoked.status_code == 200
    [answer] = answers
    assert answer["epoch"] == first["epoch"]
    [event] = answer["events"]
    assert event["kind"] == "revoked"
    assert event["leaseIds"] == [lease_id]
    assert answer["lastSeq"] == event["seq"] == 1


async def test_logs_and_metrics_carry_no_secret(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    worker = api.worker()
    writer = new_writer()
    package = api.package(worker, writer)
    body = {
        "relay_key": worker.relay_key,
        "owner_key": worker.key_hex,
        "package": base64.b64encode(package).decode(),
    }
    assert (await api.post("/api/escrow", body, worker.key)).status_code == 201
    api.evidence[worker.relay_key] = good_evidence(api.clock.ms)
    session = nacl.public.PrivateKey.generate()
    grant = (await api.unlock(worker.relay_key, session)).json()
    revoked = await api.post("/api/escrow/revoke", {"relay_key": worker.relay_key}, worker.key)
    assert revoked.status_code == 200
    from prometheus_client import generate_latest

    metrics = generate_latest(api.actor.metrics.registry).decode()
    assert 'escrow_unlock_total{result="issued"} 1.0' in metrics
    assert "escrow_active_leases 0.0" in metrics
    seed = writer.secret_key[:32]
    sealed = base64.b64decode(grant["sealed_lease"])
    forbidden = [
        seed.hex(),
        base64.b64encode(seed).decode(),
        writer.secret_key.hex(),
        base64.b64encode(package).decode(),
        package.hex(),
        grant["sealed_lease"],
        sealed.hex(),
        bytes(session).hex(),
        bytes(api.service.escrow_key.private_key).hex(),
        worker.key.encode().hex(),
        api.operator.encode().hex(),
    ]
    text = "\n".join(record.getMessage() for record in caplog.records) + metrics
    for secret in forbidden:
        assert secret not in text
    assert re.search(r"[A-Za-z0-9+/]{200,}", text) is None


async def test_health_is_503_without_the_database(api: Api) -> None:
    await api.service.db.aclose()
    response = await api.send("GET", "/api/escrow/health")
    assert response.status_code == 503
    body = response.json()
    assert body["database"]["status"] == "unreachable"
    assert body["key"]["fingerprint"] == api.service.escrow_key.fingerprint
    worker = api.worker()
    assert_error(await api.deposit(worker), 503, "database-unavailable")


async def test_concurrent_duplicate_deposits_store_one(api: Api) -> None:
    worker = api.worker()
    body = json.dumps(
        {
            "relay_key": worker.relay_key,
            "owner_key": worker.key_hex,
            "package": base64.b64encode(api.package(worker)).decode(),
        }
    ).encode()
    statuses: list[int] = []

    async def send() -> None:
        response = await api.send(
            "POST", "/api/escrow", body, key=worker.key, headers={"Idempotency-Key": "twice"}
        )
        if response.status_code == 409:
            assert_error(response, 409, "idempotency-key-in-flight")
        statuses.append(response.status_code)

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(send)
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}
    rows = await api.service.db.read(
        lambda db: db.fetch_one("SELECT count(*) FROM escrow_deposits", ())
    )
    assert rows is not None and rows[0] == 1
