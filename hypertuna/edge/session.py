"""One client's NIP-01 session on one hosted relay.

The session owns its subscriptions. Frames are read in order; EVENTs are pipelined (sent on for
signature checking and storage with a callback for the verdict, up to ``max_in_flight_events``
at once), while REQ, COUNT and CLOSE are handled in arrival order. Live events arrive from the
hub through a bounded queue. OKs and live events are written by a pump task that exists only
while something is queued; it never sends an event for a subscription before its EOSE and drops
every delivery the initial query could already see (``seq <= high_seq``), so a subscription gets
each event once: stored ones before EOSE, newer ones after.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import partial
from typing import Protocol

import attrs
import trio

from hypertuna.actors.hub import (
    Delivery,
    LiveSink,
    Subscribe,
    SubscriptionToken,
    Unsubscribe,
    UnsubscribeConnection,
)
from hypertuna.actors.runtime import ActorGone, Callback
from hypertuna.actors.verifier import VerifyThenIngest
from hypertuna.protocol.nostr import (
    AuthMessage,
    CloseMessage,
    CountMessage,
    EventMessage,
    NostrError,
    Prefix,
    ReqMessage,
    event_frame,
    parse_client_message,
    reason,
)
from hypertuna.protocol.nostr.model import Event
from hypertuna.storage.events import IngestResult, RelayRecord, StorageError
from hypertuna.system import System

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_POLICY", "ClientGone", "RelaySession", "WebSocketPort"]

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008


class ClientGone(Exception):
    """The client disconnected; raised by a transport and ending the session quietly."""


class WebSocketPort(Protocol):
    """The transport a session talks through. ``receive`` raises :class:`ClientGone` when the
    client disconnects; ``send`` and ``close`` raise it when the client is already gone."""

    async def receive(self) -> str | bytes: ...

    async def send(self, data: str) -> None: ...

    async def send_many(self, texts: Iterable[str]) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class TokenBucket:
    """Rate limiter on trio's clock: ``rate`` tokens per second, at most ``burst`` saved."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@attrs.define(eq=False)
class _Subscription:
    token: SubscriptionToken
    #: True once the stored events and EOSE are sent; live deliveries wait until then.
    ready: bool = False
    high_seq: int = 0


def _ok(event_id: str, accepted: bool, message: str) -> str:
    # The id is 64 hex (validated), so only the message needs JSON escaping; this runs once
    # per accepted event.
    if accepted and not message:
        return '["OK","' + event_id + '",true,""]'
    return (
        '["OK","'
        + event_id
        + ('",true,' if accepted else '",false,')
        + json.dumps(message, ensure_ascii=False)
        + "]"
    )


def _closed(sub_id: str, message: str) -> str:
    return json.dumps(["CLOSED", sub_id, message], ensure_ascii=False)


def _notice(message: str) -> str:
    return json.dumps(["NOTICE", message], ensure_ascii=False)


