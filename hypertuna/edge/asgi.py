"""The edge's ASGI app: relay WebSockets that reach hypercorn (an upgrade after a keep-alive HTTP
request; first-request upgrades take the fast path of :mod:`hypertuna.edge.server`) go straight
to a :class:`RelaySession`, every other scope (HTTP routes, lifespan) to the quart-trio app.

Why not quart's ``@app.websocket``: quart wraps each WebSocket in a request context, a nursery,
two tasks and a message channel, about 21 KB per connection measured on top of hypercorn's own
22 KB. A public relay holds tens of thousands of mostly idle subscribed connections, so its
sockets are served at the ASGI level with one task each (plus one while live events flow).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from hypertuna.edge.session import ClientGone, RelaySession
from hypertuna.system import System

__all__ = ["AsgiPort", "EdgeApp"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

RELAY_PREFIX = "/relay/"


class AsgiPort:
    """A session's transport over the raw ASGI WebSocket callables."""

    __slots__ = ("_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send

    async def receive(self) -> str | bytes:
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        raise ClientGone()

    async def send(self, data: str) -> None:
        try:
            await self._send({"type": "websocket.send", "text": data})
        except Exception as exc:
            # hypercorn refuses sends once the client has gone; that ends the session.
            raise ClientGone() from exc

    async def send_many(self, texts: Iterable[str]) -> None:
        for text in texts:
            await self.send(text)

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception as exc:
            raise ClientGone() from exc


class EdgeApp:
    """ASGI app: relay WebSockets here, everything else to ``http_app`` (quart-trio)."""

    def __init__(self, system: System, http_app: Any) -> None:
        self._system = system
        self._http_app = http_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self._http_app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        ident = path[len(RELAY_PREFIX) :] if path.startswith(RELAY_PREFIX) else ""
        if (await receive())["type"] != "websocket.connect":
            return
        if not ident or "/" in ident:
            await _reject(scope, send, 404, f"no WebSocket endpoint at {path}")
            return
        relay = await self._system.lookup_relay(ident)
        if relay is None:
            await _reject(scope, send, 404, f"no relay {ident!r} is hosted here")
            return
        if self._system.stopping.is_set():
            await _reject(scope, send, 503, "gateway is shutting down")
            return
        await send({"type": "websocket.accept"})
        await RelaySession(self._system, relay, AsgiPort(receive, send)).run()


async def _reject(scope: Scope, send: Send, status: int, reason: str) -> None:
    """Refuse the upgrade with an HTTP status and a JSON reason (ASGI websocket.http.response),
    or a plain close where the server lacks that extension."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        return
    body = json.dumps({"error": reason}, ensure_ascii=False).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
