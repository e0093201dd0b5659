"""The escrow's HTTP API as quart-trio routes, on the gateway's app or the standalone server's.

:func:`register_escrow_routes` adds them in one of two modes:

**Embedded** (the single binary; ``evidence`` and ``relay_check`` given, ``hmac`` None). The
unlock evidence is gathered by the gateway itself through ``evidence(relay_key)``, never taken
from a caller, and a deposit is only accepted for a relay that workers registered at this gateway
under the deposit's owner key (``relay_check``). (A gateway in front of a standalone escrow serves
the same paths as a proxy with the same checks: :mod:`hypertuna.edge.escrow_proxy`.)

**Standalone** (``hypertuna escrow``; ``hmac`` given, ``evidence`` None). Behind mutual TLS, every
``/api/escrow/*`` request must first carry the HMAC signature of a known client (the gateway's
escrow client) in the ``X-Escrow-*`` headers, checked before anything else; the unlock evidence
comes in the body, gathered by that authenticated gateway. ``/metrics`` is added too (mutual TLS
only, so that a scraper with a client certificate can read it).

Routes, who may call them (besides the standalone HMAC check) and their statuses:

- ``GET /api/escrow/policy``: anyone; 200.
- ``POST /api/escrow`` (deposit): Ed25519 signature (``X-Hypertuna-*``) of ``owner_key``;
  201 400 401 403 409 422 503, and embedded 404 ``relay-not-registered`` (no worker registered
  the relay here, or the gateway hosts it itself) and 403 ``relay-owned-by-another-key`` (it is
  registered under another owner key), 503 ``registrations-unavailable`` when the gateway's own
  database cannot say.
- ``POST /api/escrow/unlock``: embedded, an operator's Ed25519 signature; standalone, the HMAC
  client; 200 400 401 412 503.
- ``POST /api/escrow/revoke``: Ed25519 signature of the relay's owner or of an operator;
  200 400 401 403 404 503.
- ``POST /api/escrow/release``: embedded, an operator's Ed25519 signature; standalone, the HMAC
  client (the lease-holding gateway); 200 400 401 404 503.
- ``GET /api/escrow/leases`` and ``GET /api/escrow/leases/events``: embedded, an operator;
  standalone, the HMAC client; 200 400 401 503.
- ``GET /api/escrow/health``: anyone; 200, or 503 when the database is unreachable or the audit
  chain is broken.

Bodies (JSON objects, snake_case names):

- deposit: ``{"relay_key": hex64, "owner_key": hex64, "package": base64 sealed package}`` and an
  optional ``Idempotency-Key`` header (1-128 of ``[A-Za-z0-9_.:@-]``). A retry with the same key
  and body gets the original 201 answer again (with ``Idempotent-Replayed: true``); the same key
  with another body is 422; a duplicate while the first is still running is 409.
- unlock: ``{"relay_key": hex64, "session_public_key": hex64 (X25519), "requester_id": id}``;
  standalone adds ``"evidence": {"relay_registered", "escrow_enabled", "healthy_peers",
  "last_peer_seen_ms", "mirror_lag_ms", "mirror_updated_ms"}`` (missing values fail closed); an
  ``evidence`` member in embedded mode is refused (400 ``evidence-not-accepted``). The 200 answer
  holds the lease (``lease``: ids, times, digests), the ``binding`` and ``sealed_lease``: base64
  of the sealed box to the session key, the only place the secret travels. 412 lists every
  failing rule in ``reasons``.
- revoke: ``{"relay_key": hex64}`` or ``{"deposit_id": id}``; idempotent (``already_revoked``).
- release: ``{"lease_id": id, "reason": id}`` (the reason is a short code for the audit log);
  answers ``{"lease": ..., "released": bool}`` (False when the lease had already ended), 404
  ``lease-not-found``. The lease ending is published like a revocation.
- leases: ``?relay_key=hex64&active=1&limit=N`` — ids, relay, times, digests; never secrets.
- lease events (the standalone follower's lease-status stream): ``?since=SEQ&epoch=E&wait=S``
  long-polls up to ``wait`` seconds (at most 25, the default) for revocations and other lease
  endings after ``since`` and answers ``{"epoch", "events": [{"seq", "kind", "relayKey",
  "depositIds", "leaseIds", "at"}], "lastSeq", "reset"}`` — at once when there are some. A
  follower polls again with ``since=lastSeq`` and the epoch it got, so it learns of a
  revocation within one round trip, and never later than ``wait`` plus its own timeout after a
  lost connection; ``reset`` (escrow restarted, or the follower fell too far behind) means
  "list the leases again".

Every error is ``{"error": <kind>, "reason": <machine reason>, "message": <words>}`` (plus
``reasons`` for 412), and a refused request changes nothing: authentication, then the body's
syntax, then authorization are checked before the escrow is asked. Logs carry methods, paths,
reason codes, ids and digests — never a body, a package, a secret or a sealed lease.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, g, request
from quart_trio import QuartTrio

from hypertuna.actors.escrow import EscrowActor
from hypertuna.actors.runtime import ActorGone
from hypertuna.edge.hmac_auth import Authorized, HmacAuthenticator, Refused, request_target
from hypertuna.escrow.policy import Evidence
from hypertuna.escrow.service import (
    HTTP_STATUS,
    Actor,
    ActorKind,
    DepositReceipt,
    DepositRefused,
    DepositRequest,
    LeaseGrant,
    ReleaseOutcome,
    Revocation,
    UnlockRejected,
    UnlockRequest,
)
from hypertuna.escrow.store import EscrowStorageError
from hypertuna.escrow_client.port import RELAY_REFUSAL_STATUS, DepositRelayCheck
from hypertuna.protocol.signed_request import (
    ReplayGuard,
    SignedRequestError,
    SignedRequestReason,
    parse_headers,
    verify_ed25519,
)
from hypertuna.storage.events import StorageError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_LONG_POLL_S",
    "EscrowHttpError",
    "check_relay",
    "deposit_request",
    "gather_evidence",
    "json_response",
    "register_escrow_routes",
    "release_request",
    "release_response",
    "revoke_target",
    "signed_by",
    "unlock_request",
    "unlock_response",
]

log = logging.getLogger(__name__)

#: Largest request body accepted (a deposit is a few hundred bytes).
MAX_BODY_BYTES: Final = 64 * 1024
#: Longest wait of one lease-events long poll.
MAX_LONG_POLL_S: Final = 25.0

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ERRORS: Final[Mapping[int, str]] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    412: "precondition-failed",
    413: "too-large",
    422: "unprocessable",
    503: "unavailable",
}
_EVIDENCE_FIELDS: Final = tuple(field.name for field in attrs.fields(Evidence))


class EscrowHttpError(Exception):
    """A request refused at the edge: its status, reason code and message."""

    def __init__(self, status: int, reason: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.extra = extra

    def response(self) -> Response:
        body: dict[str, object] = {
            "error": _ERRORS.get(self.status, "error"),
            "reason": self.reason,
            "message": str(self),
        }
        body.update(self.extra)
        return json_response(body, self.status)


def json_response(
    data: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``data`` as a JSON answer."""
    return Response(
        json.dumps(data, ensure_ascii=False),
        status=status,
        content_type="application/json",
        headers=dict(headers or {}),
    )


