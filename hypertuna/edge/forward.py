"""A client session of a relay that workers serve: forwarded to one of them, failing over.

Two tasks per client. The *client loop* reads what one socket read gives and sends it on as one
``client-frames`` message. The *peer loop* runs the peer sweep (each usable worker tried once,
``workers.sweep_timeout_s`` each), then pumps ``relay-frames`` back to the client, everything
already queued in one write. When the worker closes the session, its connection dies or it is
found silent, the peer loop sweeps again and, on a hit, re-sends the client's open REQs and
unanswered EVENTs to the new worker.

No duplicates after a failover: per subscription the session remembers the ids of the events
already delivered (the newest :data:`MAX_DELIVERED_IDS`) and whether EOSE went out, and drops
them when the new worker sends them again. That needs only the frame's type, subscription id
and event id, read with a regular expression and ``json``'s string scanner; frames are never
parsed whole.

A sweep without a hit hands the session to the *replica path*. When the gateway holds a mirror
of the relay's owner core, the session switches to the relay's replica
(:mod:`hypertuna.actors.replica`) on the same connection: the open REQs and unanswered EVENTs
are re-sent to it exactly as to a new worker, so the same bookkeeping drops what the client
already has. While on the replica, each new REQ also starts a sweep in the background; on a hit
the session moves back to the worker (re-sending its REQs again) and the span spent on the
replica is recorded. Without a mirror the path answers: a NOTICE that the relay has no reachable
worker, ``CLOSED`` for each subscription and ``OK false`` for each EVENT; a new REQ or EVENT
sweeps again.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable
from json import decoder as _json_decoder
from typing import Protocol, cast

import attrs
import trio

from hypertuna.actors.peer_router import PickWorkers, RelayRoute, RelayServed, WorkerHandle
from hypertuna.actors.replica import ReplicaSession, SessionGone
from hypertuna.actors.runtime import ActorGone
from hypertuna.edge.session import CLOSE_POLICY, ClientGone
from hypertuna.edge.websocket import RelayWebSocket
from hypertuna.edge.worker_link import LinkSession, WorkerLink
from hypertuna.system import System

__all__ = ["MAX_DELIVERED_IDS", "ForwardedSession"]

log = logging.getLogger(__name__)

#: Event ids remembered per subscription to drop re-sent events after a failover.
MAX_DELIVERED_IDS = 4096
#: Frames a client may send while no worker is attached that are kept to forward later.
_MAX_UNSENT = 256
_MAX_BATCH = 256

_CLIENT_HEAD = re.compile(r'\s*\[\s*"(REQ|CLOSE|EVENT|COUNT)"\s*,\s*')
_RELAY_HEAD = re.compile(r'\s*\[\s*"(EVENT|EOSE|OK|CLOSED)"\s*,\s*"')
# Only a top-level member of the event object can be written "id":"<hex>" unescaped: tags hold
# strings only, and quotes inside strings are escaped.
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EVENT_ID = re.compile(r'"id"\s*:\s*"([0-9a-f]{64})"')

#: json's C string scanner: reads one JSON string from just after its opening quote.
scanstring: Callable[[str, int], tuple[str, int]] = _json_decoder.scanstring  # type: ignore[attr-defined]

UNREACHABLE = "error: no worker of this relay is reachable right now"


class _Upstream(Protocol):
    """Who answers the client's frames: a worker session or a replica session."""

    @property
    def open(self) -> bool: ...

    @property
    def overflowed(self) -> bool: ...

    @property
    def end_reason(self) -> str: ...

    async def receive(self) -> tuple[str, ...]: ...

    def receive_nowait(self) -> tuple[str, ...]: ...

    async def send(self, frames: list[str]) -> None: ...

    async def close(self, reason: str) -> None: ...


def _client_head(text: str) -> tuple[str, str] | None:
    """(type, subscription id or event id) of a client frame, when it is one we track."""
    # Most clients write the event id first: take it without a regex.
    if text.startswith('["EVENT",{"id":"') and text[80:81] == '"':
        event_id = text[16:80]
        if _HEX64.fullmatch(event_id):
            return "EVENT", event_id
    m = _CLIENT_HEAD.match(text)
    if m is None:
        return None
    kind = m.group(1)
    if kind == "EVENT":
        found = _EVENT_ID.search(text, m.end())
        return (kind, found.group(1)) if found else None
    end = m.end()
    if text[end : end + 1] != '"':
        return None
    try:
        sub_id, _ = scanstring(text, end + 1)
    except ValueError:
        return None
    return kind, sub_id


