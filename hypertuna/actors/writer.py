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
"""

from __future__ import annotations

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
from hypertuna.storage.relay_records import EventRecord, encode_record
from hypertuna.storage.relay_view import OWNER_ROLE, RelayView

__all__ = ["EventWriter", "Ingest", "IngestBatch", "WriterMessage"]

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


WriterMessage = Ingest | IngestBatch


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

    def statistics(self) -> ActorStatistics:
        return self.inbox.statistics(
            batches=self._batches,
            stored=self._stored,
            largest_batch=self._largest_batch,
            store_seconds=round(self._store_seconds, 6),
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
                for message in _flatten(self.inbox.drain()):
                    message.reply.fail_if_pending(ActorGone("event writer stopped"))
                nursery.cancel_scope.cancel()

    async def _write_loop(self) -> None:
        while True:
            try:
                first = await self.inbox.receive()
            except trio.EndOfChannel:
                return
            batch = _flatten([first])
            while len(batch) < self._max_batch:
                try:
                    batch.extend(_flatten([self.inbox.receive_nowait()]))
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
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
            view = RelayView(
                relay_id=relay.id, owner=core, writer_log=lambda _key: None, store=self._store
            )
            report = await view.sync()
            if report.blocks:
                log.info("relay %s: applied %d blocks of its core", relay.name, report.blocks)

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


def _flatten(messages: list[WriterMessage]) -> list[Ingest]:
    out: list[Ingest] = []
    for message in messages:
        if isinstance(message, IngestBatch):
            out.extend(message.items)
        else:
            out.append(message)
    return out
