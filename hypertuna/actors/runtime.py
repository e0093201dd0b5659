"""Actor runtime primitives: bounded inboxes, one-shot replies, statistics records.

An actor is a class whose state only its own ``run`` task changes. Others talk to it through its
:class:`Inbox` with frozen attrs messages; a request carries its own :class:`Reply`, which is
answered exactly once — with a value, or with an error when the actor fails or stops first, so a
requester never waits forever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import attrs
import trio

__all__ = [
    "ActorGone",
    "ActorStatistics",
    "Callback",
    "ConcurrentServer",
    "Inbox",
    "Reply",
    "ReplyAlreadySent",
    "ReplyPath",
]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
M = TypeVar("M")


class ActorGone(Exception):
    """The actor stopped (or crashed) before answering a request."""


class ReplyAlreadySent(RuntimeError):
    """A reply was answered twice: a bug in the actor."""


@attrs.define(eq=False)
class Reply(Generic[T]):
    """A one-shot reply path. The actor calls :meth:`send` or :meth:`fail` once; the requester
    awaits :meth:`wait`."""

    _event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _value: Any = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def send(self, value: T) -> None:
        if self._event.is_set():
            raise ReplyAlreadySent("reply already answered")
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        if self._event.is_set():
            raise ReplyAlreadySent("reply already answered")
        self._error = error
        self._event.set()

    def fail_if_pending(self, error: BaseException) -> None:
        """Fail the reply unless it was already answered (used when an actor stops)."""
        if not self._event.is_set():
            self.fail(error)

    async def wait(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]


class ReplyPath(Protocol[T_contra]):
    """Where an actor sends the single answer to a request."""

    @property
    def done(self) -> bool: ...

    def send(self, value: T_contra) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def fail_if_pending(self, error: BaseException) -> None: ...


class Callback(Generic[T]):
    """A reply path that hands the answer (a value or an exception) to a plain function, called
    from the answering actor's task. For requesters that must not hold a task per request,
    such as a connection with many EVENTs in flight; the function must not block."""

    __slots__ = ("_done", "_function")

    def __init__(self, function: Callable[[T | BaseException], None]) -> None:
        self._function = function
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def send(self, value: T) -> None:
        if self._done:
            raise ReplyAlreadySent("reply already answered")
        self._done = True
        self._function(value)

    def fail(self, error: BaseException) -> None:
        if self._done:
            raise ReplyAlreadySent("reply already answered")
        self._done = True
        self._function(error)

    def fail_if_pending(self, error: BaseException) -> None:
        if not self._done:
            self.fail(error)


@attrs.frozen
class ActorStatistics:
    """A snapshot of one actor's inbox and work counters."""

    name: str
    inbox_used: int
    inbox_capacity: int
    handled: int
    extra: tuple[tuple[str, float], ...] = ()


class Inbox(Generic[M]):
    """A bounded mailbox. Senders block when it is full (backpressure) or use
    :meth:`send_nowait` and get ``trio.WouldBlock``."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._send, self._receive = trio.open_memory_channel[M](capacity)
        self.handled = 0

    async def send(self, message: M) -> None:
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorGone(f"{self.name} is not running") from None

    def send_nowait(self, message: M) -> None:
        try:
            self._send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ActorGone(f"{self.name} is not running") from None

    async def request(self, build: Callable[[Reply[T]], M]) -> T:
        """Send ``build(reply)`` and wait for the single answer."""
        reply: Reply[T] = Reply()
        await self.send(build(reply))
        return await reply.wait()

    async def receive(self) -> M:
        message = await self._receive.receive()
        self.handled += 1
        return message

    def receive_nowait(self) -> M:
        message = self._receive.receive_nowait()
        self.handled += 1
        return message

    def close(self) -> None:
        """Stop accepting messages; waiting receivers see ``EndOfChannel`` once drained."""
        self._send.close()

    def drain(self) -> list[M]:
        """Remove and return whatever is queued (used at shutdown to fail pending replies)."""
        drained: list[M] = []
        while True:
            try:
                drained.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return drained

    @property
    def used(self) -> int:
        return self._receive.statistics().current_buffer_used

    def statistics(self, **extra: float) -> ActorStatistics:
        return ActorStatistics(
            name=self.name,
            inbox_used=self.used,
            inbox_capacity=self.capacity,
            handled=self.handled,
            extra=tuple(sorted(extra.items())),
        )


class ConcurrentServer(Generic[M]):
    """The receive loop of an actor whose requests may run side by side (each waits on I/O of
    its own: a database, a remote service): every message is handled in its own task, at most
    ``max_concurrent`` at once, the rest waiting in the inbox (backpressure).

    A message must carry its :class:`Reply` as ``reply``; the value ``dispatch`` returns answers
    it. An ``expected`` exception (a refused argument, an unavailable dependency) fails just
    that reply; anything else fails it with :class:`ActorGone` and propagates, ending the actor.
    """

    def __init__(
        self,
        inbox: Inbox[M],
        dispatch: Callable[[M], Awaitable[object]],
        *,
        max_concurrent: int,
        expected: tuple[type[Exception], ...],
    ) -> None:
        self._inbox = inbox
        self._dispatch = dispatch
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._expected = expected
        #: Messages being handled right now.
        self.running = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        """Handle messages in tasks of ``nursery`` until the inbox is closed."""
        while True:
            try:
                message = await self._inbox.receive()
            except trio.EndOfChannel:
                return
            # The token borrows the slot for the child task, which gives it back.
            token = object()
            await self._limiter.acquire_on_behalf_of(token)
            self.running += 1
            nursery.start_soon(self._handle, message, token)

    async def _handle(self, message: M, token: object) -> None:
        reply: Any = message.reply  # type: ignore[attr-defined]
        try:
            reply.send(await self._dispatch(message))
        except self._expected as exc:
            # The requester's problem, not the actor's.
            reply.fail_if_pending(exc)
        except BaseException as exc:
            reply.fail_if_pending(ActorGone(f"{self._inbox.name} failed: {type(exc).__name__}"))
            raise
        finally:
            self.running -= 1
            self._limiter.release_on_behalf_of(token)
