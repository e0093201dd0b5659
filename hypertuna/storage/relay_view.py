"""The view of one relay, built from its cores into the event store.

A relay is a set of cores whose blocks are records (:mod:`hypertuna.storage.relay_records`).
:class:`RelayView` reads them through :class:`~hypertuna.storage.cores.BlockLog` and keeps the
relay's events in an :class:`~hypertuna.storage.events.EventStore`, incrementally with
:meth:`RelayView.sync` or from scratch with :meth:`RelayView.rebuild`.

Which blocks count
------------------

The **owner core** (its key is the relay key) is read in order, and its records decide who the
writers are. Each core key is in one of three states:

- *unknown*, until an ``add-writer`` record names it: it is then **admitted** with that role;
- *admitted*, until a ``remove-writer {key, at_length}`` names it: it is then **removed**;
- *removed*, for good: a later ``add-writer`` for the same key changes nothing (a worker that
  wants a removed writer back admits a new key, as gateway-writer rotation does).

The owner itself is always a writer (role ``"owner"``); records that name it, ``add-writer``
for an admitted or removed key, and ``remove-writer`` for an unknown or removed key change
nothing and are reported as ignored.

When the view has applied the first ``n`` blocks of the owner core, block ``i`` of core ``K``
counts when ``K`` is the owner and ``i < n``, or ``K`` was admitted by those ``n`` blocks and,
if they also remove it, ``i < at_length``. Admission is not tied to a point in time: an
admitted writer counts from its block 0, including blocks it held before it was admitted.

Writer cores hold only ``event`` records. A counted block that is not a valid record, an event
record whose id or signature is wrong, an ephemeral event, or a membership record outside the
owner core is skipped, and counted in the :class:`SyncReport`; it never stops the view.

What the view holds
-------------------

The events of the counted blocks, merged by the store's rules for core-backed relays (see
:mod:`hypertuna.storage.events`): duplicates by id (the same event in several cores) are stored
once; for a replaceable or addressable address the newest version (``created_at``, then lowest
id) wins even when it is later deleted; NIP-09 deletions remove their author's events and keep
them out whichever arrives first; NIP-40 only hides events at query time. The result depends on
the *set* of counted events only, so any order of arrival and of ``sync`` calls gives the same
answers to every filter as a rebuild from the same cores, at any query time not earlier than the
last ``purge_expired``.

Progress and failures
---------------------

``sync`` applies the owner core's new blocks first, then each writer's, in batches. Each batch
is one store transaction holding its events *and* the new applied length of its core (with the
membership the owner blocks gave), so after a crash the view resumes exactly after the last
committed batch. A ``remove-writer`` whose ``at_length`` is below what the view has already
applied of that writer, or a core that became shorter than what was applied (a fork), cannot be
undone block by block (those events may have replaced or deleted others): the view is reset and
rebuilt from block 0 of every core. This is rare, as rotation removes a gateway writer at its
final length. While a rebuild runs, readers see the relay fill up again, with new ``seq``
numbers.

A block that fails verification (:class:`~hypertuna.storage.cores.CoreCorruptError`) stops its
core at that block for this ``sync``, as if the core ended there (reported in ``stalled``); a
writer whose core is not available yet counts as empty (reported in ``missing``). Store failures
raise :class:`~hypertuna.storage.events.StorageError`; the view then reloads its progress from
the store on the next call.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence

import attrs
import trio

from hypertuna.protocol.nostr.codec import verify_signatures
from hypertuna.protocol.nostr.model import Event, KindClass
from hypertuna.storage.cores.log import BlockLog, CoreCorruptError
from hypertuna.storage.events import EventStore, ViewCore
from hypertuna.storage.relay_records import (
    AddWriter,
    EventRecord,
    Record,
    RecordError,
    RemoveWriter,
    decode_record,
)

__all__ = [
    "OWNER_ROLE",
    "RelayView",
    "RelayViewError",
    "RelayViewStatistics",
    "Skip",
    "SyncReport",
]

OWNER_ROLE = "owner"
"""The role of the owner core in :class:`~hypertuna.storage.events.ViewCore` rows."""

DEFAULT_BATCH_BLOCKS = 256
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024

WriterLookup = Callable[[bytes], BlockLog | None]


class RelayViewError(Exception):
    """The store holds the view of another relay than the owner core given (its ``view_cores``
    rows name a different owner)."""


class Skip(enum.Enum):
    """Why a counted block gave no event."""

    MALFORMED = "malformed"
    """Not a valid record (see :mod:`hypertuna.storage.relay_records`)."""
    BAD_SIGNATURE = "bad-signature"
    """An event record whose signature does not verify."""
    EPHEMERAL = "ephemeral"
    """An event of an ephemeral kind: routed to live subscribers, never stored."""
    NOT_AN_EVENT = "not-an-event"
    """A membership record in a writer core: only the owner core decides membership."""
    IGNORED_MEMBERSHIP = "ignored-membership"
    """A membership record of the owner core that changes nothing (see the module docstring)."""


@attrs.frozen
class SyncReport:
    """What one :meth:`RelayView.sync` or :meth:`RelayView.rebuild` did.

    ``blocks`` counted blocks read; ``stored`` events the store took; ``refused`` valid events
    the merge rules turned away (duplicates, older versions, deleted); ``skipped`` blocks that
    gave no event, by reason (reasons that did not occur are left out); ``rebuilds`` how many
    times the view was reset and rebuilt; ``stalled`` keys of cores stopped at a corrupt block;
    ``missing`` keys of admitted writers whose core is not available.
    """

    blocks: int = 0
    stored: int = 0
    refused: int = 0
    skipped: tuple[tuple[Skip, int], ...] = ()
    rebuilds: int = 0
    stalled: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def skipped_for(self, reason: Skip) -> int:
        """Blocks skipped for ``reason``."""
        return dict(self.skipped).get(reason, 0)


@attrs.frozen
class RelayViewStatistics:
    """Totals since the view was built, and the cores as the view has applied them (the owner
    first, then writers by key)."""

    relay_id: int
    blocks: int
    stored: int
    refused: int
    skipped: tuple[tuple[Skip, int], ...]
    rebuilds: int
    cores: tuple[ViewCore, ...]


@attrs.define
class _Tally:
    blocks: int = 0
    stored: int = 0
    refused: int = 0
    skipped: dict[Skip, int] = attrs.Factory(dict)
    rebuilds: int = 0
    stalled: set[str] = attrs.Factory(set)
    missing: set[str] = attrs.Factory(set)

    def skip(self, reason: Skip, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def add(self, other: _Tally) -> None:
        self.blocks += other.blocks
        self.stored += other.stored
        self.refused += other.refused
        for reason, count in other.skipped.items():
            self.skip(reason, count)
        self.rebuilds += other.rebuilds

    def skipped_items(self) -> tuple[tuple[Skip, int], ...]:
        return tuple((reason, self.skipped[reason]) for reason in Skip if reason in self.skipped)

    def report(self) -> SyncReport:
        return SyncReport(
            blocks=self.blocks,
            stored=self.stored,
            refused=self.refused,
            skipped=self.skipped_items(),
            rebuilds=self.rebuilds,
            stalled=tuple(sorted(self.stalled)),
            missing=tuple(sorted(self.missing)),
        )


@attrs.frozen
class _Batch:
    """Blocks ``start .. next - 1`` of a core, decoded: a record or why there is none."""

    length: int
    next: int
    outcomes: list[Record | Skip]
    corrupt: bool


def _read_batch(
    log: BlockLog, start: int, stop: int | None, *, events_only: bool, blocks: int, size: int
) -> _Batch:
    """Read and decode blocks from ``start`` up to ``stop`` (the core's length when None), at
    most ``blocks`` blocks and about ``size`` bytes; runs in a worker thread."""
    length = log.length
    end = min(length if stop is None else min(stop, length), start + blocks)
    outcomes: list[Record | Skip] = []
    read = 0
    index = start
    corrupt = False
    while index < end and read < size:
        try:
            block = log.get(index)
        except CoreCorruptError:
            corrupt = True
            break
        except IndexError:
            break  # truncated meanwhile: the next sync sees it shorter and rebuilds
        read += len(block)
        index += 1
        try:
            record = decode_record(block, verify_signature=False)
        except RecordError:
            outcomes.append(Skip.MALFORMED)
            continue
        if events_only and not isinstance(record, EventRecord):
            outcomes.append(Skip.NOT_AN_EVENT)
        elif isinstance(record, EventRecord) and record.event.kind_class is KindClass.EPHEMERAL:
            outcomes.append(Skip.EPHEMERAL)
        else:
            outcomes.append(record)
    # One pass over the batch: the curve arithmetic runs without the GIL.
    positions: list[int] = []
    events: list[Event] = []
    for position, outcome in enumerate(outcomes):
        if isinstance(outcome, EventRecord):
            positions.append(position)
            events.append(outcome.event)
    for position, ok in zip(positions, verify_signatures(events), strict=True):
        if not ok:
            outcomes[position] = Skip.BAD_SIGNATURE
    return _Batch(length=length, next=index, outcomes=outcomes, corrupt=corrupt)


class _Rebuild(Exception):
    """Raised inside a round when what was applied cannot stand (retraction or fork)."""


class RelayView:
    """The view of relay ``relay_id`` in ``store``, built from the ``owner`` core and the
    writer cores that ``writer_log`` returns by 32-byte core key (None while a core is not
    available). See the module docstring for the semantics.

    One task owns a view; calls are serialised. Block reads and signature checks run in worker
    threads.
    """

    def __init__(
        self,
        *,
        relay_id: int,
        owner: BlockLog,
        writer_log: WriterLookup,
        store: EventStore,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        if batch_blocks < 1 or batch_bytes < 1:
            raise ValueError("batch_blocks and batch_bytes must be positive")
        self.relay_id = relay_id
        self._owner = owner
        self._owner_key = owner.key.hex()
        self._writer_log = writer_log
        self._store = store
        self._batch_blocks = batch_blocks
        self._batch_bytes = batch_bytes
        # The ViewCore rows as committed; None until loaded, and after a failure (reloaded).
        self._cores: dict[str, ViewCore] | None = None
        self._totals = _Tally()
        self._lock = trio.Lock()

    def statistics(self) -> RelayViewStatistics:
        """Totals and applied cores (``cores`` is empty until the first call loaded them)."""
        cores = self._cores or {}
        ordered = sorted(cores.values(), key=lambda c: (c.key != self._owner_key, c.key))
        totals = self._totals
        return RelayViewStatistics(
            relay_id=self.relay_id,
            blocks=totals.blocks,
            stored=totals.stored,
            refused=totals.refused,
            skipped=totals.skipped_items(),
            rebuilds=totals.rebuilds,
            cores=tuple(ordered),
        )

    async def sync(self) -> SyncReport:
        """Apply every block that arrived since the last call (the owner's first), resuming
        from the progress recorded in the store; rebuild when a removal retracts applied
        blocks or a core got shorter."""
        return await self._locked(rebuild=False)

    async def rebuild(self) -> SyncReport:
        """Reset the relay in the store and apply every core from block 0."""
        return await self._locked(rebuild=True)

    async def _locked(self, *, rebuild: bool) -> SyncReport:
        async with self._lock:
            tally = _Tally()
            try:
                if rebuild:
                    await self._reset(tally)
                elif self._cores is None:
                    await self._load(tally)
                while True:
                    try:
                        await self._round(tally)
                        break
                    except _Rebuild:
                        await self._reset(tally)
            except BaseException:
                self._cores = None  # whatever was not committed is forgotten; reload next time
                raise
            finally:
                self._totals.add(tally)
            return tally.report()

    async def _load(self, tally: _Tally) -> None:
        rows = await self._store.view_cores(self.relay_id)
        if not rows:
            # A relay whose view never started may hold events from elsewhere (plain ingest);
            # its content must come from its cores alone.
            await self._reset(tally, counted=False)
            return
        cores = {row.key: row for row in rows}
        owner = cores.get(self._owner_key)
        if owner is None or owner.role != OWNER_ROLE:
            raise RelayViewError(
                f"relay {self.relay_id} holds the view of another owner core than {self._owner_key}"
            )
        self._cores = cores

    async def _reset(self, tally: _Tally, *, counted: bool = True) -> None:
        await self._store.reset_view(self.relay_id)
        self._cores = {self._owner_key: ViewCore(self._owner_key, OWNER_ROLE, 0)}
        if counted:
            tally.rebuilds += 1

    async def _round(self, tally: _Tally) -> None:
        await self._apply_core(self._owner, self._owner_key, tally)
        assert self._cores is not None
        for key, row in sorted(self._cores.items()):
            if key == self._owner_key or (row.end is not None and row.length >= row.end):
                continue  # a removed writer applied up to its end has nothing more to give
            log = self._writer_log(bytes.fromhex(key))
            if log is None:
                tally.missing.add(key)
                continue
            await self._apply_core(log, key, tally)

    async def _apply_core(self, log: BlockLog, key: str, tally: _Tally) -> None:
        """Apply the counted blocks of one core that arrived, batch by batch, up to the length
        it had when this started (a core written to all the time must not hold the others
        back)."""
        owner = key == self._owner_key
        target: int | None = None
        while True:
            assert self._cores is not None
            row = self._cores[key]
            limits = [n for n in (target, row.end) if n is not None]
            stop = min(limits) if limits else None
            batch = await trio.to_thread.run_sync(
                functools.partial(
                    _read_batch,
                    log,
                    row.length,
                    stop,
                    events_only=not owner,
                    blocks=self._batch_blocks,
                    size=self._batch_bytes,
                )
            )
            if batch.length < row.length:
                raise _Rebuild  # the core forked below what was applied
            if target is None:
                target = batch.length
            if batch.next > row.length:
                # Counted only once committed: a batch that fails or is retracted comes again.
                skipped = _Tally()
                if owner:
                    events, changed = self._owner_records(batch.outcomes, skipped)
                else:
                    events = self._writer_records(batch.outcomes, skipped)
                    changed = []
                new_row = attrs.evolve(row, length=batch.next)
                results = await self._store.apply_view(self.relay_id, events, [new_row, *changed])
                # Committed: only now does the in-memory state follow.
                self._cores[key] = new_row
                for writer in changed:
                    self._cores[writer.key] = writer
                tally.add(skipped)
                tally.blocks += batch.next - row.length
                accepted = sum(r.accepted for r in results)
                tally.stored += accepted
                tally.refused += len(results) - accepted
            if batch.corrupt:
                tally.stalled.add(key)
                return
            if batch.next == row.length or batch.next >= min(
                n for n in (target, row.end) if n is not None
            ):
                return

    def _writer_records(self, outcomes: Sequence[Record | Skip], tally: _Tally) -> list[Event]:
        events: list[Event] = []
        for outcome in outcomes:
            if isinstance(outcome, Skip):
                tally.skip(outcome)
            else:
                assert isinstance(outcome, EventRecord)  # _read_batch let only events through
                events.append(outcome.event)
        return events

    def _owner_records(
        self, outcomes: Sequence[Record | Skip], tally: _Tally
    ) -> tuple[list[Event], list[ViewCore]]:
        """Events of an owner batch, and the writer rows its membership records change.
        Raises :class:`_Rebuild` when a removal retracts blocks already applied."""
        assert self._cores is not None
        cores = dict(self._cores)
        changed: dict[str, ViewCore] = {}
        events: list[Event] = []
        for outcome in outcomes:
            match outcome:
                case Skip():
                    tally.skip(outcome)
                case EventRecord(event=event):
                    events.append(event)
                case AddWriter(key=key, role=role):
                    if key == self._owner_key or key in cores:
                        tally.skip(Skip.IGNORED_MEMBERSHIP)
                    else:
                        cores[key] = changed[key] = ViewCore(key, str(role), 0)
                case RemoveWriter(key=key, at_length=at_length):
                    row = cores.get(key)
                    if key == self._owner_key or row is None or row.end is not None:
                        tally.skip(Skip.IGNORED_MEMBERSHIP)
                    elif row.length > at_length:
                        raise _Rebuild
                    else:
                        cores[key] = changed[key] = attrs.evolve(row, end=at_length)
        return events, list(changed.values())
