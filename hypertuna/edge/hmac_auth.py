"""HMAC-signed requests on a quart-trio app: the standalone escrow's check of its callers.

Every request to a standalone escrow is signed by the gateway's escrow client
(:mod:`hypertuna.escrow_client.transport`) with HMAC-SHA256 over method, path with query string,
body digest, timestamp and nonce (:mod:`hypertuna.protocol.signed_request`), in the headers
``X-Escrow-Key``, ``X-Escrow-Timestamp``, ``X-Escrow-Nonce`` and ``X-Escrow-Signature``
(:data:`~hypertuna.protocol.signed_request.HMAC_HEADER_PREFIX`; the ``X-Hypertuna-*`` names stay
free for an Ed25519 signature of the same request by a worker or an operator). A
:class:`HmacAuthenticator` checks, in this order: the signature headers are present and well
formed, the client id is known and the signature verifies under its secret, the timestamp is
within the allowed skew of the injected wall clock, and the nonce was not used before. A refused
request gets ``401`` with the JSON body::

    {"error": "unauthorized", "reason": "<SignedRequestReason value>", "message": "<words>"}

and the route does not run, so it changes nothing.

Secrets (configuration ``ESCROW_HMAC_CLIENTS``, parsed by :func:`parse_hmac_clients`):

- inline: comma-separated ``client_id:hexsecret`` entries, e.g.
  ``gateway-1:<64 hex digits>,gateway-2:<64 hex digits>``;
- or ``@/path/to/file``: the file holds one ``client_id:hexsecret`` per line (blank lines and
  lines starting with ``#`` are ignored), so the secrets stay out of the environment.

A secret is at least 32 bytes (64 hex digits; ``python -c "import secrets;
print(secrets.token_hex(32))"``). Client ids follow the key-header syntax ``[A-Za-z0-9_.:-]``
without ``:`` here, since it separates the id from the secret.

Use, on one authenticator per app (its replay memory must see every request)::

    auth = HmacAuthenticator(parse_hmac_clients(value), wall_clock=lambda: int(time.time()))

    @app.post("/api/escrow")
    @auth.required
    async def deposit() -> ...:
        client_id = g.hmac_client_id
        ...

or, at the start of a route, ``outcome = await auth.check()`` and ``match`` on
:class:`Authorized` / :class:`Refused` (``return outcome.response()`` for the latter).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, ParamSpec, TypeAlias, TypeVar

import attrs
from quart import Response, g, request

from hypertuna.protocol.signed_request import (
    DEFAULT_MAX_SKEW_S,
    HMAC_HEADER_PREFIX,
    ReplayGuard,
    SignedRequestError,
    SignedRequestReason,
    parse_headers,
    verify_hmac,
)

__all__ = [
    "MIN_SECRET_BYTES",
    "Authorized",
    "HmacAuthenticator",
    "HmacOutcome",
    "Refused",
    "parse_hmac_clients",
    "request_target",
]

log = logging.getLogger(__name__)

#: Shortest shared secret accepted.
MIN_SECRET_BYTES: Final = 32

_CLIENT_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_HEX_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2})+")

P = ParamSpec("P")
R = TypeVar("R")


@attrs.frozen
class Authorized:
    """The request is signed by ``client_id`` and was not seen before."""

    client_id: str


@attrs.frozen
class Refused:
    """The request is refused for ``reason``; ``message`` says why in words (no secrets)."""

    reason: SignedRequestReason
    message: str

    def response(self) -> Response:
        """The ``401`` JSON answer."""
        body = {"error": "unauthorized", "reason": self.reason.value, "message": self.message}
        return Response(json.dumps(body), status=401, content_type="application/json")


HmacOutcome: TypeAlias = Authorized | Refused


def parse_hmac_clients(value: str) -> dict[str, bytes]:
    """The secrets by client id of an ``ESCROW_HMAC_CLIENTS`` value (inline list or ``@file``,
    see the module docstring). Raises :class:`ValueError` naming the faulty entry (never the
    secret) or :class:`OSError` when the file cannot be read."""
    value = value.strip()
    if value.startswith("@"):
        path = value[1:]
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            lines = file.read().splitlines()
        entries = [line.strip() for line in lines]
        entries = [entry for entry in entries if entry and not entry.startswith("#")]
        where = path
    else:
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        where = "ESCROW_HMAC_CLIENTS"
    clients: dict[str, bytes] = {}
    for index, entry in enumerate(entries, start=1):
        client_id, sep, secret_hex = entry.partition(":")
        client_id, secret_hex = client_id.strip(), secret_hex.strip()
        if not sep or _CLIENT_ID_RE.fullmatch(client_id) is None:
            raise ValueError(f"{where}, entry {index}: expected client_id:hexsecret")
        if _HEX_RE.fullmatch(secret_hex) is None:
            raise ValueError(f"{where}, entry {index} ({client_id}): the secret must be hex")
        secret = bytes.fromhex(secret_hex)
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"{where}, entry {index} ({client_id}): the secret must be at least "
                f"{MIN_SECRET_BYTES} bytes ({2 * MIN_SECRET_BYTES} hex digits)"
            )
        if client_id in clients:
            raise ValueError(f"{where}: client id {client_id} is listed twice")
        clients[client_id] = secret
    if not clients:
        raise ValueError(f"{where}: no client is listed")
    return clients


def request_target() -> str:
    """The path and query string of the current request as sent on the wire (what the client
    signed), not a decoded or normalised form."""
    scope = request.scope
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.path
    query = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


class HmacAuthenticator:
    """Checks the HMAC signature of requests against the secrets of known clients, refusing
    stale timestamps and replayed nonces.

    ``wall_clock`` gives seconds since the epoch (the one clock of the process, so tests can
    move it). The replay memory is this object's: use one authenticator for all the routes of
    a server. Bodies are read in full for the digest; quart's ``MAX_CONTENT_LENGTH`` bounds them.
    """

    def __init__(
        self,
        secrets_by_client: Mapping[str, bytes],
        *,
        wall_clock: Callable[[], float],
        max_skew_s: int = DEFAULT_MAX_SKEW_S,
        max_remembered_nonces: int = 100_000,
    ) -> None:
        self._secrets = dict(secrets_by_client)
        self._wall_clock = wall_clock
        self._guard = ReplayGuard(max_skew_s=max_skew_s, max_entries=max_remembered_nonces)

    async def check(self) -> HmacOutcome:
        """Check the current quart request. Reads (and caches) its body, so the route can read
        it again."""
        body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
        try:
            signed = parse_headers(dict(request.headers), HMAC_HEADER_PREFIX)
            verify_hmac(signed, request.method, request_target(), body, self._secrets)
            # Only after the signature verified, so forged requests cannot fill the memory.
            self._guard.check(signed, self._wall_clock())
        except SignedRequestError as exc:
            log.info("refused %s %s: %s (%s)", request.method, request.path, exc.reason.value, exc)
            return Refused(exc.reason, str(exc))
        return Authorized(signed.key)

    def required(self, view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Response]]:
        """Decorate a route (below ``@app.route``): a refused request gets the 401 answer and the
        route does not run; an authorized one runs it with ``quart.g.hmac_client_id`` set."""

        @functools.wraps(view)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            outcome = await self.check()
            match outcome:
                case Refused():
                    return outcome.response()
                case Authorized(client_id=client_id):
                    g.hmac_client_id = client_id
                    return await view(*args, **kwargs)

        return guarded
