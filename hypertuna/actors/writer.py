"""EventWriter: the single writer of the relay view, with group commit.

Every EVENT that passed validation is sent here as an :class:`Ingest` request. The writer takes
whatever is queued (up to ``max_batch``) and stores it in one durable transaction, so many
clients share one fsync; only then does it answer each request and publish the accepted events
to the :class:`~hypertuna.actors.hub.SubscriptionHub`. An answer therefore always means durable.
Ephemeral events are never stored: they are answered and published at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from hypertuna.actors.hub import Publish, Published, SubscriptionHub
from hypertuna.actors.runtime import ActorGone, ActorStatistics, Inbox, ReplyPath
from hypertuna.protocol.nostr.model import Event, KindClass
from hypertuna.storage.events import EventStore, IngestItem, IngestResult

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
        inbox_capacity: int = 8192,
        purge_interval_s: float = 60.0,
    ) -> None:
        self.inbox: Inbox[WriterMessage] = Inbox("event-writer", inbox_capacity)
        self._store = store
        self._hub = hub
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
        started = trio.current_time()
        try:
            results = await self._store.ingest(
                [IngestItem(m.relay_id, m.event) for m in durable], now=self._wall_clock()
            )
        except BaseException as exc:
            for message in durable:
                message.reply.fail_if_pending(
                    exc if isinstance(exc, Exception) else ActorGone("event writer stopped")
                )
            if isinstance(exc, Exception):
                log.exception("storing a batch of %d events failed", len(durable))
                return
            raise
        self._store_seconds += trio.current_time() - started
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(durable))
        for message, result in zip(durable, results, strict=True):
            message.reply.send(result)
        accepted = tuple(
            Published(m.relay_id, m.event, r.seq)
            for m, r in zip(durable, results, strict=True)
            if r.accepted
        )
        self._stored += len(accepted)
        if accepted:
            await self._hub.inbox.send(Publish(accepted))

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
