"""The escrow routes of a gateway that uses a standalone escrow (``escrow.url``).

The paths are those of the embedded escrow (:mod:`hypertuna.escrow.http`), and every request is
authenticated and checked here the same way before the escrow is asked; what the escrow answers
is then passed on — its JSON body and status, errors included (with ``Idempotent-Replayed``).

- ``GET /api/escrow/policy``: anyone; passed through.
- ``POST /api/escrow`` (deposit): the worker's Ed25519 signature (``X-Hypertuna-*``) of
  ``owner_key`` is verified here, the body checked, and the relay must be registered at this
  gateway by workers under that key (404 ``relay-not-registered``, 403
  ``relay-owned-by-another-key``, as embedded). The request then goes to the escrow with the
  very same body bytes, signature headers and ``Idempotency-Key``: the escrow verifies the
  owner's signature itself, over the same method, path and body (the escrow URL has no path,
  so the signed path is the same on both sides).
- ``POST /api/escrow/revoke``: signed by any key (verified here), body checked, passed through;
  the escrow decides whether the signer is the relay's owner or one of *its* operators
  (``ESCROW_OPERATOR_KEYS``).
- ``POST /api/escrow/unlock``: an operator of this gateway (``operators.keys``); the evidence is
  gathered by this gateway and sent in the body to the escrow — an ``evidence`` member from the
  caller is refused (400 ``evidence-not-accepted``). Answers as embedded: 200 with the lease,
  ``binding`` and ``sealed_lease``, or 412 with every failing rule in ``reasons``.
- ``POST /api/escrow/release``: an operator of this gateway; the escrow records the gateway as
  who released.
- ``GET /api/escrow/leases``: an operator of this gateway; the query is passed through.
- ``GET /api/escrow/health``: anyone; the escrow's own answer.

The lease-event stream is not proxied: the gateway's own follower reads it
(:mod:`hypertuna.escrow_client.remote`).

When the escrow cannot be asked the answer is 503 with a JSON reason: ``escrow-unreachable``
(it cannot be reached or does not answer in time), ``escrow-tls-refused`` (a TLS handshake
refused either way), ``escrow-refused-gateway`` (it refused this gateway's HMAC signature), or
``escrow-stopped``; an answer that is not JSON is 502 ``escrow-bad-answer``. Forwarded requests
are sent once: a signed request's nonce cannot be used twice, so the caller retries with a new
signature.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

from hypertuna.actors.runtime import ActorGone
from hypertuna.edge.hmac_auth import request_target
from hypertuna.escrow.http import (
    EscrowHttpError,
    check_relay,
    deposit_request,
    gather_evidence,
    json_response,
    release_request,
    release_response,
    revoke_target,
    signed_by,
    unlock_request,
    unlock_response,
)
from hypertuna.escrow.policy import Evidence
from hypertuna.escrow.service import Actor, ActorKind
from hypertuna.escrow_client.port import DepositRelayCheck
from hypertuna.escrow_client.remote import (
    EscrowAnswerError,
    EscrowClientRefusedError,
    RemoteEscrow,
)
from hypertuna.escrow_client.transport import (
    EscrowRefusedTlsError,
    EscrowResponse,
    EscrowTransportError,
)
from hypertuna.protocol.signed_request import ReplayGuard, header_names

__all__ = ["register_remote_escrow_routes"]

log = logging.getLogger(__name__)

#: Request headers passed on to the escrow with a forwarded deposit or revocation.
FORWARDED_HEADERS: Final = (*header_names(), "Idempotency-Key")


def _unavailable(reason: str, message: str) -> Response:
    return EscrowHttpError(503, reason, message).response()


def _passed_on(answer: EscrowResponse) -> Response:
    """The escrow's answer as ours: its JSON body and status."""
    if not isinstance(answer.json, dict):
        log.warning(
            "escrow %s %s: answer %d is not JSON", request.method, request.path, answer.status
        )
        return EscrowHttpError(
            502, "escrow-bad-answer", f"the escrow answered {answer.status} without JSON"
        ).response()
    return json_response(answer.json, answer.status, answer.headers)


