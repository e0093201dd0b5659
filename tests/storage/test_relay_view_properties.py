"""Property test: whatever the order in which writer blocks arrive, and whenever the view
syncs, restarts or the store purges, the relay answers every filter as a rebuild does, and as
the semantics of the relay_view module docstring say (an oracle over plain Python sets)."""

from __future__ import annotations

import itertools

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypertuna.protocol.nostr.model import Event
from hypertuna.storage.events import EventStore, RelayRecord
from hypertuna.storage.relay_records import WriterRole
from hypertuna.storage.relay_view import RelayView
from tests.storage.memory_log import MemoryLog
from tests.storage.storage_factory import NOW, StoreUrl, flt, open_store
from tests.storage.view_support import (
    ALICE,
    BOB,
    add_block,
    answers,
    counted_events,
    event_block,
    expected_answer,
    forged,
    remove_block,
    visible,
)

# Few authors, kinds and d tags, so that versions of one address and deletions of them meet
# often: order dependence hides in those collisions.
AUTHORS = [ALICE, ALICE, ALICE, BOB]
KINDS = [1, 0, 0, 10002, 30023, 30023, 5, 5, 5]
PURGE_AT = NOW + 1
TIMES = [PURGE_AT, NOW + 4]
FILTERS = [
    flt(),
    flt(kinds=[0, 10002, 30023]),
    flt(authors=[ALICE.pubkey], limit=3),
    flt(tags={"d": ["a"]}),
    flt(kinds=[5]),
]
_relays = itertools.count()


@attrs.frozen
class Plan:
    """The blocks of every core (index 0 the owner), in the order each core holds them."""

    name: str
    blocks: list[list[bytes]]

    def logs(self) -> list[MemoryLog]:
        """Empty cores with the plan's keys (the same keys for every interleaving)."""
        return [MemoryLog(f"{self.name}-{i}") for i in range(len(self.blocks))]


Step = tuple[str, int]  # ("append", core) | ("sync", 0) | ("restart", 0) | ("purge", 0)
# What may happen after a block arrives: mostly nothing or a sync.
_AFTER_APPEND: list[Step] = [
    ("none", 0),
    ("none", 0),
    ("sync", 0),
    ("sync", 0),
    ("sync", 0),
    ("restart", 0),
    ("purge", 0),
]


@st.composite
def events(draw: st.DrawFn) -> list[Event]:
    made: list[Event] = []
    for i in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(KINDS))
        author = draw(st.sampled_from(AUTHORS))
        tags: list[list[str]] = []
        if kind == 30023:
            tags.append(["d", draw(st.sampled_from(["a", "a", ""]))])
        if kind == 5 and made:
            versions = [e for e in made if e.kind in (0, 10002, 30023)]
            pool = versions if versions and draw(st.integers(0, 2)) else made
            for target in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2)):
                if target.kind in (0, 10002, 30023) and draw(st.booleans()):
                    tags.append(["a", f"{target.kind}:{target.pubkey}:{target.d_tag}"])
                else:
                    tags.append(["e", target.id])
                # Mostly the target's own author, or the deletion would do nothing.
                if draw(st.integers(0, 3)):
                    author = ALICE if target.pubkey == ALICE.pubkey else BOB
        if draw(st.integers(0, 3)) == 0:  # mostly gone by the time of the purge
            tags.append(["expiration", str(NOW + draw(st.sampled_from([-1, 0, 1, 1, 3])))])
        created_at = draw(st.integers(100, 103))
        made.append(author.event(kind=kind, created_at=created_at, tags=tags, content=str(i)))
    return made


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    name = f"plan-{next(_relays)}"
    writers = draw(st.integers(1, 3))
    logs = [MemoryLog(f"{name}-{i}") for i in range(writers + 1)]
    blocks: list[list[bytes]] = [[] for _ in logs]
    for event in draw(events()):
        # An event may be in several cores (the same event written twice).
        for core in draw(st.lists(st.integers(0, writers), min_size=1, max_size=2, unique=True)):
            blocks[core].append(event_block(event))
    for core in range(writers + 1):
        if draw(st.integers(0, 6)) == 0:
            blocks[core].insert(
                draw(st.integers(0, len(blocks[core]))),
                draw(st.sampled_from([b"junk", forged(ALICE.event(content="forged"))])),
            )
    membership: list[bytes] = []
    for writer in logs[1:]:
        if draw(st.integers(0, 4)) == 0:
            continue  # never admitted
        membership.append(add_block(writer, draw(st.sampled_from(list(WriterRole)))))
        if draw(st.booleans()):
            length = len(blocks[logs.index(writer)])
            membership.append(remove_block(writer, draw(st.integers(0, length + 1))))
            if draw(st.booleans()):
                membership.append(add_block(writer))  # re-admission: changes nothing
    position = 0
    for block in membership:  # in order, each somewhere after the previous one
        position = draw(st.integers(position, len(blocks[0])))
        blocks[0].insert(position, block)
        position += 1
    return Plan(name, blocks)


