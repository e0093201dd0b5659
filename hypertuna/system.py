"""The supervisor: ``open_system(config)`` builds storage, starts every actor in dependency order
and serves the edge inside the same nursery tree, then shuts all of it down in stages.

Stages on exit: (1) ``stopping`` is set, every open WebSocket gets a 1001 close frame and a
graceful deadline to finish; (2) the HTTP server stops listening and returns; (3) the writer and
the directory drain their inboxes (queued events are still stored) and stop; (4) the hub stops;
(5) storage (the event store and the cores) closes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from hypertuna.actors.blind_peer import BlindPeerStore
from hypertuna.actors.directory import CreateRelay, ListRelays, LookupRelay, RelayDirectory
from hypertuna.actors.escrow import EscrowActor
from hypertuna.actors.evidence import EvidenceGatherer
from hypertuna.actors.hub import SubscriptionHub
from hypertuna.actors.peer_router import PeerRouter, RelayRoute, RouteRelay
from hypertuna.actors.replica import ReplicaManager, replica_data_dir
from hypertuna.actors.runtime import ActorStatistics, Inbox
from hypertuna.actors.verifier import SignatureVerifier
from hypertuna.actors.writer import EventWriter
from hypertuna.config import Config
from hypertuna.edge.metrics import GatewayMetrics
from hypertuna.edge.tls import ReloadingClientContext
from hypertuna.escrow.policy import Policy
from hypertuna.escrow.settings import EscrowSettings, open_service
from hypertuna.escrow_client.port import EscrowPort
from hypertuna.escrow_client.remote import RemoteEscrow
from hypertuna.escrow_client.transport import open_escrow_transport
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import EventStore, RelayRecord, open_event_store
from hypertuna.storage.hosted import PFP_DRIVE, open_drive

__all__ = ["GATEWAY_IDENTITY", "System", "WallClock", "open_system", "system_wall_clock"]

log = logging.getLogger(__name__)

WallClock = Callable[[], int]

#: Name of the key pair (in the core store) that is the gateway's identity.
GATEWAY_IDENTITY = "gateway/identity"


def _ms(wall_clock: WallClock) -> Callable[[], int]:
    """Unix milliseconds: the real clock's own when ``wall_clock`` is the system's, else the
    injected seconds scaled (so tests that control the clock control this too)."""
    if wall_clock is system_wall_clock:
        return lambda: time.time_ns() // 1_000_000
    return lambda: wall_clock() * 1000


def system_wall_clock() -> int:
    """Seconds since the epoch: the only wall-clock source of a production gateway."""
    return int(time.time())


class ClosableSession(Protocol):
    async def close(self, code: int, why: str) -> None: ...


class Sessions:
    """The open client sessions, so that shutdown can close each with a close frame."""

    def __init__(self) -> None:
        self._open: set[ClosableSession] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._ids = itertools.count(1)

    def add(self, session: ClosableSession) -> int:
        """Register ``session``; returns its connection number."""
        if not self._open:
            self._idle = trio.Event()
        self._open.add(session)
        return next(self._ids)

    def remove(self, session: ClosableSession) -> None:
        self._open.discard(session)
        if not self._open:
            self._idle.set()

    @property
    def open(self) -> int:
        return len(self._open)

    async def close_all(self, code: int, why: str) -> None:
        async with trio.open_nursery() as nursery:
            for session in list(self._open):
                nursery.start_soon(session.close, code, why)

    async def wait_idle(self) -> None:
        await self._idle.wait()


@attrs.define(eq=False)
class System:
    """Facade over a running gateway: what the edge and the CLI need, nothing more."""

    config: Config
    store: EventStore
    cores: CoreStore
    hub: SubscriptionHub
    writer: EventWriter
    verifier: SignatureVerifier
    directory: RelayDirectory
    metrics: GatewayMetrics
    wall_clock: WallClock
    router: PeerRouter
    #: Verified mirrors of the cores of worker-registered relays.
    blind_peer: BlindPeerStore
    #: This gateway's Ed25519 public key (hex): workers sign hellos and owners statements for it.
    gateway_id: str
    #: Serves worker relays from their mirrors while no worker answers.
    replicas: ReplicaManager
    #: Builds the escrow's unlock evidence from the gateway's own state.
    evidence: EvidenceGatherer
    #: The escrow inside the gateway, when ``escrow.enabled`` without ``escrow.url``.
    escrow: EscrowActor | None = None
    #: The standalone escrow at ``escrow.url``, when ``escrow.enabled`` with it.
    remote_escrow: RemoteEscrow | None = None
    sessions: Sessions = attrs.field(factory=Sessions)
    #: Set when shutdown begins: sessions close their WebSockets with 1001.
    stopping: trio.Event = attrs.field(factory=trio.Event)
    #: The bound ``http://host:port`` URLs once the edge listens.
    http_urls: list[str] = attrs.field(factory=list)

    def statistics(self) -> list[ActorStatistics]:
        return [
            self.hub.statistics(),
            self.writer.statistics(),
            self.verifier.statistics(),
            self.directory.statistics(),
            self.router.statistics().actor,
            self.blind_peer.statistics().actor,
            self.replicas.statistics().actor,
            *([self.escrow.statistics().actor] if self.escrow is not None else []),
            *([self.remote_escrow.statistics().actor] if self.remote_escrow is not None else []),
        ]

    @property
    def escrow_port(self) -> EscrowPort | None:
        """The escrow the gateway's lease holders use, embedded or remote (None without one)."""
        if self.escrow is not None:
            return self.escrow
        return self.remote_escrow

    @property
    def base_url(self) -> str:
        """Public http base URL: the configured one, else the first bound address."""
        if self.config.server.public_url or not self.http_urls:
            return self.config.base_http_url
        return self.http_urls[0]

    def relay_url(self, relay: RelayRecord) -> str:
        return self.config.relay_ws_url(relay.key, self.base_url)

    async def lookup_relay(self, key_or_name: str) -> RelayRecord | None:
        return await self.directory.inbox.request(lambda r: LookupRelay(key_or_name, r))

    async def route_relay(self, key_or_name: str) -> RelayRoute | None:
        """The relay that workers serve under this key or name, if any."""
        return await self.router.inbox.request(lambda r: RouteRelay(key_or_name, r))

    async def list_relays(self) -> list[RelayRecord]:
        return await self.directory.inbox.request(ListRelays)

    async def create_relay(self, name: str, description: str = "") -> RelayRecord:
        """Create a hosted relay; its key is the key of its new owner core."""
        now = self.wall_clock()
        return await self.directory.inbox.request(lambda r: CreateRelay(name, description, now, r))