class RelaySession:
    """Serves one WebSocket connection on one relay until the client leaves, the gateway stops,
    or the client is closed as too slow."""

    # Slots: one of these lives per open connection.
    __slots__ = (
        "_bucket",
        "_closing",
        "_connection",
        "_generation",
        "_in_flight",
        "_limits",
        "_metrics",
        "_nursery",
        "_oks",
        "_port",
        "_pumping",
        "_query_done",
        "_relay",
        "_sink",
        "_slot_free",
        "_subs",
        "_system",
    )

    def __init__(self, system: System, relay: RelayRecord, port: WebSocketPort) -> None:
        self._system = system
        self._relay = relay
        self._port = port
        self._limits = system.config.limits
        self._metrics = system.metrics
        self._subs: dict[str, _Subscription] = {}
        self._generation = 0
        self._bucket = TokenBucket(self._limits.events_per_second, self._limits.events_burst)
        #: EVENTs sent on for verification and storage whose OK is not queued yet.
        self._in_flight = 0
        self._slot_free: trio.Event | None = None
        #: OK frames waiting for the pump.
        self._oks: list[str] = []
        #: Made by the pump when a delivery is for a subscription whose EOSE is not sent yet;
        #: set when that REQ is answered. REQs are handled one at a time, so one suffices.
        self._query_done: trio.Event | None = None
        self._connection = 0
        self._closing = False
        self._nursery: trio.Nursery | None = None
        # The live queue and its pump exist only once the client subscribes: publishers that
        # never REQ pay nothing for them.
        self._sink: LiveSink | None = None
        self._pumping = False

    async def run(self) -> None:
        """Serve until the client leaves or :meth:`close` is called."""
        sessions = self._system.sessions
        self._connection = sessions.add(self)
        self._metrics.connections_total.inc()
        self._metrics.connections_open.inc()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._read_loop()
                except ClientGone:
                    pass
                finally:
                    # From here on the hub must not start tasks in this nursery.
                    self._nursery = None
                    if self._sink is not None:
                        self._sink.close()
                nursery.cancel_scope.cancel()
        finally:
            self._metrics.subscriptions_open.dec(len(self._subs))
            self._subs.clear()
            self._metrics.connections_open.dec()
            sessions.remove(self)
            if self._sink is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self._system.hub.inbox.send(
                            UnsubscribeConnection(self._relay.id, self._connection)
                        )
                    except ActorGone:
                        pass

    async def close(self, code: int, why: str) -> None:
        """Send a close frame and end the session: before it, a NOTICE when the client is being
        dropped (1008), else CLOSED for each open subscription. Safe to call more than once and
        from any task."""
        if self._closing:
            return
        self._closing = True
        with trio.move_on_after(2):
            try:
                if code == CLOSE_POLICY:
                    await self._port.send(_notice(f"error: connection closed: {why}"))
                elif self._subs:
                    # The relay ends for this client: say so per subscription (NIP-01 CLOSED)
                    # before the close frame, so clients know which REQs to re-issue elsewhere.
                    await self._port.send_many(
                        [_closed(sub_id, reason(Prefix.ERROR, why)) for sub_id in self._subs]
                    )
                await self._port.close(code, why)
            except ClientGone:
                pass
        self._end()

    def _end(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _live_sink(self) -> LiveSink:
        if self._sink is None:
            self._sink = LiveSink(self._connection, self._limits.outbox_frames, self._wake_pump)
        return self._sink

    def _wake_pump(self) -> None:
        # Called by the hub (synchronously, from its own task) after each offer.
        if self._pumping or self._nursery is None:
            return
        self._pumping = True
        self._nursery.start_soon(self._pump)

    async def _read_loop(self) -> None:
        while True:
            frame = await self._port.receive()
            try:
                message = parse_client_message(
                    frame,
                    max_sub_id_length=self._limits.max_sub_id_length,
                    max_filters=self._limits.max_filters,
                    max_filter_values=self._limits.max_filter_values,
                    # Signatures are checked in batches by the verifier actor, off this loop.
                    verify_signature=False,
                )
            except NostrError as err:
                await self._refuse(err)
                continue
            match message:
                case EventMessage(event=event):
                    await self._on_event(event)
                case ReqMessage():
                    await self._on_req(message)
                case CountMessage():
                    await self._on_count(message)
                case CloseMessage(sub_id=sub_id):
                    await self._on_close(sub_id)
                case AuthMessage(event=event):
                    await self._port.send(
                        _ok(
                            event.id,
                            False,
                            reason(Prefix.RESTRICTED, "this relay does not use AUTH"),
                        )
                    )

    async def _refuse(self, err: NostrError) -> None:
        """Answer a bad message the way NIP-01 clients expect: OK false for an EVENT whose id is
        known, CLOSED for a subscription whose id is known, NOTICE otherwise."""
        text = str(err)
        if err.event_id is not None:
            self._metrics.client_errors.labels(kind="invalid_event").inc()
            self._metrics.event_result(text, accepted=False)
            await self._port.send(_ok(err.event_id, False, text))
        elif err.sub_id is not None:
            self._metrics.client_errors.labels(kind="invalid_request").inc()
            await self._port.send(_closed(err.sub_id, text))
        else:
            self._metrics.client_errors.labels(kind="malformed").inc()
            await self._port.send(_notice(text))

    async def _on_event(self, event: Event) -> None:
        refusal = self._policy_refusal(event)
        if refusal is not None:
            self._metrics.event_result(refusal, accepted=False)
            await self._port.send(_ok(event.id, False, refusal))
            return
        # At the in-flight limit, stop reading the socket until an answer frees a slot:
        # backpressure on fast publishers.
        while self._in_flight >= self._limits.max_in_flight_events:
            if self._slot_free is None:
                self._slot_free = trio.Event()
            await self._slot_free.wait()
        self._in_flight += 1
        message = VerifyThenIngest(
            self._relay.id, event, Callback(partial(self._answered, event.id))
        )
        inbox = self._system.verifier.inbox
        try:
            # No scheduling round per EVENT when there is room: a pipelining client would
            # otherwise wait behind every other task of the process for each frame.
            inbox.send_nowait(message)
        except trio.WouldBlock:
            await inbox.send(message)
        except ActorGone as gone:
            self._answered(event.id, gone)

    def _answered(self, event_id: str, outcome: IngestResult | BaseException) -> None:
        """The verdict on one EVENT (called from the verifier's or the writer's task)."""
        self._in_flight -= 1
        if self._slot_free is not None:
            self._slot_free.set()
            self._slot_free = None
        if isinstance(outcome, IngestResult):
            result = outcome
        elif isinstance(outcome, ActorGone):
            result = IngestResult(False, reason(Prefix.ERROR, "gateway is shutting down"), None)
        else:
            log.error("storing event %s failed", event_id, exc_info=outcome)
            self._metrics.client_errors.labels(kind="storage").inc()
            result = IngestResult(False, reason(Prefix.ERROR, "could not store the event"), None)
        self._metrics.event_result(result.message, result.accepted)
        if self._nursery is None:
            return  # the client left; the verdict stands in the store all the same
        self._oks.append(_ok(event_id, result.accepted, result.message))
        self._wake_pump()

    def _policy_refusal(self, event: Event) -> str | None:
        if not self._bucket.take():
            self._metrics.client_errors.labels(kind="rate_limited").inc()
            return reason(
                Prefix.RATE_LIMITED,
                f"slow down: at most {self._limits.events_per_second:g} events per second",
            )
        now = self._system.wall_clock()
        if event.created_at > now + self._limits.max_future_s:
            return reason(Prefix.INVALID, "created_at is too far in the future")
        expiration = event.expiration
        if expiration is not None and expiration <= now:
            return reason(Prefix.INVALID, "event has expired")
        return None

    async def _on_req(self, message: ReqMessage) -> None:
        sub_id = message.sub_id
        if sub_id not in self._subs and len(self._subs) >= self._limits.max_subscriptions:
            self._metrics.client_errors.labels(kind="too_many_subscriptions").inc()
            await self._port.send(
                _closed(
                    sub_id,
                    reason(
                        Prefix.BLOCKED,
                        f"too many open subscriptions (at most {self._limits.max_subscriptions})",
                    ),
                )
            )
            return
        self._generation += 1
        token = SubscriptionToken(self._connection, sub_id, self._generation)
        replaced = self._subs.get(sub_id)
        subscription = _Subscription(token)
        self._subs[sub_id] = subscription
        if replaced is None:
            self._metrics.subscriptions_open.inc()
        self._metrics.subscriptions_total.inc()
        try:
            # Registered before the query: anything committed after the query's snapshot is
            # delivered live, anything before it is in the snapshot (seq <= high_seq).
            await self._system.hub.inbox.send(
                Subscribe(self._relay.id, token, message.filters, self._live_sink())
            )
            with self._metrics.query_seconds.time():
                result = await self._system.store.query(
                    self._relay.id,
                    message.filters,
                    now=self._system.wall_clock(),
                    max_limit=self._limits.max_limit,
                )
            self._metrics.queries.inc()
            subscription.high_seq = result.high_seq
            if self._subs.get(sub_id) is not subscription:
                return
            # Stored events and EOSE leave as one write.
            frames = [event_frame(sub_id, stored.raw) for stored in result.events]
            frames.append(json.dumps(["EOSE", sub_id], ensure_ascii=False))
            await self._port.send_many(frames)
            self._metrics.events_delivered.inc(len(result.events))
        except StorageError:
            log.exception("query for subscription failed")
            self._metrics.client_errors.labels(kind="storage").inc()
            await self._drop(sub_id, subscription)
            await self._port.send(_closed(sub_id, reason(Prefix.ERROR, "could not read events")))
        finally:
            subscription.ready = True
            if self._query_done is not None:
                self._query_done.set()
                self._query_done = None

    async def _drop(self, sub_id: str, subscription: _Subscription) -> None:
        if self._subs.get(sub_id) is subscription:
            del self._subs[sub_id]
            self._metrics.subscriptions_open.dec()
        await self._system.hub.inbox.send(Unsubscribe(self._relay.id, subscription.token))

    async def _on_count(self, message: CountMessage) -> None:
        try:
            with self._metrics.query_seconds.time():
                total = await self._system.store.count(
                    self._relay.id, message.filters, now=self._system.wall_clock()
                )
            self._metrics.queries.inc()
        except StorageError:
            log.exception("count failed")
            self._metrics.client_errors.labels(kind="storage").inc()
            await self._port.send(
                _closed(message.sub_id, reason(Prefix.ERROR, "could not count events"))
            )
            return
        await self._port.send(json.dumps(["COUNT", message.sub_id, {"count": total}]))

    async def _on_close(self, sub_id: str) -> None:
        subscription = self._subs.get(sub_id)
        if subscription is None:
            return
        await self._drop(sub_id, subscription)
        await self._port.send(_closed(sub_id, ""))

    async def _pump(self) -> None:
        """Send queued OKs and live events until both queues are empty, then end; the next
        answer or delivery starts a new pump (see _wake_pump)."""
        try:
            while True:
                if self._oks:
                    frames, self._oks = self._oks, []
                    await self._port.send_many(frames)
                    continue
                sink = self._sink
                if sink is None or sink.overflowed:
                    break
                delivery = sink.pop()
                if delivery is None:
                    break
                await self._deliver(delivery)
        except ClientGone:
            self._end()
            return
        finally:
            self._pumping = False
        if self._sink is not None and self._sink.overflowed:
            await self.close(CLOSE_POLICY, "too slow to receive live events")

    async def _deliver(self, delivery: Delivery) -> None:
        token = delivery.token
        subscription = self._subs.get(token.sub_id)
        if subscription is None or subscription.token != token:
            return
        while not subscription.ready:
            if self._query_done is None:
                self._query_done = trio.Event()
            await self._query_done.wait()
        if self._subs.get(token.sub_id) is not subscription:
            return
        if delivery.seq is not None and delivery.seq <= subscription.high_seq:
            return
        await self._port.send(event_frame(token.sub_id, delivery.raw))
        self._metrics.events_delivered.inc()
