"""PeerRouter: which workers are connected, which relays they serve, and whether they are alive.

The one owner of that state. Worker connections (the edge's ``/gateway/worker`` handler) tell it
when a worker has authenticated, when a heartbeat arrived and when the connection ended, and
hand it the relay statements to check and record. Client sessions ask it which relay an
identifier names and which workers to try, in order, for the peer sweep.

Health: a worker is healthy while it was heard (handshake or heartbeat) within
``liveness_timeout_s``. A periodic tick finds silent workers and aborts their connections, which
ends every forwarded session they carry so that those sessions fail over. Time comes from trio.

Registrations are durable (see :mod:`hypertuna.storage.registrations`); the router loads them at
start, so a worker that reconnects serves its registered relays again at once.
"""

from __future__ import annotations

import logging
from typing import Protocol

import attrs
import trio

from hypertuna.actors.runtime import ActorStatistics, Inbox, Reply
from hypertuna.protocol.worker import ErrorCode, RelayRegister, verify_statement
from hypertuna.storage.events import EventStore
from hypertuna.storage.registrations import Registration, RegistrationOutcome, WorkerRelay

__all__ = [
    "PeerRouter",
    "PeerRouterStatistics",
    "PickWorkers",
    "RegisterRelay",
    "RegisterVerdict",
    "RelayLiveness",
    "RelayRoute",
    "RelayServed",
    "RelayStatistics",
    "RouteRelay",
    "WorkerConnected",
    "WorkerDisconnected",
    "WorkerHandle",
    "WorkerHeard",
]

log = logging.getLogger(__name__)

#: Modes of serving a relay's clients, the label values of ``gateway_relay_served_seconds``.
SERVED_MODES = ("peer", "local", "replica")


class WorkerHandle(Protocol):
    """What the router needs of a worker connection."""

    @property
    def link_id(self) -> int: ...

    @property
    def worker_key(self) -> str: ...

    def abort(self, reason: str) -> None:
        """End the connection (and every session on it) soon; must not block."""

    def end_relay(self, relay_key: str, reason: str) -> None:
        """End the connection's sessions of one relay (the worker no longer serves it)."""


@attrs.frozen
class RelayRoute:
    """A relay served by workers, as a client identifier (key or name) resolves."""

    relay_key: str
    name: str
    description: str


@attrs.frozen
class RegisterVerdict:
    """``code`` None when the statement was accepted, else the error to answer."""

    code: ErrorCode | None
    message: str = ""


@attrs.frozen
class WorkerConnected:
    """An authenticated worker connection; the router starts counting its liveness now."""

    handle: WorkerHandle
    reply: Reply[None]


@attrs.frozen
class WorkerDisconnected:
    link_id: int


@attrs.frozen
class WorkerHeard:
    link_id: int


@attrs.frozen
class RegisterRelay:
    link_id: int
    worker_key: str
    message: RelayRegister
    now: int
    reply: Reply[RegisterVerdict]


@attrs.frozen
class RouteRelay:
    key_or_name: str
    reply: Reply[RelayRoute | None]


@attrs.frozen
class PickWorkers:
    """The healthy connections serving ``relay_key``, in the order the sweep should try them."""

    relay_key: str
    reply: Reply[tuple[WorkerHandle, ...]]


@attrs.frozen
class RelayServed:
    """A client session of ``relay_key`` spent ``seconds`` in ``mode`` (statistics only)."""

    relay_key: str
    mode: str = attrs.field(validator=attrs.validators.in_(SERVED_MODES))
    seconds: float


@attrs.frozen
class _Tick:
    pass


RouterMessage = (
    WorkerConnected
    | WorkerDisconnected
    | WorkerHeard
    | RegisterRelay
    | RouteRelay
    | PickWorkers
    | RelayServed
    | _Tick
)


@attrs.frozen
class RelayStatistics:
    relay_key: str
    name: str
    workers_registered: int
    workers_usable: int
    peer_seconds: float
    replica_seconds: float


@attrs.frozen
class RelayLiveness:
    """What the router knows of a relay's workers (for the escrow's unlock evidence)."""

    #: The relay has at least one active worker registration.
    registered: bool
    #: Healthy connected workers that serve it now.
    usable: int
    #: Trio time when a worker of the relay was last heard: now while one is usable; else the
    #: last heartbeat of the last one that went away, but never before the router started
    #: (what happened before is unknown, so the timeout counts from the start).
    last_seen: float


