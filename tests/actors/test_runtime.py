from __future__ import annotations

import pytest
import trio
import trio.testing

from hypertuna.actors.runtime import ActorGone, Inbox, Reply, ReplyAlreadySent


async def test_reply_answers_exactly_once() -> None:
    reply: Reply[int] = Reply()
    reply.send(3)
    with pytest.raises(ReplyAlreadySent):
        reply.send(4)
    with pytest.raises(ReplyAlreadySent):
        reply.fail(RuntimeError())
    reply.fail_if_pending(RuntimeError())  # no effect once answered
    assert await reply.wait() == 3


async def test_reply_failure_reaches_requester() -> None:
    reply: Reply[int] = Reply()
    reply.fail(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await reply.wait()


async def test_request_round_trip_and_statistics(autojump_clock: trio.testing.MockClock) -> None:
    inbox: Inbox[tuple[int, Reply[int]]] = Inbox("doubler", 2)

    async def actor() -> None:
        while True:
            try:
                value, reply = await inbox.receive()
            except trio.EndOfChannel:
                return
            await trio.sleep(1)
            reply.send(value * 2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        start = trio.current_time()
        assert await inbox.request(lambda r: (21, r)) == 42
        assert trio.current_time() - start == 1
        stats = inbox.statistics(extra=1.0)
        assert (stats.name, stats.inbox_capacity, stats.handled) == ("doubler", 2, 1)
        assert stats.extra == (("extra", 1.0),)
        inbox.close()


async def test_inbox_is_bounded() -> None:
    inbox: Inbox[int] = Inbox("small", 2)
    inbox.send_nowait(1)
    inbox.send_nowait(2)
    with pytest.raises(trio.WouldBlock):
        inbox.send_nowait(3)
    assert inbox.used == 2
    assert inbox.drain() == [1, 2]


async def test_send_to_stopped_actor_raises_actor_gone() -> None:
    inbox: Inbox[int] = Inbox("gone", 1)
    inbox.close()
    with pytest.raises(ActorGone):
        await inbox.send(1)
    with pytest.raises(ActorGone):
        inbox.send_nowait(1)
