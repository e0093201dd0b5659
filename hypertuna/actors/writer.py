"""EventWriter: the single writer of the relay view, with group commit.

Every EVENT that passed validation is sent here as an :class:`Ingest` request. The writer takes
whatever is queued (up to ``max_batch``) and stores it in one durable transaction, so many
clients share one fsync; only then does it answer each request and publish the accepted events
to the :class:`~hypertuna.actors.hub.SubscriptionHub`. An answer therefore always means durable.
Ephemeral events are never stored: they are answered and published at once.

Relays the gateway hosts itself (:mod:`hypertuna.storage.hosted`) are written through their
owner core: the batch's events for such a relay go through the view's merge rules, and the ones
accepted are appended to the owner core inside the same transaction, which also records the
core's new length. Before the writer reports itself started it brings every hosted relay's view
up to its core, so a crash between a core append and its commit loses nothing that was
appended (and nothing acknowledged: an answer is only sent after the commit).

Membership changes of a hosted relay go the same way: :class:`AdmitWriter` appends an
``add-writer`` record to the owner core inside a view transaction that also stores the new
writer's row, so the view and the core never disagree on who the writers are. It is handled in
the writer's own loop, between event batches, so it never races an event append.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from hypertuna.actors.hub import Publish, Published, SubscriptionHub
from hypertuna.actors.runtime import ActorGone, ActorStatistics, Inbox, ReplyPath
from hypertuna.protocol.nostr.model import Event, KindClass
from hypertuna.storage.cores import Core
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import (
    MSG_EXPIRED,
    EventStore,
    IngestItem,
    IngestResult,
    ViewCore,
)
from hypertuna.storage.hosted import is_hosted, owner_core_name
from hypertuna.storage.relay_records import AddWriter, EventRecord, WriterRole, encode_record
from hypertuna.storage.relay_view import OWNER_ROLE, RelayView

__all__ = ["Admission", "AdmitWriter", "EventWriter", "Ingest", "IngestBatch", "WriterMessage"]

log = logging.getLogger(__name__)

WallClock = Callable[[], int]


@attrs.frozen
class Ingest:
    """Store ``event`` in relay ``relay_id``; the reply is the store's verdict."""

    relay_id: int
    event: Event
    reply: ReplyPath[IngestResult]


@attrs.frozen
class IngestBatch:
    """Several :class:`Ingest` requests in one message (from the signature verifier)."""

    items: tuple[Ingest, ...]


class Admission(enum.Enum):
    """What an :class:`AdmitWriter` request came to."""

    ADMITTED = "admitted"
    """The ``add-writer`` record was appended and committed now."""
    ALREADY_ADMITTED = "already-admitted"
    """The view already admits the key with that role: nothing was appended."""
    NOT_HOSTED = "not-hosted"
    """No such relay, or it is not written through an owner core of this process."""
    OWNER_KEY = "owner-key"
    """The key is the owner core's own: the owner is always a writer."""
    OTHER_ROLE = "other-role"
    """The view admits the key with another role; a record would change nothing."""
    REMOVED = "removed"
    """The key was removed from the relay and can never be admitted again."""


@attrs.frozen
class AdmitWriter:
    """Admit the core ``key`` (64 lowercase hex) as a writer of the hosted relay ``relay_id``
    with ``role``; idempotent. The reply is the :class:`Admission`, sent once the record (if
    any) is durable in the core and the view."""

    relay_id: int
    key: str = attrs.field()
    role: WriterRole = attrs.field(validator=attrs.validators.instance_of(WriterRole))
    reply: ReplyPath[Admission]

    @key.validator
    def _check_key(self, _attribute: object, value: str) -> None:
        AddWriter(value, WriterRole.WORKER)  # the record's own key check


WriterMessage = Ingest | IngestBatch | AdmitWriter