@attrs.frozen
class PeerRouterStatistics:
    """A snapshot of the router: totals for metrics, per-relay detail for operators."""

    actor: ActorStatistics
    workers_connected: int
    workers_healthy: int
    relays_served: int
    """Relays with at least one healthy connected worker."""
    relays: tuple[RelayStatistics, ...]


@attrs.define(eq=False)
class _Worker:
    handle: WorkerHandle
    last_heard: float
    healthy: bool = True


class PeerRouter:
    """Actor owning workers, their relays and their health."""

    def __init__(
        self,
        store: EventStore,
        *,
        gateway_id: str,
        liveness_timeout_s: float,
        tick_s: float | None = None,
        inbox_capacity: int = 4096,
    ) -> None:
        self.inbox: Inbox[RouterMessage] = Inbox("peer-router", inbox_capacity)
        self._store = store
        self._gateway_id = gateway_id
        self._liveness = liveness_timeout_s
        # Ticks often enough that a silent worker is found soon after its timeout passes.
        self._tick_s = tick_s if tick_s is not None else liveness_timeout_s / 5
        self._workers: dict[int, _Worker] = {}
        self._relays: dict[str, WorkerRelay] = {}
        self._names: dict[str, str] = {}
        self._rotation: dict[str, int] = {}
        self._served: dict[tuple[str, str], float] = {}
        self._dead = 0
        self._registrations = 0
        #: Relay key -> trio time a worker of it was last heard, recorded as workers go away.
        self._relay_seen: dict[str, float] = {}
        self._started_at: float | None = None

    def statistics(self) -> PeerRouterStatistics:
        usable_by_relay = {key: len(self._usable(key)) for key in self._relays}
        relays = tuple(
            RelayStatistics(
                relay_key=key,
                name=relay.name,
                workers_registered=len(relay.workers),
                workers_usable=usable_by_relay[key],
                peer_seconds=self._served.get((key, "peer"), 0.0),
                replica_seconds=self._served.get((key, "replica"), 0.0),
            )
            for key, relay in sorted(self._relays.items())
        )
        return PeerRouterStatistics(
            actor=self.inbox.statistics(
                workers=len(self._workers),
                relays=len(self._relays),
                dead_workers=self._dead,
                registrations=self._registrations,
            ),
            workers_connected=len(self._workers),
            workers_healthy=sum(1 for w in self._workers.values() if w.healthy),
            relays_served=sum(1 for n in usable_by_relay.values() if n),
            relays=relays,
        )

    def liveness(self, relay_key: str) -> RelayLiveness:
        """The liveness of ``relay_key``'s workers (like :meth:`statistics`, safe to call from
        any task of the same trio run)."""
        now = trio.current_time()
        relay = self._relays.get(relay_key)
        usable = len(self._usable(relay_key))
        if usable:
            seen = now
        else:
            start = self._started_at if self._started_at is not None else now
            seen = max(self._relay_seen.get(relay_key, start), start)
        return RelayLiveness(
            registered=relay is not None and bool(relay.workers), usable=usable, last_seen=seen
        )

    def _gone(self, worker: _Worker) -> None:
        """Remember when the relays of a worker that goes away last heard of it."""
        key = worker.handle.worker_key
        for relay_key, relay in self._relays.items():
            if key in relay.workers:
                seen = self._relay_seen.get(relay_key)
                if seen is None or worker.last_heard > seen:
                    self._relay_seen[relay_key] = worker.last_heard

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started_at = trio.current_time()
        for relay in await self._store.worker_relays():
            self._remember(relay)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            task_status.started()
            try:
                while True:
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        return
                    await self._handle(message)
            finally:
                nursery.cancel_scope.cancel()
                for pending in self.inbox.drain():
                    reply = getattr(pending, "reply", None)
                    if reply is not None:
                        reply.fail_if_pending(RuntimeError("peer router stopped"))

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self._tick_s)
            try:
                self.inbox.send_nowait(_Tick())
            except trio.WouldBlock:
                pass  # a full inbox will get to the next tick
            except Exception:
                return

    def _remember(self, relay: WorkerRelay) -> None:
        old = self._relays.get(relay.relay_key)
        if old is not None and self._names.get(old.name) == relay.relay_key:
            del self._names[old.name]
        self._relays[relay.relay_key] = relay
        self._names[relay.name] = relay.relay_key

    def _usable(self, relay_key: str) -> list[WorkerHandle]:
        relay = self._relays.get(relay_key)
        if relay is None or not relay.workers:
            return []
        return [
            w.handle
            for w in self._workers.values()
            if w.healthy and w.handle.worker_key in relay.workers
        ]

    async def _handle(self, message: RouterMessage) -> None:
        match message:
            case WorkerHeard(link_id=link_id):
                worker = self._workers.get(link_id)
                if worker is not None:
                    worker.last_heard = trio.current_time()
            case PickWorkers(relay_key=relay_key, reply=reply):
                usable = self._usable(relay_key)
                # Rotate the starting worker so sessions spread over the relay's workers.
                if len(usable) > 1:
                    start = self._rotation.get(relay_key, 0) % len(usable)
                    self._rotation[relay_key] = start + 1
                    usable = usable[start:] + usable[:start]
                reply.send(tuple(usable))
            case RouteRelay(key_or_name=ident, reply=reply):
                key = ident if ident in self._relays else self._names.get(ident)
                relay = self._relays.get(key) if key is not None else None
                if relay is None or not relay.workers:
                    reply.send(None)
                else:
                    reply.send(RelayRoute(relay.relay_key, relay.name, relay.description))
            case WorkerConnected(handle=handle, reply=reply):
                for other in list(self._workers.values()):
                    if other.handle.worker_key == handle.worker_key:
                        # A reconnecting worker: its old connection is stale.
                        other.handle.abort("replaced by a newer connection of the same worker")
                        self._gone(other)
                        del self._workers[other.handle.link_id]
                self._workers[handle.link_id] = _Worker(handle, trio.current_time())
                reply.send(None)
            case WorkerDisconnected(link_id=link_id):
                gone = self._workers.pop(link_id, None)
                if gone is not None:
                    self._gone(gone)
            case RegisterRelay(reply=reply):
                try:
                    reply.send(await self._register(message))
                except Exception as exc:
                    reply.fail_if_pending(exc)
            case RelayServed(relay_key=key, mode=mode, seconds=seconds):
                if key in self._relays:
                    self._served[(key, mode)] = self._served.get((key, mode), 0.0) + seconds
            case _Tick():
                self._check_liveness()

    def _check_liveness(self) -> None:
        deadline = trio.current_time() - self._liveness
        for link_id, worker in list(self._workers.items()):
            if worker.last_heard < deadline:
                self._dead += 1
                log.warning(
                    "worker %s silent for %.1f s: treating it as gone",
                    worker.handle.worker_key[:16],
                    trio.current_time() - worker.last_heard,
                )
                worker.healthy = False
                self._gone(worker)
                del self._workers[link_id]
                worker.handle.abort(f"no heartbeat for {self._liveness:g} s")

    async def _register(self, message: RegisterRelay) -> RegisterVerdict:
        statement = message.message.statement
        if statement.gateway_id != self._gateway_id:
            return RegisterVerdict(ErrorCode.UNAUTHORIZED, "statement names another gateway")
        if statement.worker_key != message.worker_key:
            return RegisterVerdict(
                ErrorCode.UNAUTHORIZED, "statement names another worker than this connection's"
            )
        if not verify_statement(statement, message.message.sig):
            return RegisterVerdict(
                ErrorCode.UNAUTHORIZED,
                "not signed by the owner key, or the relay key is not the owner's core key",
            )
        outcome, relay = await self._store.apply_registration(
            Registration(
                action=statement.action.value,
                relay_key=statement.relay_key,
                owner_key=statement.owner_key,
                worker_key=statement.worker_key,
                seq=statement.seq,
                name=statement.name,
                description=statement.description,
            ),
            now=message.now,
        )
        match outcome:
            case RegistrationOutcome.ACCEPTED:
                assert relay is not None
                self._registrations += 1
                self._remember(relay)
                if statement.action.value == "remove":
                    for worker in self._workers.values():
                        if worker.handle.worker_key == statement.worker_key:
                            worker.handle.end_relay(statement.relay_key, "relay removed")
                return RegisterVerdict(None)
            case RegistrationOutcome.REPLAYED:
                return RegisterVerdict(
                    ErrorCode.REPLAYED, "seq is not above the last accepted one for this worker"
                )
            case RegistrationOutcome.HOSTED:
                return RegisterVerdict(
                    ErrorCode.CONFLICT, "the gateway hosts a relay with this key or name itself"
                )
            case RegistrationOutcome.NAME_TAKEN:
                return RegisterVerdict(ErrorCode.CONFLICT, "another relay uses this name")
            case RegistrationOutcome.OTHER_OWNER:
                return RegisterVerdict(ErrorCode.UNAUTHORIZED, "the relay has another owner key")
            case RegistrationOutcome.NOT_FOUND:
                return RegisterVerdict(
                    ErrorCode.NOT_FOUND, "this worker has no registration of the relay"
                )
