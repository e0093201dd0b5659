"""The HTTP/WebSocket edge: the only place that speaks HTTP.

Routes:

- ``GET /relay/<relayKey or alias>``: with ``Accept: application/nostr+json`` the NIP-11
  document (CORS-enabled), else a short text naming the relay's ``ws://`` URL; for a relay the
  gateway hosts and, failing that, for one that workers registered (the URL is the same whoever
  serves it). The WebSocket on the same path is served by :mod:`hypertuna.edge.asgi` and
  :mod:`hypertuna.edge.server`.
- ``GET /health``: JSON with one entry per dependency; 503 when one is down or the gateway is
  shutting down.
- ``GET /metrics``: Prometheus text from the system's own registry.
- ``/api/blind-peer...``: the signed operator API (:mod:`hypertuna.edge.admin`).
- ``/api/escrow/...``: with ``escrow.enabled``, the embedded escrow's routes
  (:mod:`hypertuna.escrow.http`) or, with ``escrow.url``, the same paths proxied to the
  standalone escrow (:mod:`hypertuna.edge.escrow_proxy`).

Every HTTP error is a JSON body ``{"error": "<reason>"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from hypertuna import __version__
from hypertuna.actors.evidence import RegisteredRelayCheck
from hypertuna.actors.peer_router import RelayRoute
from hypertuna.edge.admin import register_admin_routes
from hypertuna.edge.escrow_proxy import register_remote_escrow_routes
from hypertuna.escrow.http import register_escrow_routes
from hypertuna.escrow_client.remote import RemoteState
from hypertuna.storage.events import RelayRecord
from hypertuna.system import System

__all__ = ["create_app", "nip11_document", "worker_nip11_document"]

NOSTR_JSON = "application/nostr+json"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
}
SUPPORTED_NIPS = [1, 9, 11, 40, 45]
#: What the gateway vouches for on a worker's relay: it forwards the client's NIP-01 frames
#: unchanged and answers NIP-11 itself; the rest is up to the workers.
WORKER_RELAY_NIPS = [1, 11]


def nip11_document(system: System, relay: RelayRecord) -> dict[str, Any]:
    """The NIP-11 relay information document of a hosted relay."""
    limits = system.config.limits
    return _document(
        system,
        name=relay.name,
        description=relay.description,
        supported_nips=SUPPORTED_NIPS,
        limitation={
            "max_message_length": limits.max_frame_bytes,
            "max_subscriptions": limits.max_subscriptions,
            "max_filters": limits.max_filters,
            "max_limit": limits.max_limit,
            "default_limit": limits.max_limit,
            "max_subid_length": limits.max_sub_id_length,
            "created_at_upper_limit": limits.max_future_s,
            "auth_required": False,
            "payment_required": False,
            "restricted_writes": False,
        },
    )


def worker_nip11_document(system: System, route: RelayRoute) -> dict[str, Any]:
    """The NIP-11 document of a relay that workers serve, from its registration.

    Only what the gateway itself enforces on forwarded sessions is stated; the workers apply
    their own limits to the frames they get."""
    return _document(
        system,
        name=route.name,
        description=route.description,
        supported_nips=WORKER_RELAY_NIPS,
        limitation={"max_message_length": system.config.limits.max_frame_bytes},
    )


def _document(
    system: System,
    *,
    name: str,
    description: str,
    supported_nips: list[int],
    limitation: dict[str, Any],
) -> dict[str, Any]:
    # pubkey and contact are the gateway operator's, for every relay it answers for.
    config = system.config
    document: dict[str, Any] = {
        "name": name,
        "description": description,
        "supported_nips": supported_nips,
        "software": config.relay_info.software,
        "version": __version__,
        "limitation": limitation,
    }
    if config.relay_info.pubkey:
        document["pubkey"] = config.relay_info.pubkey
    if config.relay_info.contact:
        document["contact"] = config.relay_info.contact
    return document


def _json_error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _dumps({"error": reason}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False)


def create_app(system: System) -> QuartTrio:
    """Build the edge app bound to a running system."""
    app = QuartTrio("hypertuna.edge")
    app.config["MAX_CONTENT_LENGTH"] = system.config.limits.max_frame_bytes

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return _json_error(error.code or 500, (error.description or error.name).strip())

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        return _json_error(500, "internal error")

    @app.route("/")
    async def index() -> Response:
        relays = await system.list_relays()
        body = {
            "service": "hypertuna-gateway",
            "version": __version__,
            "relays": [{"name": r.name, "url": system.relay_url(r)} for r in relays],
        }
        return Response(_dumps(body), content_type="application/json")

    @app.route("/relay/<ident>", methods=["GET", "OPTIONS"])
    async def relay_info(ident: str) -> Response:
        if request.method == "OPTIONS":
            return Response("", status=204, headers=CORS_HEADERS)
        # Hosted relays come first, as for the WebSocket on the same path.
        relay = await system.lookup_relay(ident)
        route = await system.route_relay(ident) if relay is None else None
        if relay is not None:
            name, key = relay.name, relay.key
        elif route is not None:
            name, key = route.name, route.relay_key
        else:
            return _json_error(404, f"no relay {ident!r} is hosted here", CORS_HEADERS)
        if NOSTR_JSON in request.headers.get("Accept", ""):
            if relay is not None:
                document = nip11_document(system, relay)
            else:
                assert route is not None
                document = worker_nip11_document(system, route)
            return Response(_dumps(document), content_type=NOSTR_JSON, headers=CORS_HEADERS)
        url = system.config.relay_ws_url(key, system.base_url)
        text = f"{name}: a Nostr relay. Connect a Nostr client to {url}\n"
        return Response(text, content_type="text/plain; charset=utf-8", headers=CORS_HEADERS)

    @app.route("/health")
    async def health() -> Response:
        checks: dict[str, dict[str, Any]] = {}
        started = time.perf_counter()
        try:
            with trio.fail_after(2):
                await system.store.ping()
            checks["storage"] = {
                "ok": True,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        except Exception as exc:
            checks["storage"] = {"ok": False, "error": type(exc).__name__}
        for stats in system.statistics():
            checks[stats.name] = {
                "ok": stats.inbox_used < stats.inbox_capacity,
                "queued": stats.inbox_used,
                "capacity": stats.inbox_capacity,
            }
        if system.escrow is not None:
            try:
                with trio.fail_after(2):
                    escrow = await system.escrow.health()
                checks["escrow"] = {
                    "ok": escrow.ok,
                    "backend": escrow.backend,
                    "audit_chain_valid": escrow.audit_chain_valid,
                }
            except Exception as exc:
                checks["escrow"] = {"ok": False, "error": type(exc).__name__}
        if system.remote_escrow is not None:
            # The follower's own view: no request to the escrow from a health check.
            remote = system.remote_escrow.statistics()
            checks["escrow"] = {
                "ok": remote.state is RemoteState.UP,
                "mode": "remote",
                "state": remote.state.value,
                "lag_s": round(remote.lag_s, 3),
                "lag_bound_s": remote.lag_bound_s,
                "epoch": remote.epoch,
                **({"error": remote.last_error} if remote.last_error else {}),
            }
        if system.stopping.is_set():
            checks["lifecycle"] = {"ok": False, "error": "shutting down"}
        healthy = all(check["ok"] for check in checks.values())
        body = {"status": "ok" if healthy else "unavailable", "checks": checks}
        return Response(
            _dumps(body), status=200 if healthy else 503, content_type="application/json"
        )

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(system.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    register_admin_routes(app, system)
    if system.escrow is not None:
        # Embedded: unlock evidence comes from the gateway's own state, never from the caller.
        register_escrow_routes(
            app,
            system.escrow,
            evidence=system.evidence,
            hmac=None,
            operator_keys=frozenset(system.config.operators.keys),
            wall_clock=system.wall_clock,
            max_skew_s=system.config.operators.max_skew_s,
            relay_check=RegisteredRelayCheck(system.store),
        )
    elif system.remote_escrow is not None:
        # Remote: the same paths, checked here, then passed to the standalone escrow.
        register_remote_escrow_routes(
            app,
            system.remote_escrow,
            evidence=system.evidence,
            relay_check=RegisteredRelayCheck(system.store),
            operator_keys=frozenset(system.config.operators.keys),
            wall_clock=system.wall_clock,
            max_skew_s=system.config.operators.max_skew_s,
        )
    return app