class EventWriter:
    """Actor that owns all writes to the event store."""

    def __init__(
        self,
        store: EventStore,
        hub: SubscriptionHub,
        *,
        wall_clock: WallClock,
        max_batch: int = 256,
        cores: CoreStore | None = None,
        inbox_capacity: int = 8192,
        purge_interval_s: float = 60.0,
    ) -> None:
        self.inbox: Inbox[WriterMessage] = Inbox("event-writer", inbox_capacity)
        self._store = store
        self._hub = hub
        self._cores = cores
        # Relay id -> its owner core when the gateway hosts it through one, else None.
        self._owner_cores: dict[int, Core | None] = {}
        self._wall_clock = wall_clock
        self._max_batch = max_batch
        self._purge_interval_s = purge_interval_s
        self._batches = 0
        self._stored = 0
        self._largest_batch = 0
        self._store_seconds = 0.0
        self._admitted = 0

    def statistics(self) -> ActorStatistics:
        return self.inbox.statistics(
            batches=self._batches,
            stored=self._stored,
            largest_batch=self._largest_batch,
            store_seconds=round(self._store_seconds, 6),
            admitted=self._admitted,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._purge_loop)
            await self._catch_up_hosted_relays()
            task_status.started()
            try:
                await self._write_loop()
            finally:
                # Whatever is still queued was never answered: say so instead of leaving the
                # requester waiting.
                for message in self.inbox.drain():
                    replies = (
                        [message.reply]
                        if isinstance(message, AdmitWriter)
                        else [m.reply for m in _flatten([message])]
                    )
                    for reply in replies:
                        reply.fail_if_pending(ActorGone("event writer stopped"))
                nursery.cancel_scope.cancel()

    async def _write_loop(self) -> None:
        while True:
            try:
                message = await self.inbox.receive()
            except trio.EndOfChannel:
                return
            batch: list[Ingest] = []
            while True:
                if isinstance(message, AdmitWriter):
                    # In arrival order: the events queued before it are written first.
                    if batch:
                        await self._write_batch(batch)
                        batch = []
                    await self._admit(message)
                else:
                    batch.extend(_flatten([message]))
                if len(batch) >= self._max_batch:
                    break
                try:
                    message = self.inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if batch:
                await self._write_batch(batch)

    async def _write_batch(self, batch: list[Ingest]) -> None:
        ephemeral = [m for m in batch if m.event.kind_class is KindClass.EPHEMERAL]
        durable = [m for m in batch if m.event.kind_class is not KindClass.EPHEMERAL]
        for message in ephemeral:
            message.reply.send(IngestResult(accepted=True, message="", seq=None))
        if ephemeral:
            await self._hub.inbox.send(
                Publish(tuple(Published(m.relay_id, m.event, None) for m in ephemeral))
            )
        if not durable:
            return
        hosted: dict[int, list[Ingest]] = {}
        plain: list[Ingest] = []
        for message in durable:
            if await self._owner_core(message.relay_id) is None:
                plain.append(message)
            else:
                hosted.setdefault(message.relay_id, []).append(message)
        if plain:
            await self._commit(plain, self._ingest_plain)
        for relay_id, messages in hosted.items():
            await self._commit(messages, functools.partial(self._ingest_hosted, relay_id))

    async def _ingest_plain(self, messages: Sequence[Ingest]) -> list[IngestResult]:
        return await self._store.ingest(
            [IngestItem(m.relay_id, m.event) for m in messages], now=self._wall_clock()
        )

    async def _ingest_hosted(self, relay_id: int, messages: Sequence[Ingest]) -> list[IngestResult]:
        core = self._owner_cores[relay_id]
        assert core is not None
        now = self._wall_clock()
        results: list[IngestResult | None] = []
        live: list[Event] = []
        for message in messages:
            # The view ignores NIP-40 (its answer must not depend on when a block is read),
            # so an event that arrives already expired is refused here, as plain ingest does.
            expiration = message.event.expiration
            if expiration is not None and expiration <= now:
                results.append(IngestResult(False, MSG_EXPIRED, None))
            else:
                results.append(None)
                live.append(message.event)

        def append_accepted(applied: Sequence[IngestResult]) -> list[ViewCore]:
            blocks = [
                encode_record(EventRecord(event))
                for event, result in zip(live, applied, strict=True)
                if result.accepted
            ]
            length = core.append(blocks) if blocks else core.length
            return [ViewCore(core.key.hex(), OWNER_ROLE, length)]

        try:
            applied = iter(
                await self._store.apply_view(relay_id, live, [], before_commit=append_accepted)
            )
        except BaseException:
            # A failed append may leave a torn tail in the core; reopening cuts it back to the
            # last signed length, so the next batch starts from a consistent core.
            self._forget_owner_core(relay_id)
            raise
        return [result if result is not None else next(applied) for result in results]

    async def _admit(self, message: AdmitWriter) -> None:
        try:
            outcome = await self._admit_writer(message)
        except BaseException as exc:
            message.reply.fail_if_pending(
                exc if isinstance(exc, Exception) else ActorGone("event writer stopped")
            )
            if isinstance(exc, Exception):
                log.exception("admitting a writer to relay %d failed", message.relay_id)
                return
            raise
        if outcome is Admission.ADMITTED:
            self._admitted += 1
            log.info(
                "relay %d: admitted writer %s with role %s",
                message.relay_id,
                message.key,
                message.role,
            )
        message.reply.send(outcome)

    async def _admit_writer(self, message: AdmitWriter) -> Admission:
        relay_id = message.relay_id
        core = await self._owner_core(relay_id)
        if core is None:
            return Admission.NOT_HOSTED
        owner_key = core.key.hex()
        if message.key == owner_key:
            return Admission.OWNER_KEY
        rows = {row.key: row for row in await self._store.view_cores(relay_id)}
        owner_row = rows.get(owner_key)
        if owner_row is None or owner_row.length != core.length:
            # The row written below claims every block of the core applied: make it so first.
            await self._sync_hosted(relay_id, core)
            rows = {row.key: row for row in await self._store.view_cores(relay_id)}
        row = rows.get(message.key)
        if row is not None:
            if row.end is not None:
                return Admission.REMOVED
            if row.role != message.role:
                return Admission.OTHER_ROLE
            return Admission.ALREADY_ADMITTED
        record = encode_record(AddWriter(message.key, message.role))

        def append_record(_applied: Sequence[IngestResult]) -> list[ViewCore]:
            length = core.append([record])
            # Exactly the rows the view would give the block on its own (RelayView).
            return [
                ViewCore(owner_key, OWNER_ROLE, length),
                ViewCore(message.key, str(message.role), 0),
            ]

        try:
            await self._store.apply_view(relay_id, [], [], before_commit=append_record)
        except BaseException:
            self._forget_owner_core(relay_id)
            raise
        return Admission.ADMITTED

    async def _commit(
        self,
        messages: list[Ingest],
        store: Callable[[Sequence[Ingest]], Awaitable[list[IngestResult]]],
    ) -> None:
        started = trio.current_time()
        try:
            results = await store(messages)
        except BaseException as exc:
            for message in messages:
                message.reply.fail_if_pending(
                    exc if isinstance(exc, Exception) else ActorGone("event writer stopped")
                )
            if isinstance(exc, Exception):
                log.exception("storing a batch of %d events failed", len(messages))
                return
            raise
        self._store_seconds += trio.current_time() - started
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(messages))
        for message, result in zip(messages, results, strict=True):
            message.reply.send(result)
        accepted = tuple(
            Published(m.relay_id, m.event, r.seq)
            for m, r in zip(messages, results, strict=True)
            if r.accepted
        )
        self._stored += len(accepted)
        if accepted:
            await self._hub.inbox.send(Publish(accepted))

    async def _owner_core(self, relay_id: int) -> Core | None:
        """The owner core of ``relay_id`` if this gateway hosts it through one."""
        if self._cores is None:
            return None
        if relay_id not in self._owner_cores:
            # A relay we have not seen yet (created since): look every new one up at once.
            cores = self._cores
            for relay in await self._store.list_relays():
                if relay.id in self._owner_cores:
                    continue
                hosted = await trio.to_thread.run_sync(is_hosted, cores, relay)
                self._owner_cores[relay.id] = (
                    await trio.to_thread.run_sync(cores.writable, owner_core_name(relay.name))
                    if hosted
                    else None
                )
        return self._owner_cores.get(relay_id)

    def _forget_owner_core(self, relay_id: int) -> None:
        core = self._owner_cores.pop(relay_id, None)
        if core is not None and self._cores is not None:
            self._cores.release(core.key)

    async def _catch_up_hosted_relays(self) -> None:
        if self._cores is None:
            return
        for relay in await self._store.list_relays():
            core = await self._owner_core(relay.id)
            if core is None:
                continue
            blocks = await self._sync_hosted(relay.id, core)
            if blocks:
                log.info("relay %s: applied %d blocks of its core", relay.name, blocks)

    async def _sync_hosted(self, relay_id: int, core: Core) -> int:
        """Bring the view of a hosted relay up to its owner core; the blocks applied."""
        view = RelayView(
            relay_id=relay_id, owner=core, writer_log=lambda _key: None, store=self._store
        )
        report = await view.sync()
        return report.blocks

    async def _purge_loop(self) -> None:
        # NIP-40: expired events are already invisible to queries; this reclaims their space.
        while True:
            await trio.sleep(self._purge_interval_s)
            try:
                removed = await self._store.purge_expired(now=self._wall_clock())
            except Exception:
                log.exception("purging expired events failed")
                continue
            if removed:
                log.info("purged %d expired events", removed)


def _flatten(messages: list[Ingest | IngestBatch]) -> list[Ingest]:
    out: list[Ingest] = []
    for message in messages:
        if isinstance(message, IngestBatch):
            out.extend(message.items)
        else:
            out.append(message)
    return out
