"""``/gateway/worker``: one worker's control connection.

:func:`serve_worker` runs the handshake (challenge, signed hello, welcome) under a deadline,
then a :class:`WorkerLink` serves the connection: heartbeats both ways, relay statements handed
to the :class:`~hypertuna.actors.peer_router.PeerRouter`, and forwarded client sessions
multiplexed by session number. Before ``welcome`` only ``hello`` is accepted (anything else gets
``error`` and the connection is closed); afterwards a malformed, unknown or unauthorized message
gets a typed ``error`` and changes nothing, and the connection stays up. ``mirror-update`` and
``mirror-request`` go to the :class:`~hypertuna.actors.blind_peer.BlindPeerStore`, answered with
``mirror-status`` or a typed ``error`` (see :mod:`hypertuna.protocol.worker`); a connection
whose mirror updates are refused more than :data:`MAX_MIRROR_REFUSALS` times is closed (1008).
A message larger than ``workers.max_message_bytes`` closes the connection with 1009 (in the
frame reader).

The link is the transport of forwarded sessions (:mod:`hypertuna.edge.forward`): a session task
opens a :class:`LinkSession`, sends client frames through it and reads relay frames from its
bounded queue; when the worker closes the session or the link ends, the queue ends and the
session fails over.
"""

from __future__ import annotations

import enum
import logging
import secrets

import trio

from hypertuna.actors.blind_peer import ApplyMirror, MirrorAccepted, MirrorLength, MirrorOutcome
from hypertuna.actors.peer_router import (
    RegisterRelay,
    RegisterVerdict,
    WorkerConnected,
    WorkerDisconnected,
    WorkerHeard,
)
from hypertuna.actors.runtime import ActorGone, Reply
from hypertuna.edge.session import ClientGone
from hypertuna.edge.websocket import RelayWebSocket
from hypertuna.protocol.worker import (
    Ack,
    Challenge,
    ClientFrames,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    MirrorRequest,
    MirrorStatus,
    MirrorUpdate,
    PendingWritesAck,
    ProtocolError,
    RelayFrames,
    RelayRegister,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    Welcome,
    decode,
    encode,
    encode_binary,
    verify_hello,
)
from hypertuna.system import System

__all__ = ["LinkSession", "SessionState", "WorkerLink", "serve_worker"]

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
#: Refused mirror updates one connection may send: the reference worker stops offering a core
#: the gateway refused, so a worker that goes on is broken or hostile and is disconnected.
MAX_MIRROR_REFUSALS = 64
CLOSE_GOING_AWAY = 1001


class SessionState(enum.Enum):
    OPENING = "opening"
    READY = "ready"
    REFUSED = "refused"
    ENDED = "ended"


class LinkSession:
    """One forwarded client session on a worker link, as its session task sees it."""

    __slots__ = (
        "_receive",
        "_send",
        "end_reason",
        "id",
        "link",
        "overflowed",
        "relay_key",
        "settled",
        "state",
    )

    def __init__(self, link: WorkerLink, session_id: int, relay_key: str, capacity: int) -> None:
        self.link = link
        self.id = session_id
        self.relay_key = relay_key
        self.state = SessionState.OPENING
        self.settled = trio.Event()
        self.end_reason = ""
        #: The client did not keep up and the queue filled: the session was ended.
        self.overflowed = False
        self._send, self._receive = trio.open_memory_channel[tuple[str, ...]](capacity)

    async def receive(self) -> tuple[str, ...]:
        """The next batch of relay frames; ``trio.EndOfChannel`` once the session ended (see
        ``end_reason`` and ``overflowed``)."""
        return await self._receive.receive()

    def receive_nowait(self) -> tuple[str, ...]:
        return self._receive.receive_nowait()

    @property
    def open(self) -> bool:
        return self.state is SessionState.READY

    async def send(self, frames: list[str]) -> None:
        """Forward client frames; :class:`ClientGone` when the worker or the session is gone."""
        if self.state is not SessionState.READY:
            raise ClientGone()
        await self.link.send_frames(ClientFrames(self.id, tuple(frames)))

    async def close(self, reason: str) -> None:
        """End the session from the gateway side (tells the worker if it can still hear)."""
        was_open = self.state in (SessionState.READY, SessionState.OPENING)
        self.link.forget(self, reason)
        if was_open:
            try:
                await self.link.send_message(SessionClose(self.id, reason[:1024]))
            except ClientGone:
                pass

    # Called by the link's task only.
    def _end(self, reason: str) -> None:
        if self.state is SessionState.ENDED:
            return
        self.state = SessionState.ENDED
        self.end_reason = reason
        self._send.close()
        self.settled.set()

    def _deliver(self, frames: tuple[str, ...]) -> bool:
        try:
            self._send.send_nowait(frames)
        except trio.WouldBlock:
            # Blocking here would stall every session of this worker behind one slow client.
            self.overflowed = True
            return False
        except trio.ClosedResourceError:
            pass
        return True


