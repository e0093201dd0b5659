"""The gateway's unlock evidence: what it observed itself about a relay's workers and mirrors.

In the single binary the escrow judges an unlock on this evidence only; it is never taken from
an HTTP caller (issue 6). :class:`EvidenceGatherer` reads snapshots of the actors that own the
facts, in the same trio run (like their ``statistics()``):

- the :class:`~hypertuna.actors.peer_router.PeerRouter`: whether the relay has an active worker
  registration, how many healthy workers serve it, and when one was last heard;
- the :class:`~hypertuna.actors.blind_peer.BlindPeerStore`: how far the relay's mirrors are
  behind what their workers announced, and so when they were last known current;
- the :class:`~hypertuna.actors.replica.ReplicaManager`: whether the relay's mirrored owner core
  admits a writer with role ``gateway`` — the relay's own, signed statement that it is
  escrow-enabled (its owner admitted a gateway writer, whose secret it deposits).

A fact the gateway does not have stays ``None``, and the policy fails closed on it.

:class:`RegisteredRelayCheck` is the other thing the gateway vouches for: that a deposit is for a
relay workers registered at this gateway, under the deposit's owner key (the durable worker
registrations of the event store, :mod:`hypertuna.storage.registrations`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from hypertuna.actors.blind_peer import BlindPeerStore
from hypertuna.actors.peer_router import PeerRouter
from hypertuna.actors.replica import ReplicaManager
from hypertuna.escrow.policy import Evidence
from hypertuna.escrow_client.port import RelayRefusal, RelayRefused
from hypertuna.storage.events import EventStore
from hypertuna.storage.relay_records import WriterRole

__all__ = ["EvidenceGatherer", "RegisteredRelayCheck"]


class EvidenceGatherer:
    """Builds the :class:`~hypertuna.escrow.policy.Evidence` for one relay on demand.
    ``wall_clock_ms`` is Unix milliseconds (injected, so tests control it)."""

    def __init__(
        self,
        router: PeerRouter,
        blind_peer: BlindPeerStore,
        replicas: ReplicaManager,
        *,
        wall_clock_ms: Callable[[], int],
    ) -> None:
        self._router = router
        self._blind_peer = blind_peer
        self._replicas = replicas
        self._wall_clock_ms = wall_clock_ms

    async def __call__(self, relay_key: str) -> Evidence:
        gateway_writers = await self._replicas.admitted_writers(relay_key, WriterRole.GATEWAY)
        now_ms = self._wall_clock_ms()
        now = trio.current_time()
        liveness = self._router.liveness(relay_key)
        last_seen_ms = now_ms - int((now - liveness.last_seen) * 1000)
        mirrors = [m for m in self._blind_peer.mirrors() if m.relay_key == relay_key]
        has_owner = any(m.core_key == relay_key for m in mirrors)
        # The most-behind mirror decides: the relay is only as complete as its worst core.
        lag_ms = max((m.lag_ms for m in mirrors), default=0) if has_owner else None
        return Evidence(
            relay_registered=liveness.registered,
            escrow_enabled=bool(gateway_writers),
            healthy_peers=liveness.usable,
            last_peer_seen_ms=last_seen_ms,
            mirror_lag_ms=lag_ms,
            # A mirror behind for lag_ms was last current lag_ms ago; a ready one is current.
            mirror_updated_ms=None if lag_ms is None else now_ms - lag_ms,
        )


class RegisteredRelayCheck:
    """A :data:`~hypertuna.escrow_client.port.DepositRelayCheck` on the gateway's worker
    registrations: a deposit is only for a relay that workers registered here (it stays known
    when they leave), and only from the owner key it is registered under. A relay the gateway
    hosts itself has no worker owner, so it takes no deposit either. Raises the store's
    :class:`~hypertuna.storage.events.StorageError` when the database is unavailable."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def __call__(self, relay_key: str, owner_key: str) -> RelayRefused | None:
        relay = await self._store.worker_relay(relay_key)
        if relay is None:
            hosted = await self._store.get_relay(relay_key)
            return RelayRefused(
                RelayRefusal.NOT_REGISTERED,
                f"relay {relay_key} is hosted by this gateway itself, not by workers"
                if hosted is not None
                else f"no worker registered relay {relay_key} at this gateway",
            )
        if relay.owner_key != owner_key:
            return RelayRefused(
                RelayRefusal.OTHER_OWNER,
                f"relay {relay_key} is registered at this gateway under another owner key",
            )
        return None
