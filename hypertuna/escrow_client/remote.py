"""RemoteEscrow: a standalone ``hypertuna escrow`` seen from the gateway, as an actor.

It satisfies :class:`~hypertuna.escrow_client.port.EscrowPort` over an
:class:`~hypertuna.escrow_client.transport.EscrowTransport` (mutual TLS, HMAC-signed requests):
:meth:`RemoteEscrow.unlock` sends the evidence the gateway gathered itself in the body,
:meth:`~RemoteEscrow.release`, :meth:`~RemoteEscrow.leases` and :meth:`~RemoteEscrow.health`
parse the escrow's JSON into the same typed results as the embedded
:class:`~hypertuna.actors.escrow.EscrowActor`, and :meth:`~RemoteEscrow.forward` passes a request
through unchanged (the gateway's edge proxies deposits and revocations that workers signed).
Requests arrive through a bounded inbox and run in child tasks of the actor, at most
``max_concurrent`` at a time.

**The lease-event follower.** A background task of the actor long-polls
``GET /api/escrow/leases/events?since=&epoch=&wait=`` and publishes every lease ending in the
answers (revocation, rotation, expiry, release) on :attr:`RemoteEscrow.bus` at once, as a
:class:`~hypertuna.escrow.service.Revocation`. When the escrow answers ``reset`` (it restarted —
its epoch changed — or the follower fell more than its event log behind), the follower publishes
the endings in that answer, lists the active leases again (``GET /api/escrow/leases?active=1``)
and publishes an ending for every lease it had seen active (listed before, or granted through
:meth:`~RemoteEscrow.unlock`) that is no longer active; a restarted escrow's policy is fetched
again too. After a failed poll it waits a fully jittered backoff (0.2 s doubling to
``backoff.cap_s``) and polls again with the same cursor. An ending may be published twice (once
from the diff, once as an event); a holder treats a second ending of a lease as a no-op.

**Bounded staleness.** Let ``W`` be the poll wait (``poll_wait_s``), ``T`` one request attempt
(connect timeout plus answer timeout, :attr:`EscrowTransport.attempt_timeout_s`) and ``B`` the
backoff cap. While the long poll is up, a lease ending reaches the bus one round trip after it
happened. A poll whose connection died silently is given up at most ``W + T`` after it was sent,
the next one goes out at most ``B`` later and brings the ending at once, within ``T``: so an
ending reaches the bus at most :attr:`RemoteEscrow.staleness_bound_s` ``= W + 2T + B`` after it
happened, whenever the escrow can be reached. While it cannot, nothing arrives; instead
:meth:`RemoteEscrow.lag_s` — the seconds since the follower last heard from the escrow
(``gateway_escrow_lease_lag_seconds``) — grows past :attr:`RemoteEscrow.lag_bound_s`
``= W + T``, which it never exceeds while the follower is up, and the state is no longer ``up``.
A lease holder must stop using a lease when the lag passes that bound.

**Start.** :meth:`RemoteEscrow.run` makes one attempt to reach the escrow (lease-event cursor,
policy, active leases) before ``started()``. When the escrow is unreachable or failing, the
gateway starts anyway with the state ``unavailable`` (its ``/health`` says so) and the follower
keeps trying. A refusal that retrying cannot cure — our client certificate or the escrow's
refused at the TLS handshake (:class:`~hypertuna.escrow_client.transport.EscrowRefusedTlsError`),
or our HMAC signature refused (:class:`EscrowClientRefusedError`) — stops the start with the
reason in words; after the start it makes the state ``refused`` (and is retried with backoff, in
case the files were fixed).

Time: trio's clock for lag, backoff and timeouts. Endings from events carry the escrow's own
timestamps; an ending found by listing again carries the injected ``wall_clock_ms`` of the moment
the follower learned of it (the escrow no longer says when).
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import random
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import attrs
import trio

from hypertuna.actors.runtime import ActorGone, ActorStatistics, ConcurrentServer, Inbox, Reply
from hypertuna.escrow.bus import RevocationBus
from hypertuna.escrow.package import LeaseBinding
from hypertuna.escrow.policy import Evidence, Reason
from hypertuna.escrow.service import (
    Actor,
    EscrowHealth,
    LeaseGrant,
    ReleaseOutcome,
    Revocation,
    UnlockRejected,
    UnlockRequest,
)
from hypertuna.escrow.store import LeaseRecord, LeaseStatus
from hypertuna.escrow_client.transport import (
    EscrowRefusedTlsError,
    EscrowResponse,
    EscrowTransport,
    EscrowTransportError,
)
from hypertuna.worker.backoff import BackoffPolicy

__all__ = [
    "DEFAULT_FOLLOW_BACKOFF",
    "MAX_POLL_WAIT_S",
    "EscrowAnswerError",
    "EscrowClientRefusedError",
    "EscrowNotReadyError",
    "RemoteEscrow",
    "RemoteEscrowStatistics",
    "RemoteState",
]

log = logging.getLogger(__name__)

#: The escrow answers a long poll after at most this many seconds.
MAX_POLL_WAIT_S: Final = 25
#: Delays between failed polls: 0.2 s doubling up to 5 s, fully jittered.
DEFAULT_FOLLOW_BACKOFF: Final = BackoffPolicy(base_s=0.2, cap_s=5.0)
#: Most leases one listing returns (the escrow's own limit).
_LIST_LIMIT: Final = 1000


class RemoteState(enum.Enum):
    """How the follower last fared."""

    #: Not reached since the start yet.
    CONNECTING = "connecting"
    #: The last poll (or listing) succeeded; endings arrive as they happen.
    UP = "up"
    #: Unreachable, too slow, or answering with server errors.
    UNAVAILABLE = "unavailable"
    #: Our client certificate, the escrow's, or our HMAC signature was refused.
    REFUSED = "refused"


class EscrowAnswerError(EscrowTransportError):
    """The escrow answered, but not as the operation expects. :attr:`status` and :attr:`body`
    are its answer (the gateway's edge passes them on); :attr:`reason` is the answer's reason
    code, or ``malformed-answer`` when it could not be understood."""

    def __init__(self, status: int, reason: str, message: str, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.body = body


class EscrowClientRefusedError(EscrowAnswerError):
    """The escrow refused this gateway's HMAC signature (401): an unknown client id, a wrong
    secret, or clocks too far apart. Retrying does not help; the configuration must change."""


class EscrowNotReadyError(EscrowTransportError):
    """The escrow has not been reached since the gateway started, so its policy is unknown."""


@attrs.frozen
class RemoteEscrowStatistics:
    """A snapshot of the follower and the request side (for ``/health`` and metrics)."""

    actor: ActorStatistics
    state: RemoteState
    epoch: str | None
    last_seq: int
    #: Seconds since the escrow was last heard (since the start before it ever was).
    lag_s: float
    lag_bound_s: float
    staleness_bound_s: float
    polls: int
    poll_failures: int
    resets: int
    published: int
    leases_tracked: int
    last_error: str | None


# --- messages --------------------------------------------------------------------------------


@attrs.frozen
class _Unlock:
    request: UnlockRequest
    evidence: Evidence
    reply: Reply[LeaseGrant | UnlockRejected]


@attrs.frozen
class _Release:
    lease_id: str
    reason: str
    reply: Reply[ReleaseOutcome | None]


@attrs.frozen
class _Leases:
    relay_key: str | None
    active_only: bool
    limit: int
    reply: Reply[list[LeaseRecord]]


@attrs.frozen
class _Health:
    reply: Reply[EscrowHealth]


@attrs.frozen
class _Forward:
    method: str
    target: str
    body: bytes | None
    headers: Mapping[str, str]
    reply: Reply[EscrowResponse]


RemoteMessage: TypeAlias = _Unlock | _Release | _Leases | _Health | _Forward


@attrs.define
class _Tracked:
    """A lease the follower saw active, and when (trio time) it started tracking it."""

    relay_key: str
    deposit_id: str
    since: float


# --- parsing the escrow's answers --------------------------------------------------------------


def _malformed(status: int, what: str, body: object = None) -> EscrowAnswerError:
    return EscrowAnswerError(status, "malformed-answer", f"the escrow's {what} is malformed", body)


def _field(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} is not {kind.__name__}")
    return value


def _optional(data: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    return None if data.get(name) is None else _field(data, name, kind)


def parse_lease(data: object) -> LeaseRecord:
    """A :class:`~hypertuna.escrow.store.LeaseRecord` from its JSON form
    (:meth:`LeaseRecord.to_json`); :class:`ValueError` on anything else."""
    if not isinstance(data, dict):
        raise ValueError("a lease is an object")
    try:
        return LeaseRecord(
            lease_id=_field(data, "leaseId", str),
            relay_key=_field(data, "relayKey", str),
            deposit_id=_field(data, "depositId", str),
            lease_version=_field(data, "leaseVersion", int),
            requester_id=_field(data, "requesterId", str),
            session_key_digest=_field(data, "sessionKeyDigest", str),
            sealed_digest=_field(data, "sealedDigest", str),
            issued_at_ms=_field(data, "issuedAt", int),
            expires_at_ms=_field(data, "expiresAt", int),
            status=LeaseStatus(_field(data, "status", str)),
            ended_at_ms=_optional(data, "endedAt", int),
            end_reason=_optional(data, "endReason", str),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a lease: {exc}") from None


def _grant(request: UnlockRequest, data: object) -> LeaseGrant:
    if not isinstance(data, dict):
        raise ValueError("not an object")
    lease = parse_lease(data.get("lease"))
    binding = LeaseBinding.from_json(data.get("binding"))
    sealed = data.get("sealed_lease")
    if not isinstance(sealed, str):
        raise ValueError("sealed_lease is missing")
    try:
        secret = base64.b64decode(sealed.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("sealed_lease is not base64") from None
    if (lease.lease_id, lease.relay_key) != (binding.lease_id, binding.relay_key) or (
        lease.relay_key != request.relay_key
    ):
        raise ValueError("the lease, its binding and the request disagree")
    return LeaseGrant(lease=lease, binding=binding, sealed_secret=secret)


def _revocation(data: object) -> Revocation:
    if not isinstance(data, dict):
        raise ValueError("an event is an object")
    try:
        deposits = _field(data, "depositIds", list)
        leases = _field(data, "leaseIds", list)
        if not all(isinstance(x, str) for x in (*deposits, *leases)):
            raise TypeError("ids are strings")
        _field(data, "seq", int)
        _field(data, "kind", str)
        return Revocation(
            relay_key=_field(data, "relayKey", str),
            deposit_ids=tuple(deposits),
            lease_ids=tuple(leases),
            at_ms=_field(data, "at", int),
            already_revoked=False,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a lease event: {exc}") from None


@attrs.frozen
class _EventsAnswer:
    epoch: str
    endings: tuple[Revocation, ...]
    last_seq: int
    reset: bool


def _events_answer(data: object) -> _EventsAnswer:
    if not isinstance(data, dict):
        raise ValueError("not an object")
    try:
        events = _field(data, "events", list)
        return _EventsAnswer(
            epoch=_field(data, "epoch", str),
            endings=tuple(_revocation(event) for event in events),
            last_seq=_field(data, "lastSeq", int),
            reset=_field(data, "reset", bool),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a lease-event answer: {exc}") from None


def _health(data: object) -> EscrowHealth:
    if not isinstance(data, dict):
        raise ValueError("not an object")
    try:
        database = _field(data, "database", dict)
        key = _field(data, "key", dict)
        audit = _field(data, "audit", dict)
        chain = {"valid": True, "broken": False, "unverified": None}[_field(audit, "status", str)]
        return EscrowHealth(
            ok=_field(data, "status", str) == "ok",
            backend=_field(database, "backend", str),
            fingerprint=_field(key, "fingerprint", str),
            deposits_active=_field(data, "depositsActive", int),
            leases_active=_field(data, "leasesActive", int),
            audit_entries=_field(audit, "entries", int),
            last_checkpoint_seq=_optional(audit, "lastCheckpointSeq", int),
            audit_chain_valid=chain,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a health answer: {exc}") from None


def _reason(response: EscrowResponse) -> str | None:
    reason = response.json.get("reason") if isinstance(response.json, dict) else None
    return reason if isinstance(reason, str) else None


def _error(response: EscrowResponse, what: str) -> EscrowAnswerError:
    """The error of an unexpected answer; a 401 is the escrow refusing our HMAC signature (the
    typed operations carry no other signature)."""
    body = response.json
    reason = body.get("reason") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(reason, str):
        return _malformed(response.status, f"answer to {what} ({response.status})", body)
    words = message if isinstance(message, str) else reason
    if response.status == 401:
        return EscrowClientRefusedError(
            401,
            reason,
            f"the escrow refused this gateway's HMAC signature ({reason}: {words}); check "
            "escrow.hmac_client_id and escrow.hmac_secret against its ESCROW_HMAC_CLIENTS",
            body,
        )
    return EscrowAnswerError(response.status, reason, f"{what}: {words}", body)


# --- the actor -------------------------------------------------------------------------------


class RemoteEscrow:
    """See the module docstring. ``transport`` belongs to the caller (who closes it)."""

    def __init__(
        self,
        transport: EscrowTransport,
        *,
        wall_clock_ms: Callable[[], int],
        poll_wait_s: int = 20,
        backoff: BackoffPolicy = DEFAULT_FOLLOW_BACKOFF,
        bus: RevocationBus | None = None,
        rng: random.Random | None = None,
        max_concurrent: int = 64,
        inbox_capacity: int = 256,
    ) -> None:
        if not 0 < poll_wait_s <= MAX_POLL_WAIT_S:
            raise ValueError(f"poll_wait_s must be in 1..{MAX_POLL_WAIT_S}")
        if max_concurrent <= 0:
            raise ValueError("max_concurrent must be positive")
        self.inbox: Inbox[RemoteMessage] = Inbox("escrow-remote", inbox_capacity)
        self._transport = transport
        self._wall_clock_ms = wall_clock_ms
        self._wait_s = poll_wait_s
        self._backoff = backoff
        self._bus = bus if bus is not None else RevocationBus()
        self._rng = rng if rng is not None else random.Random()
        self._server = ConcurrentServer(
            self.inbox,
            self._dispatch,
            max_concurrent=max_concurrent,
            expected=(EscrowTransportError, ValueError),
        )
        # -- the follower's state (changed by the actor's own tasks only) --
        self._state = RemoteState.CONNECTING
        self._last_error: str | None = None
        self._epoch: str | None = None
        self._since = 0
        self._active: dict[str, _Tracked] = {}
        self._policy: dict[str, object] | None = None
        self._started_at: float | None = None
        self._heard_at: float | None = None
        self._polls = self._poll_failures = self._resets = self._published = 0
        self._changed = trio.Event()

    # -- properties and synchronous reads -----------------------------------------------------

    @property
    def bus(self) -> RevocationBus:
        """Where every lease ending the follower hears of is published."""
        return self._bus

    @property
    def state(self) -> RemoteState:
        return self._state

    @property
    def lag_bound_s(self) -> float:
        """``W + T``: the lag never exceeds this while the follower is up."""
        return self._wait_s + self._transport.attempt_timeout_s

    @property
    def staleness_bound_s(self) -> float:
        """``W + 2T + B``: the longest a lease ending takes to reach the bus while the escrow
        can be reached (see the module docstring)."""
        return self._wait_s + 2 * self._transport.attempt_timeout_s + self._backoff.cap_s

    def lag_s(self) -> float:
        """Seconds since the escrow was last heard (since the start, before it ever was)."""
        now = trio.current_time()
        since = self._heard_at if self._heard_at is not None else self._started_at
        return 0.0 if since is None else max(0.0, now - since)

    def policy_document(self) -> dict[str, object]:
        """The escrow's policy document as last fetched (at the start and after each restart
        of the escrow); :class:`EscrowNotReadyError` before the escrow was first reached."""
        if self._policy is None:
            raise EscrowNotReadyError("the escrow has not been reached yet")
        return dict(self._policy)

    def statistics(self) -> RemoteEscrowStatistics:
        return RemoteEscrowStatistics(
            actor=self.inbox.statistics(running=self._server.running),
            state=self._state,
            epoch=self._epoch,
            last_seq=self._since,
            lag_s=self.lag_s(),
            lag_bound_s=self.lag_bound_s,
            staleness_bound_s=self.staleness_bound_s,
            polls=self._polls,
            poll_failures=self._poll_failures,
            resets=self._resets,
            published=self._published,
            leases_tracked=len(self._active),
            last_error=self._last_error,
        )

    async def wait_for(self, check: Callable[[RemoteEscrowStatistics], bool]) -> None:
        """Return once ``check(self.statistics())`` holds (checked at every change of state,
        cursor or tracked leases)."""
        while not check(self.statistics()):
            await self._changed.wait()

    # -- requests -----------------------------------------------------------------------------

    async def unlock(
        self, request: UnlockRequest, evidence: Evidence
    ) -> LeaseGrant | UnlockRejected:
        """Ask the escrow for a lease, judged on ``evidence`` (gathered by the gateway). Sent
        once: an unlock is not idempotent (a lost answer would cost a second lease)."""
        return await self.inbox.request(lambda reply: _Unlock(request, evidence, reply))

    async def release(self, lease_id: str, *, reason: str, actor: Actor) -> ReleaseOutcome | None:
        """End a lease. The escrow records the authenticated client — this gateway — as who
        released it; ``actor`` is only logged here."""
        log.info("escrow release of lease %s asked by %s", lease_id, actor.audit_name())
        return await self.inbox.request(lambda reply: _Release(lease_id, reason, reply))

    async def leases(
        self, *, relay_key: str | None = None, active_only: bool = False, limit: int = 100
    ) -> list[LeaseRecord]:
        if not 0 < limit <= _LIST_LIMIT:
            raise ValueError(f"limit must be in 1..{_LIST_LIMIT}")
        return await self.inbox.request(lambda reply: _Leases(relay_key, active_only, limit, reply))

    async def health(self) -> EscrowHealth:
        """The escrow's own health answer; :class:`EscrowAnswerError` (503
        ``database-unavailable``) when its database is unreachable."""
        return await self.inbox.request(_Health)

    async def forward(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> EscrowResponse:
        """Send a request through unchanged (``target`` is the path with query string, the
        same on both sides, so a signature of it stays valid) and return the escrow's answer
        whatever its status. Sent once: a signed request's nonce cannot be used twice."""
        return await self.inbox.request(
            lambda reply: _Forward(method, target, body, dict(headers or {}), reply)
        )

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Try the escrow once, start the follower, then serve requests until the inbox is
        closed or the task cancelled. Raises :class:`EscrowRefusedTlsError` or
        :class:`EscrowClientRefusedError` before ``started()`` when the escrow refuses us."""
        self._started_at = trio.current_time()
        try:
            try:
                await self._resync(first=True)
            except (EscrowRefusedTlsError, EscrowClientRefusedError):
                raise
            except EscrowTransportError as exc:
                self._failed(RemoteState.UNAVAILABLE, exc)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow)
                task_status.started()
                await self._server.serve(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.inbox.close()
            for pending in self.inbox.drain():
                pending.reply.fail_if_pending(ActorGone("the escrow client stopped"))

    async def _dispatch(self, message: RemoteMessage) -> object:
        match message:
            case _Unlock(request=request, evidence=evidence):
                return await self._unlock(request, evidence)
            case _Release(lease_id=lease_id, reason=reason):
                body = {"lease_id": lease_id, "reason": reason}
                response = await self._transport.request("POST", "/api/escrow/release", body)
                if response.status == 404 and _reason(response) == "lease-not-found":
                    return None
                if response.status != 200 or not isinstance(response.json, dict):
                    raise _error(response, "release")
                try:
                    lease = parse_lease(response.json.get("lease"))
                    released = _field(response.json, "released", bool)
                except (ValueError, TypeError, KeyError):
                    raise _malformed(200, "release answer", response.json) from None
                if lease.status is not LeaseStatus.ACTIVE:
                    self._forget(lease.lease_id)
                return ReleaseOutcome(lease=lease, released=released)
            case _Leases(relay_key=relay_key, active_only=active_only, limit=limit):
                return await self._list(relay_key=relay_key, active_only=active_only, limit=limit)
            case _Health():
                response = await self._transport.request("GET", "/api/escrow/health", retry=False)
                if response.status not in (200, 503):
                    raise _error(response, "health")
                try:
                    return _health(response.json)
                except ValueError:
                    if response.status == 503:
                        raise EscrowAnswerError(
                            503,
                            "database-unavailable",
                            "the escrow's database is unreachable",
                            response.json,
                        ) from None
                    raise _malformed(200, "health answer", response.json) from None
            case _Forward(method=method, target=target, body=body, headers=headers):
                return await self._transport.request(
                    method, target, headers=headers, raw_body=body, retry=False
                )
        raise AssertionError(f"unhandled message {type(message).__name__}")

    async def _unlock(
        self, request: UnlockRequest, evidence: Evidence
    ) -> LeaseGrant | UnlockRejected:
        body = {
            "relay_key": request.relay_key,
            "session_public_key": request.session_public_key.hex(),
            "requester_id": request.requester_id,
            "evidence": evidence.to_json(),
        }
        response = await self._transport.request("POST", "/api/escrow/unlock", body, retry=False)
        if response.status == 412 and isinstance(response.json, dict):
            codes = response.json.get("reasons")
            try:
                if not isinstance(codes, list):
                    raise ValueError("no reasons")
                reasons = tuple(Reason(code) for code in codes)
            except ValueError:
                raise _malformed(412, "unlock refusal", response.json) from None
            return UnlockRejected(relay_key=request.relay_key, reasons=reasons)
        if response.status != 200:
            raise _error(response, "unlock")
        try:
            grant = _grant(request, response.json)
        except ValueError:
            # Never the body in words: it holds the sealed lease.
            raise _malformed(200, "unlock answer") from None
        self._track(grant.lease)
        return grant

    async def _list(
        self, *, relay_key: str | None, active_only: bool, limit: int
    ) -> list[LeaseRecord]:
        query: dict[str, str | int] = {"limit": limit}
        if relay_key is not None:
            query["relay_key"] = relay_key
        if active_only:
            query["active"] = 1
        target = "/api/escrow/leases?" + urllib.parse.urlencode(query)
        response = await self._transport.request("GET", target)
        if response.status != 200 or not isinstance(response.json, dict):
            raise _error(response, "leases")
        leases = response.json.get("leases")
        try:
            if not isinstance(leases, list):
                raise ValueError("no leases")
            return [parse_lease(lease) for lease in leases]
        except ValueError:
            raise _malformed(200, "lease list", response.json) from None

    # -- the follower -------------------------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                if self._epoch is None:
                    await self._resync(first=True)
                await self._poll()
                failures = 0
                continue
            except EscrowRefusedTlsError as exc:
                self._failed(RemoteState.REFUSED, exc)
            except EscrowClientRefusedError as exc:
                self._failed(RemoteState.REFUSED, exc)
            except EscrowTransportError as exc:
                self._failed(RemoteState.UNAVAILABLE, exc)
            self._poll_failures += 1
            delay = self._backoff.delay(failures, self._rng)
            failures += 1
            await trio.sleep(delay)

    async def _poll(self) -> None:
        assert self._epoch is not None
        target = "/api/escrow/leases/events?" + urllib.parse.urlencode(
            {"since": self._since, "epoch": self._epoch, "wait": self._wait_s}
        )
        response = await self._transport.request(
            "GET",
            target,
            retry=False,
            timeout_s=self._wait_s + self._transport.request_timeout_s,
        )
        self._polls += 1
        if response.status != 200:
            raise _error(response, "lease events")
        try:
            answer = _events_answer(response.json)
        except ValueError:
            raise _malformed(200, "lease-event answer", response.json) from None
        published = self._publish_all(answer.endings)
        if answer.reset or answer.epoch != self._epoch:
            log.warning(
                "escrow lease events reset (%s): listing the leases again",
                "the escrow restarted" if answer.epoch != self._epoch else "fell behind",
            )
            self._resets += 1
            await self._resync(first=False, answer=answer, published=published)
        else:
            self._since = answer.last_seq
            self._heard()

    async def _resync(
        self,
        *,
        first: bool,
        answer: _EventsAnswer | None = None,
        published: frozenset[str] = frozenset(),
    ) -> None:
        """Take a new cursor (the one in ``answer``, else a fresh one), fetch the policy when
        the epoch is new, list the active leases and publish the endings of the tracked ones
        that are gone. The cursor is taken first, so nothing ending after the listing is
        missed."""
        if answer is None:
            response = await self._transport.request(
                "GET", "/api/escrow/leases/events?wait=0", retry=False
            )
            if response.status != 200:
                raise _error(response, "lease events")
            try:
                answer = _events_answer(response.json)
            except ValueError:
                raise _malformed(200, "lease-event answer", response.json) from None
        if answer.epoch != self._epoch or self._policy is None:
            response = await self._transport.request("GET", "/api/escrow/policy", retry=False)
            if response.status != 200 or not isinstance(response.json, dict):
                raise _error(response, "policy")
            self._policy = response.json
        listed_at = trio.current_time()
        active = await self._list(relay_key=None, active_only=True, limit=_LIST_LIMIT)
        still = {lease.lease_id for lease in active}
        for lease_id, tracked in list(self._active.items()):
            if lease_id in still:
                continue
            if tracked.since >= listed_at:
                continue  # granted while the listing was on its way: not known to be gone
            del self._active[lease_id]
            if lease_id not in published:
                self._publish(
                    Revocation(
                        relay_key=tracked.relay_key,
                        deposit_ids=(tracked.deposit_id,),
                        lease_ids=(lease_id,),
                        at_ms=self._wall_clock_ms(),
                        already_revoked=False,
                    )
                )
        for lease in active:
            self._active.setdefault(
                lease.lease_id, _Tracked(lease.relay_key, lease.deposit_id, listed_at)
            )
        if self._epoch is not None and answer.epoch != self._epoch:
            log.info("escrow epoch changed: %s -> %s", self._epoch, answer.epoch)
        self._epoch = answer.epoch
        self._since = answer.last_seq
        if first:
            log.info(
                "escrow reached: epoch %s, %d active lease(s) followed", self._epoch, len(still)
            )
        self._heard()

    def _publish_all(self, endings: tuple[Revocation, ...]) -> frozenset[str]:
        ended: set[str] = set()
        for ending in endings:
            self._publish(ending)
            ended.update(ending.lease_ids)
        return frozenset(ended)

    def _publish(self, ending: Revocation) -> None:
        for lease_id in ending.lease_ids:
            self._active.pop(lease_id, None)
        self._bus.publish(ending)
        self._published += 1
        self._signal()

    def _track(self, lease: LeaseRecord) -> None:
        if lease.status is LeaseStatus.ACTIVE:
            self._active[lease.lease_id] = _Tracked(
                lease.relay_key, lease.deposit_id, trio.current_time()
            )
            self._signal()

    def _forget(self, lease_id: str) -> None:
        if self._active.pop(lease_id, None) is not None:
            self._signal()

    def _heard(self) -> None:
        self._heard_at = trio.current_time()
        if self._state is not RemoteState.UP:
            log.info("escrow follower up (epoch %s, seq %d)", self._epoch, self._since)
        self._state = RemoteState.UP
        self._last_error = None
        self._signal()

    def _failed(self, state: RemoteState, exc: Exception) -> None:
        reason = str(exc) or type(exc).__name__
        if (state, reason) != (self._state, self._last_error):
            log.warning("escrow %s: %s", state.value, reason)
        self._state = state
        self._last_error = reason
        self._signal()

    def _signal(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()
