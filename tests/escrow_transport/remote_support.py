"""Helpers of the remote-escrow tests: a standalone escrow served in this process
(:func:`~hypertuna.escrow.standalone.serve_escrow`, real mutual TLS and HMAC on a real socket)
that can be stopped and started again on the same port (a new epoch, the same database), a TCP
relay between the gateway and the escrow that a test can cut, and signed deposits."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import nacl.signing
import trio

from hypertuna.escrow.keys import EscrowKey, create_audit_key, create_escrow_key
from hypertuna.escrow.package import seal_deposit
from hypertuna.escrow.settings import EscrowSettings
from hypertuna.escrow.standalone import StandaloneEscrow, serve_escrow
from hypertuna.escrow_client import EscrowTransport
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores.crypto import KeyPair
from hypertuna.worker.backoff import BackoffPolicy
from tests.escrow_transport import CLIENT_ID, SECRET, Pki

FAST_BACKOFF = BackoffPolicy(base_s=0.02, cap_s=0.2)


class EscrowServer:
    """A standalone escrow in this process; :meth:`start` and :meth:`stop` it at will."""

    def __init__(self, directory: Path, pki: Pki, nursery: trio.Nursery) -> None:
        key_dir = directory / "keys"
        self.escrow_key: EscrowKey = create_escrow_key(key_dir / "escrow.key")
        create_audit_key(key_dir / "audit.key")
        self.operator = nacl.signing.SigningKey.generate()
        self.pki = pki
        self.settings = EscrowSettings(
            key_dir=key_dir,
            sqlite_path=directory / "escrow.db",
            host="127.0.0.1",
            port=0,
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_ca=pki.ca_bundle,
            hmac_clients=f"{CLIENT_ID}:{SECRET.hex()}",
            operator_keys=frozenset({self.operator.verify_key.encode().hex()}),
        )
        self._nursery = nursery
        self._scope: trio.CancelScope | None = None
        self.running: StandaloneEscrow | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> StandaloneEscrow:
        """Serve (on the port of the first start, once there was one)."""
        assert self._scope is None, "already running"

        async def serve(task_status: trio.TaskStatus[StandaloneEscrow]) -> None:
            with trio.CancelScope() as scope:
                self._scope = scope
                await serve_escrow(self.settings, task_status=task_status)

        self.running = await self._nursery.start(serve)
        self.settings = attrs.evolve(self.settings, port=self.running.port)
        return self.running

    async def stop(self) -> None:
        assert self._scope is not None, "not running"
        self._scope.cancel()
        self._scope = None
        self.running = None
        # Let the listener close before anyone connects again.
        await trio.sleep(0.05)

    def transport(
        self, name: str = CLIENT_ID, url: str | None = None, **options: Any
    ) -> EscrowTransport:
        return EscrowTransport(
            url or self.url,
            client_id=CLIENT_ID,
            secret=options.pop("secret", SECRET),
            ssl_context_holder=self.pki.client_holder(name, options.pop("ca", None)),
            wall_clock=time.time,
            request_timeout_s=options.pop("request_timeout_s", 2.0),
            connect_timeout_s=options.pop("connect_timeout_s", 2.0),
            retries=options.pop("retries", 1),
            backoff=FAST_BACKOFF,
            **options,
        )


@asynccontextmanager
async def open_escrow_server(directory: Path, pki: Pki) -> AsyncIterator[EscrowServer]:
    async with trio.open_nursery() as nursery:
        server = EscrowServer(directory, pki, nursery)
        await server.start()
        yield server
        nursery.cancel_scope.cancel()


class TcpRelay:
    """Forwards TCP connections from its own port to ``target_port`` until :meth:`cut`, which
    closes every connection and refuses new ones until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._cut = False
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    def cut(self) -> None:
        self._cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self._cut = False

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self._cut:
                return
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
                finally:
                    self._scopes.discard(scope)


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


@attrs.frozen
class SignedDeposit:
    """A worker's deposit request: its exact body and the owner's Ed25519 headers."""

    relay_key: str
    owner: nacl.signing.SigningKey
    body: bytes
    headers: dict[str, str]

    @property
    def owner_key(self) -> str:
        return self.owner.verify_key.encode().hex()


def signed(
    key: nacl.signing.SigningKey, method: str, path: str, data: object
) -> tuple[bytes, dict[str, str]]:
    """``data`` as a JSON body and the Ed25519 headers of ``key`` over the request."""
    body = json.dumps(data).encode()
    headers = sign_ed25519(key, method, path, body, timestamp=int(time.time())).as_dict()
    return body, headers


def signed_deposit(
    escrow_key: EscrowKey,
    owner: nacl.signing.SigningKey | None = None,
    relay_key: str | None = None,
    writer: KeyPair | None = None,
) -> SignedDeposit:
    owner = owner or nacl.signing.SigningKey.generate()
    relay_key = relay_key or secrets.token_hex(32)
    owner_key = owner.verify_key.encode().hex()
    package = seal_deposit(
        escrow_key.public_key,
        relay_key=relay_key,
        writer=writer or KeyPair.from_seed(secrets.token_bytes(32)),
        owner_key=owner_key,
        created_at_ms=time.time_ns() // 1_000_000,
        rotation=1,
    )
    data = {
        "relay_key": relay_key,
        "owner_key": owner_key,
        "package": base64.b64encode(package).decode(),
    }
    body, headers = signed(owner, "POST", "/api/escrow", data)
    return SignedDeposit(relay_key, owner, body, headers)