@st.composite
def interleavings(draw: st.DrawFn, plan: Plan) -> list[Step]:
    arrivals = [core for core, blocks in enumerate(plan.blocks) for _ in blocks]
    steps: list[Step] = []
    for core in draw(st.permutations(arrivals)):
        steps.append(("append", core))
        steps.append(draw(st.sampled_from(_AFTER_APPEND)))
    return [s for s in steps if s[0] != "none"]


async def _build(
    store: EventStore, plan: Plan, steps: list[Step], batch_blocks: int
) -> tuple[RelayRecord, RelayView, list[MemoryLog]]:
    # The relay key is only a name here: the view reads the owner core it is given.
    relay = await store.create_relay(
        key=f"{next(_relays):064x}", name=f"prop-{next(_relays)}", description="", created_at=NOW
    )
    logs = plan.logs()
    by_key = {log.key: log for log in logs[1:]}

    def new_view() -> RelayView:
        return RelayView(
            relay_id=relay.id,
            owner=logs[0],
            writer_log=by_key.get,
            store=store,
            batch_blocks=batch_blocks,
        )

    view = new_view()
    position = [0] * len(logs)
    for action, core in steps:
        if action == "append":
            logs[core].append([plan.blocks[core][position[core]]])
            position[core] += 1
        elif action == "sync":
            await view.sync()
        elif action == "restart":
            view = new_view()  # resumes from the progress the store recorded
        else:
            await store.purge_expired(now=PURGE_AT)
    await view.sync()
    return relay, view, logs


async def _run(
    store_url: StoreUrl, plan: Plan, orders: list[list[Step]], batch_blocks: list[int]
) -> None:
    async with open_store(store_url) as store:
        built = [
            await _build(store, plan, steps, size)
            for steps, size in zip(orders, batch_blocks, strict=True)
        ]
        logs = built[0][2]
        counted = counted_events(logs[0], logs[1:])
        expected = [expected_answer(counted, f, now) for now in TIMES for f in FILTERS]
        for relay, _, _ in built:
            assert await answers(store, relay, FILTERS, TIMES) == expected
        relay, view, _ = built[0]
        await view.rebuild()
        assert await answers(store, relay, FILTERS, TIMES) == expected


def _check(store_url: StoreUrl, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        plan = data.draw(plans())
        orders = [data.draw(interleavings(plan)) for _ in range(2)]
        sizes = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=2))
        trio.run(_run, store_url, plan, orders, sizes)

    check()


def test_any_interleaving_gives_the_answers_of_a_rebuild(store_url: StoreUrl) -> None:
    _check(store_url, 120 if store_url[0] is None else 10)


def test_the_oracle_sees_what_the_generator_makes() -> None:
    """Guards the property: generated plans do exercise replacement, deletion, duplicates and
    membership (a generator that made none of these would let the property pass vacuously)."""
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(plan=plans())
    def check(plan: Plan) -> None:
        logs = plan.logs()
        for log, blocks in zip(logs, plan.blocks, strict=True):
            log.append(blocks)
        counted = counted_events(logs[0], logs[1:])
        ids = [e.id for e in counted]
        if len(ids) > len(set(ids)):
            seen.add("duplicate")
        shown = {e.id for e in visible(counted, NOW)}
        if any(e.kind == 5 for e in counted) and len(shown) < len(set(ids)):
            seen.add("deleted or replaced")
        if any(b"remove-writer" in b for b in plan.blocks[0]):
            seen.add("removal")
        writer_events = sum(len(b) for b in plan.blocks[1:])
        if writer_events and len(counted) < sum(len(b) for b in plan.blocks):
            seen.add("uncounted")

    check()
    assert seen == {"duplicate", "deleted or replaced", "removal", "uncounted"}
