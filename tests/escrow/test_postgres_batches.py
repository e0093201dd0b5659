"""Group commit on PostgreSQL: the writes queued together share one pipelined transaction, yet
each caller gets the outcome it would have had alone — also when a statement of one of them
fails on the server, which in pipeline mode surfaces late and loses the shared transaction."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio

from hypertuna.escrow.postgres_store import open_postgres_escrow_database
from hypertuna.escrow.store import EscrowStorageError, Runner, insert_relay, relay_owner

pytestmark = pytest.mark.postgres


class Refused(Exception):
    """A work's own refusal (never reaches the server)."""


def _relay(index: int) -> str:
    return f"{index:064x}"


@pytest.mark.parametrize("bad", ["server-error", "raises-after-writing", "raises-before-writing"])
async def test_a_failing_work_fails_only_its_own_caller(pg_url: str, bad: str) -> None:
    async with open_postgres_escrow_database(pg_url) as db:
        await db.write(lambda run: insert_relay(run, _relay(0), "owner-0", 1))
        outcomes: dict[str, object] = {}

        def hold(run: Runner) -> None:
            time.sleep(0.3)  # in the writer's thread: the works below queue up meanwhile

        def insert(index: int, owner: str) -> Callable[[Runner], str]:
            def work(run: Runner) -> str:
                insert_relay(run, _relay(index), owner, 1)
                return owner

            return work

        def refuse_late(run: Runner) -> None:
            insert_relay(run, _relay(99), "owner-99", 1)
            raise Refused

        def refuse_early(run: Runner) -> None:
            relay_owner(run, _relay(0))
            raise Refused

        bad_work = {
            "server-error": insert(0, "intruder"),  # the relay exists: unique violation
            "raises-after-writing": refuse_late,
            "raises-before-writing": refuse_early,
        }[bad]

        async def call(name: str, work: Callable[[Runner], object]) -> None:
            try:
                outcomes[name] = await db.write(work)
            except (EscrowStorageError, Refused) as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.write, hold)
            await trio.sleep(0.1)
            nursery.start_soon(call, "first", insert(1, "owner-1"))
            nursery.start_soon(call, "bad", bad_work)
            nursery.start_soon(call, "last", insert(2, "owner-2"))

        assert outcomes["first"] == "owner-1"
        assert outcomes["last"] == "owner-2"
        expected = EscrowStorageError if bad == "server-error" else Refused
        assert isinstance(outcomes["bad"], expected)

        def read(run: Runner) -> list[tuple[str, int] | None]:
            return [relay_owner(run, _relay(i)) for i in (0, 1, 2, 99)]

        # The bad work changed nothing; the others are all there.
        assert await db.read(read) == [("owner-0", 0), ("owner-1", 0), ("owner-2", 0), None]


async def test_queued_writes_share_transactions(pg_url: str) -> None:
    async with open_postgres_escrow_database(pg_url) as db:
        transactions: set[int] = set()

        def insert(index: int) -> Callable[[Runner], None]:
            def work(run: Runner) -> None:
                row = run.fetch_one("SELECT txid_current()", ())
                assert row is not None
                transactions.add(int(row[0]))
                insert_relay(run, _relay(index), f"owner-{index}", 1)

            return work

        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.write, lambda run: time.sleep(0.3))
            await trio.sleep(0.1)
            for index in range(20):
                nursery.start_soon(db.write, insert(index))
        # The twenty queued behind the sleeping write went together.
        assert len(transactions) == 1
        owners = await db.read(lambda run: [relay_owner(run, _relay(i)) for i in range(20)])
        assert owners == [(f"owner-{i}", 0) for i in range(20)]
