"""The EventWriter admits writers to a hosted relay through its owner core: a real event store
(SQLite and PostgreSQL), a real core store, real signatures."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from hypertuna.actors.hub import SubscriptionHub
from hypertuna.actors.runtime import ActorGone, Reply
from hypertuna.actors.writer import Admission, AdmitWriter, EventWriter, Ingest
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import EventStore, IngestResult, RelayRecord, open_event_store
from hypertuna.storage.hosted import create_hosted_relay, owner_core_name
from hypertuna.storage.relay_records import (
    AddWriter,
    EventRecord,
    RemoveWriter,
    WriterRole,
    decode_record,
    encode_record,
)
from hypertuna.storage.relay_view import OWNER_ROLE, RelayView
from tests.support import TIMEOUT, Signer

GATEWAY_WRITER = "ab" * 32
OTHER_WRITER = "cd" * 32


@attrs.frozen
class Running:
    store: EventStore
    cores: CoreStore
    writer: EventWriter

    async def admit(
        self, relay: RelayRecord, key: str, role: WriterRole = WriterRole.GATEWAY
    ) -> Admission:
        with trio.fail_after(TIMEOUT):
            return await self.writer.inbox.request(lambda r: AdmitWriter(relay.id, key, role, r))

    async def ingest(self, relay: RelayRecord, signer: Signer, content: str) -> IngestResult:
        event = signer.event(content=content)
        with trio.fail_after(TIMEOUT):
            return await self.writer.inbox.request(lambda r: Ingest(relay.id, event, r))

    async def writers(self, relay: RelayRecord) -> dict[str, tuple[str, int | None]]:
        return {row.key: (row.role, row.end) for row in await self.store.view_cores(relay.id)}


@contextlib.asynccontextmanager
async def running(store_url: tuple[str | None, Path]) -> AsyncIterator[Running]:
    url, data_dir = store_url
    async with open_event_store(url, data_dir) as store:
        cores = await trio.to_thread.run_sync(CoreStore.open, data_dir / "cores")
        try:
            hub = SubscriptionHub()
            writer = EventWriter(store, hub, wall_clock=lambda: 1_700_000_000, cores=cores)
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.run)
                await nursery.start(writer.run)
                yield Running(store, cores, writer)
                nursery.cancel_scope.cancel()
        finally:
            cores.close()


async def _hosted(run: Running, name: str = "alpha") -> RelayRecord:
    existing = await run.store.get_relay(name)
    if existing is not None:
        return existing
    return await create_hosted_relay(
        run.store, run.cores, name=name, description="", created_at=1_700_000_000
    )


def _records(run: Running, relay: RelayRecord) -> list[object]:
    core = run.cores.writable(owner_core_name(relay.name))
    return [decode_record(core.get(i)) for i in range(core.length)]


async def test_admitted_once_through_the_owner_core_and_kept_across_restarts(
    store_url: tuple[str | None, Path],
) -> None:
    alice = Signer()
    async with running(store_url) as run:
        relay = await _hosted(run)
        assert (await run.ingest(relay, alice, "before")).accepted
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.ADMITTED
        assert (await run.ingest(relay, alice, "after")).accepted
        owner_key = relay.key
        assert await run.writers(relay) == {
            owner_key: (OWNER_ROLE, None),
            GATEWAY_WRITER: ("gateway", None),
        }
        records = _records(run, relay)
        assert records[1] == AddWriter(GATEWAY_WRITER, WriterRole.GATEWAY)
        assert [type(r) for r in records] == [EventRecord, AddWriter, EventRecord]
        # Idempotent: nothing more is appended.
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.ALREADY_ADMITTED
        assert len(_records(run, relay)) == 3
        assert dict(run.writer.statistics().extra)["admitted"] == 1

    async with running(store_url) as run:
        relay = await _hosted(run)
        assert await run.writers(relay) == {
            relay.key: (OWNER_ROLE, None),
            GATEWAY_WRITER: ("gateway", None),
        }
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.ALREADY_ADMITTED
        core = run.cores.writable(owner_core_name(relay.name))
        assert core.length == 3
        # The view built from the core alone says the same.
        view = RelayView(relay_id=relay.id, owner=core, writer_log=lambda _k: None, store=run.store)
        rows_before = await run.store.view_cores(relay.id)
        await view.rebuild()
        assert await run.store.view_cores(relay.id) == rows_before
        assert await run.store.event_count(relay.id) == 2


async def test_a_record_appended_but_not_committed_is_applied_on_start(
    store_url: tuple[str | None, Path],
) -> None:
    async with running(store_url) as run:
        relay = await _hosted(run)
        # As if the process died between the core append and the commit.
        core = run.cores.writable(owner_core_name(relay.name))
        core.append([encode_record(AddWriter(GATEWAY_WRITER, WriterRole.GATEWAY))])
    async with running(store_url) as run:
        relay = await _hosted(run)
        assert (await run.writers(relay))[GATEWAY_WRITER] == ("gateway", None)
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.ALREADY_ADMITTED
        assert len(_records(run, relay)) == 1


async def test_admissions_that_would_change_nothing_are_refused(
    store_url: tuple[str | None, Path],
) -> None:
    async with running(store_url) as run:
        relay = await _hosted(run)
        plain = await run.store.create_relay(
            key="ee" * 32, name="plain", description="", created_at=1_700_000_000
        )
        assert await run.admit(plain, GATEWAY_WRITER) is Admission.NOT_HOSTED
        assert await run.admit(relay, relay.key) is Admission.OWNER_KEY
        assert await run.admit(relay, OTHER_WRITER, WriterRole.WORKER) is Admission.ADMITTED
        assert await run.admit(relay, OTHER_WRITER) is Admission.OTHER_ROLE
        # A removed writer stays removed (rotation admits a new key instead).
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.ADMITTED
        core = run.cores.writable(owner_core_name(relay.name))
        core.append([encode_record(RemoveWriter(GATEWAY_WRITER, 0))])
        length = core.length
        # The view is behind the core (appended outside the writer): it catches up first.
        assert await run.admit(relay, GATEWAY_WRITER) is Admission.REMOVED
        assert core.length == length
        assert (await run.writers(relay))[GATEWAY_WRITER] == ("gateway", 0)


async def test_admission_requests_fail_once_the_writer_stopped(tmp_path: Path) -> None:
    async with open_event_store(None, tmp_path) as store:
        writer = EventWriter(store, SubscriptionHub(), wall_clock=lambda: 0)
        writer.inbox.close()
        with pytest.raises(ActorGone):
            await writer.inbox.request(
                lambda r: AdmitWriter(1, GATEWAY_WRITER, WriterRole.GATEWAY, r)
            )


def test_admit_writer_checks_its_key() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        AdmitWriter(1, "AB" * 32, WriterRole.GATEWAY, Reply[Admission]())
