"""Fixed secp256k1 identities and helpers shared by the Nostr codec tests."""

from __future__ import annotations

import json
from typing import Any

from hypertuna.protocol.nostr import Event, compute_event_id, public_key_hex, sign_event

ALICE = bytes.fromhex("01" * 32)
BOB = bytes.fromhex("02" * 32)
ALICE_PK = public_key_hex(ALICE)
BOB_PK = public_key_hex(BOB)

T0 = 1_700_000_000


def note(
    content: str = "hello",
    *,
    secret: bytes = ALICE,
    created_at: int = T0,
    kind: int = 1,
    tags: list[list[str]] | None = None,
) -> Event:
    return sign_event(secret, created_at=created_at, kind=kind, tags=tags or [], content=content)


def as_json(event: Event) -> dict[str, Any]:
    """The event as a freshly decoded JSON object (what the relay receives)."""
    value = json.loads(event.raw)
    assert isinstance(value, dict)
    return value


def rehash(obj: dict[str, Any]) -> dict[str, Any]:
    """Recompute the id after a change to the signed fields, leaving the signature stale."""
    obj["id"] = compute_event_id(
        obj["pubkey"], obj["created_at"], obj["kind"], obj["tags"], obj["content"]
    )
    return obj
