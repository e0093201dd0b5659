"""The EscrowActor: the escrow service inside the gateway (or the standalone escrow server).

It owns the :class:`~hypertuna.escrow.service.EscrowService` (opened in :meth:`EscrowActor.run`,
or handed in already open), the :class:`~hypertuna.escrow.bus.RevocationBus`, a log of lease
endings for followers over HTTP, and two housekeeping loops: lease expiry (every
``expiry_interval_s``) and audit-chain verification (every ``audit_interval_s``, which sets
``escrow_audit_chain_valid``).

Requests arrive through a bounded :class:`~hypertuna.actors.runtime.Inbox`; the actor's task takes
each one and runs it in a child task of its own nursery, at most ``max_concurrent`` at a time, so
requests are not queued behind each other (the database serializes the writes that must be).
Every request ends with exactly one answer: the service's outcome value, or the exception — a
:class:`ValueError` for a request the service refuses to build, an
:class:`~hypertuna.escrow.store.EscrowStorageError` for a database failure (the actor keeps
running; the edge answers 503). Any other exception is a bug and stops the actor.

Whatever ends a lease — a revocation, a rotation superseding its deposit, its expiry, a release —
is published at once on :attr:`EscrowActor.bus` as a
:class:`~hypertuna.escrow.service.Revocation` (``lease_ids`` name the ended leases; its
``already_revoked`` is False) and appended to the lease-event log read by
:meth:`EscrowActor.wait_lease_events` (``GET /api/escrow/leases/events``).

It satisfies :class:`~hypertuna.escrow_client.port.EscrowPort`, like the gateway's client of a
standalone escrow (:class:`~hypertuna.escrow_client.remote.RemoteEscrow`).

Time: trio's clock for intervals and durations; wall-clock Unix milliseconds from the injected
``wall_clock_ms`` only.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, TypeAlias, TypeVar

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hypertuna.actors.runtime import ActorGone, ActorStatistics, ConcurrentServer, Inbox, Reply
from hypertuna.escrow import store
from hypertuna.escrow.audit import Checkpoint, VerifyResult
from hypertuna.escrow.bus import RevocationBus
from hypertuna.escrow.policy import Evidence, Reason, policy_document
from hypertuna.escrow.service import (
    Actor,
    DepositReceipt,
    DepositRefused,
    DepositRequest,
    EscrowHealth,
    EscrowService,
    EscrowStatistics,
    LeaseGrant,
    ReleaseOutcome,
    Revocation,
    RevokeRefused,
    UnlockRejected,
    UnlockRequest,
)
from hypertuna.escrow.store import EscrowStorageError, LeaseRecord, Runner

__all__ = [
    "DB_OPERATIONS",
    "LEASE_EVENT_KINDS",
    "UNLOCK_RESULTS",
    "EscrowActor",
    "EscrowActorStatistics",
    "EscrowMetrics",
    "LeaseEvent",
    "LeaseEventKind",
    "LeaseEvents",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``escrow_unlock_total{result}``.
UNLOCK_RESULTS: Final = ("issued", "rejected", "error")
#: ``escrow_db_latency_seconds{operation}`` and ``escrow_db_errors_total{operation}``.
DB_OPERATIONS: Final = ("read", "write")
#: How many lease events are kept for followers (older ones make a follower resynchronise).
DEFAULT_EVENT_LOG = 1024


class LeaseEventKind(enum.Enum):
    """Why leases ended (the ``kind`` of a lease event)."""

    REVOKED = "revoked"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"
    RELEASED = "released"


LEASE_EVENT_KINDS: Final = tuple(kind.value for kind in LeaseEventKind)


@attrs.frozen
class LeaseEvent:
    """One entry of the lease-event log: leases of ``relay_key`` that ended (possibly none, for
    a revocation of a deposit that had no lease), numbered from 1 per process (``epoch``)."""

    seq: int
    kind: LeaseEventKind
    relay_key: str
    deposit_ids: tuple[str, ...]
    lease_ids: tuple[str, ...]
    at_ms: int

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "kind": self.kind.value,
            "relayKey": self.relay_key,
            "depositIds": list(self.deposit_ids),
            "leaseIds": list(self.lease_ids),
            "at": self.at_ms,
        }


@attrs.frozen
class LeaseEvents:
    """What :meth:`EscrowActor.wait_lease_events` found. ``epoch`` changes when the escrow
    restarts (sequence numbers start again); ``reset`` is True when events after ``since`` were
    already dropped from the log or ``since`` is from another epoch — either way the follower
    must resynchronise (list the leases) before following again from ``last_seq``."""

    epoch: str
    events: tuple[LeaseEvent, ...]
    last_seq: int
    reset: bool

    def to_json(self) -> dict[str, object]:
        return {
            "epoch": self.epoch,
            "events": [event.to_json() for event in self.events],
            "lastSeq": self.last_seq,
            "reset": self.reset,
        }


# --- metrics ---------------------------------------------------------------------------------


class EscrowMetrics:
    """The ``escrow_*`` Prometheus metrics in their own :attr:`registry`.

    The standalone server exposes :attr:`registry` at ``/metrics``. The gateway adds them to its
    own ``/metrics`` by registering this object as a collector in its registry
    (``gateway_metrics.registry.register(escrow_metrics)``), which yields every metric of
    :attr:`registry`. Label values come from closed sets only (:data:`UNLOCK_RESULTS`,
    :class:`~hypertuna.escrow.policy.Reason` codes, :data:`DB_OPERATIONS`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.unlocks = Counter(
            "escrow_unlock", "Unlock requests judged, by result", ["result"], registry=r
        )
        self.rejections = Counter(
            "escrow_policy_rejections",
            "Failing policy rules of rejected unlocks, by reason",
            ["reason"],
            registry=r,
        )
        self.active_leases = Gauge("escrow_active_leases", "Leases active now", registry=r)
        self.unlock_duration = Histogram(
            "escrow_unlock_duration_seconds",
            "Time to judge an unlock and issue its lease",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.audit_chain_valid = Gauge(
            "escrow_audit_chain_valid",
            "1 while the last audit-chain verification passed (0 before the first)",
            registry=r,
        )
        self.db_latency = Histogram(
            "escrow_db_latency_seconds",
            "Escrow database transactions, by operation",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.db_errors = Counter(
            "escrow_db_errors",
            "Escrow database transactions that failed, by operation",
            ["operation"],
            registry=r,
        )
        self.lease_events = Counter(
            "escrow_lease_events",
            "Lease endings published (revocation bus and lease-event log), by kind",
            ["kind"],
            registry=r,
        )
        for result in UNLOCK_RESULTS:
            self.unlocks.labels(result)
        for reason in Reason:
            self.rejections.labels(reason.value)
        for operation in DB_OPERATIONS:
            self.db_latency.labels(operation)
            self.db_errors.labels(operation)
        for kind in LEASE_EVENT_KINDS:
            self.lease_events.labels(kind)

    def collect(self) -> Iterator[Any]:
        """Every metric of :attr:`registry` (so that this object is a collector the gateway's
        registry can hold)."""
        yield from self.registry.collect()

    def describe(self) -> list[Any]:
        return []


class _TimedDatabase:
    """An :class:`~hypertuna.escrow.store.EscrowDatabase` that times every transaction and
    counts the failed ones."""

    def __init__(self, inner: store.EscrowDatabase, metrics: EscrowMetrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self.backend = inner.backend
        self.applied_migrations = inner.applied_migrations

    async def _timed(self, operation: str, call: Callable[[], Any]) -> Any:
        started = trio.current_time()
        try:
            return await call()
        except EscrowStorageError:
            self._metrics.db_errors.labels(operation).inc()
            raise
        finally:
            self._metrics.db_latency.labels(operation).observe(trio.current_time() - started)

    async def write(self, work: Callable[[Runner], T]) -> T:
        result: T = await self._timed("write", lambda: self._inner.write(work))
        return result

    async def read(self, work: Callable[[Runner], T]) -> T:
        result: T = await self._timed("read", lambda: self._inner.read(work))
        return result

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- messages --------------------------------------------------------------------------------


@attrs.frozen
class _Deposit:
    request: DepositRequest
    reply: Reply[DepositReceipt | DepositRefused]


@attrs.frozen
class _Unlock:
    request: UnlockRequest
    evidence: Evidence
    reply: Reply[LeaseGrant | UnlockRejected]


@attrs.frozen
class _Revoke:
    actor: Actor
    relay_key: str | None
    deposit_id: str | None
    reply: Reply[Revocation | RevokeRefused]


@attrs.frozen
class _Release:
    lease_id: str
    reason: str
    actor: Actor
    reply: Reply[ReleaseOutcome | None]


@attrs.frozen
class _Leases:
    relay_key: str | None
    active_only: bool
    limit: int
    reply: Reply[list[LeaseRecord]]


@attrs.frozen
class _Health:
    reply: Reply[EscrowHealth]


@attrs.frozen
class _VerifyAudit:
    reply: Reply[VerifyResult]


@attrs.frozen
class _Checkpoint:
    reply: Reply[Checkpoint | None]


@attrs.frozen
class _ExpireLeases:
    reply: Reply[list[LeaseRecord]]


EscrowMessage: TypeAlias = (
    _Deposit
    | _Unlock
    | _Revoke
    | _Release
    | _Leases
    | _Health
    | _VerifyAudit
    | _Checkpoint
    | _ExpireLeases
)


@attrs.frozen
class EscrowActorStatistics:
    """The actor's inbox and work, the service's counters, and the bus."""

    actor: ActorStatistics
    service: EscrowStatistics
    running: int
    active_leases: int
    lease_events: int
    bus_subscribers: int


# --- the actor -------------------------------------------------------------------------------

OpenService: TypeAlias = Callable[[], AbstractAsyncContextManager[EscrowService]]


class EscrowActor:
    """See the module docstring.

    ``service`` is either an open :class:`EscrowService` (its owner closes it) or a callable
    returning an async context manager that opens one — with its keys loaded, so a missing key
    fails :meth:`run` before ``started()`` (e.g. :func:`hypertuna.escrow.settings.open_service`).
    """

    def __init__(
        self,
        service: EscrowService | OpenService,
        *,
        wall_clock_ms: Callable[[], int],
        metrics: EscrowMetrics | None = None,
        bus: RevocationBus | None = None,
        expiry_interval_s: float = 5.0,
        audit_interval_s: float = 300.0,
        max_concurrent: int = 64,
        inbox_capacity: int = 256,
        event_log_size: int = DEFAULT_EVENT_LOG,
    ) -> None:
        if expiry_interval_s <= 0 or audit_interval_s <= 0:
            raise ValueError("intervals must be positive")
        if max_concurrent <= 0 or event_log_size <= 0:
            raise ValueError("max_concurrent and event_log_size must be positive")
        self.inbox: Inbox[EscrowMessage] = Inbox("escrow", inbox_capacity)
        self.metrics = metrics if metrics is not None else EscrowMetrics()
        self._source = service
        self._service: EscrowService | None = None
        self._wall_clock_ms = wall_clock_ms
        self._bus = bus if bus is not None else RevocationBus()
        self._expiry_interval_s = expiry_interval_s
        self._audit_interval_s = audit_interval_s
        self._server = ConcurrentServer(
            self.inbox,
            self._dispatch,
            max_concurrent=max_concurrent,
            expected=(ValueError, EscrowStorageError),
        )
        self._active_leases = 0
        self._earliest_expiry_ms: int | None = None
        self._epoch = secrets.token_hex(8)
        self._events: deque[LeaseEvent] = deque(maxlen=event_log_size)
        self._event_seq = 0
        self._events_changed = trio.Event()

    # -- properties and synchronous reads -----------------------------------------------------

    @property
    def bus(self) -> RevocationBus:
        """Where every lease ending is published at once (see the module docstring)."""
        return self._bus

    @property
    def service(self) -> EscrowService:
        """The running service (only between ``started()`` and the end of :meth:`run`)."""
        if self._service is None:
            raise ActorGone("the escrow is not running")
        return self._service

    @property
    def epoch(self) -> str:
        """Identifies this run's lease-event numbering."""
        return self._epoch

    def policy_document(self) -> dict[str, object]:
        """The body of ``GET /api/escrow/policy`` (policy, public key, fingerprint)."""
        service = self.service
        return policy_document(service.policy, service.escrow_key.public_key)

    def statistics(self) -> EscrowActorStatistics:
        service = self._service
        stats = (
            service.statistics()
            if service is not None
            else EscrowStatistics(0, 0, 0, {}, 0, 0, None)
        )
        return EscrowActorStatistics(
            actor=self.inbox.statistics(running=self._server.running),
            service=stats,
            running=self._server.running,
            active_leases=self._active_leases,
            lease_events=self._event_seq,
            bus_subscribers=self._bus.statistics().subscribers,
        )

    # -- requests -------------------------------------------------------------------------------

    async def deposit(self, request: DepositRequest) -> DepositReceipt | DepositRefused:
        return await self.inbox.request(lambda reply: _Deposit(request, reply))

    async def unlock(
        self, request: UnlockRequest, evidence: Evidence
    ) -> LeaseGrant | UnlockRejected:
        return await self.inbox.request(lambda reply: _Unlock(request, evidence, reply))

    async def revoke(
        self, *, actor: Actor, relay_key: str | None = None, deposit_id: str | None = None
    ) -> Revocation | RevokeRefused:
        return await self.inbox.request(lambda reply: _Revoke(actor, relay_key, deposit_id, reply))

    async def release(self, lease_id: str, *, reason: str, actor: Actor) -> ReleaseOutcome | None:
        return await self.inbox.request(lambda reply: _Release(lease_id, reason, actor, reply))

    async def leases(
        self, *, relay_key: str | None = None, active_only: bool = False, limit: int = 100
    ) -> list[LeaseRecord]:
        return await self.inbox.request(lambda reply: _Leases(relay_key, active_only, limit, reply))

    async def health(self) -> EscrowHealth:
        """Database counts and the audit status; raises
        :class:`~hypertuna.escrow.store.EscrowStorageError` when the database is unreachable."""
        return await self.inbox.request(_Health)

    async def verify_audit(self) -> VerifyResult:
        """Verify the audit chain now (sets ``escrow_audit_chain_valid``)."""
        return await self.inbox.request(_VerifyAudit)

    async def checkpoint(self) -> Checkpoint | None:
        """Sign an audit checkpoint now (None when the last entry already has one)."""
        return await self.inbox.request(_Checkpoint)

    async def expire_leases(self) -> list[LeaseRecord]:
        """Expire the leases that are due now, without waiting for the next expiry tick."""
        return await self.inbox.request(_ExpireLeases)

    async def wait_lease_events(
        self, since: int, *, timeout_s: float, epoch: str | None = None
    ) -> LeaseEvents:
        """The lease events after ``since``, waiting up to ``timeout_s`` for one when there is
        none yet (a long poll). ``since=0`` means from the start of this epoch; a follower that
        names another ``epoch`` (the escrow restarted) is answered at once with ``reset``."""
        if epoch is None or epoch == self._epoch:
            with trio.move_on_after(timeout_s):
                while since == self._event_seq:
                    await self._events_changed.wait()
        return self.lease_events_since(since, epoch=epoch)

    def lease_events_since(self, since: int, *, epoch: str | None = None) -> LeaseEvents:
        """The lease events after ``since`` (no waiting)."""
        if epoch is not None and epoch != self._epoch:
            events = tuple(self._events)
            reset = True
        else:
            first = self._events[0].seq if self._events else self._event_seq + 1
            reset = since > self._event_seq or since < first - 1
            events = tuple(event for event in self._events if event.seq > since)
        return LeaseEvents(epoch=self._epoch, events=events, last_seq=self._event_seq, reset=reset)

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the service (when given an opener), then serve until cancelled; ``started()``
        once the service, its keys and its database are ready."""
        try:
            async with self._open() as service:
                service.db = _TimedDatabase(service.db, self.metrics)
                self._service = service
                await self._resync_active_leases()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._expire_periodically)
                    nursery.start_soon(self._verify_periodically)
                    task_status.started()
                    await self._server.serve(nursery)
                    nursery.cancel_scope.cancel()
        finally:
            # Whether it stopped or never started, nobody may wait on it any more.
            self.inbox.close()
            for pending in self.inbox.drain():
                pending.reply.fail_if_pending(ActorGone("the escrow stopped"))
            self._service = None

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[EscrowService]:
        if isinstance(self._source, EscrowService):
            yield self._source
        else:
            async with self._source() as service:
                yield service

    async def _dispatch(self, message: EscrowMessage) -> object:
        service = self.service
        match message:
            case _Deposit(request=request):
                receipt = await service.deposit(request, now_ms=self._wall_clock_ms())
                if (
                    isinstance(receipt, DepositReceipt)
                    and not receipt.replayed
                    and receipt.superseded_deposit_id is not None
                ):
                    self._publish(
                        LeaseEventKind.SUPERSEDED,
                        receipt.relay_key,
                        (receipt.superseded_deposit_id,),
                        receipt.ended_lease_ids,
                        receipt.deposited_at_ms,
                    )
                return receipt
            case _Unlock(request=request, evidence=evidence):
                return await self._unlock(service, request, evidence)
            case _Revoke(actor=actor, relay_key=relay_key, deposit_id=deposit_id):
                outcome = await service.revoke(
                    actor=actor,
                    now_ms=self._wall_clock_ms(),
                    relay_key=relay_key,
                    deposit_id=deposit_id,
                )
                if isinstance(outcome, Revocation) and not outcome.already_revoked:
                    self._publish(
                        LeaseEventKind.REVOKED,
                        outcome.relay_key,
                        outcome.deposit_ids,
                        outcome.lease_ids,
                        outcome.at_ms,
                        revocation=outcome,
                    )
                return outcome
            case _Release(lease_id=lease_id, reason=reason, actor=actor):
                now = self._wall_clock_ms()
                released = await service.release(lease_id, reason=reason, actor=actor, now_ms=now)
                if released is not None and released.released:
                    lease = released.lease
                    self._publish(
                        LeaseEventKind.RELEASED,
                        lease.relay_key,
                        (lease.deposit_id,),
                        (lease.lease_id,),
                        now,
                    )
                return released
            case _Leases(relay_key=relay_key, active_only=active_only, limit=limit):
                return await service.leases(
                    relay_key=relay_key, active_only=active_only, limit=limit
                )
            case _Health():
                health = await service.health()
                self._set_active_leases(health.leases_active)
                return health
            case _VerifyAudit():
                return await self._verify(service)
            case _Checkpoint():
                return await service.checkpoint(now_ms=self._wall_clock_ms())
            case _ExpireLeases():
                return await self._expire(service)
        raise AssertionError(f"unhandled escrow message {type(message).__name__}")

    async def _unlock(
        self, service: EscrowService, request: UnlockRequest, evidence: Evidence
    ) -> LeaseGrant | UnlockRejected:
        started = trio.current_time()
        try:
            now = self._wall_clock_ms()
            if self._earliest_expiry_ms is not None and now >= self._earliest_expiry_ms:
                # The unlock would expire them silently; expire them here so they are published.
                await self._expire(service)
            outcome = await service.unlock(request, evidence, now_ms=now)
        except BaseException:
            self.metrics.unlocks.labels("error").inc()
            raise
        finally:
            self.metrics.unlock_duration.observe(trio.current_time() - started)
        if isinstance(outcome, UnlockRejected):
            self.metrics.unlocks.labels("rejected").inc()
            for reason in outcome.reasons:
                self.metrics.rejections.labels(reason.value).inc()
        else:
            self.metrics.unlocks.labels("issued").inc()
            self._set_active_leases(self._active_leases + 1)
            expires = outcome.lease.expires_at_ms
            if self._earliest_expiry_ms is None or expires < self._earliest_expiry_ms:
                self._earliest_expiry_ms = expires
        return outcome

    async def _expire(self, service: EscrowService) -> list[LeaseRecord]:
        expired = await service.expire_leases(now_ms=self._wall_clock_ms())
        for lease in expired:
            self._publish(
                LeaseEventKind.EXPIRED,
                lease.relay_key,
                (lease.deposit_id,),
                (lease.lease_id,),
                lease.ended_at_ms if lease.ended_at_ms is not None else lease.expires_at_ms,
            )
        await self._resync_active_leases()
        return expired

    async def _resync_active_leases(self) -> None:
        active = await self.service.leases(active_only=True, limit=1000)
        self._set_active_leases(len(active))
        self._earliest_expiry_ms = min((lease.expires_at_ms for lease in active), default=None)

    async def _verify(self, service: EscrowService) -> VerifyResult:
        result = await service.audit_verify()
        self.metrics.audit_chain_valid.set(1 if result.valid else 0)
        return result

    def _set_active_leases(self, count: int) -> None:
        self._active_leases = max(0, count)
        self.metrics.active_leases.set(self._active_leases)

    def _publish(
        self,
        kind: LeaseEventKind,
        relay_key: str,
        deposit_ids: tuple[str, ...],
        lease_ids: tuple[str, ...],
        at_ms: int,
        *,
        revocation: Revocation | None = None,
    ) -> None:
        if kind is not LeaseEventKind.REVOKED and not lease_ids:
            return  # nothing a lease holder must hear about
        self._set_active_leases(self._active_leases - len(lease_ids))
        self._bus.publish(
            revocation
            if revocation is not None
            else Revocation(
                relay_key=relay_key,
                deposit_ids=deposit_ids,
                lease_ids=lease_ids,
                at_ms=at_ms,
                already_revoked=False,
            )
        )
        self._event_seq += 1
        self._events.append(
            LeaseEvent(self._event_seq, kind, relay_key, deposit_ids, lease_ids, at_ms)
        )
        self.metrics.lease_events.labels(kind.value).inc()
        changed, self._events_changed = self._events_changed, trio.Event()
        changed.set()

    # -- housekeeping ---------------------------------------------------------------------------

    async def _expire_periodically(self) -> None:
        while True:
            await trio.sleep(self._expiry_interval_s)
            try:
                await self.expire_leases()
            except EscrowStorageError as exc:
                log.warning("escrow lease expiry failed: %s", exc)
            except ActorGone:
                return

    async def _verify_periodically(self) -> None:
        while True:
            try:
                result = await self.verify_audit()
            except EscrowStorageError as exc:
                log.warning("escrow audit verification failed: %s", exc)
            except ActorGone:
                return
            else:
                if result.valid:
                    log.debug("escrow audit chain verified: %s", result.message)
            await trio.sleep(self._audit_interval_s)
