"""WorkerControl: the worker's side of the control connection to its gateway.

One actor keeps one connection to ``/gateway/worker`` open for as long as the worker runs:

- **handshake**: answer the gateway's ``challenge`` with a ``hello`` signed by the identity key,
  then wait for ``welcome`` (heartbeat interval, liveness timeout, message size limit);
- **registration**: every hosted relay is registered with a ``relay-register`` statement signed
  by the relay's owner key, with a fresh durable ``seq``; the hosted relays are listed again
  every ``rescan_interval_s`` (and on :class:`Rescan`), so relays created meanwhile are
  registered too. A relay the gateway refuses is logged and not offered again while the worker
  runs (an ``internal`` refusal is retried on the next connection);
- **liveness**: a heartbeat every interval; a gateway silent for the liveness timeout is gone;
- **forwarded sessions**: each ``session-open`` for a hosted relay runs a
  :class:`~hypertuna.edge.session.RelaySession` over a :class:`ForwardedPort`, exactly as the
  local edge serves a direct client;
- **reconnects** with jittered exponential backoff after any failure;
- **shutdown** (:class:`Shutdown`): forwarded sessions are closed (each gets CLOSED frames and a
  ``session-close``), then the WebSocket is closed with 1001.

- **blind-peer mirrors**: every registered relay's owner and drive cores are mirrored to the
  gateway by a :class:`~hypertuna.worker.mirror.MirrorFeed` (initial sync from the gateway's
  length, then new blocks as they are appended; see :mod:`hypertuna.worker.mirror`).
- **escrow**: once a relay's registration is accepted, its gateway writer is deposited in the
  gateway's escrow and admitted in the relay by the
  :class:`~hypertuna.worker.escrow.EscrowDepositor`, in a task of its own (once per relay per
  connection; see :mod:`hypertuna.worker.escrow`).

Pending-write messages belong to a later feature: they are logged and ignored.
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import attrs
import nacl.signing
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from hypertuna.actors.runtime import ActorGone, Inbox, Reply
from hypertuna.edge.session import ClientGone, RelaySession
from hypertuna.protocol.worker import (
    Ack,
    Challenge,
    ClientFrames,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    Message,
    MirrorStatus,
    PendingWrites,
    ProtocolError,
    RelayAction,
    RelayFrames,
    RelayRegister,
    RelayStatement,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    Welcome,
    decode,
    encode,
    encode_binary,
    sign_hello,
    sign_statement,
)
from hypertuna.storage.events import RelayRecord
from hypertuna.storage.hosted import is_hosted, owner_core_name
from hypertuna.system import System
from hypertuna.worker.backoff import ReconnectBackoff
from hypertuna.worker.escrow import EscrowDepositor, EscrowRelayStatus
from hypertuna.worker.identity import StatementSeq, worker_key
from hypertuna.worker.mirror import MirrorCoreStatus, MirrorFeed
from hypertuna.worker.port import ForwardedPort
from hypertuna.worker.settings import WorkerSettings

__all__ = [
    "ControlMessage",
    "ControlStatistics",
    "Rescan",
    "Shutdown",
    "WorkerControl",
]

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY: Final = 1001
M = TypeVar("M", bound=Message)
_DESCRIPTION_MAX: Final = 1024
#: Heartbeat intervals and liveness timeouts below this are taken as this (a gateway asking
#: for 0 ms must not turn the worker into a busy loop).
_MIN_PERIOD_S: Final = 0.05
#: Refusals that will not change by asking again.
_PERMANENT: Final = frozenset(ErrorCode) - {ErrorCode.INTERNAL}


@attrs.frozen
class Shutdown:
    """Close forwarded sessions and the control connection gracefully, then stop."""

    reply: Reply[None]


@attrs.frozen
class Rescan:
    """List the hosted relays now and register the new ones."""


ControlMessage = Shutdown | Rescan


@attrs.frozen
class ControlStatistics:
    connected: bool
    gateway_id: str | None
    #: Connections that got through the handshake, and attempts that failed or ended.
    connections: int
    disconnects: int
    #: Relays registered on the current connection; refusals since start.
    registered: int
    refused: int
    sessions_open: int
    sessions_total: int
    sessions_refused: int
    client_frames: int
    inbox_used: int
    #: The cores mirrored to the gateway on the current connection.
    mirrors: tuple[MirrorCoreStatus, ...] = ()
    #: The escrow deposit of each relay handled since the worker started.
    escrow: tuple[EscrowRelayStatus, ...] = ()


class _ConnectionEnded(Exception):
    """The current control connection is over (the reason is logged where it is raised)."""


class _State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    STOPPING = "stopping"


@attrs.define(eq=False)
class _Forwarded:
    port: ForwardedPort
    session: RelaySession


class WorkerControl:
    """The control-client actor (see the module docstring). ``on_connected`` is called with
    each ``welcome`` (from the actor's task; it must not block)."""

    def __init__(
        self,
        system: System,
        identity: nacl.signing.SigningKey,
        settings: WorkerSettings,
        seq: StatementSeq,
        *,
        rng: random.Random | None = None,
        on_connected: Callable[[Welcome], None] | None = None,
    ) -> None:
        self.inbox: Inbox[ControlMessage] = Inbox("worker-control", 16)
        self.worker_key = worker_key(identity)
        self._system = system
        self._identity = identity
        self._settings = settings
        self._seq = seq
        rng = rng or random.Random()
        self._backoff = ReconnectBackoff(settings.backoff, rng)
        self._escrow = (
            EscrowDepositor(
                cores=system.cores,
                writer=system.writer.inbox,
                data_dir=system.config.storage.data_dir,
                settings=settings,
                rng=rng,
            )
            if settings.deposit_escrow
            else None
        )
        self._on_connected = on_connected
        self._state = _State.IDLE
        self._stopping = trio.Event()
        self._loop_done = trio.Event()
        self._attempt_scope: trio.CancelScope | None = None
        #: Relay key -> reason, for refusals that asking again would not change.
        self._refused: dict[str, str] = {}
        self._rescan = trio.Event()
        self._connection: _Connection | None = None
        self._connections = 0
        self._disconnects = 0
        self._refusals = 0
        self._sessions_total = 0
        self._sessions_refused = 0
        self._client_frames = 0

    def statistics(self) -> ControlStatistics:
        connection = self._connection
        return ControlStatistics(
            connected=self._state is _State.CONNECTED,
            gateway_id=connection.gateway_id if connection else None,
            connections=self._connections,
            disconnects=self._disconnects,
            registered=len(connection.registered) if connection else 0,
            refused=self._refusals,
            sessions_open=len(connection.sessions) if connection else 0,
            sessions_total=self._sessions_total,
            sessions_refused=self._sessions_refused,
            client_frames=self._client_frames,
            inbox_used=self.inbox.used,
            mirrors=connection.mirrors.statuses() if connection else (),
            escrow=self._escrow.statuses() if self._escrow is not None else (),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep connected until :class:`Shutdown`. Ready at once: a worker starts (and serves
        its local endpoint) while its gateway is still unreachable."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._connect_loop)
            task_status.started()
            try:
                while True:
                    try:
                        message = await self.inbox.receive()
                    except trio.EndOfChannel:
                        message = Shutdown(Reply())
                    match message:
                        case Rescan():
                            self._rescan.set()
                        case Shutdown(reply=reply):
                            await self._shut_down()
                            nursery.cancel_scope.cancel()
                            reply.send(None)
                            return
            finally:
                for pending in self.inbox.drain():
                    if isinstance(pending, Shutdown):
                        pending.reply.fail_if_pending(ActorGone("worker control stopped"))

    async def _shut_down(self) -> None:
        self._stopping.set()
        if self._state is not _State.CONNECTED and self._attempt_scope is not None:
            # Nothing to close gracefully: do not wait for a connect attempt to time out.
            self._attempt_scope.cancel()
        deadline = self._settings.graceful_timeout_s + self._settings.disconnect_timeout_s + 1
        with trio.move_on_after(deadline):
            await self._loop_done.wait()

    # -- connecting ------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                connected_for = await self._connect_once()
                if self._stopping.is_set():
                    return
                delay = self._backoff.next_delay(connected_for)
                log.info("reconnecting to the gateway in %.2f s", delay)
                with trio.move_on_after(delay):
                    await self._stopping.wait()
        finally:
            self._state = _State.IDLE
            self._loop_done.set()

    async def _connect_once(self) -> float | None:
        """One connection, from connect to its end; returns how long it was up after the
        welcome (None if it never got that far)."""
        settings = self._settings
        url = settings.ws_url
        self._state = _State.CONNECTING
        welcomed_at: float | None = None
        with trio.CancelScope() as self._attempt_scope:
            try:
                async with open_websocket_url(
                    url,
                    max_message_size=settings.max_receive_bytes,
                    connect_timeout=settings.connect_timeout_s,
                    disconnect_timeout=settings.disconnect_timeout_s,
                ) as ws:
                    connection = _Connection(self, ws)
                    try:
                        with trio.fail_after(settings.handshake_timeout_s):
                            welcome = await connection.handshake()
                    except trio.TooSlowError:
                        log.warning("gateway %s did not complete the handshake in time", url)
                        return None
                    welcomed_at = trio.current_time()
                    self._connections += 1
                    self._connection = connection
                    self._state = _State.CONNECTED
                    log.info("connected to gateway %s (%s)", url, connection.gateway_id)
                    if self._on_connected is not None:
                        self._on_connected(welcome)
                    await connection.serve(welcome)
            except HandshakeError as exc:
                # Also raised when the close handshake of a dead connection times out.
                log.warning("connection to gateway %s failed: %s", url, _describe(exc))
            except ConnectionClosed as exc:
                log.warning("gateway %s closed the connection: %s", url, exc.reason)
            except (_ConnectionEnded, OSError) as exc:
                if str(exc):
                    log.warning("connection to gateway %s ended: %s", url, exc)
            finally:
                self._connection = None
                self._state = _State.STOPPING if self._stopping.is_set() else _State.IDLE
                self._disconnects += 1
        self._attempt_scope = None
        return None if welcomed_at is None else trio.current_time() - welcomed_at


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    text = str(exc) or type(exc).__name__
    return f"{text} ({cause})" if cause is not None else text


class _Connection:
    """One welcomed control connection: its tasks belong to the :class:`WorkerControl` actor
    and end with the connection."""

    def __init__(self, control: WorkerControl, ws: WebSocketConnection) -> None:
        self._control = control
        self._ws = ws
        self._system = control._system
        self.gateway_id = ""
        self.registered: set[str] = set()
        #: Relays offered on this connection (acknowledged or not): never offered twice.
        self._offered: set[str] = set()
        self.sessions: dict[int, _Forwarded] = {}
        self._sessions_idle = trio.Event()
        self._sessions_idle.set()
        self._pending: dict[int, Reply[Ack | ErrorMessage]] = {}
        self._ids = itertools.count(1)
        self._max_message_bytes = 0
        self._liveness_s = 0.0
        self._nursery: trio.Nursery | None = None
        self.mirrors = MirrorFeed(
            control._system.cores,
            self.send,
            max_message_bytes=0,
            poll_s=control._settings.mirror_poll_s,
        )

    # -- sending -------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message; :class:`_ConnectionEnded` if the connection is gone."""
        try:
            await self._ws.send_message(encode(message))
        except ConnectionClosed:
            raise _ConnectionEnded() from None

    async def _send_for_session(self, message: Message) -> None:
        # Relay frames go in the protocol's binary form: no JSON escaping on either side.
        data = encode_binary(message) if isinstance(message, RelayFrames) else encode(message)
        try:
            await self._ws.send_message(data)
        except ConnectionClosed:
            raise ClientGone() from None

    async def _receive(self) -> Message | None:
        """The next valid message (None for an invalid one, which was answered with an
        error)."""
        raw = await self._ws.get_message()
        try:
            return decode(raw)
        except ProtocolError as err:
            log.warning("invalid message from the gateway: %s", err.message)
            await self.send(
                ErrorMessage(id=err.request_id, code=err.code, message=err.message[:1024])
            )
            return None

    # -- handshake -----------------------------------------------------------------------------

    async def handshake(self) -> Welcome:
        challenge = await self._expect(Challenge)
        self.gateway_id = challenge.gateway_id
        control = self._control
        await self.send(sign_hello(control._identity, challenge, control._settings.agent))
        welcome = await self._expect(Welcome)
        self._max_message_bytes = welcome.max_message_bytes
        self.mirrors = MirrorFeed(
            self._system.cores,
            self.send,
            max_message_bytes=welcome.max_message_bytes,
            poll_s=control._settings.mirror_poll_s,
        )
        return welcome

    async def _expect(self, kind: type[M]) -> M:
        while True:
            message = await self._receive()
            if isinstance(message, kind):
                return message
            if isinstance(message, ErrorMessage):
                raise _ConnectionEnded(f"gateway refused the handshake: {message.message}")
            if message is not None:
                raise _ConnectionEnded(f"expected {kind.TYPE}, got {message.TYPE}")

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, welcome: Welcome) -> None:
        """Serve until the connection ends (raising :class:`_ConnectionEnded` or
        ``ConnectionClosed``) or the worker stops (returning after a graceful close)."""
        interval = max(welcome.heartbeat_interval_ms / 1000, _MIN_PERIOD_S)
        self._liveness_s = max(welcome.liveness_timeout_ms / 1000, _MIN_PERIOD_S)
        ended: BaseExceptionGroup[_ConnectionEnded | ConnectionClosed] | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeats, interval)
                nursery.start_soon(self._registrations)
                nursery.start_soon(self._watch_stop)
                nursery.start_soon(self.mirrors.run)
                await self._read_loop()
        except* (_ConnectionEnded, ConnectionClosed) as group:
            ended = group
        finally:
            self._nursery = None
            for reply in self._pending.values():
                reply.fail_if_pending(_ConnectionEnded("connection ended"))
            for forwarded in self.sessions.values():
                forwarded.port.peer_closed()
        # While stopping, a closed socket is the expected end (the close handshake races the
        # heartbeat and the reader).
        if ended is not None and not self._control._stopping.is_set():
            reasons = "; ".join(_describe(exc) for exc in ended.exceptions)
            raise _ConnectionEnded(reasons) from ended

    async def _read_loop(self) -> None:
        while True:
            with trio.move_on_after(self._liveness_s) as silence:
                message = await self._receive()
            if silence.cancelled_caught:
                raise _ConnectionEnded(
                    f"gateway silent for {self._liveness_s:g} s (liveness timeout)"
                )
            if message is not None:
                await self._handle(message)

    async def _handle(self, message: Message) -> None:
        control = self._control
        match message:
            case Heartbeat():
                pass  # any message proves liveness; the read deadline already restarted
            case ClientFrames(session=session, frames=frames):
                control._client_frames += len(frames)
                forwarded = self.sessions.get(session)
                if forwarded is None:
                    log.debug("client frames for session %d, which is not open", session)
                    return
                if not await forwarded.port.deliver(frames, control._settings.session_stall_s):
                    self._start(forwarded.session.close, 1008, "forwarded session not keeping up")
            case SessionOpen():
                await self._open_session(message)
            case SessionClose(session=session, reason=reason):
                forwarded = self.sessions.get(session)
                if forwarded is not None:
                    log.debug("gateway closed session %d: %s", session, reason)
                    forwarded.port.peer_closed()
            case Ack(id=request_id) | ErrorMessage(id=int(request_id)) if (
                request_id in self._pending
            ):
                self._pending.pop(request_id).send(message)
            case MirrorStatus():
                self.mirrors.on_status(message)
            case ErrorMessage(id=None) if self.mirrors.on_error(message):
                pass
            case ErrorMessage(code=code, message=text):
                log.warning("gateway reported an error: %s: %s", code, text)
            case PendingWrites():
                log.info("ignoring %s: not supported by this worker yet", message.TYPE)
            case _:
                await self.send(
                    ErrorMessage(
                        id=None,
                        code=ErrorCode.UNEXPECTED,
                        message=f"{message.TYPE} is not expected from a gateway now",
                    )
                )

    def _start(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(function, *args)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.send(Heartbeat(t=int(trio.current_time() * 1000)))

    async def _watch_stop(self) -> None:
        control = self._control
        await control._stopping.wait()
        with trio.move_on_after(control._settings.graceful_timeout_s):
            async with trio.open_nursery() as nursery:
                for forwarded in list(self.sessions.values()):
                    nursery.start_soon(
                        forwarded.session.close, CLOSE_GOING_AWAY, "worker shutting down"
                    )
            await self._sessions_idle.wait()
        # Shielded: a sibling task (heartbeat, reader, mirror feed) that sees the socket start
        # closing ends the nursery, and must not cut the close handshake short (1006).
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(control._settings.disconnect_timeout_s),
        ):
            await self._ws.aclose(CLOSE_GOING_AWAY, "worker shutting down")
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # -- sessions ------------------------------------------------------------------------------

    async def _open_session(self, message: SessionOpen) -> None:
        control = self._control
        relay = await self._relay_to_serve(message)
        if isinstance(relay, str):
            control._sessions_refused += 1
            await self.send(SessionRefused(session=message.session, reason=relay))
            return
        port = ForwardedPort(
            message.session,
            self._send_for_session,
            max_message_bytes=self._max_message_bytes,
            queue_frames=control._settings.session_queue_frames,
        )
        forwarded = _Forwarded(port, RelaySession(self._system, relay, port))
        self.sessions[message.session] = forwarded
        self._sessions_idle = trio.Event()
        control._sessions_total += 1
        # Ready goes out before the session can send anything for it.
        await self.send(SessionReady(session=message.session))
        self._start(self._serve_session, forwarded)

    async def _relay_to_serve(self, message: SessionOpen) -> RelayRecord | str:
        """The relay the session is for, or why it is refused."""
        if self._control._stopping.is_set():
            return "worker shutting down"
        if message.session in self.sessions:
            return f"session {message.session} is already open"
        if len(self.sessions) >= self._control._settings.max_sessions:
            return "worker has too many open sessions"
        relay = await self._system.lookup_relay(message.relay_key)
        if relay is None or relay.key != message.relay_key or not self._hosted(relay):
            return "relay not hosted by this worker"
        return relay

    def _hosted(self, relay: RelayRecord) -> bool:
        return is_hosted(self._system.cores, relay)

    async def _serve_session(self, forwarded: _Forwarded) -> None:
        port = forwarded.port
        try:
            await forwarded.session.run()
        except Exception:
            # One session's failure must not end every other session of the connection.
            log.exception("forwarded session %d failed", port.session)
        finally:
            del self.sessions[port.session]
            if not self.sessions:
                self._sessions_idle.set()
            if not port.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await port.close(1000, "session ended")

    # -- registrations -------------------------------------------------------------------------

    async def _registrations(self) -> None:
        control = self._control
        while True:
            control._rescan = trio.Event()
            for relay in await self._system.list_relays():
                if relay.key in self._offered or relay.key in control._refused:
                    continue
                if not self._hosted(relay):
                    continue
                self._offered.add(relay.key)
                await self._register(relay)
            with trio.move_on_after(control._settings.rescan_interval_s):
                await control._rescan.wait()

    async def _register(self, relay: RelayRecord) -> None:
        control = self._control
        owner = self._system.cores.key_pair(owner_core_name(relay.name))
        seq = await trio.to_thread.run_sync(control._seq.next)
        statement = RelayStatement(
            action=RelayAction.REGISTER,
            relay_key=relay.key,
            owner_key=owner.public_key.hex(),
            gateway_id=self.gateway_id,
            worker_key=control.worker_key,
            seq=seq,
            name=relay.name,
            description=relay.description[:_DESCRIPTION_MAX],
        )
        sig = sign_statement(nacl.signing.SigningKey(owner.seed), statement)
        request_id = next(self._ids)
        reply: Reply[Ack | ErrorMessage] = Reply()
        self._pending[request_id] = reply
        await self.send(RelayRegister(id=request_id, statement=statement, sig=sig))
        with trio.move_on_after(control._settings.register_timeout_s):
            answer = await reply.wait()
            if isinstance(answer, Ack):
                self.registered.add(relay.key)
                log.info("registered relay %s (%s) with the gateway", relay.name, relay.key)
                await self.mirrors.add_relay(relay)
                if control._escrow is not None:
                    # Its own task: HTTP round trips and retries never hold up this loop.
                    self._start(control._escrow.deposit, relay)
                return
            control._refusals += 1
            permanent = answer.code in _PERMANENT
            if permanent:
                control._refused[relay.key] = f"{answer.code}: {answer.message}"
            log.error(
                "the gateway refused relay %s (%s): %s: %s; %s",
                relay.name,
                relay.key,
                answer.code,
                answer.message,
                "not offered again until the worker restarts"
                if permanent
                else "offered again on the next connection",
            )
            return
        self._pending.pop(request_id, None)
        log.warning("the gateway did not answer the registration of relay %s", relay.name)
