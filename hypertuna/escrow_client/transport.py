"""Signed HTTPS requests to a standalone escrow, with timeouts and retries.

:class:`EscrowTransport` sends JSON requests to the escrow at ``base_url`` (``ESCROW_URL``), over
mutual TLS with the files of a :class:`~hypertuna.edge.tls.ReloadingClientContext`
(``ESCROW_TLS_CA``, ``ESCROW_TLS_CLIENT_CERT``, ``ESCROW_TLS_CLIENT_KEY``; plain HTTP when none is
given, for tests and the in-process escrow). Every attempt is signed afresh with HMAC-SHA256 over
method, path with query string, body digest, timestamp and a new nonce
(:func:`hypertuna.protocol.signed_request.sign_hmac`) in the ``X-Escrow-*`` headers, so a retry is
never taken for a replay. Extra headers (e.g. a worker's ``X-Hypertuna-*`` Ed25519 signature of
a deposit) travel alongside.

Retries, with full-jitter exponential backoff (:class:`hypertuna.worker.backoff.BackoffPolicy`),
happen only when the escrow could not be reached or did not answer in time, and on 502, 503 and
504. Every other answer, 4xx included, is returned to the caller as an :class:`EscrowResponse`.
A TLS refusal (our certificate refused by the escrow, or the escrow's certificate not trusted
by us) is not retried: it raises :class:`EscrowRefusedTlsError` with OpenSSL's reason. Running
out of attempts raises :class:`EscrowUnavailableError`.

A retried request may already have been carried out by the escrow (the answer was lost), so the
escrow's operations are expected to be idempotent; pass ``retry=False`` for one that is not.

Logs name the method, the path (without query string), the status and the attempt; never a
body (deposits carry sealed secrets) nor a header.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final

import attrs
import httpx
import trio

from hypertuna.edge.tls import ReloadingClientContext, describe_tls_error
from hypertuna.protocol.signed_request import HMAC_HEADER_PREFIX, sign_hmac
from hypertuna.worker.backoff import BackoffPolicy

__all__ = [
    "DEFAULT_BACKOFF",
    "PASSED_HEADERS",
    "RETRIED_STATUSES",
    "EscrowRefusedTlsError",
    "EscrowResponse",
    "EscrowTransport",
    "EscrowTransportError",
    "EscrowUnavailableError",
    "TransportStatistics",
    "open_escrow_transport",
]

log = logging.getLogger(__name__)

#: Answers that mean "the escrow, or a proxy before it, cannot serve right now".
RETRIED_STATUSES: Final = frozenset({502, 503, 504})
#: Delays between attempts: 0.2 s doubling up to 5 s, fully jittered.
DEFAULT_BACKOFF: Final = BackoffPolicy(base_s=0.2, cap_s=5.0)
#: Answer headers kept in :attr:`EscrowResponse.headers` (lower case).
PASSED_HEADERS: Final = frozenset({"idempotent-replayed", "retry-after"})


class EscrowTransportError(Exception):
    """A request to the escrow got no usable answer."""


class EscrowUnavailableError(EscrowTransportError):
    """Every attempt failed; :attr:`attempts` were made, the last one failed because of
    :attr:`last_failure` (a status such as ``503`` or a network error in words)."""

    def __init__(self, message: str, *, attempts: int, last_failure: str) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_failure = last_failure


class EscrowRefusedTlsError(EscrowTransportError):
    """The TLS handshake was refused by either side; :attr:`reason` is OpenSSL's (e.g.
    "tlsv13 alert certificate required", "certificate verify failed: ...")."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class EscrowResponse:
    """The escrow's answer: its status, its JSON body (None when the body is empty or not JSON)
    and the headers a proxy passes on (:data:`PASSED_HEADERS`; not compared)."""

    status: int
    json: Any
    headers: Mapping[str, str] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class TransportStatistics:
    """Counters since the transport was created."""

    requests: int
    attempts: int
    retries: int
    failures: int


class _Failure(Exception):
    """One attempt failed in a way worth retrying; the message says how."""


class _Pool:
    """An httpx client bound to one TLS context; retired when the context is replaced and
    closed once its last request is done."""

    def __init__(self, client: httpx.AsyncClient, context: ssl.SSLContext | None) -> None:
        self.client = client
        self.context = context
        self.in_flight = 0
        self.retired = False


