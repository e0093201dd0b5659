"""Prometheus metrics of the gateway, in the system's own registry.

Label values always come from closed sets (result prefixes, error kinds, actor names), never
from client input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hypertuna.actors.blind_peer import MIRROR_STATES, BlindPeerStatistics
from hypertuna.actors.peer_router import SERVED_MODES, PeerRouterStatistics
from hypertuna.actors.runtime import ActorStatistics
from hypertuna.escrow_client.remote import RemoteEscrowStatistics, RemoteState

__all__ = [
    "ERROR_KINDS",
    "EVENT_RESULTS",
    "FALLBACK_MODES",
    "FALLBACK_READ_MODES",
    "SERVED_MODES",
    "SWEEP_RESULTS",
    "GatewayMetrics",
]

#: Outcomes of an EVENT: accepted, or the NIP-01 prefix of the refusal.
EVENT_RESULTS = (
    "accepted",
    "duplicate",
    "invalid",
    "blocked",
    "rate-limited",
    "restricted",
    "error",
    "auth-required",
)
#: Client mistakes and protections that produce a NOTICE, CLOSED or a close frame.
ERROR_KINDS = (
    "malformed",
    "invalid_event",
    "invalid_request",
    "too_many_subscriptions",
    "rate_limited",
    "oversize",
    "slow_consumer",
    "storage",
)


#: Outcomes of one try of the peer sweep, and ``none`` for a sweep that found no worker.
SWEEP_RESULTS = ("hit", "refused", "timeout", "error", "none")
FORWARD_DIRECTIONS = ("to_worker", "to_client")
#: Why a session went to a relay's replica: the sweep found no worker for a session that had
#: none (``sweep-miss``), or the worker serving it was lost (``worker-lost``).
FALLBACK_MODES = ("sweep-miss", "worker-lost")
#: Who answers reads while a relay's workers are offline (the lease issue adds a writable mode).
FALLBACK_READ_MODES = ("replica",)


class _RouterCollector(Collector):
    def __init__(self, source: Callable[[], PeerRouterStatistics]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._source()
        relays = GaugeMetricFamily(
            "gateway_worker_relays",
            "Relays registered by workers that at least one healthy connected worker serves",
        )
        relays.add_metric([], stats.relays_served)
        yield relays
        healthy = GaugeMetricFamily(
            "gateway_workers_healthy", "Connected workers heard within the liveness timeout"
        )
        healthy.add_metric([], stats.workers_healthy)
        yield healthy


class _BlindPeerCollector(Collector):
    def __init__(self, source: Callable[[], BlindPeerStatistics]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._source()
        states = GaugeMetricFamily(
            "gateway_blind_peer_mirror_state",
            "Blind-peer mirrors by state (ready: holds what its worker announced; syncing: "
            "behind for less than blind_peer.stale_after_s; stale: behind for longer)",
            labels=["state"],
        )
        counts = dict(stats.states)
        for state in MIRROR_STATES:
            states.add_metric([state], counts.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "gateway_blind_peer_mirror_lag_ms",
            "Largest mirror lag: ms since a mirror fell behind its worker's announced length",
            value=stats.max_lag_ms,
        )
        yield GaugeMetricFamily(
            "gateway_blind_peer_bytes", "Bytes of mirrored blocks held", value=stats.bytes
        )
        updates = CounterMetricFamily(
            "gateway_blind_peer_updates",
            "Mirror updates by outcome (accepted, or the error code of the refusal)",
            labels=["result"],
        )
        updates.add_metric(["accepted"], stats.accepted)
        for code, count in stats.refused:
            updates.add_metric([code], count)
        yield updates


class _RemoteEscrowCollector(Collector):
    def __init__(self, source: Callable[[], RemoteEscrowStatistics]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._source()
        yield GaugeMetricFamily(
            "gateway_escrow_lease_lag_seconds",
            "Seconds since the lease-event follower last heard from the standalone escrow "
            "(at most the poll wait plus one request attempt while it is up)",
            value=stats.lag_s,
        )
        yield GaugeMetricFamily(
            "gateway_escrow_remote_up",
            "1 while the standalone escrow answers the lease-event follower",
            value=1 if stats.state is RemoteState.UP else 0,
        )
        yield CounterMetricFamily(
            "gateway_escrow_lease_resets",
            "Times the follower listed the leases again (the escrow restarted or it fell behind)",
            value=stats.resets,
        )
        yield CounterMetricFamily(
            "gateway_escrow_lease_endings",
            "Lease endings the follower published on the gateway's revocation bus",
            value=stats.published,
        )


class _ActorCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[ActorStatistics]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "gateway_actor_inbox_messages", "Messages waiting in an actor inbox", labels=["actor"]
        )
        capacity = GaugeMetricFamily(
            "gateway_actor_inbox_capacity", "Capacity of an actor inbox", labels=["actor"]
        )
        handled = GaugeMetricFamily(
            "gateway_actor_messages_handled", "Messages an actor has taken", labels=["actor"]
        )
        counters = GaugeMetricFamily(
            "gateway_actor_stat",
            "An actor's own work counters (batches, largest batch, deliveries, ...)",
            labels=["actor", "stat"],
        )
        for stats in self._source():
            used.add_metric([stats.name], stats.inbox_used)
            capacity.add_metric([stats.name], stats.inbox_capacity)
            handled.add_metric([stats.name], stats.handled)
            for name, value in stats.extra:
                counters.add_metric([stats.name, name], value)
        yield used
        yield capacity
        yield handled
        yield counters


class GatewayMetrics:
    """Counters and gauges of one gateway system."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_total = Counter(
            "gateway_connections", "Client WebSocket connections accepted", registry=r
        )
        self.connections_open = Gauge(
            "gateway_connections_open", "Client WebSocket connections open now", registry=r
        )
        self.subscriptions_total = Counter(
            "gateway_subscriptions", "REQ subscriptions opened", registry=r
        )
        self.subscriptions_open = Gauge(
            "gateway_subscriptions_open", "Live subscriptions open now", registry=r
        )
        self.events_received = Counter(
            "gateway_events_received", "EVENT messages by result", ["result"], registry=r
        )
        self.events_delivered = Counter(
            "gateway_events_delivered", "Events sent to clients (stored and live)", registry=r
        )
        self.client_errors = Counter(
            "gateway_client_errors", "Client errors and protections by kind", ["kind"], registry=r
        )
        self.queries = Counter("gateway_queries", "REQ and COUNT store queries", registry=r)
        self.query_seconds = Histogram(
            "gateway_query_seconds",
            "Store query time for REQ and COUNT",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.workers_connected = Gauge(
            "gateway_workers_connected", "Authenticated worker connections open now", registry=r
        )
        self.peer_sweep = Counter(
            "gateway_peer_sweep",
            "Peer sweep tries by result (none: a whole sweep without a hit)",
            ["result"],
            registry=r,
        )
        self.forwarded_frames = Counter(
            "gateway_forwarded_frames",
            "NIP-01 frames forwarded between clients and workers",
            ["direction"],
            registry=r,
        )
        self.relay_served_seconds = Counter(
            "gateway_relay_served_seconds",
            "Client session time by who answered: a worker (peer), a relay the gateway hosts "
            "(local), or the replica path",
            ["mode"],
            registry=r,
        )
        # -- replica fallback ----------------------------------------------------------------
        self.replica_fallback = Counter(
            "gateway_replica_fallback",
            "Client sessions switched to a relay's replica, by why",
            ["mode"],
            registry=r,
        )
        self.fallbacks = {m: self.replica_fallback.labels(mode=m) for m in FALLBACK_MODES}
        # The relay label is the first 16 hex of the relay key, and only relays with an open
        # replica have one (removed on eviction): at most the replica LRU's size of them.
        self.relay_fallback_reads = Counter(
            "gateway_relay_fallback_reads",
            "REQ and COUNT answered from a replica, by relay (key prefix) and mode",
            ["relay", "mode"],
            registry=r,
        )
        self.replica_sessions = Gauge(
            "gateway_relay_replica_sessions",
            "Client sessions served from a replica now",
            registry=r,
        )
        self.fallback_duration = Histogram(
            "gateway_relay_fallback_duration_seconds",
            "Length of the spans a client session spent in replica mode",
            registry=r,
            buckets=(0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0),
        )
        self.sweep_results = {res: self.peer_sweep.labels(result=res) for res in SWEEP_RESULTS}
        self.forwarded = {d: self.forwarded_frames.labels(direction=d) for d in FORWARD_DIRECTIONS}
        self.served = {mode: self.relay_served_seconds.labels(mode=mode) for mode in SERVED_MODES}
        # Children resolved once: labels() takes a lock and a dict lookup on every call.
        self._event_results = {
            result: self.events_received.labels(result=result) for result in EVENT_RESULTS
        }
        for kind in ERROR_KINDS:
            self.client_errors.labels(kind=kind)

    def watch_actors(self, source: Callable[[], Iterable[ActorStatistics]]) -> None:
        """Export inbox gauges read from the actors' ``statistics()`` at scrape time."""
        self.registry.register(_ActorCollector(source))

    def watch_remote_escrow(self, source: Callable[[], RemoteEscrowStatistics]) -> None:
        """Export the standalone escrow follower's lag, state and counters at scrape time."""
        self.registry.register(_RemoteEscrowCollector(source))

    def watch_router(self, source: Callable[[], PeerRouterStatistics]) -> None:
        """Export the router's gauges read from its ``statistics()`` at scrape time."""
        self.registry.register(_RouterCollector(source))

    def fallback_reads_for(self, relay_key: str) -> None:
        """Start exporting the fallback reads of ``relay_key`` (its replica opened)."""
        for mode in FALLBACK_READ_MODES:
            self.relay_fallback_reads.labels(relay=relay_key[:16], mode=mode)

    def forget_fallback_reads(self, relay_key: str) -> None:
        """Stop exporting them (its replica closed): keeps the label set bounded."""
        for mode in FALLBACK_READ_MODES:
            try:
                self.relay_fallback_reads.remove(relay_key[:16], mode)
            except KeyError:
                pass

    def fallback_read(self, relay_key: str, mode: str = "replica") -> None:
        self.relay_fallback_reads.labels(relay=relay_key[:16], mode=mode).inc()

    def watch_blind_peer(self, source: Callable[[], BlindPeerStatistics]) -> None:
        """Export the blind-peer store's gauges read from its ``statistics()`` at scrape time."""
        self.registry.register(_BlindPeerCollector(source))

    def event_result(self, message: str, accepted: bool) -> None:
        if accepted:
            self._event_results["accepted"].inc()
            return
        prefix = message.split(":", 1)[0]
        self._event_results.get(prefix, self._event_results["error"]).inc()