class _Actor(Protocol):
    @property
    def inbox(self) -> Inbox[Any]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@contextlib.asynccontextmanager
async def _running(actor: _Actor) -> AsyncIterator[None]:
    """Run ``actor`` until the block exits, then close its inbox and wait for it to finish
    what is queued."""
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        try:
            yield
        finally:
            actor.inbox.close()


@contextlib.asynccontextmanager
async def open_system(
    config: Config,
    *,
    wall_clock: WallClock = system_wall_clock,
    serve: bool = True,
    escrow_environ: Mapping[str, str] | None = None,
) -> AsyncIterator[System]:
    """Run a gateway for the duration of the ``async with`` block.

    Parts start in dependency order (storage, hub, writer, verifier, directory, peer router,
    replica manager, blind-peer store, escrow, edge) and stop in the reverse order, each after
    the ones that send to it. With ``serve=False`` no port is opened (for commands that only
    need the actors). With ``escrow.enabled`` the EscrowActor runs too, its policy read from the
    ``ESCROW_*`` variables of ``escrow_environ`` (default ``os.environ``) — or, with
    ``escrow.url``, a :class:`~hypertuna.escrow_client.remote.RemoteEscrow` follows the
    standalone escrow there instead.
    """
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            open_event_store(config.storage.database_url or None, config.storage.data_dir)
        )
        cores = await trio.to_thread.run_sync(CoreStore.open, config.storage.cores_dir)
        stack.callback(cores.close)
        # The shared profile-picture drive exists from the first start (relay drives are made
        # with their relays).
        await trio.to_thread.run_sync(open_drive, cores, PFP_DRIVE)
        hub = SubscriptionHub()
        await stack.enter_async_context(_running(hub))
        writer = EventWriter(
            store, hub, wall_clock=wall_clock, max_batch=config.storage.max_batch, cores=cores
        )
        await stack.enter_async_context(_running(writer))
        verifier = SignatureVerifier(writer.inbox)
        await stack.enter_async_context(_running(verifier))
        directory = RelayDirectory(store, cores)
        await stack.enter_async_context(_running(directory))
        # Derived from the core store's primary key: stable across restarts, no extra secret.
        gateway_id = cores.key_pair(GATEWAY_IDENTITY).public_key.hex()
        router = PeerRouter(
            store,
            gateway_id=gateway_id,
            liveness_timeout_s=config.workers.liveness_timeout_s,
        )
        await stack.enter_async_context(_running(router))
        metrics = GatewayMetrics()
        # Replica views are caches rebuilt from the mirrors: their own store, never the hosted
        # relays' one. Made before the blind-peer store, which reports mirror growth to it
        # (``on_grow=replicas.notify_grow``).
        replica_store = await stack.enter_async_context(
            open_event_store(None, replica_data_dir(config.storage.data_dir))
        )
        replicas = ReplicaManager(
            replica_store,
            cores,
            metrics,
            wall_clock=wall_clock,
            max_open=config.blind_peer.max_open_replicas,
            max_limit=config.limits.max_limit,
            session_capacity=config.limits.outbox_frames,
        )
        await stack.enter_async_context(_running(replicas))
        blind_peer = BlindPeerStore(
            cores,
            store.worker_relays,
            wall_clock=wall_clock,
            max_bytes=config.blind_peer.max_bytes,
            max_bytes_per_owner=config.blind_peer.max_bytes_per_owner,
            max_block_bytes=config.blind_peer.max_block_bytes,
            stale_after_s=config.blind_peer.stale_after_s,
            mirror_ttl_s=config.blind_peer.mirror_ttl_s,
            gc_interval_s=config.blind_peer.gc_interval_s,
            is_held=replicas.is_open,
            on_grow=replicas.notify_grow,
            on_removed=replicas.notify_removed,
        )
        await stack.enter_async_context(_running(blind_peer))
        evidence = EvidenceGatherer(router, blind_peer, replicas, wall_clock_ms=_ms(wall_clock))
        escrow: EscrowActor | None = None
        remote_escrow: RemoteEscrow | None = None
        if config.escrow.remote:
            remote_escrow = await stack.enter_async_context(_open_remote_escrow(config, wall_clock))
            metrics.watch_remote_escrow(remote_escrow.statistics)
        elif config.escrow.enabled:
            policy = Policy.from_env(os.environ if escrow_environ is None else escrow_environ)
            settings = EscrowSettings(
                key_dir=escrow_key_dir(config),
                database_url=config.escrow.database_url or None,
                sqlite_path=config.storage.data_dir / "escrow.db",
                policy=policy,
            )
            # The keys are loaded before the actor reports started: a missing or unreadable
            # key stops the gateway with the key error's own words (never a new key).
            escrow = EscrowActor(lambda: open_service(settings), wall_clock_ms=_ms(wall_clock))
            await stack.enter_async_context(_running(escrow))
            metrics.registry.register(escrow.metrics)
        system = System(
            config=config,
            store=store,
            cores=cores,
            hub=hub,
            writer=writer,
            verifier=verifier,
            directory=directory,
            metrics=metrics,
            wall_clock=wall_clock,
            router=router,
            blind_peer=blind_peer,
            gateway_id=gateway_id,
            replicas=replicas,
            evidence=evidence,
            escrow=escrow,
            remote_escrow=remote_escrow,
        )
        system.metrics.watch_actors(system.statistics)
        system.metrics.watch_router(router.statistics)
        system.metrics.watch_blind_peer(blind_peer.statistics)
        await stack.enter_async_context(_serving(system, serve))
        yield system


