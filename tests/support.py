"""Helpers for tests that talk to a real gateway over real sockets."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from hypertuna.config import Config, LimitsConfig, ServerConfig, StorageConfig
from hypertuna.protocol.nostr import Event, sign_event
from hypertuna.storage.events import RelayRecord
from hypertuna.system import System, open_system

#: Seconds any single wait on the real clock may take before a test fails.
TIMEOUT = 10


class FakeWallClock:
    """A wall clock the test moves by hand (seconds since the epoch)."""

    def __init__(self, now: int = 1_700_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Signer:
    """A Nostr identity with a real secp256k1 key."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def event(
        self,
        *,
        kind: int = 1,
        content: str = "hello",
        tags: Sequence[Sequence[str]] = (),
        created_at: int = 1_700_000_000,
    ) -> Event:
        return sign_event(self.secret, created_at=created_at, kind=kind, tags=tags, content=content)


def event_json(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.raw)
    return data


def gateway_config(data_dir: Path, *, database_url: str = "", **limits: Any) -> Config:
    """A config listening on a free port of 127.0.0.1 with a fast shutdown."""
    return Config(
        server=ServerConfig(host="127.0.0.1", port=0, graceful_timeout_s=2.0),
        storage=StorageConfig(data_dir=data_dir, database_url=database_url),
        limits=attrs.evolve(LimitsConfig(events_per_second=10_000, events_burst=10_000), **limits),
    )


@attrs.define
class Gateway:
    system: System
    relay: RelayRecord
    clock: FakeWallClock

    @property
    def url(self) -> str:
        return self.system.relay_url(self.relay)

    @property
    def http(self) -> str:
        return self.system.base_url


@contextlib.asynccontextmanager
async def open_gateway(
    data_dir: Path, *, database_url: str = "", clock: FakeWallClock | None = None, **limits: Any
) -> AsyncIterator[Gateway]:
    clock = clock or FakeWallClock()
    config = gateway_config(data_dir, database_url=database_url, **limits)
    async with open_system(config, wall_clock=clock) as system:
        relay = await system.lookup_relay("test") or await system.create_relay(
            "test", "conformance relay"
        )
        yield Gateway(system, relay, clock)


class RelayClient:
    """A minimal third-party-style Nostr client over a real WebSocket."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, *message: Any) -> None:
        await self.ws.send_message(json.dumps(list(message), ensure_ascii=False))

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def recv(self) -> list[Any]:
        with trio.fail_after(TIMEOUT):
            message = await self.ws.get_message()
        decoded: list[Any] = json.loads(message)
        return decoded

    async def recv_nothing(self, seconds: float = 0.2) -> None:
        """Assert no frame arrives within ``seconds`` (used only for negative checks)."""
        with trio.move_on_after(seconds):
            message = await self.ws.get_message()
            raise AssertionError(f"unexpected frame {message!r}")

    async def publish(self, event: Event | dict[str, Any]) -> tuple[bool, str]:
        data = event_json(event) if isinstance(event, Event) else event
        await self.send("EVENT", data)
        reply = await self.recv()
        assert reply[0] == "OK", reply
        assert reply[1] == data["id"], reply
        return reply[2], reply[3]

    async def query(self, sub_id: str, *filters: dict[str, Any]) -> list[dict[str, Any]]:
        """REQ, collect stored events until EOSE; the subscription stays open."""
        await self.send("REQ", sub_id, *filters)
        events: list[dict[str, Any]] = []
        while True:
            reply = await self.recv()
            if reply[0] == "EOSE":
                assert reply[1] == sub_id
                return events
            assert reply[0] == "EVENT", reply
            assert reply[1] == sub_id, reply
            events.append(reply[2])

    async def fetch(self, sub_id: str, *filters: dict[str, Any]) -> list[dict[str, Any]]:
        """A one-shot query: REQ, stored events until EOSE, then CLOSE."""
        events = await self.query(sub_id, *filters)
        await self.send("CLOSE", sub_id)
        assert await self.recv() == ["CLOSED", sub_id, ""]
        return events

    async def count(self, sub_id: str, *filters: dict[str, Any]) -> int:
        await self.send("COUNT", sub_id, *filters)
        reply = await self.recv()
        assert reply[:2] == ["COUNT", sub_id], reply
        count: int = reply[2]["count"]
        return count


@contextlib.asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[RelayClient]:
    async with open_websocket_url(url, **kwargs) as ws:
        yield RelayClient(ws)
