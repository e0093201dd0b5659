"""Helpers for the standalone escrow's transport tests: trustme certificates written to files, a
tiny quart-trio app served by :func:`serve_tls_app` on port 0, and raw TLS probes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio
import trustme
from quart import Response, g, request
from quart_trio import QuartTrio

from hypertuna.edge.hmac_auth import Authorized, HmacAuthenticator, Refused
from hypertuna.edge.tls import ReloadingClientContext, ReloadingServerContext
from hypertuna.edge.tls_server import client_certificate, serve_tls_app
from hypertuna.protocol.signed_request import HMAC_HEADER_PREFIX, header_names

HMAC_NONCE = header_names(HMAC_HEADER_PREFIX)[2]
#: Seconds any single wait on the real clock may take before a test fails.
TIMEOUT = 10
#: The wall-clock second the tests' requests are signed and checked at.
NOW = 1_700_000_000
CLIENT_ID = "gateway-1"
SECRET = bytes(range(32))


class FakeWallClock:
    """A wall clock the test moves by hand (seconds since the epoch)."""

    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by renaming a new file over it, as rotation tools do."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def cert_der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


class Pki:
    """Two CAs, a server certificate and client certificates, as files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.server_cert = self.directory / "server.pem"
        self.server_key = self.directory / "server.key"
        self.ca_bundle = self.directory / "clients-ca.pem"
        self.server_ca = self.directory / "server-ca.pem"
        self.server = self.issue_server()
        self.install_server(self.server)
        write_atomically(self.ca_bundle, self.ca.cert_pem.bytes())
        write_atomically(self.server_ca, self.ca.cert_pem.bytes())

    def issue_server(self) -> trustme.LeafCert:
        return self.ca.issue_cert("127.0.0.1", "localhost", common_name="escrow")

    def install_server(self, cert: trustme.LeafCert) -> None:
        write_atomically(self.server_cert, b"".join(p.bytes() for p in cert.cert_chain_pems))
        write_atomically(self.server_key, cert.private_key_pem.bytes())

    def client_files(self, name: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        """Certificate and key files of a client certificate ``CN=name`` issued by ``ca``."""
        cert = (ca or self.ca).issue_cert(f"{name}.clients.test", common_name=name)
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        write_atomically(cert_path, cert.cert_chain_pems[0].bytes())
        write_atomically(key_path, cert.private_key_pem.bytes())
        return cert_path, key_path

    def server_context(self) -> ReloadingServerContext:
        return ReloadingServerContext(
            self.server_cert, self.server_key, self.ca_bundle, check_interval_s=0
        )

    def client_context(self, name: str | None, ca: trustme.CA | None = None) -> ssl.SSLContext:
        """A client context trusting the server's CA and presenting ``CN=name`` (none when
        ``name`` is None)."""
        return self.client_holder(name, ca).context()

    def client_holder(
        self, name: str | None, ca: trustme.CA | None = None
    ) -> ReloadingClientContext:
        if name is None:
            return ReloadingClientContext(self.server_ca, check_interval_s=0)
        cert_path, key_path = self.client_files(name, ca)
        return ReloadingClientContext(self.server_ca, cert_path, key_path, check_interval_s=0)


@attrs.define
class AppState:
    """What the test app saw."""

    counter: int = 0
    flaky_attempts: int = 0
    flaky_failures: int = 503
    flaky_failures_left: int = 0
    nonces: list[str] = attrs.Factory(list)


def make_app(state: AppState, auth: HmacAuthenticator | None = None) -> QuartTrio:
    """Routes: ``GET|POST /echo`` (what the request looked like), ``POST /counter``
    (increments), ``GET /count``, ``POST /flaky`` (``state.flaky_failures`` while
    ``flaky_failures_left``, then 200), ``GET /slow`` (sleeps), ``POST /bad`` (400). With
    ``auth``, ``/counter``, ``/flaky`` and ``/echo`` need a signature; ``/checked`` checks it
    with :meth:`HmacAuthenticator.check` instead of the decorator."""
    app = QuartTrio("escrow-transport-test")

    def signed(view: Any) -> Any:
        return auth.required(view) if auth is not None else view

    @app.route("/echo", methods=["GET", "POST"])
    @signed
    async def echo() -> dict[str, Any]:
        certificate = client_certificate(request.scope)
        return {
            "method": request.method,
            "scheme": request.scheme,
            "body": (await request.get_data(as_text=True)),
            "client_cn": certificate.common_name if certificate else None,
            "client_id": g.get("hmac_client_id"),
        }

    @app.post("/counter")
    @signed
    async def counter() -> dict[str, int]:
        state.counter += 1
        return {"counter": state.counter}

    @app.get("/count")
    async def count() -> dict[str, int]:
        return {"counter": state.counter}

    @app.post("/flaky")
    @signed
    async def flaky() -> tuple[dict[str, Any], int]:
        state.flaky_attempts += 1
        state.nonces.append(request.headers.get(HMAC_NONCE, ""))
        if state.flaky_failures_left > 0:
            state.flaky_failures_left -= 1
            return {"error": "busy"}, state.flaky_failures
        state.counter += 1
        return {"counter": state.counter}, 200

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await trio.sleep(30)
        return {"slept": "yes"}

    @app.post("/bad")
    async def bad() -> tuple[dict[str, str], int]:
        state.flaky_attempts += 1
        return {"error": "bad-request"}, 400

    @app.post("/checked")
    async def checked() -> Response | dict[str, Any]:
        assert auth is not None
        outcome = await auth.check()
        match outcome:
            case Refused():
                return outcome.response()
            case Authorized(client_id=client_id):
                state.counter += 1
                return {"counter": state.counter, "client_id": client_id}

    return app


@contextlib.asynccontextmanager
async def open_tls_server(
    app: QuartTrio, holder: ReloadingServerContext, **options: Any
) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 with ``holder``'s TLS files; yields the port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_tls_app(
                app, "127.0.0.1", 0, holder, task_status=task_status, **options
            )
        )
        yield port
        nursery.cancel_scope.cancel()


async def tls_get(port: int, context: ssl.SSLContext, path: str = "/count") -> tuple[bytes, bytes]:
    """One raw HTTP/1.1 GET over a new TLS connection: the server certificate (DER) and the
    whole response. TLS refusals surface as :class:`trio.BrokenResourceError` (TLS 1.3 reports
    a refused client certificate at the first read, after the client's handshake completed)."""
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        assert der is not None
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    return der, response
