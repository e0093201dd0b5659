"""The escrow inside the gateway (``escrow.enabled``): its routes on the gateway's own port, its
keys required at start, unlocks judged on the gateway's own evidence, its health and metrics."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import attrs
import httpx
import nacl.public
import nacl.signing
import pytest

from hypertuna.cli import _first_leaf
from hypertuna.config import Config, EscrowConfig, OperatorsConfig
from hypertuna.escrow.keys import EscrowKey, EscrowKeyError, create_audit_key, create_escrow_key
from hypertuna.escrow.package import seal_deposit
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores import KeyPair
from hypertuna.storage.events import open_event_store
from hypertuna.storage.registrations import Registration, RegistrationOutcome
from hypertuna.system import open_system
from tests.edge.worker_support import Owner
from tests.support import gateway_config


async def register_relay(config: Config, owner: Owner, worker_key: str = "c" * 64) -> None:
    """Record a worker's registration of ``owner``'s relay, as the worker link would."""
    async with open_event_store(
        config.storage.database_url or None, config.storage.data_dir
    ) as store:
        outcome, _ = await store.apply_registration(
            Registration(
                action="register",
                relay_key=owner.relay_key,
                owner_key=owner.public,
                worker_key=worker_key,
                seq=1,
                name=f"relay-{owner.relay_key[:8]}",
                description="",
            ),
            now=int(time.time()),
        )
    assert outcome is RegistrationOutcome.ACCEPTED


def deposit_body(escrow_key: EscrowKey, owner: Owner, relay_key: str | None = None) -> object:
    package = seal_deposit(
        escrow_key.public_key,
        relay_key=relay_key or owner.relay_key,
        writer=KeyPair.from_seed(bytes(range(32))),
        owner_key=owner.public,
        created_at_ms=time.time_ns() // 1_000_000,
        rotation=1,
    )
    return {
        "relay_key": relay_key or owner.relay_key,
        "owner_key": owner.public,
        "package": base64.b64encode(package).decode(),
    }


async def _post(
    client: httpx.AsyncClient, path: str, data: object, key: nacl.signing.SigningKey
) -> httpx.Response:
    body = json.dumps(data).encode()
    signed = sign_ed25519(key, "POST", path, body, timestamp=int(time.time()))
    return await client.post(path, content=body, headers=signed.as_dict())


async def test_embedded_escrow_judges_unlocks_on_the_gateways_own_evidence(
    tmp_path: Path,
) -> None:
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    escrow_key = create_escrow_key(key_dir / "escrow.key")
    create_audit_key(key_dir / "audit.key")
    operator = nacl.signing.SigningKey.generate()
    config = attrs.evolve(
        gateway_config(tmp_path / "gateway"),
        escrow=EscrowConfig(enabled=True, key_dir=str(key_dir)),
        operators=OperatorsConfig(keys=(operator.verify_key.encode().hex(),)),
    )
    owner = Owner()
    await register_relay(config, owner)
    async with (
        open_system(config, escrow_environ={}) as system,
        httpx.AsyncClient(base_url=system.base_url) as client,
    ):
        policy = (await client.get("/api/escrow/policy")).json()
        assert policy["publicKey"] == escrow_key.public_key.hex()
        assert policy["fingerprint"] == escrow_key.fingerprint
        deposit = deposit_body(escrow_key, owner)
        assert (await _post(client, "/api/escrow", deposit, owner.key)).status_code == 201
        session = nacl.public.PrivateKey.generate()
        unlock = {
            "relay_key": owner.relay_key,
            "session_public_key": bytes(session.public_key).hex(),
            "requester_id": "operator-test",
        }
        refused = await _post(client, "/api/escrow/unlock", unlock, operator)
        assert refused.status_code == 412, refused.text
        # What the gateway itself knows: a worker registered the relay but none is connected,
        # it has no mirror (so no admitted gateway writer), and it only just started (so the
        # peer timeout counts from now).
        assert refused.json()["reasons"] == [
            "registration-flag-missing",
            "peer-timeout-not-reached",
            "mirror-too-stale",
            "mirror-window-expired",
        ]
        # Evidence in the body is never taken from a caller.
        forged = await _post(client, "/api/escrow/unlock", {**unlock, "evidence": {}}, operator)
        assert forged.status_code == 400
        health = (await client.get("/health")).json()
        assert health["checks"]["escrow"]["ok"] is True
        metrics = (await client.get("/metrics")).text
        assert 'escrow_unlock_total{result="rejected"} 1.0' in metrics


async def test_missing_escrow_keys_stop_the_gateway(tmp_path: Path) -> None:
    config = attrs.evolve(
        gateway_config(tmp_path / "gateway"),
        escrow=EscrowConfig(enabled=True, key_dir=str(tmp_path / "nowhere")),
    )
    with pytest.raises(BaseException) as raised:
        async with open_system(config, escrow_environ={}):
            pass
    assert isinstance(_first_leaf(raised.value, EscrowKeyError), EscrowKeyError)
    assert "hypertuna escrow init" in str(_first_leaf(raised.value, EscrowKeyError))
    assert not (tmp_path / "nowhere").exists()  # nothing was created in its place


async def test_deposits_only_for_relays_workers_registered_here_under_that_key(
    tmp_path: Path,
) -> None:
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    escrow_key = create_escrow_key(key_dir / "escrow.key")
    create_audit_key(key_dir / "audit.key")
    config = attrs.evolve(
        gateway_config(tmp_path / "gateway"),
        escrow=EscrowConfig(enabled=True, key_dir=str(key_dir)),
    )
    owner, stranger, thief = Owner(), Owner(), Owner()
    await register_relay(config, owner)
    async with (
        open_system(config, escrow_environ={}) as system,
        httpx.AsyncClient(base_url=system.base_url) as client,
    ):
        assert system.escrow is not None
        hosted = await system.create_relay("mine")
        refused = [
            (await _post(client, "/api/escrow", deposit_body(escrow_key, stranger), stranger.key)),
            (
                await _post(
                    client,
                    "/api/escrow",
                    deposit_body(escrow_key, thief, owner.relay_key),
                    thief.key,
                )
            ),
            (
                await _post(
                    client,
                    "/api/escrow",
                    deposit_body(escrow_key, owner, hosted.key),
                    owner.key,
                )
            ),
        ]
        assert [(r.status_code, r.json()["reason"]) for r in refused] == [
            (404, "relay-not-registered"),
            (403, "relay-owned-by-another-key"),
            (404, "relay-not-registered"),
        ]
        assert "hosted by this gateway" in refused[2].json()["message"]
        assert (await system.escrow.health()).deposits_active == 0
        accepted = await _post(client, "/api/escrow", deposit_body(escrow_key, owner), owner.key)
        assert accepted.status_code == 201, accepted.text
        assert (await system.escrow.health()).deposits_active == 1