class _Sub:
    __slots__ = ("delivered", "eose_sent", "order", "req")

    def __init__(self, req: str) -> None:
        self.req = req
        self.eose_sent = False
        self.delivered: set[str] = set()
        self.order: deque[str] = deque()

    def remember(self, event_id: str) -> None:
        self.delivered.add(event_id)
        self.order.append(event_id)
        if len(self.order) > MAX_DELIVERED_IDS:
            self.delivered.discard(self.order.popleft())


@attrs.frozen
class _Asked:
    """The subscriptions, EVENTs and untracked frames a session had when a sweep began."""

    subs: set[str]
    events: set[str]
    unsent: int


class ForwardedSession:
    """Serves one client WebSocket of a worker-served relay (see the module docstring)."""

    def __init__(self, system: System, route: RelayRoute, client: RelayWebSocket) -> None:
        self._system = system
        self._route = route
        self._client = client
        self._config = system.config.workers
        self._limits = system.config.limits
        self._metrics = system.metrics
        self._subs: dict[str, _Sub] = {}
        #: EVENTs sent on whose OK has not come back: id -> frame.
        self._pending: dict[str, str] = {}
        #: Untracked frames (COUNT, anything else) received while no worker is attached.
        self._unsent: list[str] = []
        self._peer: _Upstream | None = None
        #: A worker session found by a background sweep while on the replica.
        self._next_peer: LinkSession | None = None
        self._want_peer = trio.Event()
        self._mode = ""
        self._mode_since = trio.current_time()
        self._replica_since = self._mode_since
        self._closing = False
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        sessions = self._system.sessions
        sessions.add(self)
        self._metrics.connections_total.inc()
        self._metrics.connections_open.inc()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._peer_loop)
                try:
                    await self._client_loop()
                except ClientGone:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._set_mode("")
            self._metrics.connections_open.dec()
            sessions.remove(self)
            peer, self._peer = self._peer, None
            if peer is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await peer.close("client left")

    async def close(self, code: int, why: str) -> None:
        """Close the client (shutdown, or too slow): CLOSED for its subscriptions first."""
        if self._closing:
            return
        self._closing = True
        with trio.move_on_after(2):
            try:
                if code == CLOSE_POLICY:
                    await self._client.send(json.dumps(["NOTICE", f"error: {why}"]))
                elif self._subs:
                    await self._client.send_many(
                        [json.dumps(["CLOSED", s, f"error: {why}"]) for s in self._subs]
                    )
                await self._client.close(code, why)
            except ClientGone:
                pass
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _set_mode(self, mode: str) -> None:
        now = trio.current_time()
        if self._mode != mode:
            if self._mode == "replica":
                self._metrics.fallback_duration.observe(now - self._replica_since)
            elif mode == "replica":
                self._replica_since = now
        if self._mode:
            elapsed = now - self._mode_since
            self._metrics.served[self._mode].inc(elapsed)
            try:
                self._system.router.inbox.send_nowait(
                    RelayServed(self._route.relay_key, self._mode, elapsed)
                )
            except (trio.WouldBlock, ActorGone):
                pass  # statistics only
        self._mode = mode
        self._mode_since = now

    # -- client to worker ------------------------------------------------------------------------

    async def _client_loop(self) -> None:
        client = self._client
        while True:
            first = await client.receive()
            batch = [first, *client.receive_buffered(_MAX_BATCH)]
            texts = [t if isinstance(t, str) else t.decode("utf-8", "replace") for t in batch]
            await self._from_client(texts)

    async def _from_client(self, texts: list[str]) -> None:
        peer = self._peer
        attached = peer is not None and peer.open
        on_replica = attached and isinstance(peer, ReplicaSession)
        forward: list[str] = []
        untracked: list[str] = []
        local_answers: list[str] = []
        for text in texts:
            head = _client_head(text)
            kind, key = head if head is not None else ("", "")
            if kind == "REQ":
                if on_replica:
                    # Maybe a worker is back: new subscriptions should go to it.
                    self._want_peer.set()
                if key in self._subs or len(self._subs) < self._limits.max_subscriptions:
                    self._subs[key] = _Sub(text)
                elif not attached:
                    untracked.append(text)
                    continue
            elif kind == "CLOSE":
                self._subs.pop(key, None)
                if not attached:
                    # Nothing to close at any worker: answer here.
                    local_answers.append(json.dumps(["CLOSED", key, ""]))
                    continue
            elif kind == "EVENT":
                if len(self._pending) < self._limits.max_in_flight_events * 4:
                    self._pending[key] = text
                elif not attached:
                    untracked.append(text)
                    continue
            else:
                untracked.append(text)
                if not attached:
                    continue
            forward.append(text)
        if local_answers:
            await self._client.send_many(local_answers)
        if attached:
            assert peer is not None
            try:
                await peer.send(forward)
                self._metrics.forwarded["to_worker"].inc(len(forward))
                return
            except (ClientGone, SessionGone):
                # The worker went away under us: tracked frames are re-sent by the failover.
                pass
        room = _MAX_UNSENT - len(self._unsent)
        self._unsent.extend(untracked[:room])
        self._want_peer.set()

    # -- worker to client ------------------------------------------------------------------------

    async def _peer_loop(self) -> None:
        try:
            while not self._system.stopping.is_set():
                # Made before anything is answered: a frame arriving while the answers are
                # written then wakes the next sweep.
                self._want_peer = trio.Event()
                peer: _Upstream | None
                peer, self._next_peer = self._next_peer, None
                # What the client asked before this sweep: only that is refused if it misses.
                # Frames that arrive during the sweep wait for the next one, which may find a
                # worker that came back meanwhile.
                asked = _Asked(set(self._subs), set(self._pending), len(self._unsent))
                if peer is None:
                    peer = await self._sweep()
                if peer is None:
                    peer = await self._open_replica()
                    if peer is None:
                        await self._answer_unreachable(asked)
                        if not (self._subs or self._pending or self._unsent):
                            await self._want_peer.wait()
                        continue
                    await self._attach(peer, "replica")
                    async with trio.open_nursery() as watch:
                        watch.start_soon(self._watch_for_workers, peer)
                        await self._pump(peer)
                        watch.cancel_scope.cancel()
                else:
                    await self._attach(peer, "peer")
                    await self._pump(peer)
                self._peer = None
                await peer.close("failing over")
                if peer.overflowed:
                    await self.close(CLOSE_POLICY, "too slow to receive events")
                    return
                log.info(
                    "relay %s: worker session ended (%s), sweeping again",
                    self._route.relay_key[:16],
                    peer.end_reason,
                )
        except ClientGone:
            pass
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _sweep(self) -> LinkSession | None:
        relay_key = self._route.relay_key
        candidates: tuple[WorkerHandle, ...]
        try:
            candidates = await self._system.router.inbox.request(
                lambda r: PickWorkers(relay_key, r)
            )
        except ActorGone:
            candidates = ()
        results = self._metrics.sweep_results
        for handle in candidates:
            link = cast(WorkerLink, handle)
            outcome = await link.open_session(relay_key, self._config.sweep_timeout_s)
            if isinstance(outcome, LinkSession):
                results["hit"].inc()
                return outcome
            results[outcome].inc()
        results["none"].inc()
        return None

    async def _open_replica(self) -> ReplicaSession | None:
        """A session on the relay's replica, when the gateway mirrors its owner core."""
        try:
            session = await self._system.replicas.open(self._route.relay_key)
        except ActorGone:
            return None
        except Exception:
            log.exception("relay %s: the replica could not be opened", self._route.relay_key[:16])
            return None
        if session is not None:
            why = "worker-lost" if self._mode == "peer" else "sweep-miss"
            self._metrics.fallbacks[why].inc()
        return session

    async def _watch_for_workers(self, replica: ReplicaSession) -> None:
        """While on the replica: on each new REQ, sweep; on a hit, close the replica session
        (the pump passes on what it had queued, then ends) so the peer loop attaches the
        worker."""
        while True:
            await self._want_peer.wait()
            self._want_peer = trio.Event()
            found = await self._sweep()
            if found is not None:
                self._next_peer = found
                await replica.close("a worker is back")
                return

    async def _attach(self, peer: _Upstream, mode: str) -> None:
        # Built and attached with no checkpoint in between: whatever the client sends from now
        # on goes straight to the new worker, after these.
        frames = [sub.req for sub in self._subs.values()]
        frames += self._pending.values()
        frames += self._unsent
        self._unsent = []
        self._peer = peer
        self._set_mode(mode)
        if frames:
            try:
                await peer.send(frames)
                if mode == "peer":
                    self._metrics.forwarded["to_worker"].inc(len(frames))
            except (ClientGone, SessionGone):
                pass  # the pump sees the session end and fails over again

    async def _answer_unreachable(self, asked: _Asked) -> None:
        frames: list[str] = []
        if self._mode != "replica":
            frames.append(
                json.dumps(
                    [
                        "NOTICE",
                        f"{UNREACHABLE}: relay {self._route.name} is served by workers and none "
                        "answered; new subscriptions will try again",
                    ]
                )
            )
            self._set_mode("replica")
        closed = [sub_id for sub_id in self._subs if sub_id in asked.subs]
        frames += [json.dumps(["CLOSED", sub_id, UNREACHABLE]) for sub_id in closed]
        for sub_id in closed:
            del self._subs[sub_id]
        refused = [event_id for event_id in self._pending if event_id in asked.events]
        frames += [
            json.dumps(["OK", event_id, False, f"{UNREACHABLE}; the event was not stored"])
            for event_id in refused
        ]
        for event_id in refused:
            del self._pending[event_id]
        answered, self._unsent = self._unsent[: asked.unsent], self._unsent[asked.unsent :]
        for text in answered:
            head = _client_head(text)
            if head is None:
                continue  # covered by the NOTICE
            kind, key = head
            if kind == "EVENT":
                frames.append(json.dumps(["OK", key, False, f"{UNREACHABLE}; not stored"]))
            elif kind != "CLOSE":
                frames.append(json.dumps(["CLOSED", key, UNREACHABLE]))
        if frames:
            await self._client.send_many(frames)

    async def _pump(self, peer: _Upstream) -> None:
        client = self._client
        forwarded = self._metrics.forwarded["to_client"]
        while True:
            try:
                batch = await peer.receive()
            except trio.EndOfChannel:
                return
            out = self._filter(batch)
            while True:
                try:
                    more = peer.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                out += self._filter(more)
            if out:
                await client.send_many(out)
                forwarded.inc(len(out))

    def _filter(self, frames: tuple[str, ...]) -> list[str]:
        """The frames to pass on: re-sent events and EOSEs dropped, bookkeeping updated."""
        out: list[str] = []
        subs = self._subs
        for frame in frames:
            # Fast path for the compact form relays (ours included) write stored and live
            # events in: plain string searches instead of a regex and a JSON string scan.
            if frame.startswith('["EVENT","'):
                sub_end = frame.find('"', 10)
                id_at = frame.find('"id":"', sub_end) + 6
                if sub_end > 0 and id_at > 5 and "\\" not in frame[10:sub_end]:
                    sub = subs.get(frame[10:sub_end])
                    if sub is not None:
                        event_id = frame[id_at : id_at + 64]
                        if event_id in sub.delivered:
                            continue
                        sub.remember(event_id)
                    out.append(frame)
                    continue
            if frame.startswith('["OK","') and frame[71:72] == '"':
                self._pending.pop(frame[7:71], None)
                out.append(frame)
                continue
            m = _RELAY_HEAD.match(frame)
            if m is not None:
                try:
                    key, end = scanstring(frame, m.end())
                except ValueError:
                    out.append(frame)
                    continue
                kind = m.group(1)
                if kind == "EVENT":
                    sub = self._subs.get(key)
                    if sub is not None:
                        found = _EVENT_ID.search(frame, end)
                        if found is not None:
                            event_id = found.group(1)
                            if event_id in sub.delivered:
                                continue
                            sub.remember(event_id)
                elif kind == "EOSE":
                    sub = self._subs.get(key)
                    if sub is not None:
                        if sub.eose_sent:
                            continue
                        sub.eose_sent = True
                elif kind == "OK":
                    self._pending.pop(key, None)
                else:  # CLOSED: the worker ended the subscription (or refused the COUNT)
                    self._subs.pop(key, None)
            out.append(frame)
        return out