class WorkerLink:
    """A worker connection after the handshake (see the module docstring)."""

    def __init__(self, system: System, ws: RelayWebSocket, worker_key: str, agent: str) -> None:
        self._system = system
        self._ws = ws
        self._worker_key = worker_key
        self.agent = agent
        self._link_id = 0
        self._sessions: dict[int, LinkSession] = {}
        self._next_session = 1
        self._scope: trio.CancelScope | None = None
        self._abort_reason = ""
        self._closed = False
        self._config = system.config.workers
        self._mirror_refusals = 0

    @property
    def link_id(self) -> int:
        return self._link_id

    @property
    def worker_key(self) -> str:
        return self._worker_key

    def abort(self, reason: str) -> None:
        if not self._abort_reason:
            self._abort_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    def end_relay(self, relay_key: str, reason: str) -> None:
        for session in list(self._sessions.values()):
            if session.relay_key == relay_key:
                session._end(reason)

    async def close(self, code: int, why: str) -> None:
        """Close the WebSocket (shutdown); the link's sessions fail over or end."""
        try:
            await self._ws.close(code, why)
        except ClientGone:
            pass
        self.abort(why)

    async def send_message(self, message: Message) -> None:
        if self._closed:
            raise ClientGone()
        await self._ws.send(encode(message))

    async def send_frames(self, message: ClientFrames) -> None:
        """Forward client frames in the protocol's binary form (no JSON escaping)."""
        if self._closed:
            raise ClientGone()
        await self._ws.send_binary(encode_binary(message))

    def forget(self, session: LinkSession, reason: str) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        session._end(reason)

    async def open_session(self, relay_key: str, try_seconds: float) -> LinkSession | str:
        """Ask the worker to take a client session of ``relay_key``: the ready session, or the
        miss (``"refused"``, ``"timeout"`` or ``"error"``)."""
        if self._closed:
            return "error"
        session_id = self._next_session
        self._next_session += 1
        session = LinkSession(self, session_id, relay_key, self._config.session_buffer_messages)
        self._sessions[session_id] = session
        try:
            await self.send_message(SessionOpen(session_id, relay_key))
            with trio.move_on_after(try_seconds):
                await session.settled.wait()
        except ClientGone:
            self.forget(session, "worker connection lost")
            return "error"
        match session.state:
            case SessionState.READY:
                return session
            case SessionState.REFUSED:
                return "refused"
            case SessionState.ENDED:
                return "error"
            case SessionState.OPENING:
                # Too slow: give up on it, and tell the worker so a late ready is not left open.
                await session.close("session-open timed out")
                return "timeout"

    async def run(self, welcome: Welcome | None = None) -> None:
        """Serve until the worker leaves, the link is aborted or the gateway stops. ``welcome``
        is sent once the router counts the worker, so a worker that has its welcome is already
        one the peer sweep can pick."""
        router = self._system.router
        sessions = self._system.sessions
        self._link_id = sessions.add(self)
        try:
            await router.inbox.request(lambda r: WorkerConnected(self, r))
            if welcome is not None:
                await self.send_message(welcome)
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._abort_reason:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeats)
                    try:
                        await self._read_loop()
                    except ClientGone:
                        pass
                    nursery.cancel_scope.cancel()
        finally:
            sessions.remove(self)
            self._closed = True
            reason = self._abort_reason or "worker connection closed"
            for session in list(self._sessions.values()):
                session._end(reason)
            self._sessions.clear()
            with trio.CancelScope(shield=True):
                try:
                    router.inbox.send_nowait(WorkerDisconnected(self._link_id))
                except (trio.WouldBlock, ActorGone):
                    with trio.move_on_after(5):
                        try:
                            await router.inbox.send(WorkerDisconnected(self._link_id))
                        except ActorGone:
                            pass
                if self._abort_reason and self._ws.open:
                    with trio.move_on_after(1):
                        try:
                            await self._ws.close(CLOSE_POLICY, self._abort_reason[:120])
                        except ClientGone:
                            pass

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self._config.heartbeat_interval_s)
            await self.send_message(Heartbeat(int(self._system.wall_clock() * 1000)))

    async def _error(self, request_id: int | None, code: ErrorCode, message: str) -> None:
        await self.send_message(ErrorMessage(request_id, code, message[:1024]))

    async def _read_loop(self) -> None:
        router = self._system.router
        while True:
            frame = await self._ws.receive()
            try:
                message = decode(frame)
            except ProtocolError as err:
                await self._error(err.request_id, err.code, err.message)
                continue
            match message:
                case RelayFrames(session=sid, frames=frames):
                    session = self._sessions.get(sid)
                    if session is None or session.state is not SessionState.READY:
                        await self._unknown_session(sid, message)
                    elif not session._deliver(frames):
                        self.forget(session, "client too slow")
                        await self.send_message(SessionClose(sid, "client too slow"))
                case Heartbeat():
                    try:
                        router.inbox.send_nowait(WorkerHeard(self._link_id))
                    except trio.WouldBlock:
                        await router.inbox.send(WorkerHeard(self._link_id))
                case SessionReady(session=sid):
                    session = self._sessions.get(sid)
                    if session is None or session.state is not SessionState.OPENING:
                        await self._unknown_session(sid, message)
                    else:
                        session.state = SessionState.READY
                        session.settled.set()
                case SessionRefused(session=sid, reason=why):
                    session = self._sessions.get(sid)
                    if session is None or session.state is not SessionState.OPENING:
                        await self._unknown_session(sid, message)
                    else:
                        del self._sessions[sid]
                        session.state = SessionState.REFUSED
                        session.end_reason = why
                        session.settled.set()
                case SessionClose(session=sid, reason=why):
                    session = self._sessions.pop(sid, None)
                    if session is not None:
                        session._end(why or "closed by the worker")
                case RelayRegister():
                    await self._register(message)
                case MirrorUpdate():
                    await self._mirror(message)
                case MirrorRequest(core_key=core_key):
                    await self._mirror_status(core_key)
                case PendingWritesAck():
                    await self._error(
                        None, ErrorCode.NOT_IMPLEMENTED, f"{message.TYPE} is not supported yet"
                    )
                case ErrorMessage(code=code, message=text):
                    # Never answered: two sides answering each other's errors would loop.
                    log.info("worker %s reports %s: %s", self._worker_key[:16], code, text)
                case _:
                    await self._error(
                        getattr(message, "id", None),
                        ErrorCode.UNEXPECTED,
                        f"{message.TYPE} is not sent by a worker",
                    )

    async def _register(self, message: RelayRegister) -> None:
        def build(reply: Reply[RegisterVerdict]) -> RegisterRelay:
            now = self._system.wall_clock()
            return RegisterRelay(self._link_id, self._worker_key, message, now, reply)

        verdict = await self._system.router.inbox.request(build)
        if verdict.code is None:
            await self.send_message(Ack(message.id))
        else:
            await self._error(message.id, verdict.code, verdict.message)

    async def _mirror_status(self, core_key: str) -> None:
        def build(reply: Reply[tuple[int, int]]) -> MirrorLength:
            return MirrorLength(core_key, reply)

        length, fork = await self._system.blind_peer.inbox.request(build)
        await self.send_message(MirrorStatus(core_key, length, fork))

    async def _mirror(self, message: MirrorUpdate) -> None:
        def build(reply: Reply[MirrorOutcome]) -> ApplyMirror:
            return ApplyMirror(self._worker_key, message, reply)

        outcome = await self._system.blind_peer.inbox.request(build)
        if isinstance(outcome, MirrorAccepted):
            await self.send_message(MirrorStatus(outcome.core_key, outcome.length, outcome.fork))
            return
        await self._error(None, outcome.code, outcome.message)
        self._mirror_refusals += 1
        if self._mirror_refusals > MAX_MIRROR_REFUSALS:
            log.warning("worker %s: too many refused mirror updates", self._worker_key[:16])
            self.abort("too many refused mirror updates")

    async def _unknown_session(self, sid: int, message: Message) -> None:
        # Frames for a session the gateway already gave up on (timed out, closed) are a normal
        # race; only numbers never handed out are the worker's mistake.
        if sid >= self._next_session:
            await self._error(None, ErrorCode.NOT_FOUND, f"{message.TYPE}: no session {sid}")


