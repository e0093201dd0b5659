"""Serving the edge: our listeners, hypercorn's trio connection handler for HTTP.

Every accepted connection is read up to the end of its first request head. A WebSocket upgrade
to ``/relay/<relay>`` is served by the lean relay socket (:mod:`hypertuna.edge.websocket`): by a
:class:`RelaySession` for a relay the gateway hosts, else by a :class:`ForwardedSession` to the
workers that registered it; ``/gateway/worker`` is the workers' control connection
(:mod:`hypertuna.edge.worker_link`) on the same kind of socket;
everything else (HTTP routes of the quart-trio app, and any other upgrade) is handed, with the
bytes already read, to hypercorn's ``TCPServer``, exactly as hypercorn's own worker would.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from hypertuna.config import Config
from hypertuna.edge.asgi import RELAY_PREFIX
from hypertuna.edge.forward import ForwardedSession
from hypertuna.edge.session import RelaySession
from hypertuna.edge.websocket import RelayWebSocket, WebSocketHandshake, accept_websocket
from hypertuna.edge.worker_link import serve_worker
from hypertuna.system import System

__all__ = ["WORKER_PATH", "ReplayStream", "hypercorn_config", "is_relay_upgrade", "serve_edge"]

log = logging.getLogger(__name__)

#: Where workers connect (the control protocol, :mod:`hypertuna.protocol.worker`).
WORKER_PATH = "/gateway/worker"
#: Longest request head read before deciding where a connection goes.
MAX_HEAD_BYTES = 16 * 1024
#: Seconds a new connection has to send its request head.
HEAD_TIMEOUT_S = 10.0
#: TCP keepalive of relay sockets: a client that vanished without closing (a phone that lost
#: its network) is detected after about idle + interval * count seconds and its session ends.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 120, 30, 4


def hypercorn_config(config: Config) -> HypercornConfig:
    """Settings for hypercorn's connection handler. Binding and the shutdown deadline are ours
    (:func:`serve_edge`), so only per-connection settings are set here.

    ``websocket_max_message_size`` applies to WebSockets that hypercorn serves (upgrades after a
    keep-alive request): a larger message closes the connection with 1009, as on the fast path.
    """
    hc = HypercornConfig()
    hc.websocket_max_message_size = config.limits.max_frame_bytes
    hc.h11_max_incomplete_size = MAX_HEAD_BYTES
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = 30
    hc.backlog = 1024
    return hc


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream that first gives back bytes already read from it."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def is_relay_upgrade(head: bytes) -> bool:
    """Whether a request head asks for a WebSocket on a relay path or the worker path
    (validated later)."""
    request_line, _, rest = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    target = parts[1].split(b"?", 1)[0]
    if not target.startswith(RELAY_PREFIX.encode()) and target != WORKER_PATH.encode():
        return False
    for line in rest.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"upgrade":
            return b"websocket" in value.lower()
    return False


class _Dispatcher:
    def __init__(self, system: System, app: Any, hc: HypercornConfig) -> None:
        self._system = system
        self._app = app
        self._hc = hc
        self.context = WorkerContext(None)
        self.lifespan_state: dict[str, Any] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. A failure in it is logged and ends that connection only: the
        handlers share one nursery, so an escaping exception would stop the whole gateway."""
        try:
            await self._handle(stream)
        except Exception:
            log.exception("a connection handler failed; closing that connection")
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            head = await self._read_head(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()
            return
        if head is None:
            await stream.aclose()
        elif is_relay_upgrade(head):
            await self._serve_relay(stream, head)
        else:
            # TCPServer is typed for SSL streams but takes any stream with ``.socket`` (it
            # tells plain streams apart by their missing do_handshake).
            server = TCPServer(
                self._app,
                self._hc,
                self.context,
                self.lifespan_state,
                ReplayStream(stream, head),  # type: ignore[arg-type]
            )
            await server.run()

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        """Bytes up to (at least) the end of the first request head; what was read so far if
        the head is oversized (hypercorn answers that); None when the client sent nothing."""
        buffer = b""
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while b"\r\n\r\n" not in buffer and len(buffer) < MAX_HEAD_BYTES:
                data = await stream.receive_some(MAX_HEAD_BYTES)
                if not data:
                    break
                buffer += data
        return buffer or None

    async def _serve_relay(self, stream: trio.SocketStream, head: bytes) -> None:
        system = self._system
        try:
            handshake = accept_websocket(head)
            if isinstance(handshake, bytes):
                await stream.send_all(handshake)
                return
            if system.stopping.is_set():
                await stream.send_all(handshake.reject(503, "gateway is shutting down"))
                return
            if handshake.path == WORKER_PATH:
                await self._serve_worker(stream, handshake)
                return
            ident = handshake.path[len(RELAY_PREFIX) :]
            valid = bool(ident) and "/" not in ident
            relay = await system.lookup_relay(ident) if valid else None
            # Relays the gateway hosts itself come first; the others may be served by workers.
            route = await system.route_relay(ident) if valid and relay is None else None
            if relay is None and route is None:
                await stream.send_all(handshake.reject(404, f"no relay {ident!r} is hosted here"))
                return
            response, trailing = handshake.accept()
            _enable_keepalive(stream)
            await stream.send_all(response)
            relay_socket = RelayWebSocket(
                stream, trailing, max_message_bytes=system.config.limits.max_frame_bytes
            )
            if relay is not None:
                started = trio.current_time()
                try:
                    await RelaySession(system, relay, relay_socket).run()
                finally:
                    system.metrics.served["local"].inc(trio.current_time() - started)
            else:
                assert route is not None
                await ForwardedSession(system, route, relay_socket).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await _close_gracefully(stream)

    async def _serve_worker(self, stream: trio.SocketStream, handshake: WebSocketHandshake) -> None:
        response, trailing = handshake.accept()
        _enable_keepalive(stream)
        await stream.send_all(response)
        worker_socket = RelayWebSocket(
            stream, trailing, max_message_bytes=self._system.config.workers.max_message_bytes
        )
        await serve_worker(self._system, worker_socket)


def _enable_keepalive(stream: trio.SocketStream) -> None:
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system defaults apply
        options += [
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
        ]
    for level, option, value in options:
        with contextlib.suppress(OSError):
            stream.setsockopt(level, option, value)


async def _close_gracefully(stream: trio.SocketStream) -> None:
    """Half-close, let the client read what was sent (a close frame) and hang up, then close.

    Closing at once with unread input would make the kernel send RST, and a client may then
    drop our final frames unread.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await stream.aclose()


def _url(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_edge(
    system: System,
    app: Any,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns, then stop accepting and give open connections
    ``server.graceful_timeout_s``; ``started()`` hands back the bound ``http://host:port`` URLs
    (the real port when configured with port 0)."""
    config = system.config
    hc = hypercorn_config(config)
    wrapped = wrap_app(app, hc.wsgi_max_body_size, "asgi")
    dispatcher = _Dispatcher(system, wrapped, hc)
    lifespan = Lifespan(wrapped, hc, dispatcher.lifespan_state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        listeners = await trio.open_tcp_listeners(
            config.server.port, host=config.server.host, backlog=hc.backlog
        )
        urls = [_url(listener.socket.getsockname()) for listener in listeners]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptor:
                acceptor.start_soon(
                    partial(
                        trio.serve_listeners,
                        dispatcher.handle,
                        listeners,
                        handler_nursery=connections,
                    )
                )
                for url in urls:
                    log.info("listening on %s", url)
                task_status.started(urls)
                await shutdown_trigger()
                acceptor.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await dispatcher.context.terminated.set()
            connections.cancel_scope.deadline = (
                trio.current_time() + config.server.graceful_timeout_s
            )
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
