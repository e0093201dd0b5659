"""Serving an ASGI app over mutual TLS on our own trio listener.

The standalone escrow (``hypertuna escrow``) serves its quart-trio app this way, like the
gateway edge (:mod:`hypertuna.edge.server`) serves its own: we accept TCP connections, and each
one, once wrapped in a :class:`trio.SSLStream` and past its handshake, is handed to hypercorn's
trio ``TCPServer``, exactly as hypercorn's own worker would (hypercorn sees an SSL stream, so the
ASGI scope says ``https``).

The TLS context is fetched from a :class:`~hypertuna.edge.tls.ReloadingServerContext` for every
new connection, so rotated files apply to new connections without a restart. A client that
fails the handshake (no certificate, a certificate of an unknown CA, a plain-HTTP request, a
stall) is logged at info level with its address and the reason, and its connection closed; it
reaches no application code.

The verified client certificate is given to the app in the ASGI scope, under the ASGI TLS
extension ``scope["extensions"]["tls"]`` (``client_cert_chain`` with the leaf in PEM,
``client_cert_name``, ``tls_version``), and as a :class:`ClientCertificate` under
``scope["extensions"][CLIENT_CERT_EXTENSION]`` (read it with :func:`client_certificate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Final

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from hypertuna.edge.tls import ReloadingServerContext, describe_tls_error

__all__ = [
    "CLIENT_CERT_EXTENSION",
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "ClientCertificate",
    "client_certificate",
    "serve_tls_app",
    "tls_hypercorn_config",
]

log = logging.getLogger(__name__)

#: Seconds a new connection has to complete its TLS handshake.
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
#: Key of the :class:`ClientCertificate` in ``scope["extensions"]``.
CLIENT_CERT_EXTENSION: Final = "hypertuna.client_certificate"

# ASGI's TLS extension numbers TLS versions as on the wire.
_TLS_VERSIONS: Final = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# Short names of RFC 4514 for the attributes getpeercert() spells out.
_RDN_NAMES: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


@attrs.frozen
class ClientCertificate:
    """The client certificate a connection was verified with."""

    #: The subject's common name ("" when it has none).
    common_name: str
    #: The subject as ``CN=...,O=...`` (RFC 4514 order: most specific first).
    subject: str
    #: The serial number, upper-case hex.
    serial_number: str
    #: SHA-256 of the DER certificate, lower-case hex.
    sha256_fingerprint: str


def client_certificate(scope: Mapping[str, Any]) -> ClientCertificate | None:
    """The verified client certificate of the connection an ASGI ``scope`` came on (in quart:
    ``request.scope``); None when the request did not come through :func:`serve_tls_app`."""
    extensions = scope.get("extensions") or {}
    value = extensions.get(CLIENT_CERT_EXTENSION)
    return value if isinstance(value, ClientCertificate) else None


def tls_hypercorn_config() -> HypercornConfig:
    """Per-connection settings for hypercorn; binding, TLS and shutdown are
    :func:`serve_tls_app`'s."""
    hc = HypercornConfig()
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = 30
    hc.h11_max_incomplete_size = 16 * 1024
    hc.backlog = 128
    return hc


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _read_certificate(tls: trio.SSLStream[trio.SocketStream]) -> ClientCertificate | None:
    der = tls.getpeercert(binary_form=True)
    info = tls.getpeercert()
    if not der or not info:
        return None
    # getpeercert() lists the subject's RDNs root first; RFC 4514 writes them the other way.
    pairs = [(name, str(value)) for rdn in info.get("subject", ()) for name, value in rdn]
    rdns = [f"{_RDN_NAMES.get(name, name)}={value}" for name, value in pairs]
    return ClientCertificate(
        common_name=next((value for name, value in pairs if name == "commonName"), ""),
        subject=",".join(reversed(rdns)),
        serial_number=str(info.get("serialNumber", "")),
        sha256_fingerprint=hashlib.sha256(der).hexdigest(),
    )