def register_remote_escrow_routes(
    app: QuartTrio,
    remote: RemoteEscrow,
    *,
    evidence: Callable[[str], Awaitable[Evidence]],
    relay_check: DepositRelayCheck,
    operator_keys: frozenset[str],
    wall_clock: Callable[[], int],
    max_skew_s: int = 60,
) -> None:
    """Add the proxied escrow routes (see the module docstring) to ``app``. ``operator_keys``
    are this gateway's operators (unlock, release, leases); ``wall_clock`` gives seconds for
    signature timestamps, accepted within ``max_skew_s``."""
    guard = ReplayGuard(max_skew_s=max_skew_s)

    async def signer(allowed: frozenset[str] | None) -> str:
        return await signed_by(guard, allowed, wall_clock)

    async def forward(body: bytes | None) -> Response:
        headers = {
            name: value
            for name in FORWARDED_HEADERS
            if (value := request.headers.get(name)) is not None
        }
        # The target as the caller signed it, query string included.
        answer = await remote.forward(request.method, request_target(), body=body, headers=headers)
        return _passed_on(answer)

    async def guarded(call: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await call()
        except EscrowHttpError as exc:
            log.info(
                "escrow %s %s refused: %d %s", request.method, request.path, exc.status, exc.reason
            )
            return exc.response()
        except EscrowClientRefusedError as exc:
            # Our credentials, not the caller's: passing the 401 on would blame the caller.
            return _unavailable("escrow-refused-gateway", str(exc))
        except EscrowAnswerError as exc:
            if isinstance(exc.body, dict):
                return json_response(exc.body, exc.status)
            return EscrowHttpError(502, "escrow-bad-answer", str(exc)).response()
        except EscrowRefusedTlsError as exc:
            return _unavailable("escrow-tls-refused", f"TLS with the escrow refused: {exc.reason}")
        except EscrowTransportError as exc:
            return _unavailable("escrow-unreachable", f"the escrow cannot be reached: {exc}")
        except ActorGone:
            return _unavailable("escrow-stopped", "the escrow client is not running")

    @app.get("/api/escrow/policy")
    async def escrow_policy() -> Response:
        return await guarded(lambda: forward(None))

    @app.post("/api/escrow")
    async def escrow_deposit() -> Response:
        async def call() -> Response:
            deposit = await deposit_request(await signer(None))
            await check_relay(relay_check, deposit.relay_key, deposit.owner_key)
            body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
            assert isinstance(body, bytes)
            return await forward(body)

        return await guarded(call)

    @app.post("/api/escrow/revoke")
    async def escrow_revoke() -> Response:
        async def call() -> Response:
            await signer(None)
            await revoke_target()
            body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
            assert isinstance(body, bytes)
            return await forward(body)

        return await guarded(call)

    @app.post("/api/escrow/unlock")
    async def escrow_unlock() -> Response:
        async def call() -> Response:
            await signer(operator_keys)
            unlock, _ = await unlock_request(evidence_in_body=False)
            observed = await gather_evidence(evidence, unlock.relay_key)
            return unlock_response(await remote.unlock(unlock, observed))

        return await guarded(call)

    @app.post("/api/escrow/release")
    async def escrow_release() -> Response:
        async def call() -> Response:
            operator = await signer(operator_keys)
            lease_id, reason = await release_request()
            outcome = await remote.release(
                lease_id, reason=reason, actor=Actor(ActorKind.OPERATOR, operator)
            )
            return release_response(lease_id, outcome)

        return await guarded(call)

    @app.get("/api/escrow/leases")
    async def escrow_leases() -> Response:
        async def call() -> Response:
            await signer(operator_keys)
            return await forward(None)

        return await guarded(call)

    @app.get("/api/escrow/health")
    async def escrow_health() -> Response:
        return await guarded(lambda: forward(None))
