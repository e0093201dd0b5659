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
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from hypertuna.actors.blind_peer import BlindPeerStore
from hypertuna.actors.peer_router import PeerRouter
from hypertuna.actors.replica import ReplicaManager
from hypertuna.escrow.policy import Evidence
from hypertuna.storage.relay_records import WriterRole

__all__ = ["EvidenceGatherer"]


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
