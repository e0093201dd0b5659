"""Replica fallback: relays served from their blind-peer mirrors while no worker answers.

:class:`ReplicaManager` is one actor that owns every open replica. A replica is the view of one
relay (:class:`~hypertuna.storage.relay_view.RelayView`) built from the mirrors in the gateway's
core store: the owner core (whose key is the relay key) and the mirrored cores of the writers it
admits. Views live in their own event store (``<data_dir>/replicas``): they are caches that can
always be rebuilt from the mirrors, so they never share rows, names or keys with hosted relays
and nothing but a view ever writes them.

A forwarded client session opens a :class:`ReplicaSession` with :meth:`ReplicaManager.open` and
uses it like a worker session: it sends client frames and receives batches of relay frames.
``REQ`` gets the stored events then ``EOSE`` and stays live: each time the mirror of one of the
relay's cores grows (:meth:`ReplicaManager.notify_grow`, called by the blind-peer store), the
view is synced and the events it newly stored are sent to the matching subscriptions of that
relay's sessions only. ``COUNT`` and ``CLOSE`` are answered; ``EVENT`` is refused (read-only
until the lease issue makes replicas writable).

Views are kept up to date while nobody reads them, so that a failover finds them ready: a grow
notification for a relay without an open replica marks it *dirty*, and dirty views are synced
whenever the manager has no message waiting (client frames come first). Notifications of one
relay coalesce, so a busy worker costs one sync per idle moment, not one per append. The blind
-peer store notifies every mirror once at start, which catches up what was stored before a
restart; a view's progress is committed with its events, so a caught-up view costs nothing more.

At most ``max_open`` replicas are open; opening one more closes the least recently used, ending
its sessions (they sweep again and may reopen it). A closed replica's view object is kept in a
bounded cache of idle views, which background syncs use too. Mirrors stay open in the core store
on eviction: the blind-peer store writes to them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import attrs
import trio

from hypertuna.actors.blind_peer import RemovedMirror
from hypertuna.actors.runtime import ActorGone, ActorStatistics, Inbox, Reply
from hypertuna.edge.metrics import GatewayMetrics
from hypertuna.protocol.nostr import (
    AuthMessage,
    CloseMessage,
    CountMessage,
    EventMessage,
    NostrError,
    Prefix,
    ReqMessage,
    event_frame,
    parse_client_message,
    reason,
)
from hypertuna.protocol.nostr.model import Event, Filter
from hypertuna.storage.cores import CoreError
from hypertuna.storage.cores.log import BlockLog
from hypertuna.storage.corestore import CoreStore, CoreStoreError
from hypertuna.storage.events import (
    BeforeCommit,
    EventStore,
    IngestResult,
    StorageError,
    ViewCore,
)
from hypertuna.storage.relay_view import RelayView, RelayViewError

__all__ = [
    "DEFAULT_MAX_OPEN",
    "READ_ONLY_NOTICE",
    "CloseReplicaSession",
    "MirrorGrew",
    "MirrorRemoved",
    "OpenReplica",
    "ReplicaFrames",
    "ReplicaManager",
    "ReplicaMessage",
    "ReplicaSession",
    "ReplicaState",
    "replica_name",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN = 64
#: Views of relays without an open replica kept as objects for background syncs (more are
#: recreated from the store's recorded progress when needed).
DEFAULT_MAX_IDLE_VIEWS = 1024
#: Frames batches queued per replica session before it is ended as too slow.
DEFAULT_SESSION_CAPACITY = 1024
READ_ONLY_NOTICE = "relay is read-only while its workers are offline"
_BLOCKED = reason(Prefix.BLOCKED, READ_ONLY_NOTICE)

WallClock = Callable[[], int]


def replica_name(relay_key: str) -> str:
    """The name of the relay row holding the replica view of ``relay_key``."""
    return "replica-" + relay_key[:16]


class SessionGone(Exception):
    """The replica session ended (evicted, gateway stopping, or closed)."""


class ReplicaSession:
    """One client session on one replica, as the client's session task sees it (the same
    shape as a worker session: ``send`` client frames, ``receive`` batches of relay frames)."""

    __slots__ = ("_receive", "_send", "end_reason", "manager", "overflowed", "relay_key")

    def __init__(self, manager: ReplicaManager, relay_key: str, capacity: int) -> None:
        self.manager = manager
        self.relay_key = relay_key
        self.end_reason = ""
        self.overflowed = False
        self._send, self._receive = trio.open_memory_channel[tuple[str, ...]](capacity)

    @property
    def open(self) -> bool:
        return not self.end_reason

    async def receive(self) -> tuple[str, ...]:
        """The next batch of relay frames; ``trio.EndOfChannel`` once the session ended."""
        return await self._receive.receive()

    def receive_nowait(self) -> tuple[str, ...]:
        return self._receive.receive_nowait()

    async def send(self, frames: list[str]) -> None:
        """Hand client frames to the replica; :class:`SessionGone` once it ended."""
        if self.end_reason:
            raise SessionGone(self.end_reason)
        try:
            await self.manager.inbox.send(ReplicaFrames(self, tuple(frames)))
        except ActorGone:
            raise SessionGone("gateway stopping") from None

    async def close(self, why: str) -> None:
        """End the session from the client side."""
        if self.end_reason:
            return
        try:
            await self.manager.inbox.send(CloseReplicaSession(self, why))
        except ActorGone:
            self._end(why)

    # Called by the manager's task only.
    def _end(self, why: str) -> None:
        if not self.end_reason:
            self.end_reason = why or "closed"
            self._send.close()

    def _deliver(self, frames: tuple[str, ...]) -> bool:
        if self.end_reason:
            return True
        try:
            self._send.send_nowait(frames)
        except trio.WouldBlock:
            self.overflowed = True
            return False
        return True


# -- messages ---------------------------------------------------------------------------------


@attrs.frozen
class OpenReplica:
    """Open a session on the replica of ``relay_key``; None when no owner mirror exists."""

    relay_key: str
    reply: Reply[ReplicaSession | None]


@attrs.frozen
class ReplicaFrames:
    session: ReplicaSession
    frames: tuple[str, ...]


@attrs.frozen
class CloseReplicaSession:
    session: ReplicaSession
    why: str


@attrs.frozen
class MirrorGrew:
    """The mirror of core ``key``, one of relay ``relay_key``'s cores, now has ``length``
    blocks."""

    key: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    length: int = attrs.field(validator=attrs.validators.ge(0))
    relay_key: str

    @key.validator
    def _check_key(self, _attribute: object, value: bytes) -> None:
        if len(value) != 32:
            raise ValueError("a core key is 32 bytes")


@attrs.frozen
class MirrorRemoved:
    """A mirror of one of relay ``relay_key``'s cores was taken out of the core store."""

    relay_key: str