@contextlib.asynccontextmanager
async def _open_remote_escrow(config: Config, wall_clock: WallClock) -> AsyncIterator[RemoteEscrow]:
    """The client of the standalone escrow at ``escrow.url``, running. Its TLS files and secret
    are loaded first (:class:`~hypertuna.edge.tls.TlsContextError`,
    :class:`~hypertuna.config.ConfigError`); a refused certificate or HMAC signature stops the
    start, an unreachable escrow does not (see :mod:`hypertuna.escrow_client.remote`)."""
    settings = config.escrow
    secret = settings.read_hmac_secret()
    holder = ReloadingClientContext(
        settings.tls_ca, settings.tls_client_cert, settings.tls_client_key
    )
    async with open_escrow_transport(
        settings.url,
        client_id=settings.hmac_client_id,
        secret=secret,
        ssl_context_holder=holder,
        wall_clock=wall_clock,
        connect_timeout_s=settings.request_timeout_s,
        request_timeout_s=settings.request_timeout_s,
    ) as transport:
        remote = RemoteEscrow(
            transport, wall_clock_ms=_ms(wall_clock), poll_wait_s=settings.poll_wait_s
        )
        async with _running(remote):
            yield remote


def escrow_key_dir(config: Config) -> Path:
    """Where the gateway's escrow keys live (``escrow.key_dir`` or ``<data_dir>/escrow-keys``)."""
    key_dir = config.escrow.key_dir
    return Path(key_dir) if key_dir else config.storage.data_dir / "escrow-keys"


@contextlib.asynccontextmanager
async def _serving(system: System, serve: bool) -> AsyncIterator[None]:
    # Imported here: the edge depends on the system facade, not the other way round.
    from hypertuna.edge.app import create_app
    from hypertuna.edge.asgi import EdgeApp
    from hypertuna.edge.server import serve_edge

    if not serve:
        yield
        return
    edge_stop = trio.Event()
    async with trio.open_nursery() as edge_nursery:
        system.http_urls = await edge_nursery.start(
            serve_edge, system, EdgeApp(system, create_app(system)), edge_stop.wait
        )
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                system.stopping.set()
                with trio.move_on_after(system.config.server.graceful_timeout_s):
                    await system.sessions.close_all(1001, "gateway shutting down")
                    await system.sessions.wait_idle()
                if system.sessions.open:
                    log.warning(
                        "%d connections still open after the graceful deadline",
                        system.sessions.open,
                    )
                edge_stop.set()
