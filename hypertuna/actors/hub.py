"""SubscriptionHub: the owner of every live subscription.

Accepted events are published to the hub after they are durable; the hub finds the matching
subscriptions through an index (ids, authors, kinds, single-letter tags, or "everything") instead
of testing every subscription, and hands a :class:`Delivery` to each subscriber's bounded
:class:`LiveSink`. A subscriber that cannot keep up is marked overflowed and dropped rather than
slowing every other connection down.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Hashable

import attrs
import trio

from hypertuna.actors.runtime import ActorStatistics, Inbox
from hypertuna.protocol.nostr.model import Event, Filter

__all__ = [
    "Delivery",
    "LiveSink",
    "Publish",
    "Published",
    "Subscribe",
    "SubscriptionHub",
    "SubscriptionToken",
    "Unsubscribe",
    "UnsubscribeConnection",
]


@attrs.frozen(slots=True)
class SubscriptionToken:
    """Names one registration: a REQ that replaces an older one with the same id gets a new
    generation, so deliveries meant for the old filters can be told apart."""

    connection: int
    sub_id: str
    generation: int


@attrs.frozen(slots=True)
class Delivery:
    """One live event for one subscription. ``seq`` is the store sequence (None for ephemeral
    events, which are never stored)."""

    token: SubscriptionToken
    seq: int | None
    raw: str


class LiveSink:
    """One connection's bounded queue of live deliveries.

    The hub offers without ever waiting; each offer calls ``wakeup`` so the connection can start
    a task that drains the queue with :meth:`pop`, and that task ends when the queue is empty.
    An idle subscribed connection therefore holds no task for live events: a gateway keeps one
    sink per subscribed connection, tens of thousands of them mostly idle.
    """

    __slots__ = ("_capacity", "_items", "_wakeup", "closed", "connection", "overflowed")

    def __init__(self, connection: int, capacity: int, wakeup: Callable[[], None]) -> None:
        self.connection = connection
        self._capacity = capacity
        self._items: deque[Delivery] = deque()
        self._wakeup = wakeup
        #: No more offers are taken (the consumer left, or the queue overflowed).
        self.closed = False
        #: The consumer fell ``capacity`` deliveries behind; its queue was dropped.
        self.overflowed = False

    def offer(self, delivery: Delivery) -> bool:
        """Queue ``delivery``; False when the sink is closed or full (it is then overflowed,
        and the consumer is woken to drop the connection)."""
        if self.closed:
            return False
        if len(self._items) >= self._capacity:
            self.closed = True
            self.overflowed = True
            self._items.clear()
            self._wakeup()
            return False
        self._items.append(delivery)
        self._wakeup()
        return True

    def pop(self) -> Delivery | None:
        """The oldest queued delivery, or None when the queue is empty."""
        return self._items.popleft() if self._items else None

    def close(self) -> None:
        """Refuse further offers (the consumer is going away)."""
        self.closed = True
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@attrs.frozen
class Subscribe:
    relay_id: int
    token: SubscriptionToken
    filters: tuple[Filter, ...]
    sink: LiveSink


@attrs.frozen
class Unsubscribe:
    relay_id: int
    token: SubscriptionToken


@attrs.frozen
class UnsubscribeConnection:
    relay_id: int
    connection: int


@attrs.frozen
class Published:
    """One durable (or ephemeral, ``seq`` None) event of relay ``relay_id``."""

    relay_id: int
    event: Event
    seq: int | None


@attrs.frozen
class Publish:
    """Events to deliver live, in order. One message per write batch: each send to the hub is a
    scheduling round for the writer, so a batch must not cost one round per event."""

    events: tuple[Published, ...]


HubMessage = Subscribe | Unsubscribe | UnsubscribeConnection | Publish

_EVERYTHING: tuple[str] = ("*",)


def _index_keys(flt: Filter) -> list[Hashable]:
    """The buckets a filter is filed under: its most selective condition."""
    if flt.ids is not None:
        return [("id", value) for value in flt.ids]
    if flt.tags:
        letter, values = flt.tags[0]
        return [("tag", letter, value) for value in values]
    if flt.authors is not None:
        return [("author", value) for value in flt.authors]
    if flt.kinds is not None:
        return [("kind", value) for value in flt.kinds]
    return [_EVERYTHING]


def _event_keys(event: Event) -> list[Hashable]:
    keys: list[Hashable] = [("id", event.id), ("author", event.pubkey), ("kind", event.kind)]
    keys.extend(("tag", name, value) for name, value in event.indexed_tags())
    keys.append(_EVERYTHING)
    return keys


@attrs.define(eq=False)
class _Registration:
    token: SubscriptionToken
    filters: tuple[Filter, ...]
    sink: LiveSink
    keys: list[Hashable]


class _RelayIndex:
    def __init__(self) -> None:
        self.by_token: dict[SubscriptionToken, _Registration] = {}
        self.buckets: defaultdict[Hashable, dict[SubscriptionToken, _Registration]] = defaultdict(
            dict
        )
        self.by_connection: defaultdict[int, set[SubscriptionToken]] = defaultdict(set)

    def add(self, registration: _Registration) -> None:
        self.remove(registration.token)
        token = registration.token
        # A REQ replacing an older one: the older generation is gone.
        for old in [t for t in self.by_connection[token.connection] if t.sub_id == token.sub_id]:
            self.remove(old)
        self.by_token[token] = registration
        self.by_connection[token.connection].add(token)
        for key in registration.keys:
            self.buckets[key][token] = registration

    def remove(self, token: SubscriptionToken) -> None:
        registration = self.by_token.pop(token, None)
        if registration is None:
            return
        tokens = self.by_connection.get(token.connection)
        if tokens is not None:
            tokens.discard(token)
            if not tokens:
                del self.by_connection[token.connection]
        for key in registration.keys:
            bucket = self.buckets.get(key)
            if bucket is not None:
                bucket.pop(token, None)
                if not bucket:
                    del self.buckets[key]

    def remove_connection(self, connection: int) -> None:
        for token in list(self.by_connection.get(connection, ())):
            self.remove(token)


class SubscriptionHub:
    """Actor owning live subscriptions of every hosted relay."""

    def __init__(self, *, inbox_capacity: int = 4096) -> None:
        self.inbox: Inbox[HubMessage] = Inbox("subscription-hub", inbox_capacity)
        self._relays: dict[int, _RelayIndex] = {}
        self._deliveries = 0
        self._overflows = 0

    def statistics(self) -> ActorStatistics:
        return self.inbox.statistics(
            subscriptions=sum(len(r.by_token) for r in self._relays.values()),
            deliveries=self._deliveries,
            overflows=self._overflows,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                message = await self.inbox.receive()
            except trio.EndOfChannel:
                return
            self._handle(message)

    def _handle(self, message: HubMessage) -> None:
        match message:
            case Publish(events=events):
                for item in events:
                    self._publish(item.relay_id, item.event, item.seq)
            case Subscribe(relay_id=relay_id, token=token, filters=filters, sink=sink):
                if sink.closed:
                    return
                keys = list(dict.fromkeys(k for f in filters for k in _index_keys(f)))
                self._relays.setdefault(relay_id, _RelayIndex()).add(
                    _Registration(token, filters, sink, keys)
                )
            case Unsubscribe(relay_id=relay_id, token=token):
                if (found := self._relays.get(relay_id)) is not None:
                    found.remove(token)
                    self._forget_if_empty(relay_id, found)
            case UnsubscribeConnection(relay_id=relay_id, connection=connection):
                if (found := self._relays.get(relay_id)) is not None:
                    found.remove_connection(connection)
                    self._forget_if_empty(relay_id, found)

    def _forget_if_empty(self, relay_id: int, index: _RelayIndex) -> None:
        if not index.by_token:
            del self._relays[relay_id]

    def _publish(self, relay_id: int, event: Event, seq: int | None) -> None:
        index = self._relays.get(relay_id)
        if index is None:
            return
        seen: set[SubscriptionToken] = set()
        dead: list[int] = []
        for key in _event_keys(event):
            bucket = index.buckets.get(key)
            if not bucket:
                continue
            for token, registration in bucket.items():
                if token in seen:
                    continue
                seen.add(token)
                if not any(f.matches(event) for f in registration.filters):
                    continue
                if registration.sink.offer(Delivery(token, seq, event.raw)):
                    self._deliveries += 1
                else:
                    dead.append(token.connection)
        for connection in set(dead):
            index.remove_connection(connection)
        self._overflows += len(set(dead))
        self._forget_if_empty(relay_id, index)