ReplicaMessage = OpenReplica | ReplicaFrames | CloseReplicaSession | MirrorGrew | MirrorRemoved


@attrs.frozen
class ReplicaStatistics:
    actor: ActorStatistics
    open_replicas: int
    sessions: int
    evictions: int
    dropped_notifications: int
    #: Relays whose view waits for a background sync.
    dirty_views: int
    background_syncs: int


@attrs.frozen
class ReplicaState:
    """An open replica as the operator API shows it (wall-clock seconds)."""

    relay_key: str
    sessions: int
    opened_at: int
    last_activity: int


# -- state owned by the manager's task ----------------------------------------------------------


class _CapturingStore:
    """The replica store as a view sees it, keeping the events each apply stored (with their
    ``seq``) so that they can be sent to live subscriptions."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.stored: list[tuple[int, Event]] = []

    async def apply_view(
        self,
        relay_id: int,
        events: Sequence[Event],
        cores: Sequence[ViewCore],
        *,
        before_commit: BeforeCommit | None = None,
    ) -> list[IngestResult]:
        results = await self._store.apply_view(relay_id, events, cores, before_commit=before_commit)
        for event, result in zip(events, results, strict=True):
            if result.accepted and result.seq is not None:
                self.stored.append((result.seq, event))
        return results

    async def view_cores(self, relay_id: int) -> list[ViewCore]:
        return await self._store.view_cores(relay_id)

    async def reset_view(self, relay_id: int) -> None:
        await self._store.reset_view(relay_id)


@attrs.define(eq=False)
class _Sub:
    filters: tuple[Filter, ...]
    high_seq: int


@attrs.define(eq=False)
class _Replica:
    relay_key: str
    relay_id: int
    view: RelayView
    capture: _CapturingStore
    writers: dict[bytes, BlockLog]
    sessions: dict[ReplicaSession, dict[str, _Sub]] = attrs.Factory(dict)
    opened_at: int = 0
    last_activity: int = 0
    #: The last sync failed: the view may be behind its mirrors until one succeeds.
    stale: bool = False


class ReplicaManager:
    """Owns the open replicas and their sessions (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        cores: CoreStore,
        metrics: GatewayMetrics,
        *,
        wall_clock: WallClock,
        max_open: int = DEFAULT_MAX_OPEN,
        max_idle_views: int = DEFAULT_MAX_IDLE_VIEWS,
        max_limit: int = 500,
        session_capacity: int = DEFAULT_SESSION_CAPACITY,
        inbox_capacity: int = 1024,
    ) -> None:
        if max_open < 1 or max_idle_views < 0:
            raise ValueError("max_open must be positive and max_idle_views not negative")
        self.inbox: Inbox[ReplicaMessage] = Inbox("replica-manager", inbox_capacity)
        self._store = store
        self._cores = cores
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._max_open = max_open
        self._max_idle_views = max_idle_views
        self._max_limit = max_limit
        self._session_capacity = session_capacity
        self._replicas: OrderedDict[str, _Replica] = OrderedDict()
        #: Views of relays without an open replica, least recently used first.
        self._idle: OrderedDict[str, _Replica] = OrderedDict()
        #: Relays with mirrors (from notifications), and those whose view needs a sync.
        self._known: set[str] = set()
        self._dirty: dict[str, None] = {}
        #: The relay whose idle view is being synced (counted as dirty until it is done).
        self._syncing: str | None = None
        #: Relays whose replica is being opened (see :meth:`is_open`).
        self._opening: set[str] = set()
        self._evictions = 0
        self._dropped = 0
        self._background_syncs = 0
        #: Set by notify_grow when the inbox was full: the next message syncs every view.
        self._missed = False
        #: Relays whose removal notification did not fit in the inbox.
        self._removed_pending: set[str] = set()

    def statistics(self) -> ReplicaStatistics:
        return ReplicaStatistics(
            actor=self.inbox.statistics(
                open_replicas=len(self._replicas),
                evictions=self._evictions,
                dirty_views=len(self._dirty) + (self._syncing is not None),
                background_syncs=self._background_syncs,
            ),
            open_replicas=len(self._replicas),
            sessions=sum(len(r.sessions) for r in self._replicas.values()),
            evictions=self._evictions,
            dropped_notifications=self._dropped,
            dirty_views=len(self._dirty) + (self._syncing is not None),
            background_syncs=self._background_syncs,
        )

    def snapshot(self) -> tuple[ReplicaState, ...]:
        """The open replicas, most recently used last (safe to call from any task of the same
        trio run)."""
        return tuple(
            ReplicaState(r.relay_key, len(r.sessions), r.opened_at, r.last_activity)
            for r in self._replicas.values()
        )

    def is_open(self, relay_key: str) -> bool:
        """Whether a replica of ``relay_key`` is open or being opened (read by the blind-peer
        store, in the same trio run, to keep the mirrors a replica reads)."""
        return relay_key in self._replicas or relay_key in self._opening

    async def admitted_writers(self, relay_key: str, role: str) -> tuple[str, ...]:
        """Core keys of the writers that ``relay_key``'s mirrored owner core admits with
        ``role`` and has not removed, as its replica view last applied it (empty when the
        gateway holds no view of the relay). A read of the replica store; any task may call it."""
        relay = await self._store.get_relay(relay_key)
        if relay is None:
            return ()
        rows = await self._store.view_cores(relay.id)
        return tuple(row.key for row in rows if row.role == role and row.end is None)

    def notify_grow(self, key: bytes, length: int, relay_key: str) -> None:
        """The blind-peer store's ``on_grow``: never blocks; when the inbox is full the
        notification is dropped and every view is synced soon after."""
        try:
            self.inbox.send_nowait(MirrorGrew(key, length, relay_key))
        except trio.WouldBlock:
            self._dropped += 1
            self._missed = True
        except ActorGone:
            pass

    def notify_removed(self, removed: RemovedMirror) -> None:
        """The blind-peer store's ``on_removed``: the relay's view is dropped (its mirrors are
        closed) and rebuilt from what remains; never blocks."""
        try:
            self.inbox.send_nowait(MirrorRemoved(removed.relay_key))
        except trio.WouldBlock:
            # Rare (a full inbox while mirrors are collected): the view is dropped at the next
            # message instead.
            self._removed_pending.add(removed.relay_key)
        except ActorGone:
            pass

    async def open(self, relay_key: str) -> ReplicaSession | None:
        """A session on the replica of ``relay_key``, or None when no mirror of its owner
        core exists."""
        return await self.inbox.request(lambda r: OpenReplica(relay_key, r))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                try:
                    message = self.inbox.receive_nowait()
                except trio.WouldBlock:
                    if self._dirty:
                        # Nothing waits: bring one idle view up to date.
                        relay_key = next(iter(self._dirty))
                        del self._dirty[relay_key]
                        self._syncing = relay_key
                        try:
                            await self._sync_idle(relay_key)
                        finally:
                            self._syncing = None
                        continue
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        return
                except trio.EndOfChannel:
                    return
                while self._removed_pending:
                    await self._forget_view(self._removed_pending.pop())
                if self._missed:
                    self._missed = False
                    for replica in list(self._replicas.values()):
                        await self._sync(replica)
                    self._dirty.update(dict.fromkeys(self._known - self._replicas.keys()))
                await self._handle(message)
        finally:
            for message in self.inbox.drain():
                if isinstance(message, OpenReplica):
                    message.reply.fail_if_pending(ActorGone("replica manager stopped"))
            for relay_key in list(self._replicas):
                self._close_replica(relay_key, "gateway stopping")

    async def _handle(self, message: ReplicaMessage) -> None:
        match message:
            case OpenReplica(relay_key=relay_key, reply=reply):
                try:
                    reply.send(await self._open_session(relay_key))
                except (StorageError, CoreError, CoreStoreError, OSError, ValueError) as exc:
                    log.exception("opening the replica of %s failed", relay_key[:16])
                    reply.fail(exc)
            case ReplicaFrames(session=session, frames=frames):
                await self._on_frames(session, frames)
            case CloseReplicaSession(session=session, why=why):
                self._drop_session(session, why)
            case MirrorRemoved(relay_key=relay_key):
                await self._forget_view(relay_key)
            case MirrorGrew(relay_key=relay_key):
                self._known.add(relay_key)
                replica = self._replicas.get(relay_key)
                if replica is not None:
                    await self._sync(replica)
                else:
                    self._dirty[relay_key] = None

    # -- replicas --------------------------------------------------------------------------------

    async def _open_session(self, relay_key: str) -> ReplicaSession | None:
        replica = self._replicas.get(relay_key)
        if replica is None:
            replica = await self._open_replica(relay_key)
            if replica is None:
                return None
        else:
            self._replicas.move_to_end(relay_key)
        session = ReplicaSession(self, relay_key, self._session_capacity)
        replica.sessions[session] = {}
        replica.last_activity = self._wall_clock()
        self._metrics.replica_sessions.inc()
        return session

    async def _open_replica(self, relay_key: str) -> _Replica | None:
        self._opening.add(relay_key)
        try:
            replica = self._idle.pop(relay_key, None)
            if replica is None:
                replica = await self._new_view(relay_key)
                if replica is None:
                    return None
            while len(self._replicas) >= self._max_open:
                # Prefer a replica nobody reads; otherwise the least recently used.
                idle = next((k for k, r in self._replicas.items() if not r.sessions), None)
                victim = idle if idle is not None else next(iter(self._replicas))
                self._close_replica(victim, "replica evicted")
                self._evictions += 1
            replica.opened_at = replica.last_activity = self._wall_clock()
            self._replicas[relay_key] = replica
            self._dirty.pop(relay_key, None)
            self._metrics.fallback_reads_for(relay_key)
            await self._sync(replica)
            return replica
        finally:
            self._opening.discard(relay_key)

    async def _forget_view(self, relay_key: str) -> None:
        """Drop the view of ``relay_key`` after one of its mirrors was removed: the view may
        hold events of that core, and its objects read closed mirrors. What the relay still
        has mirrored is applied again from scratch in the background."""
        self._close_replica(relay_key, "a mirror of the relay was removed")
        replica = self._idle.pop(relay_key, None)
        self._dirty.pop(relay_key, None)
        relay_id = replica.relay_id if replica is not None else None
        if relay_id is None:
            relay = await self._store.get_relay(relay_key)
            relay_id = relay.id if relay is not None else None
        if relay_id is not None:
            try:
                await self._store.reset_view(relay_id)
            except StorageError:
                log.exception("resetting the view of %s failed", relay_key[:16])
        self._idle.pop(relay_key, None)  # _close_replica parks an open replica's view there
        if self._cores.has(bytes.fromhex(relay_key)):
            self._dirty[relay_key] = None
        else:
            self._known.discard(relay_key)

    async def _sync_idle(self, relay_key: str) -> None:
        """Bring the view of a relay without an open replica up to date (nobody to publish
        to: its events reach subscriptions through their REQ's query)."""
        replica = self._idle.pop(relay_key, None)
        if replica is None:
            try:
                replica = await self._new_view(relay_key)
            except (StorageError, CoreError, CoreStoreError, OSError, ValueError):
                log.exception("opening the view of %s failed", relay_key[:16])
                return
            if replica is None:
                return
        await self._sync(replica)
        self._background_syncs += 1
        self._idle[relay_key] = replica
        while len(self._idle) > self._max_idle_views:
            self._idle.popitem(last=False)

    async def _new_view(self, relay_key: str) -> _Replica | None:
        """The view of ``relay_key`` over its mirrors, resuming from the progress the replica
        store recorded; None when the owner core is not mirrored."""
        key = bytes.fromhex(relay_key)
        owner = await trio.to_thread.run_sync(self._cores.open_mirror, key)
        if owner is None:
            return None
        relay = await self._store.get_relay(relay_key)
        if relay is None:
            relay = await self._store.create_relay(
                key=relay_key,
                name=replica_name(relay_key),
                description="replica of a worker relay, built from its mirrors",
                created_at=self._wall_clock(),
            )
        capture = _CapturingStore(self._store)
        writers: dict[bytes, BlockLog] = {}
        view = RelayView(
            relay_id=relay.id,
            owner=owner,
            writer_log=writers.get,
            store=cast(EventStore, capture),
        )
        return _Replica(relay_key, relay.id, view, capture, writers)

    def _close_replica(self, relay_key: str, why: str) -> None:
        replica = self._replicas.pop(relay_key, None)
        if replica is None:
            return
        for session in list(replica.sessions):
            self._drop_session(session, why, replica)
        self._metrics.forget_fallback_reads(relay_key)
        if self._max_idle_views:
            self._idle[relay_key] = replica
            while len(self._idle) > self._max_idle_views:
                self._idle.popitem(last=False)

    def _drop_session(
        self, session: ReplicaSession, why: str, replica: _Replica | None = None
    ) -> None:
        replica = replica or self._replicas.get(session.relay_key)
        if replica is not None and replica.sessions.pop(session, None) is not None:
            self._metrics.replica_sessions.dec()
        session._end(why)

    async def _sync(self, replica: _Replica) -> None:
        """Apply what the mirrors gained and send the new events to live subscriptions."""
        replica.capture.stored.clear()
        try:
            for _ in range(2):
                report = await replica.view.sync()
                # Writers admitted by this round may be mirrored already: open them, go again.
                if not report.missing or not await self._open_writers(replica, report.missing):
                    break
        except (StorageError, RelayViewError, CoreError, CoreStoreError, OSError):
            # The view stays as it was; the next notification or REQ tries again.
            log.exception("syncing the replica of %s failed", replica.relay_key[:16])
            replica.stale = True
            return
        replica.stale = False
        stored, replica.capture.stored = replica.capture.stored, []
        if stored:
            self._publish(replica, stored)

    async def _open_writers(self, replica: _Replica, missing: Sequence[str]) -> bool:
        opened = False
        for hex_key in missing:
            key = bytes.fromhex(hex_key)
            mirror = await trio.to_thread.run_sync(self._cores.open_mirror, key)
            if mirror is not None:
                replica.writers[key] = mirror
                opened = True
        return opened

    def _publish(self, replica: _Replica, stored: list[tuple[int, Event]]) -> None:
        now = self._wall_clock()
        for session, subs in list(replica.sessions.items()):
            frames: list[str] = []
            for sub_id, sub in subs.items():
                for seq, event in stored:
                    if seq <= sub.high_seq:
                        continue
                    expiration = event.expiration
                    if expiration is not None and expiration <= now:
                        continue
                    if any(f.matches(event) for f in sub.filters):
                        frames.append(event_frame(sub_id, event.raw))
            if frames and not session._deliver(tuple(frames)):
                self._drop_session(session, "too slow to receive events", replica)

    # -- client frames ---------------------------------------------------------------------------

    async def _on_frames(self, session: ReplicaSession, frames: tuple[str, ...]) -> None:
        replica = self._replicas.get(session.relay_key)
        if replica is None or session not in replica.sessions:
            session._end(session.end_reason or "replica closed")
            return
        self._replicas.move_to_end(session.relay_key)
        replica.last_activity = self._wall_clock()
        out: list[str] = []
        for text in frames:
            try:
                message = parse_client_message(text, verify_signature=False)
            except NostrError as err:
                if err.event_id is not None:
                    out.append(json.dumps(["OK", err.event_id, False, str(err)]))
                elif err.sub_id is not None:
                    out.append(json.dumps(["CLOSED", err.sub_id, str(err)]))
                else:
                    out.append(json.dumps(["NOTICE", str(err)]))
                continue
            subs = replica.sessions.get(session)
            if subs is None:
                return
            match message:
                case ReqMessage(sub_id=sub_id, filters=filters):
                    out += await self._on_req(replica, subs, sub_id, filters)
                case CountMessage(sub_id=sub_id, filters=filters):
                    out += await self._on_count(replica, sub_id, filters)
                case CloseMessage(sub_id=sub_id):
                    subs.pop(sub_id, None)
                    out.append(json.dumps(["CLOSED", sub_id, ""]))
                case EventMessage(event=event) | AuthMessage(event=event):
                    out.append(json.dumps(["NOTICE", READ_ONLY_NOTICE]))
                    out.append(json.dumps(["OK", event.id, False, _BLOCKED]))
        if out and not session._deliver(tuple(out)):
            self._drop_session(session, "too slow to receive events", replica)

    async def _on_req(
        self,
        replica: _Replica,
        subs: dict[str, _Sub],
        sub_id: str,
        filters: tuple[Filter, ...],
    ) -> list[str]:
        # Every grow notification syncs an open replica before the next message (dropped ones
        # too, see run), so only a view whose last sync failed needs one here.
        if replica.stale:
            await self._sync(replica)
        try:
            result = await self._store.query(
                replica.relay_id, filters, now=self._wall_clock(), max_limit=self._max_limit
            )
        except StorageError:
            log.exception("replica query failed")
            subs.pop(sub_id, None)
            return [json.dumps(["CLOSED", sub_id, reason(Prefix.ERROR, "could not read events")])]
        self._metrics.fallback_read(replica.relay_key)
        subs[sub_id] = _Sub(filters, result.high_seq)
        frames = [event_frame(sub_id, stored.raw) for stored in result.events]
        frames.append(json.dumps(["EOSE", sub_id]))
        return frames

    async def _on_count(
        self, replica: _Replica, sub_id: str, filters: tuple[Filter, ...]
    ) -> list[str]:
        if replica.stale:
            await self._sync(replica)
        try:
            total = await self._store.count(replica.relay_id, filters, now=self._wall_clock())
        except StorageError:
            log.exception("replica count failed")
            return [json.dumps(["CLOSED", sub_id, reason(Prefix.ERROR, "could not count")])]
        self._metrics.fallback_read(replica.relay_key)
        return [json.dumps(["COUNT", sub_id, {"count": total}])]


def replica_data_dir(data_dir: Path) -> Path:
    """Where the replica views' embedded event store lives."""
    return data_dir / "replicas"
