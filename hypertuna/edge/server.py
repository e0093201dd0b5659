"""Serving the edge app with hypercorn's trio worker."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from hypertuna.config import Config

__all__ = ["hypercorn_config", "serve_edge"]


def hypercorn_config(config: Config) -> HypercornConfig:
    """Hypercorn settings derived from the gateway config.

    ``websocket_max_message_size`` is the frame limit: a larger message closes the connection
    with 1009. Trio's SocketStream turns TCP_NODELAY on for every accepted socket, so small
    frames (OK, EOSE) leave without Nagle delays.
    """
    hc = HypercornConfig()
    host = config.server.host
    hc.bind = [f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"]
    hc.websocket_max_message_size = config.limits.max_frame_bytes
    hc.h11_max_incomplete_size = 64 * 1024
    hc.graceful_timeout = config.server.graceful_timeout_s
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_timeout = 30
    hc.backlog = 1024
    return hc


async def serve_edge(
    app: Any,
    config: Config,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; ``started()`` hands back the bound
    ``http://host:port`` URLs (the real port when configured with port 0)."""
    await serve(
        app, hypercorn_config(config), shutdown_trigger=shutdown_trigger, task_status=task_status
    )
