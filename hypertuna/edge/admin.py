"""The signed operator API of the blind-peer store (DESIGN §4, §5).

Routes, each answered with JSON:

- ``GET /api/blind-peer``: totals (mirrors, bytes, quotas, states, lag, update counts,
  collections) and, per relay owner key, its mirrors, bytes, quota and relays.
- ``GET /api/blind-peer/replicas``: per mirrored relay, its cores and their lengths, lag, whether
  a healthy worker serves it, whether a replica has it open, and the (reserved) lease fields.
- ``POST /api/blind-peer/gc``: run garbage collection now; answers with the removed mirrors.
- ``DELETE /api/blind-peer/mirrors/<coreKey>``: remove one mirror now (400 for a malformed key,
  404 when it is not mirrored, 409 while its relay is held).

Every call must be signed with an Ed25519 key listed in ``operators.keys``
(:mod:`hypertuna.protocol.signed_request`: method, path with query string, body digest,
timestamp, nonce). The signature is checked before anything else is looked at; a refused call
gets 401 ``{"error": "unauthorized", "reason": <SignedRequestReason value>, "message": ...}``
and changes nothing. Other errors are ``{"error", "reason", "message"}`` with a 4xx status.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, ParamSpec

from quart import Response, request
from quart_trio import QuartTrio

from hypertuna.actors.blind_peer import (
    CollectGarbage,
    ListMirrors,
    MirrorInfo,
    Removal,
    RemovalOutcome,
    RemovedMirror,
    RemoveMirror,
)
from hypertuna.actors.runtime import Reply
from hypertuna.edge.hmac_auth import request_target
from hypertuna.protocol.signed_request import (
    ReplayGuard,
    SignedRequestError,
    SignedRequestReason,
    parse_headers,
    verify_ed25519,
)
from hypertuna.storage.registrations import WorkerRelay
from hypertuna.system import System, WallClock

__all__ = ["OperatorAuth", "operator_only", "register_admin_routes"]

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
#: The lease fields of a relay, reserved until leases exist.
_NO_LEASE: Final[Mapping[str, object]] = {
    "active": False,
    "lease_id": None,
    "expires_at": None,
    "lease_version": None,
}

P = ParamSpec("P")


class OperatorAuth:
    """Checks that a request is signed by an operator key, fresh, and not seen before.

    One per app: its :class:`ReplayGuard` remembers the nonces of the requests it accepted.
    """

    def __init__(self, keys: frozenset[str], *, max_skew_s: int, wall_clock: WallClock) -> None:
        self._keys = keys
        self._guard = ReplayGuard(max_skew_s=max_skew_s)
        self._wall_clock = wall_clock

    def check(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> str:
        """The operator key that signed the request. Raises :class:`SignedRequestError`."""
        if not self._keys:
            raise SignedRequestError(
                SignedRequestReason.UNKNOWN_KEY,
                "no operator keys are configured (operators.keys): the operator API is off",
            )
        signed = parse_headers(headers)
        verify_ed25519(signed, method, path, body, self._keys)
        # Only after the signature verified, so that forged requests cannot fill the guard.
        self._guard.check(signed, now=self._wall_clock())
        return signed.key


def _api_error(status: int, error: str, reason: str, message: str) -> Response:
    body = {"error": error, "reason": reason, "message": message}
    return Response(_dumps(body), status=status, content_type="application/json")


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False)


def _json(data: object, status: int = 200) -> Response:
    return Response(_dumps(data), status=status, content_type="application/json")


def operator_only(
    auth: OperatorAuth,
) -> Callable[[Callable[P, Awaitable[Response]]], Callable[P, Awaitable[Response]]]:
    """Decorate a quart view so that it runs only for a request signed by an operator; any
    other request gets 401 before the view is called."""

    def decorate(view: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
        @functools.wraps(view)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
            body = await request.get_data(cache=True, as_text=False)
            assert isinstance(body, bytes)
            headers = dict(request.headers.items())
            try:
                auth.check(request.method, request_target(), body, headers)
            except SignedRequestError as exc:
                return _api_error(401, "unauthorized", exc.reason.value, str(exc))
            return await view(*args, **kwargs)

        return guarded

    return decorate


def _removed(mirror: RemovedMirror) -> dict[str, object]:
    return {
        "core_key": mirror.core_key,
        "relay_key": mirror.relay_key,
        "type": mirror.core_type,
        "bytes": mirror.bytes,
        "last_activity": mirror.last_activity,
    }


def _core(mirror: MirrorInfo) -> dict[str, object]:
    return {
        "core_key": mirror.core_key,
        "type": mirror.core_type,
        "length": mirror.length,
        "announced_length": mirror.announced_length,
        "fork": mirror.fork,
        "bytes": mirror.bytes,
        "lag_ms": mirror.lag_ms,
        "state": mirror.state,
        "last_activity": mirror.last_activity,
    }


async def _mirrors(system: System) -> tuple[MirrorInfo, ...]:
    def build(reply: Reply[tuple[MirrorInfo, ...]]) -> ListMirrors:
        return ListMirrors(reply)

    return await system.blind_peer.inbox.request(build)


def blind_peer_summary(system: System, mirrors: tuple[MirrorInfo, ...]) -> dict[str, Any]:
    """The body of ``GET /api/blind-peer``."""
    config = system.config.blind_peer
    stats = system.blind_peer.statistics()
    # With no per-owner limit, an owner is bounded by the total only.
    owner_quota = config.max_bytes_per_owner or config.max_bytes
    owners: dict[str, dict[str, Any]] = {}
    for mirror in mirrors:
        owner = owners.setdefault(
            mirror.owner_key, {"mirrors": 0, "bytes": 0, "quota": owner_quota, "relays": set()}
        )
        owner["mirrors"] += 1
        owner["bytes"] += mirror.bytes
        owner["relays"].add(mirror.relay_key)
    total = sum(m.bytes for m in mirrors)
    return {
        "mirrors": len(mirrors),
        "bytes": total,
        "quota": {
            "max_bytes": config.max_bytes,
            "max_bytes_per_owner": config.max_bytes_per_owner,
            "free_bytes": max(0, config.max_bytes - total),
        },
        "states": dict(stats.states),
        "max_lag_ms": stats.max_lag_ms,
        "accepted": stats.accepted,
        "blocks": stats.blocks,
        "refused": dict(stats.refused),
        "refused_total": sum(n for _, n in stats.refused),
        "gc": {
            "collected": stats.collected,
            "mirror_ttl_s": config.mirror_ttl_s,
            "interval_s": config.gc_interval_s,
        },
        "owners": {
            key: {**owner, "relays": sorted(owner["relays"])}
            for key, owner in sorted(owners.items())
        },
    }


def blind_peer_replicas(
    system: System, mirrors: tuple[MirrorInfo, ...], registered: Sequence[WorkerRelay]
) -> list[dict[str, Any]]:
    """The ``relays`` of ``GET /api/blind-peer/replicas``: one entry per mirrored relay
    (``registered``: the durable worker registrations, for names and registered workers)."""
    by_relay: dict[str, list[MirrorInfo]] = {}
    for mirror in mirrors:
        by_relay.setdefault(mirror.relay_key, []).append(mirror)
    relays = {relay.relay_key: relay for relay in registered}
    routes = {relay.relay_key: relay for relay in system.router.statistics().relays}
    replicas = {state.relay_key: state for state in system.replicas.snapshot()}
    out: list[dict[str, Any]] = []
    for relay_key, cores in sorted(by_relay.items()):
        # The owner core first, then by type and key, so the listing is stable.
        cores.sort(key=lambda m: (m.core_type != "owner", m.core_type, m.core_key))
        route = routes.get(relay_key)
        relay = relays.get(relay_key)
        replica = replicas.get(relay_key)
        identifier = next((m.relay_id for m in cores if m.relay_id), "")
        last_activity = max(m.last_activity for m in cores)
        if replica is not None:
            last_activity = max(last_activity, replica.last_activity)
        out.append(
            {
                "relay_key": relay_key,
                "identifier": identifier,
                "name": relay.name if relay is not None else None,
                "owner_key": cores[0].owner_key,
                "cores": [_core(m) for m in cores],
                "bytes": sum(m.bytes for m in cores),
                "lag_ms": max(m.lag_ms for m in cores),
                "healthy": route is not None and route.workers_usable > 0,
                "workers_registered": len(relay.workers) if relay is not None else 0,
                "workers_healthy": route.workers_usable if route is not None else 0,
                "opened": replica is not None or system.replicas.is_open(relay_key),
                "opened_at": replica.opened_at if replica is not None else None,
                "sessions": replica.sessions if replica is not None else 0,
                "last_activity": last_activity,
                "held": system.blind_peer.held(relay_key),
                "lease": dict(_NO_LEASE),
            }
        )
    return out


def register_admin_routes(app: QuartTrio, system: System) -> OperatorAuth:
    """Add the operator routes to ``app``; returns the checker they share."""
    operators = system.config.operators
    auth = OperatorAuth(
        frozenset(operators.keys), max_skew_s=operators.max_skew_s, wall_clock=system.wall_clock
    )
    signed = operator_only(auth)

    @app.route("/api/blind-peer", methods=["GET"])
    @signed
    async def blind_peer() -> Response:
        return _json(blind_peer_summary(system, await _mirrors(system)))

    @app.route("/api/blind-peer/replicas", methods=["GET"])
    @signed
    async def blind_peer_replicas_view() -> Response:
        mirrors = await _mirrors(system)
        registered = await system.store.worker_relays()
        return _json({"relays": blind_peer_replicas(system, mirrors, registered)})

    @app.route("/api/blind-peer/gc", methods=["POST"])
    @signed
    async def blind_peer_gc() -> Response:
        def build(reply: Reply[tuple[RemovedMirror, ...]]) -> CollectGarbage:
            return CollectGarbage(reply)

        removed = await system.blind_peer.inbox.request(build)
        return _json({"removed": [_removed(m) for m in removed], "count": len(removed)})

    @app.route("/api/blind-peer/mirrors/<core_key>", methods=["DELETE"])
    @signed
    async def blind_peer_remove(core_key: str) -> Response:
        if _HEX64.fullmatch(core_key) is None:
            return _api_error(
                400, "bad-request", "invalid-core-key", "a core key is 64 lowercase hex characters"
            )

        def build(reply: Reply[Removal]) -> RemoveMirror:
            return RemoveMirror(core_key, reply)

        removal = await system.blind_peer.inbox.request(build)
        match removal.outcome:
            case RemovalOutcome.REMOVED:
                assert removal.mirror is not None
                return _json({"removed": _removed(removal.mirror)})
            case RemovalOutcome.NOT_FOUND:
                return _api_error(404, "not-found", "not-mirrored", f"no mirror of {core_key}")
            case RemovalOutcome.HELD:
                return _api_error(
                    409,
                    "conflict",
                    "relay-held",
                    "the mirror's relay is held (an open replica, pending writes or a lease)",
                )

    return auth
