"""Fixtures of the escrow tests: real keys in temporary files, and an escrow service on each
backend (``escrow`` is parametrized over SQLite and PostgreSQL through ``store_url``)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import nacl.public
import pytest

from hypertuna.escrow.keys import AuditKey, EscrowKey, create_audit_key, create_escrow_key
from hypertuna.escrow.package import seal_deposit
from hypertuna.escrow.policy import Evidence, Policy
from hypertuna.escrow.service import DepositRequest, EscrowService, open_escrow_service
from hypertuna.storage.cores.crypto import KeyPair

NOW = 1_700_000_000_000
DEADLINE_S = 30


def hex_key() -> str:
    return secrets.token_hex(32)


@attrs.frozen
class Owner:
    """A worker's owner key and one relay it deposits for."""

    key: KeyPair
    relay_key: str

    @property
    def key_hex(self) -> str:
        return self.key.public_key.hex()


def new_owner() -> Owner:
    return Owner(KeyPair.from_seed(secrets.token_bytes(32)), hex_key())


def new_writer() -> KeyPair:
    return KeyPair.from_seed(secrets.token_bytes(32))


def deposit_request(
    escrow_key: EscrowKey,
    owner: Owner,
    writer: KeyPair,
    *,
    rotation: int = 1,
    created_at_ms: int = NOW,
    idempotency_key: str | None = None,
) -> DepositRequest:
    package = seal_deposit(
        escrow_key.public_key,
        relay_key=owner.relay_key,
        writer=writer,
        owner_key=owner.key_hex,
        created_at_ms=created_at_ms,
        rotation=rotation,
    )
    return DepositRequest(
        owner_key=owner.key_hex,
        relay_key=owner.relay_key,
        package=package,
        idempotency_key=idempotency_key,
    )


def good_evidence(now_ms: int = NOW) -> Evidence:
    """Evidence that passes every rule of the default policy at ``now_ms``."""
    return Evidence(
        relay_registered=True,
        escrow_enabled=True,
        healthy_peers=0,
        last_peer_seen_ms=now_ms - 60_000,
        mirror_lag_ms=1_000,
        mirror_updated_ms=now_ms - 5_000,
    )


def session_key() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


@pytest.fixture
def escrow_key(tmp_path: Path) -> EscrowKey:
    return create_escrow_key(tmp_path / "keys" / "escrow.key")


@pytest.fixture
def audit_key(tmp_path: Path) -> AuditKey:
    return create_audit_key(tmp_path / "keys" / "audit.key")


@pytest.fixture
def escrow_db(store_url: tuple[str | None, Path]) -> tuple[str | None, Path]:
    """``(database_url, sqlite_path)`` for each backend."""
    url, data_dir = store_url
    return url, data_dir / "var" / "escrow.db"


@pytest.fixture
async def escrow(
    escrow_db: tuple[str | None, Path], escrow_key: EscrowKey, audit_key: AuditKey
) -> AsyncIterator[EscrowService]:
    url, path = escrow_db
    async with open_escrow_service(
        escrow_key=escrow_key,
        audit_key=audit_key,
        policy=Policy(),
        database_url=url,
        sqlite_path=path,
        checkpoint_every=5,
    ) as service:
        yield service