async def _handshake(system: System, ws: RelayWebSocket) -> Hello | None:
    challenge = Challenge(gateway_id=system.gateway_id, nonce=secrets.token_hex(32))
    await ws.send(encode(challenge))
    with trio.move_on_after(system.config.workers.handshake_timeout_s):
        frame = await ws.receive()
        try:
            message = decode(frame)
        except ProtocolError as err:
            await ws.send(encode(ErrorMessage(err.request_id, err.code, err.message)))
            await ws.close(CLOSE_POLICY, "handshake failed")
            return None
        if not isinstance(message, Hello):
            await ws.send(
                encode(
                    ErrorMessage(
                        getattr(message, "id", None),
                        ErrorCode.UNEXPECTED,
                        f"expected hello, got {message.TYPE}",
                    )
                )
            )
            await ws.close(CLOSE_POLICY, "handshake failed")
            return None
        if not verify_hello(message, challenge):
            await ws.send(
                encode(
                    ErrorMessage(
                        None, ErrorCode.UNAUTHORIZED, "hello does not answer this challenge"
                    )
                )
            )
            await ws.close(CLOSE_POLICY, "handshake failed")
            return None
        return message
    await ws.close(CLOSE_POLICY, "handshake timed out")
    return None


async def serve_worker(system: System, ws: RelayWebSocket) -> None:
    """Serve one accepted ``/gateway/worker`` WebSocket until either side ends it."""
    hello = await _handshake(system, ws)
    if hello is None:
        return
    config = system.config.workers
    welcome = Welcome(
        worker_id=hello.worker_key,
        heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
        liveness_timeout_ms=int(config.liveness_timeout_s * 1000),
        max_message_bytes=config.max_message_bytes,
    )
    link = WorkerLink(system, ws, hello.worker_key, hello.agent)
    metrics = system.metrics
    metrics.workers_connected.inc()
    log.info("worker %s connected (%s)", hello.worker_key[:16], hello.agent)
    try:
        await link.run(welcome)
    finally:
        metrics.workers_connected.dec()
        log.info("worker %s disconnected", hello.worker_key[:16])