def _tls_refusal(exc: BaseException) -> str | None:
    """OpenSSL's reason when ``exc`` comes from a TLS refusal (an alert or a failed
    verification), None for a connection that merely dropped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and not isinstance(
            current, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
        ):
            return describe_tls_error(current)
        current = current.__cause__ or current.__context__
    return None


def _parse_json(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


class EscrowTransport:
    """Signed requests to one escrow (see the module docstring).

    ``base_url`` is ``https://host:port`` (``http://`` only without ``ssl_context_holder``);
    ``connect_timeout_s`` bounds connecting (TLS handshake included) and ``request_timeout_s``
    each read and write, while one attempt never takes longer than their sum. ``retries`` is the
    number of attempts after the first. ``wall_clock`` gives seconds since the epoch for the
    signature timestamps. Use it as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        secret: bytes,
        ssl_context_holder: ReloadingClientContext | None,
        wall_clock: Callable[[], float],
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 10.0,
        retries: int = 3,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{base_url!r} is not an http(s)://host:port URL")
        if url.scheme == "https" and ssl_context_holder is None:
            raise ValueError("an https escrow URL needs the TLS files (ssl_context_holder)")
        if url.scheme == "http" and ssl_context_holder is not None:
            raise ValueError("TLS files are given but the escrow URL is plain http")
        if connect_timeout_s <= 0 or request_timeout_s <= 0 or retries < 0:
            raise ValueError("timeouts must be positive and retries not negative")
        self._base_url = base_url.rstrip("/")
        self._client_id = client_id
        self._secret = secret
        self._holder = ssl_context_holder
        self._wall_clock = wall_clock
        self._timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._attempt_deadline_s = connect_timeout_s + request_timeout_s
        self._retries = retries
        self._backoff = backoff
        self._rng = rng if rng is not None else random.Random()
        self._pool: _Pool | None = None
        self._closed = False
        self._requests = self._attempts = self._retried = self._failures = 0

    async def __aenter__(self) -> EscrowTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; later requests raise :class:`EscrowTransportError`."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.retired = True
            if pool.in_flight == 0:
                with trio.CancelScope(shield=True):
                    await pool.client.aclose()

    @property
    def attempt_timeout_s(self) -> float:
        """The longest one attempt takes: connecting plus the answer timeout."""
        return self._attempt_deadline_s

    @property
    def request_timeout_s(self) -> float:
        """How long an answer may take (each read and write)."""
        return self._request_timeout_s

    def statistics(self) -> TransportStatistics:
        """Request, attempt, retry and failure counts."""
        return TransportStatistics(
            requests=self._requests,
            attempts=self._attempts,
            retries=self._retried,
            failures=self._failures,
        )

    async def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        *,
        retry: bool = True,
        raw_body: bytes | None = None,
        timeout_s: float | None = None,
    ) -> EscrowResponse:
        """Send ``method path`` (``path`` starts with ``/`` and may carry a query string) with
        ``json_body`` (no body when None) and extra ``headers``, signed; retry as the module
        docstring says. Returns the escrow's answer, whatever its status once it is not
        retried; raises :class:`EscrowUnavailableError` or :class:`EscrowRefusedTlsError`.

        ``raw_body`` sends those exact bytes as a JSON body instead of ``json_body`` (a proxy
        passing on a body that someone else signed). ``timeout_s`` replaces the answer timeout
        of this request (a long poll waits longer than a plain request): one attempt then takes
        at most the connect timeout plus ``timeout_s``."""
        if self._closed:
            raise EscrowTransportError("the escrow transport is closed")
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        if raw_body is not None and json_body is not None:
            raise ValueError("give json_body or raw_body, not both")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        method = method.upper()
        url = httpx.URL(self._base_url + path)
        target = url.raw_path.decode("ascii")
        log_path = target.split("?", 1)[0]
        if raw_body is not None:
            body = raw_body
        else:
            body = (
                b"" if json_body is None else json.dumps(json_body, separators=(",", ":")).encode()
            )
        self._requests += 1
        attempts = 1 + (self._retries if retry else 0)
        last_failure = ""
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self._retried += 1
                await trio.sleep(self._backoff.delay(attempt - 2, self._rng))
            self._attempts += 1
            try:
                response = await self._attempt(method, url, target, body, headers, timeout_s)
            except _Failure as exc:
                last_failure = str(exc)
                log.info(
                    "escrow %s %s: attempt %d/%d failed: %s",
                    method,
                    log_path,
                    attempt,
                    attempts,
                    last_failure,
                )
                continue
            except EscrowRefusedTlsError:
                self._failures += 1
                log.warning("escrow %s %s: TLS refused on attempt %d", method, log_path, attempt)
                raise
            if response.status_code in RETRIED_STATUSES:
                last_failure = f"status {response.status_code}"
                log.info(
                    "escrow %s %s: attempt %d/%d answered %d",
                    method,
                    log_path,
                    attempt,
                    attempts,
                    response.status_code,
                )
                continue
            log.debug(
                "escrow %s %s: %d (attempt %d)", method, log_path, response.status_code, attempt
            )
            return EscrowResponse(
                status=response.status_code,
                json=_parse_json(response.content),
                headers={
                    name: value
                    for name, value in response.headers.items()
                    if name.lower() in PASSED_HEADERS
                },
            )
        self._failures += 1
        log.warning(
            "escrow %s %s: giving up after %d attempts: %s",
            method,
            log_path,
            attempts,
            last_failure,
        )
        raise EscrowUnavailableError(
            f"escrow {method} {log_path} failed after {attempts} attempt(s): {last_failure}",
            attempts=attempts,
            last_failure=last_failure,
        )

    async def _attempt(
        self,
        method: str,
        url: httpx.URL,
        target: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> httpx.Response:
        signed = sign_hmac(
            self._client_id,
            self._secret,
            method,
            target,
            body,
            timestamp=int(self._wall_clock()),
        )
        signature = signed.as_dict(HMAC_HEADER_PREFIX)
        # Extra headers cannot replace the signature's nor the body's type (names compared the
        # way HTTP does, without case).
        reserved = {name.lower() for name in signature} | {"content-type"}
        sent = {
            name: value for name, value in (headers or {}).items() if name.lower() not in reserved
        }
        if body:
            sent["Content-Type"] = "application/json"
        sent.update(signature)
        if timeout_s is None:
            timeout, deadline = self._timeout, self._attempt_deadline_s
        else:
            timeout = httpx.Timeout(timeout_s, connect=self._timeout.connect)
            deadline = self._connect_timeout_s + timeout_s
        pool = await self._acquire()
        try:
            with trio.move_on_after(deadline):
                return await pool.client.request(
                    method, url, content=body, headers=sent, timeout=timeout
                )
            raise _Failure(f"no answer within {deadline:g} s")
        except httpx.TimeoutException as exc:
            raise _Failure(f"timed out ({type(exc).__name__})") from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            reason = _tls_refusal(exc)
            if reason is not None:
                raise EscrowRefusedTlsError(
                    f"escrow {method} {url.path}: TLS refused: {reason}", reason=reason
                ) from exc
            raise _Failure(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from exc
        except httpx.HTTPError as exc:
            raise EscrowTransportError(f"escrow {method} {url.path}: {exc}") from exc
        finally:
            await self._release(pool)

    async def _acquire(self) -> _Pool:
        context = None if self._holder is None else self._holder.context()
        pool = self._pool
        if pool is None or pool.context is not context:
            if pool is not None:
                # Requests still on the old connections finish there; new ones use the new
                # files (a CA dropped from our bundle must not keep being trusted).
                pool.retired = True
                if pool.in_flight == 0:
                    with trio.CancelScope(shield=True):
                        await pool.client.aclose()
            client = httpx.AsyncClient(
                verify=context if context is not None else True,
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=False,
            )
            pool = self._pool = _Pool(client, context)
        pool.in_flight += 1
        return pool

    async def _release(self, pool: _Pool) -> None:
        pool.in_flight -= 1
        if pool.retired and pool.in_flight == 0:
            with trio.CancelScope(shield=True):
                await pool.client.aclose()


@asynccontextmanager
async def open_escrow_transport(
    base_url: str,
    *,
    client_id: str,
    secret: bytes,
    ssl_context_holder: ReloadingClientContext | None,
    wall_clock: Callable[[], float],
    connect_timeout_s: float = 5.0,
    request_timeout_s: float = 10.0,
    retries: int = 3,
    backoff: BackoffPolicy = DEFAULT_BACKOFF,
    rng: random.Random | None = None,
) -> AsyncIterator[EscrowTransport]:
    """An :class:`EscrowTransport` closed on exit."""
    transport = EscrowTransport(
        base_url,
        client_id=client_id,
        secret=secret,
        ssl_context_holder=ssl_context_holder,
        wall_clock=wall_clock,
        connect_timeout_s=connect_timeout_s,
        request_timeout_s=request_timeout_s,
        retries=retries,
        backoff=backoff,
        rng=rng,
    )
    async with transport:
        yield transport