def _bad(reason: str, message: str) -> EscrowHttpError:
    return EscrowHttpError(400, reason, message)


async def _body() -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise EscrowHttpError(413, "body-too-large", f"the body exceeds {MAX_BODY_BYTES} bytes")
    data = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    assert isinstance(data, bytes)
    if len(data) > MAX_BODY_BYTES:
        raise EscrowHttpError(413, "body-too-large", f"the body exceeds {MAX_BODY_BYTES} bytes")
    return data


def _object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _bad("malformed-json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _bad("not-an-object", "the body must be a JSON object")
    return value


def _only(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _bad("unknown-field", f"unknown field(s): {', '.join(unknown[:5])}")


def _string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise _bad("missing-field", f"{name} is required")
    if not isinstance(value, str):
        raise _bad("wrong-type", f"{name} must be a string")
    return value


def _hex64(data: Mapping[str, Any], name: str) -> str:
    value = _string(data, name)
    if _HEX64.fullmatch(value) is None:
        raise _bad("bad-hex", f"{name} must be 64 lowercase hex characters")
    return value


def _base64(data: Mapping[str, Any], name: str) -> bytes:
    value = _string(data, name)
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _bad("bad-base64", f"{name} must be standard base64") from None
    if not decoded:
        raise _bad("bad-base64", f"{name} is empty")
    return decoded


def _evidence(value: object) -> Evidence:
    if value is None:
        return Evidence()
    if not isinstance(value, dict):
        raise _bad("wrong-type", "evidence must be an object")
    _only(value, _EVIDENCE_FIELDS)
    try:
        return Evidence(**value)
    except (TypeError, ValueError) as exc:
        raise _bad("bad-evidence", f"evidence: {exc}") from None


def _lease_grant(grant: LeaseGrant) -> dict[str, object]:
    return {
        "lease": grant.lease.to_json(),
        "binding": grant.binding.to_json(),
        "sealed_lease": base64.b64encode(grant.sealed_secret).decode("ascii"),
    }


def _revocation(outcome: Revocation) -> dict[str, object]:
    return {
        "relayKey": outcome.relay_key,
        "depositIds": list(outcome.deposit_ids),
        "leaseIds": list(outcome.lease_ids),
        "at": outcome.at_ms,
        "alreadyRevoked": outcome.already_revoked,
    }


def _refusal(reason: str, message: str) -> EscrowHttpError:
    return EscrowHttpError(HTTP_STATUS.get(reason, 400), reason, message)


def register_escrow_routes(
    app: QuartTrio,
    escrow: EscrowActor,
    *,
    evidence: Callable[[str], Awaitable[Evidence]] | None,
    hmac: HmacAuthenticator | None,
    operator_keys: frozenset[str],
    wall_clock: Callable[[], int],
    max_skew_s: int = 60,
    relay_check: DepositRelayCheck | None = None,
) -> None:
    """Add the escrow routes (see the module docstring) to ``app``.

    Exactly one of ``evidence`` (embedded) and ``hmac`` (standalone) is given; embedded also
    needs ``relay_check``, the gateway's check that a deposit's relay is registered here by
    workers under the deposit's owner key (a standalone escrow knows no registrations: the
    gateway in front of it checks). ``operator_keys`` are the Ed25519 public keys (hex) that may
    unlock (embedded), release and list leases (embedded) and revoke any relay. ``wall_clock``
    gives seconds since the epoch for signature timestamps, accepted within ``max_skew_s``.
    """
    if (evidence is None) == (hmac is None):
        raise ValueError("give evidence (embedded) or hmac (standalone), not both or neither")
    if (relay_check is None) != (hmac is not None):
        raise ValueError("relay_check goes with evidence (embedded), and only there")
    standalone = hmac is not None
    guard = ReplayGuard(max_skew_s=max_skew_s)

    async def signer(allowed: frozenset[str] | None) -> str:
        return await signed_by(guard, allowed, wall_clock)

    async def gate() -> None:
        """The standalone HMAC check (every escrow route), before anything else."""
        if hmac is not None:
            await _body()
            outcome = await hmac.check()
            if isinstance(outcome, Refused):
                raise EscrowHttpError(401, outcome.reason.value, outcome.message)
            assert isinstance(outcome, Authorized)
            g.hmac_client_id = outcome.client_id

    async def guarded(call: Callable[[], Awaitable[Response]]) -> Response:
        try:
            await gate()
            return await call()
        except EscrowHttpError as exc:
            log.info(
                "escrow %s %s refused: %d %s", request.method, request.path, exc.status, exc.reason
            )
            return exc.response()
        except EscrowStorageError:
            log.warning("escrow %s %s: database unavailable", request.method, request.path)
            return EscrowHttpError(
                503, "database-unavailable", "the escrow database is unavailable"
            ).response()
        except ActorGone:
            return EscrowHttpError(503, "escrow-stopped", "the escrow is not running").response()

    @app.get("/api/escrow/policy")
    async def escrow_policy() -> Response:
        async def call() -> Response:
            return json_response(escrow.policy_document())

        return await guarded(call)

    @app.post("/api/escrow")
    async def escrow_deposit() -> Response:
        async def call() -> Response:
            deposit = await deposit_request(await signer(None))
            if relay_check is not None:
                await check_relay(relay_check, deposit.relay_key, deposit.owner_key)
            outcome = await escrow.deposit(deposit)
            if isinstance(outcome, DepositRefused):
                raise _refusal(outcome.reason.value, outcome.message)
            assert isinstance(outcome, DepositReceipt)
            headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
            return json_response(outcome.to_json(), 201, headers)

        return await guarded(call)

    @app.post("/api/escrow/unlock")
    async def escrow_unlock() -> Response:
        async def call() -> Response:
            if not standalone:
                await signer(operator_keys)
            unlock, observed = await unlock_request(evidence_in_body=standalone)
            if observed is None:
                assert evidence is not None
                observed = await gather_evidence(evidence, unlock.relay_key)
            return unlock_response(await escrow.unlock(unlock, observed))

        return await guarded(call)

    @app.post("/api/escrow/revoke")
    async def escrow_revoke() -> Response:
        async def call() -> Response:
            key = await signer(None)
            relay_key, deposit_id = await revoke_target()
            kind = ActorKind.OPERATOR if key in operator_keys else ActorKind.OWNER
            try:
                outcome = await escrow.revoke(
                    actor=Actor(kind, key), relay_key=relay_key, deposit_id=deposit_id
                )
            except ValueError as exc:
                raise _bad("invalid-request", str(exc)) from None
            if not isinstance(outcome, Revocation):
                raise _refusal(outcome.reason.value, outcome.message)
            return json_response(_revocation(outcome))

        return await guarded(call)

    @app.post("/api/escrow/release")
    async def escrow_release() -> Response:
        async def call() -> Response:
            if standalone:
                actor = Actor(ActorKind.GATEWAY, str(g.hmac_client_id))
            else:
                actor = Actor(ActorKind.OPERATOR, await signer(operator_keys))
            lease_id, reason = await release_request()
            try:
                outcome = await escrow.release(lease_id, reason=reason, actor=actor)
            except ValueError as exc:
                raise _bad("invalid-request", str(exc)) from None
            return release_response(lease_id, outcome)

        return await guarded(call)

    @app.get("/api/escrow/leases")
    async def escrow_leases() -> Response:
        async def call() -> Response:
            if not standalone:
                await signer(operator_keys)
            args = request.args
            relay_key = args.get("relay_key")
            if relay_key is not None and _HEX64.fullmatch(relay_key) is None:
                raise _bad("bad-hex", "relay_key must be 64 lowercase hex characters")
            active = args.get("active", "0")
            if active not in ("0", "1", "true", "false"):
                raise _bad("invalid-request", "active must be 0 or 1")
            limit = _int_arg(args.get("limit"), "limit", 100, 1, 1000)
            leases = await escrow.leases(
                relay_key=relay_key, active_only=active in ("1", "true"), limit=limit
            )
            return json_response({"leases": [lease.to_json() for lease in leases]})

        return await guarded(call)

    @app.get("/api/escrow/leases/events")
    async def escrow_lease_events() -> Response:
        async def call() -> Response:
            if not standalone:
                await signer(operator_keys)
            args = request.args
            since = _int_arg(args.get("since"), "since", 0, 0, 2**62)
            wait = _int_arg(args.get("wait"), "wait", int(MAX_LONG_POLL_S), 0, 3600)
            epoch = args.get("epoch")
            if epoch is not None and re.fullmatch(r"[0-9a-f]{1,64}", epoch) is None:
                raise _bad("invalid-request", "epoch is malformed")
            found = await escrow.wait_lease_events(
                since, timeout_s=min(float(wait), MAX_LONG_POLL_S), epoch=epoch
            )
            return json_response(found.to_json())

        return await guarded(call)

    @app.get("/api/escrow/health")
    async def escrow_health() -> Response:
        async def call() -> Response:
            fingerprint = escrow.service.escrow_key.fingerprint
            try:
                health = await escrow.health()
            except EscrowStorageError:
                return json_response(
                    {
                        "status": "unavailable",
                        "database": {"status": "unreachable"},
                        "key": {"status": "loaded", "fingerprint": fingerprint},
                        "audit": {"status": "unknown"},
                    },
                    503,
                )
            audit = {None: "unverified", True: "valid", False: "broken"}[health.audit_chain_valid]
            return json_response(
                {
                    "status": "ok" if health.ok else "unhealthy",
                    "database": {"status": "ok", "backend": health.backend},
                    "key": {"status": "loaded", "fingerprint": health.fingerprint},
                    "audit": {
                        "status": audit,
                        "entries": health.audit_entries,
                        "lastCheckpointSeq": health.last_checkpoint_seq,
                    },
                    "depositsActive": health.deposits_active,
                    "leasesActive": health.leases_active,
                },
                200 if health.ok else 503,
            )

        return await guarded(call)

    if standalone:

        @app.get("/metrics")
        async def escrow_metrics() -> Response:
            return Response(
                generate_latest(escrow.metrics.registry), content_type=CONTENT_TYPE_LATEST
            )


# --- the requests' bodies (shared with the gateway's proxy of a standalone escrow) -----------


async def deposit_request(signer_key: str) -> DepositRequest:
    """The deposit of the current request, signed by ``signer_key`` (400 for a bad body, 403
    when the signer is not ``owner_key``)."""
    data = _object(await _body())
    _only(data, ("relay_key", "owner_key", "package"))
    relay_key = _hex64(data, "relay_key")
    owner_key = _hex64(data, "owner_key")
    package = _base64(data, "package")
    if owner_key != signer_key:
        raise EscrowHttpError(403, "signer-not-owner", "the request must be signed by owner_key")
    try:
        return DepositRequest(
            owner_key=owner_key,
            relay_key=relay_key,
            package=package,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
    except ValueError as exc:
        raise _bad("invalid-request", str(exc)) from None


async def unlock_request(*, evidence_in_body: bool) -> tuple[UnlockRequest, Evidence | None]:
    """The unlock of the current request, and the evidence of its body when
    ``evidence_in_body`` (standalone); otherwise an ``evidence`` member is refused."""
    data = _object(await _body())
    fields: tuple[str, ...] = ("relay_key", "session_public_key", "requester_id")
    if "evidence" in data and not evidence_in_body:
        raise _bad(
            "evidence-not-accepted",
            "the gateway gathers the evidence itself; it is never taken from a caller",
        )
    _only(data, (*fields, "evidence") if evidence_in_body else fields)
    relay_key = _hex64(data, "relay_key")
    session_key = bytes.fromhex(_hex64(data, "session_public_key"))
    requester_id = _string(data, "requester_id")
    observed = _evidence(data.get("evidence")) if evidence_in_body else None
    try:
        unlock = UnlockRequest(
            relay_key=relay_key, session_public_key=session_key, requester_id=requester_id
        )
    except ValueError as exc:
        raise _bad("invalid-request", str(exc)) from None
    return unlock, observed


async def gather_evidence(
    evidence: Callable[[str], Awaitable[Evidence]], relay_key: str
) -> Evidence:
    """The gateway's evidence about ``relay_key``; none at all when gathering fails."""
    try:
        return await evidence(relay_key)
    except Exception:
        # Fail closed: without evidence every rule that needs it refuses.
        log.warning("escrow evidence for relay %s unavailable", relay_key)
        return Evidence()


def unlock_response(outcome: LeaseGrant | UnlockRejected) -> Response:
    """200 with the lease, or the 412 error listing every failing rule."""
    if isinstance(outcome, LeaseGrant):
        return json_response(_lease_grant(outcome))
    codes = [reason.value for reason in outcome.reasons]
    raise EscrowHttpError(
        412,
        "policy-rejected",
        "the unlock policy refuses: " + ", ".join(codes),
        reasons=codes,
    )


async def revoke_target() -> tuple[str | None, str | None]:
    """``(relay_key, deposit_id)`` of the current revoke request, exactly one of them set."""
    data = _object(await _body())
    _only(data, ("relay_key", "deposit_id"))
    if ("relay_key" in data) == ("deposit_id" in data):
        raise _bad("invalid-request", "give exactly one of relay_key and deposit_id")
    relay_key = _hex64(data, "relay_key") if "relay_key" in data else None
    deposit_id = _string(data, "deposit_id") if "deposit_id" in data else None
    return relay_key, deposit_id


async def release_request() -> tuple[str, str]:
    """``(lease_id, reason)`` of the current release request."""
    data = _object(await _body())
    _only(data, ("lease_id", "reason"))
    return _string(data, "lease_id"), _string(data, "reason")


def release_response(lease_id: str, outcome: ReleaseOutcome | None) -> Response:
    if outcome is None:
        raise EscrowHttpError(404, "lease-not-found", f"no lease {lease_id}")
    return json_response({"lease": outcome.lease.to_json(), "released": outcome.released})


async def check_relay(check: DepositRelayCheck, relay_key: str, owner_key: str) -> None:
    """Refuse a deposit for a relay the gateway does not know under ``owner_key``."""
    try:
        refused = await check(relay_key, owner_key)
    except StorageError:
        log.warning("escrow deposit for relay %s: registrations unavailable", relay_key)
        raise EscrowHttpError(
            503, "registrations-unavailable", "the gateway's registrations are unavailable"
        ) from None
    if refused is not None:
        raise EscrowHttpError(
            RELAY_REFUSAL_STATUS[refused.reason], refused.reason.value, refused.message
        )


async def signed_by(
    guard: ReplayGuard, allowed: frozenset[str] | None, wall_clock: Callable[[], int]
) -> str:
    """The Ed25519 key (``X-Hypertuna-*``) that signed the current request, checked against
    ``guard`` (any key when ``allowed`` is None); :class:`EscrowHttpError` 401 otherwise."""
    body = await _body()
    try:
        signed = parse_headers(dict(request.headers.items()))
        keys = frozenset({signed.key}) if allowed is None else allowed
        if not keys:
            raise SignedRequestError(
                SignedRequestReason.UNKNOWN_KEY, "no operator keys are configured"
            )
        verify_ed25519(signed, request.method, request_target(), body, keys)
        guard.check(signed, now=wall_clock())
    except SignedRequestError as exc:
        raise EscrowHttpError(401, exc.reason.value, str(exc)) from None
    return signed.key


def _int_arg(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise _bad("invalid-request", f"{name} must be a whole number")
    value = int(raw)
    if not low <= value <= high:
        raise _bad("invalid-request", f"{name} must be in {low}..{high}")
    return value
