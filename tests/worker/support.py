"""A scripted test gateway for the worker: a real trio-websocket server on port 0 that speaks
the control protocol with real signatures, driven step by step by the test."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from hypertuna.protocol.worker import (
    Ack,
    Challenge,
    Heartbeat,
    Hello,
    Message,
    MirrorRequest,
    MirrorUpdate,
    RelayRegister,
    Welcome,
    decode,
    encode,
    verify_hello,
    verify_statement,
)
from hypertuna.storage.events import RelayRecord
from hypertuna.system import System, open_system
from hypertuna.worker.backoff import BackoffPolicy
from hypertuna.worker.control import Shutdown, WorkerControl
from hypertuna.worker.identity import StatementSeq, load_or_create_identity
from hypertuna.worker.runner import worker_config
from hypertuna.worker.settings import WorkerSettings
from tests.support import TIMEOUT

M = TypeVar("M", bound=Message)


class GatewayConn:
    """One worker connection as the test gateway sees it."""

    def __init__(self, ws: WebSocketConnection, gateway_id: str) -> None:
        self.ws = ws
        self.gateway_id = gateway_id
        self.done = trio.Event()
        self.challenge: Challenge | None = None
        self.mirror_messages: list[Message] = []

    async def send(self, message: Message) -> None:
        await self.ws.send_message(encode(message))

    async def send_raw(self, text: str) -> None:
        await self.ws.send_message(text)

    async def recv(
        self, *, heartbeats: bool = False, mirrors: bool = False, patience: float = TIMEOUT
    ) -> Message:
        """The next message (heartbeats and blind-peer mirror messages skipped unless asked
        for; skipped mirror messages are kept in ``mirror_messages``)."""
        with trio.fail_after(patience):
            while True:
                message = decode(await self.ws.get_message())
                if isinstance(message, MirrorRequest | MirrorUpdate) and not mirrors:
                    self.mirror_messages.append(message)
                    continue
                if heartbeats or not isinstance(message, Heartbeat):
                    return message

    async def expect(self, kind: type[M], **kwargs: Any) -> M:
        message = await self.recv(**kwargs)
        assert isinstance(message, kind), message
        return message

    async def recv_nothing(self, seconds: float) -> None:
        """Assert nothing but heartbeats arrives within ``seconds``."""
        with trio.move_on_after(seconds):
            message = await self.recv(patience=seconds + 1)
            raise AssertionError(f"unexpected message {message!r}")

    async def handshake(
        self,
        *,
        heartbeat_interval_ms: int = 1000,
        liveness_timeout_ms: int = 10_000,
        max_message_bytes: int = 1024 * 1024,
    ) -> Hello:
        self.challenge = Challenge(gateway_id=self.gateway_id, nonce=secrets.token_hex(32))
        await self.send(self.challenge)
        hello = await self.expect(Hello)
        assert verify_hello(hello, self.challenge)
        await self.send(
            Welcome(
                worker_id=hello.worker_key,
                heartbeat_interval_ms=heartbeat_interval_ms,
                liveness_timeout_ms=liveness_timeout_ms,
                max_message_bytes=max_message_bytes,
            )
        )
        return hello

    async def registration(self, *, ack: bool = True) -> RelayRegister:
        """The next registration, checked to be validly signed and bound to this gateway."""
        register = await self.expect(RelayRegister)
        assert verify_statement(register.statement, register.sig)
        assert register.statement.gateway_id == self.gateway_id
        if ack:
            await self.send(Ack(id=register.id))
        return register

    async def close_code(self) -> int | None:
        """Read until the worker closes; its close code."""
        with trio.fail_after(TIMEOUT):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code


@attrs.define(eq=False)
class ScriptedGateway:
    gateway_id: str = attrs.field(factory=lambda: secrets.token_hex(32))
    port: int = 0
    _send: trio.MemorySendChannel[GatewayConn] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[GatewayConn] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[GatewayConn](16)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def accept(self, patience: float = TIMEOUT) -> GatewayConn:
        """The next worker connection."""
        with trio.fail_after(patience):
            return await self._receive.receive()

    async def handle(self, request: WebSocketRequest) -> None:
        assert request.path == "/gateway/worker", request.path
        ws = await request.accept()
        conn = GatewayConn(ws, self.gateway_id)
        await self._send.send(conn)
        # trio-websocket closes the socket when the handler returns: keep it until the test
        # is done with it.
        await conn.done.wait()


@contextlib.asynccontextmanager
async def open_test_gateway() -> AsyncIterator[ScriptedGateway]:
    gateway = ScriptedGateway()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(serve_websocket, gateway.handle, "127.0.0.1", 0, ssl_context=None)
        )
        gateway.port = server.port
        yield gateway
        nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (polling the worker's statistics) until ``condition`` holds."""
    with trio.fail_after(TIMEOUT):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


def fast_settings(url: str, **changes: Any) -> WorkerSettings:
    """Settings with short delays, so reconnects happen within a test's patience."""
    settings = WorkerSettings(
        gateway_url=url,
        backoff=BackoffPolicy(base_s=0.05, cap_s=0.2, healthy_after_s=5),
        graceful_timeout_s=2,
        rescan_interval_s=60,
    )
    return attrs.evolve(settings, **changes)


@attrs.define(eq=False)
class RunningWorker:
    system: System
    control: WorkerControl
    relay: RelayRecord
    data_dir: Path

    async def shutdown(self) -> None:
        with trio.fail_after(TIMEOUT):
            await self.control.inbox.request(Shutdown)


@contextlib.asynccontextmanager
async def open_worker(
    data_dir: Path, settings: WorkerSettings, *, relay: str = "alpha"
) -> AsyncIterator[RunningWorker]:
    """The worker's stack on ``data_dir`` with a hosted relay, and its control client."""
    config = attrs.evolve(
        worker_config(data_dir),
        server=attrs.evolve(worker_config(data_dir).server, graceful_timeout_s=2.0),
    )
    identity = load_or_create_identity(data_dir)
    async with open_system(config) as system:
        record = await system.lookup_relay(relay) or await system.create_relay(relay)
        control = WorkerControl(system, identity, settings, StatementSeq(data_dir))
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            yield RunningWorker(system, control, record, data_dir)
            nursery.cancel_scope.cancel()