class _TlsApp:
    """Hypercorn's app wrapper for one connection: adds the connection's TLS facts to every
    scope, so the app needs no connection lookup."""

    def __init__(self, app: Any, tls: dict[str, Any], certificate: ClientCertificate) -> None:
        self._app = app
        self._tls = tls
        self._certificate = certificate

    async def __call__(
        self,
        scope: Any,
        receive: Any,
        send: Any,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = dict(self._tls)
        extensions[CLIENT_CERT_EXTENSION] = self._certificate
        await self._app(scope, receive, send, sync_spawn, call_soon)


class _Acceptor:
    def __init__(
        self,
        app: Any,
        hc: HypercornConfig,
        contexts: ReloadingServerContext,
        handshake_timeout_s: float,
    ) -> None:
        self._app = app
        self._hc = hc
        self._contexts = contexts
        self._handshake_timeout_s = handshake_timeout_s
        self.context = WorkerContext(None)
        self.lifespan_state: dict[str, Any] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. A failure is logged and ends that connection only: the handlers
        share one nursery, and an escaping exception would stop the server."""
        try:
            await self._handle(stream)
        except Exception:
            log.exception("a TLS connection handler failed; closing that connection")
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peer(stream)
        # https_compatible: HTTP clients commonly hang up without a TLS close_notify.
        tls = trio.SSLStream(
            stream, self._contexts.context(), server_side=True, https_compatible=True
        )
        refusal: str | None = None
        try:
            with trio.fail_after(self._handshake_timeout_s):
                await tls.do_handshake()
        except trio.TooSlowError:
            refusal = f"no TLS handshake within {self._handshake_timeout_s:g} s"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            refusal = describe_tls_error(exc)
            await _send_pending_alert(tls)
        certificate = None if refusal is not None else _read_certificate(tls)
        if certificate is None:
            # Cannot happen with CERT_REQUIRED; kept so an unverified peer never gets through.
            refusal = refusal or "no verified client certificate"
            log.info("TLS connection from %s refused: %s", peer, refusal)
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await trio.aclose_forcefully(tls)
            return
        log.debug("TLS connection from %s as %s", peer, certificate.subject)
        version = tls.version()
        facts: dict[str, Any] = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))],
            "client_cert_name": certificate.subject,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(version) if version else None,
            "cipher_suite": None,
        }
        # TCPServer repeats do_handshake (a no-op once done) and reads ALPN and the socket
        # through the SSL stream, so it serves this connection as https.
        server = TCPServer(
            _TlsApp(self._app, facts, certificate),
            self._hc,
            self.context,
            self.lifespan_state,
            tls,
        )
        await server.run()


async def _send_pending_alert(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the TLS alert OpenSSL queued when the handshake failed, then hang up gracefully.

    trio marks the stream broken without flushing it, and the client would only see the
    connection drop; with the alert it learns why ("certificate required", "unknown ca"). The
    half-close and the short drain that follow keep the kernel from answering the client's
    unread bytes with a reset, which could destroy the alert before the client reads it.
    This reads trio's private outgoing buffer, so it does nothing if that ever changes.
    """
    outgoing = getattr(tls, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    transport = tls.transport_stream
    with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError, OSError):
        await transport.send_all(outgoing.read())
        await transport.send_eof()
        while await transport.receive_some(65536):
            pass


async def _run_forever() -> None:
    await trio.sleep_forever()


async def serve_tls_app(
    app: Any,
    host: str,
    port: int,
    context_holder: ReloadingServerContext,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] = _run_forever,
    graceful_timeout_s: float = 5.0,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    hypercorn_config: HypercornConfig | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` over mutual TLS on ``host``:``port`` until ``shutdown_trigger``
    returns (or the caller cancels), then stop accepting and give open connections
    ``graceful_timeout_s`` before the app's lifespan shutdown.

    ``started()`` hands back the bound port (the real one when ``port`` is 0; give a literal
    address as ``host`` then, since a name resolving to several addresses would get one
    listener, and one port, per address). The app's lifespan startup has run by then.
    """
    hc = hypercorn_config if hypercorn_config is not None else tls_hypercorn_config()
    wrapped = wrap_app(app, hc.wsgi_max_body_size, "asgi")
    acceptor = _Acceptor(wrapped, hc, context_holder, handshake_timeout_s)
    lifespan = Lifespan(wrapped, hc, acceptor.lifespan_state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=hc.backlog)
        bound_port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(
                        trio.serve_listeners,
                        acceptor.handle,
                        listeners,
                        handler_nursery=connections,
                    )
                )
                log.info("serving mutual TLS on %s port %d", host, bound_port)
                task_status.started(bound_port)
                await shutdown_trigger()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await acceptor.context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + graceful_timeout_s
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
