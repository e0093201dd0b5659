"""``hypertuna escrow serve``: the escrow alone, over HTTPS with mandatory client certificates.

The :class:`~hypertuna.actors.escrow.EscrowActor` opens the service (keys loaded first: a missing
or unreadable key file stops the start with :class:`~hypertuna.escrow.keys.EscrowKeyError`), then
the routes of :mod:`hypertuna.escrow.http` in standalone mode are served by
:func:`~hypertuna.edge.tls_server.serve_tls_app` with a
:class:`~hypertuna.edge.tls.ReloadingServerContext` (``ESCROW_TLS_CERT``, ``ESCROW_TLS_KEY``,
``ESCROW_TLS_CA``; changed files apply to new connections) and every ``/api/escrow/*`` request
is also checked against the HMAC secrets of ``ESCROW_HMAC_CLIENTS``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio
from quart_trio import QuartTrio

from hypertuna.actors.escrow import EscrowActor
from hypertuna.edge.hmac_auth import HmacAuthenticator, parse_hmac_clients
from hypertuna.edge.tls import ReloadingServerContext
from hypertuna.edge.tls_server import serve_tls_app
from hypertuna.escrow.http import MAX_BODY_BYTES, register_escrow_routes
from hypertuna.escrow.keys import load_audit_key, load_escrow_key
from hypertuna.escrow.settings import EscrowSettings, EscrowSettingsError, open_service

__all__ = ["StandaloneEscrow", "serve_escrow", "standalone_app"]


def _wall_clock_s() -> int:
    return int(time.time())


def standalone_app(
    actor: EscrowActor,
    settings: EscrowSettings,
    hmac: HmacAuthenticator,
    *,
    wall_clock: Callable[[], int],
) -> QuartTrio:
    """The standalone escrow's quart-trio app (routes in standalone mode, plus ``/metrics``)."""
    app = QuartTrio("hypertuna-escrow")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    register_escrow_routes(
        app,
        actor,
        evidence=None,
        hmac=hmac,
        operator_keys=settings.operator_keys,
        wall_clock=wall_clock,
        max_skew_s=settings.max_skew_s,
    )
    return app


class StandaloneEscrow:
    """What :func:`serve_escrow` hands back once serving: the bound port and the actor."""

    def __init__(self, port: int, actor: EscrowActor) -> None:
        self.port = port
        self.actor = actor


async def _forever() -> None:
    await trio.sleep_forever()


async def serve_escrow(
    settings: EscrowSettings,
    *,
    wall_clock_s: Callable[[], int] = _wall_clock_s,
    shutdown_trigger: Callable[[], Awaitable[None]] = _forever,
    task_status: trio.TaskStatus[StandaloneEscrow] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the escrow until ``shutdown_trigger`` returns. Raises
    :class:`~hypertuna.escrow.settings.EscrowSettingsError` (missing TLS or HMAC settings),
    :class:`ValueError`/:class:`OSError` (unusable ``ESCROW_HMAC_CLIENTS``),
    :class:`~hypertuna.edge.tls.TlsContextError` and
    :class:`~hypertuna.escrow.keys.EscrowKeyError` before ``started()``."""
    # The keys first: without them nothing else matters (the actor loads them again to run).
    load_escrow_key(settings.escrow_key_path)
    load_audit_key(settings.audit_key_path)
    if settings.tls_cert is None or settings.tls_key is None or settings.tls_ca is None:
        raise EscrowSettingsError(
            "the standalone escrow needs ESCROW_TLS_CERT, ESCROW_TLS_KEY and ESCROW_TLS_CA "
            "(client certificates are mandatory)"
        )
    if settings.hmac_clients is None:
        raise EscrowSettingsError(
            "the standalone escrow needs ESCROW_HMAC_CLIENTS (client_id:hexsecret,... or @file)"
        )
    clients = parse_hmac_clients(settings.hmac_clients)
    holder = ReloadingServerContext(settings.tls_cert, settings.tls_key, settings.tls_ca)
    actor = EscrowActor(
        lambda: open_service(settings),
        wall_clock_ms=lambda: wall_clock_s() * 1000,
        expiry_interval_s=settings.expiry_interval_s,
        audit_interval_s=settings.audit_interval_s,
    )
    hmac = HmacAuthenticator(clients, wall_clock=wall_clock_s, max_skew_s=settings.max_skew_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        app = standalone_app(actor, settings, hmac, wall_clock=wall_clock_s)

        async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
            await serve_tls_app(
                app,
                settings.host,
                settings.port,
                holder,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
            # The server has drained after the shutdown trigger: stop the actor too.
            nursery.cancel_scope.cancel()

        port: int = await nursery.start(serve_then_stop)
        task_status.started(StandaloneEscrow(port, actor))
