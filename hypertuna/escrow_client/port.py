"""What the gateway needs from its escrow, whether the escrow runs inside it or alone.

:class:`EscrowPort` is the one interface the gateway's lease holders consume. Two classes satisfy
it: :class:`~hypertuna.actors.escrow.EscrowActor` (the escrow inside the gateway, ``escrow.enabled``
without ``escrow.url``) and :class:`~hypertuna.escrow_client.remote.RemoteEscrow` (a standalone
``hypertuna escrow`` reached over mutual TLS, ``escrow.url`` set). Both take the unlock evidence
from their caller — the gateway's own :class:`~hypertuna.actors.evidence.EvidenceGatherer`, never
an HTTP client — and both publish every lease ending (revocation, rotation, expiry, release) on
their :attr:`EscrowPort.bus`: the embedded actor at once, the remote one as soon as its lease-event
follower hears of it (see :mod:`hypertuna.escrow_client.remote` for the bound).

Expected outcomes are values (:class:`~hypertuna.escrow.service.LeaseGrant` or
:class:`~hypertuna.escrow.service.UnlockRejected` with every failing rule); failures are the
exceptions of :data:`ESCROW_FAILURES` (a lost escrow database, a stopped actor, an unreachable or
refusing standalone escrow).

Deposits are checked against the gateway's worker registrations before the escrow sees them: a
:data:`DepositRelayCheck` answers None for a relay that workers registered at this gateway under
the deposit's owner key, else a :class:`RelayRefused` (HTTP status in :data:`RELAY_REFUSAL_STATUS`).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Protocol, TypeAlias

import attrs

from hypertuna.actors.runtime import ActorGone
from hypertuna.escrow.bus import RevocationBus
from hypertuna.escrow.policy import Evidence
from hypertuna.escrow.service import (
    Actor,
    EscrowHealth,
    LeaseGrant,
    ReleaseOutcome,
    UnlockRejected,
    UnlockRequest,
)
from hypertuna.escrow.store import EscrowStorageError, LeaseRecord
from hypertuna.escrow_client.transport import EscrowTransportError

__all__ = [
    "ESCROW_FAILURES",
    "RELAY_REFUSAL_STATUS",
    "DepositRelayCheck",
    "EscrowPort",
    "RelayRefusal",
    "RelayRefused",
]

#: What an :class:`EscrowPort` call raises when it cannot answer (embedded: the database or the
#: actor is gone; remote: the escrow cannot be reached, refuses us, or answers nonsense).
ESCROW_FAILURES: Final[tuple[type[Exception], ...]] = (
    EscrowStorageError,
    ActorGone,
    EscrowTransportError,
)


class EscrowPort(Protocol):
    """The escrow operations the gateway itself uses (see the module docstring)."""

    @property
    def bus(self) -> RevocationBus:
        """Where every lease ending is published; subscribe before relying on a lease."""
        ...

    def policy_document(self) -> dict[str, object]:
        """The escrow's policy, public key and fingerprint (``GET /api/escrow/policy``)."""
        ...

    async def unlock(
        self, request: UnlockRequest, evidence: Evidence
    ) -> LeaseGrant | UnlockRejected:
        """Ask for a lease, judged on ``evidence`` that the gateway gathered itself."""
        ...

    async def release(self, lease_id: str, *, reason: str, actor: Actor) -> ReleaseOutcome | None:
        """End a lease (None when the escrow does not know it)."""
        ...

    async def leases(
        self, *, relay_key: str | None = None, active_only: bool = False, limit: int = 100
    ) -> list[LeaseRecord]:
        """Leases, newest first: ids, relay, times, digests — never secrets."""
        ...

    async def health(self) -> EscrowHealth:
        """The escrow's database counts and audit status."""
        ...


class RelayRefusal(enum.Enum):
    """Why the gateway refuses a deposit for a relay (value = wire reason code)."""

    #: No worker ever registered the relay at this gateway (or the gateway hosts it itself).
    NOT_REGISTERED = "relay-not-registered"
    #: Workers registered the relay under another owner key than the deposit's.
    OTHER_OWNER = "relay-owned-by-another-key"


RELAY_REFUSAL_STATUS: Final[Mapping[RelayRefusal, int]] = {
    RelayRefusal.NOT_REGISTERED: 404,
    RelayRefusal.OTHER_OWNER: 403,
}


@attrs.frozen
class RelayRefused:
    """A deposit refused for its relay; ``message`` says why in words."""

    reason: RelayRefusal
    message: str


#: ``check(relay_key, owner_key)``: None when the deposit's relay is registered at this gateway
#: by workers under ``owner_key``, else why not.
DepositRelayCheck: TypeAlias = Callable[[str, str], Awaitable[RelayRefused | None]]
