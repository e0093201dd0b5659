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
from hypertuna.config import EscrowConfig, OperatorsConfig
from hypertuna.escrow.keys import EscrowKeyError, create_audit_key, create_escrow_key
from hypertuna.escrow.package import seal_deposit
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores import KeyPair
from hypertuna.system import open_system
from tests.edge.worker_support import Owner
from tests.support import gateway_config


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
    async with (
        open_system(config, escrow_environ={}) as system,
        httpx.AsyncClient(base_url=system.base_url) as client,
    ):
        policy = (await client.get("/api/escrow/policy")).json()
        assert policy["publicKey"] == escrow_key.public_key.hex()
        assert policy["fingerprint"] == escrow_key.fingerprint
        owner = Owner()
        package = seal_deposit(
            escrow_key.public_key,
            relay_key=owner.relay_key,
            writer=KeyPair.from_seed(bytes(range(32))),
            owner_key=owner.public,
            created_at_ms=time.time_ns() // 1_000_000,
            rotation=1,
        )
        deposit = {
            "relay_key": owner.relay_key,
            "owner_key": owner.public,
            "package": base64.b64encode(package).decode(),
        }
        assert (await _post(client, "/api/escrow", deposit, owner.key)).status_code == 201
        session = nacl.public.PrivateKey.generate()
        unlock = {
            "relay_key": owner.relay_key,
            "session_public_key": bytes(session.public_key).hex(),
            "requester_id": "operator-test",
        }
        refused = await _post(client, "/api/escrow/unlock", unlock, operator)
        assert refused.status_code == 412, refused.text
        # What the gateway itself knows: no worker ever registered the relay, it has no
        # mirror, and it only just started (so the peer timeout counts from now).
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
