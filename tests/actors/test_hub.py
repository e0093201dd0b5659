from __future__ import annotations

import trio
import trio.testing

from hypertuna.actors.hub import (
    Delivery,
    LiveSink,
    Publish,
    Published,
    Subscribe,
    SubscriptionHub,
    SubscriptionToken,
    Unsubscribe,
    UnsubscribeConnection,
)
from hypertuna.protocol.nostr import Filter
from tests.support import Signer


async def _settle(hub: SubscriptionHub) -> None:
    # The hub is idle once its inbox is empty and it is blocked waiting for more.
    await trio.testing.wait_all_tasks_blocked()
    assert hub.inbox.used == 0


def _sink(connection: int, size: int = 16) -> tuple[LiveSink, LiveSink]:
    sink = LiveSink(connection, size, lambda: None)
    return sink, sink


def _drain(sink: LiveSink) -> list[Delivery]:
    out = []
    while (delivery := sink.pop()) is not None:
        out.append(delivery)
    return out


async def test_matching_by_index_and_filters() -> None:
    alice, bob = Signer(), Signer()
    hub = SubscriptionHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        sink, receive = _sink(1)
        by_author = SubscriptionToken(1, "a", 1)
        by_tag = SubscriptionToken(1, "t", 2)
        everything_since = SubscriptionToken(1, "all", 3)
        a_pub = alice.event().pubkey
        await hub.inbox.send(Subscribe(7, by_author, (Filter(authors=frozenset([a_pub])),), sink))
        await hub.inbox.send(
            Subscribe(
                7, by_tag, (Filter(tags=(("t", frozenset(["x"])),), kinds=frozenset([1])),), sink
            )
        )
        await hub.inbox.send(Subscribe(7, everything_since, (Filter(since=1_700_000_100),), sink))
        e1 = alice.event(kind=7)
        e2 = bob.event(kind=1, tags=[["t", "x"]])
        e3 = bob.event(kind=1, tags=[["t", "x"]], created_at=1_700_000_200)
        e4 = bob.event(kind=2, tags=[["t", "x"]])
        for seq, event in enumerate([e1, e2, e3, e4], start=1):
            await hub.inbox.send(Publish((Published(7, event, seq),)))
        await hub.inbox.send(Publish((Published(8, e2, 9),)))  # another relay: nobody listens there
        await _settle(hub)
        got = [(d.token.sub_id, d.seq) for d in _drain(receive)]
        assert got == [("a", 1), ("t", 2), ("t", 3), ("all", 3)]
        assert hub.statistics().extra == (("deliveries", 4), ("overflows", 0), ("subscriptions", 3))

        await hub.inbox.send(Unsubscribe(7, by_tag))
        await hub.inbox.send(Publish((Published(7, e2, 10),)))
        await hub.inbox.send(UnsubscribeConnection(7, 1))
        await hub.inbox.send(Publish((Published(7, e1, 11),)))
        await _settle(hub)
        assert _drain(receive) == []
        assert dict(hub.statistics().extra)["subscriptions"] == 0
        hub.inbox.close()


async def test_same_sub_id_new_generation_replaces_old() -> None:
    alice = Signer()
    hub = SubscriptionHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        sink, receive = _sink(1)
        await hub.inbox.send(
            Subscribe(1, SubscriptionToken(1, "s", 1), (Filter(kinds=frozenset([1])),), sink)
        )
        await hub.inbox.send(
            Subscribe(1, SubscriptionToken(1, "s", 2), (Filter(kinds=frozenset([7])),), sink)
        )
        await hub.inbox.send(Publish((Published(1, alice.event(kind=1), 1),)))
        await hub.inbox.send(Publish((Published(1, alice.event(kind=7), 2),)))
        await _settle(hub)
        assert [(d.token.generation, d.seq) for d in _drain(receive)] == [(2, 2)]
        hub.inbox.close()


async def test_slow_subscriber_overflows_and_others_still_get_events() -> None:
    alice = Signer()
    hub = SubscriptionHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        slow, _slow_receive = _sink(1, size=2)
        fast, fast_receive = _sink(2, size=64)
        await hub.inbox.send(Subscribe(1, SubscriptionToken(1, "s", 1), (Filter(),), slow))
        await hub.inbox.send(Subscribe(1, SubscriptionToken(2, "s", 1), (Filter(),), fast))
        for seq in range(5):
            await hub.inbox.send(Publish((Published(1, alice.event(content=str(seq)), seq),)))
        await _settle(hub)
        assert slow.overflowed
        assert len(_drain(fast_receive)) == 5
        assert dict(hub.statistics().extra)["overflows"] == 1
        assert dict(hub.statistics().extra)["subscriptions"] == 1
        hub.inbox.close()


def test_live_sink_wakes_on_every_offer_and_overflows() -> None:
    wakeups: list[int] = []
    sink = LiveSink(1, 2, lambda: wakeups.append(len(sink)))
    token = SubscriptionToken(1, "s", 1)
    assert sink.offer(Delivery(token, 1, ""))
    assert sink.offer(Delivery(token, 2, ""))
    assert wakeups == [1, 2]
    assert [d.seq for d in _drain(sink)] == [1, 2]
    assert sink.offer(Delivery(token, 3, ""))
    assert sink.offer(Delivery(token, 4, ""))
    assert not sink.offer(Delivery(token, 5, ""))  # a third queued one overflows
    assert sink.overflowed and sink.closed
    assert sink.pop() is None  # an overflowed queue is dropped, not drained
    assert wakeups[-1] == 0  # and the consumer is woken to notice


def test_closed_sink_refuses_offers() -> None:
    sink = LiveSink(1, 2, lambda: None)
    sink.close()
    assert not sink.offer(Delivery(SubscriptionToken(1, "s", 1), 1, ""))
    assert not sink.overflowed
