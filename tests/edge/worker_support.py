"""A small test worker speaking the control protocol over a real WebSocket.

It serves forwarded sessions by piping them to a real relay (a hosted relay of another gateway,
the *backend*), so clients through the gateway see real NIP-01 behaviour; two test workers on
the same backend behave like two workers holding the same relay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import nacl.signing
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from hypertuna.protocol.worker import (
    Challenge,
    ClientFrames,
    Heartbeat,
    Message,
    RelayAction,
    RelayFrames,
    RelayRegister,
    RelayStatement,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    Welcome,
    decode,
    encode,
    owner_relay_key,
    sign_hello,
    sign_statement,
)
from tests.support import TIMEOUT


def worker_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/gateway/worker"


class Owner:
    """A relay owner's Ed25519 key and its relay key."""

    def __init__(self) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.public = bytes(self.key.verify_key).hex()
        self.relay_key = owner_relay_key(self.public)


class TestWorker:
    """A worker connection after the handshake (see :func:`open_worker`)."""

    __test__ = False

    def __init__(self, ws: WebSocketConnection, key: nacl.signing.SigningKey, welcome: Welcome):
        self.ws = ws
        self.key = key
        self.public = bytes(key.verify_key).hex()
        self.welcome = welcome
        self._ids = itertools.count(1)
        self.replies: trio.MemoryReceiveChannel[Message]
        self._replies_send, self.replies = trio.open_memory_channel[Message](100)
        self.backend_url = ""
        self.refuse = False
        #: Leave session-open unanswered (a worker too slow for the sweep).
        self.ignore_opens = False
        self.heartbeats = True
        self.sessions: dict[int, WebSocketConnection] = {}
        self.opened = 0

    async def send(self, message: Message) -> None:
        await self.ws.send_message(encode(message))

    async def send_raw(self, text: str | bytes) -> None:
        await self.ws.send_message(text)

    async def reply(self) -> Message:
        with trio.fail_after(TIMEOUT):
            return await self.replies.receive()

    async def register(
        self,
        owner: Owner,
        *,
        gateway_id: str,
        seq: int,
        action: RelayAction = RelayAction.REGISTER,
        name: str = "chat",
        worker_key: str | None = None,
        signer: nacl.signing.SigningKey | None = None,
        relay_key: str | None = None,
    ) -> Message:
        statement = RelayStatement(
            action=action,
            relay_key=relay_key or owner.relay_key,
            owner_key=owner.public,
            gateway_id=gateway_id,
            worker_key=worker_key or self.public,
            seq=seq,
            name=name,
            description="test relay",
        )
        message = RelayRegister(
            id=next(self._ids),
            statement=statement,
            sig=sign_statement(signer or owner.key, statement),
        )
        await self.send(message)
        return await self.reply()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the connection: replies go to ``replies``, sessions are piped to the backend."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            task_status.started()
            try:
                while True:
                    message = decode(await self.ws.get_message())
                    match message:
                        case SessionOpen():
                            if self.ignore_opens:
                                continue
                            sid = message.session
                            if self.refuse or not self.backend_url:
                                await self.send(SessionRefused(sid, "not serving"))
                            else:
                                self.opened += 1
                                await nursery.start(self._pipe, sid)
                        case ClientFrames(session=sid, frames=frames):
                            backend = self.sessions.get(sid)
                            if backend is not None:
                                for frame in frames:
                                    await backend.send_message(frame)
                        case SessionClose(session=sid):
                            backend = self.sessions.pop(sid, None)
                            if backend is not None:
                                await backend.aclose()
                        case Heartbeat():
                            pass
                        case _:
                            await self._replies_send.send(message)
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.welcome.heartbeat_interval_ms / 1000)
            if self.heartbeats:
                await self.send(Heartbeat(0))

    async def _pipe(self, sid: int, *, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_url(self.backend_url) as backend:
            self.sessions[sid] = backend
            await self.send(SessionReady(sid))
            task_status.started()
            try:
                while True:
                    frame = await backend.get_message()
                    assert isinstance(frame, str)
                    await self.send(RelayFrames(sid, (frame,)))
            except ConnectionClosed:
                pass


async def handshake(
    ws: WebSocketConnection, key: nacl.signing.SigningKey, *, agent: str = "test-worker"
) -> tuple[Challenge, Message]:
    with trio.fail_after(TIMEOUT):
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge), challenge
        await ws.send_message(encode(sign_hello(key, challenge, agent)))
        return challenge, decode(await ws.get_message())


@contextlib.asynccontextmanager
async def open_worker(
    http_url: str, backend_url: str = "", key: nacl.signing.SigningKey | None = None
) -> AsyncIterator[TestWorker]:
    """A connected, welcomed test worker serving sessions through ``backend_url``."""
    key = key or nacl.signing.SigningKey.generate()
    async with open_websocket_url(worker_url(http_url)) as ws:
        _, welcome = await handshake(ws, key)
        assert isinstance(welcome, Welcome), welcome
        worker = TestWorker(ws, key, welcome)
        worker.backend_url = backend_url
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            yield worker
            nursery.cancel_scope.cancel()


def frame(text: str | bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    return data
