"""EscrowDepositor: the worker deposits each relay's gateway writer in its gateway's escrow.

For every relay the worker hosts there is a dedicated **gateway writer**: an Ed25519 key pair
derived from the worker's core store under the name ``gateway-writer/<relay key>/<rotation>``
(:func:`gateway_writer_name`; rotation 1 to start with), so it needs no secret of its own on
disk and is never the owner key nor the worker's identity. Its secret goes to the escrow, so the
gateway can write for the relay while every worker is offline; the relay admits the writer
(``add-writer {key: <its core key>, role: gateway}`` in the owner core), which is the relay's own
signed statement that it is escrow-enabled. The key admitted is the writer's *core key* (the
manifest core of its public key, as for any core), the one views and mirrors address it by.

Once the gateway accepted a relay's registration, the control connection runs
:meth:`EscrowDepositor.deposit` for it (once per relay per connection, as a task of its own):

1. ``GET /api/escrow/policy`` from the gateway's HTTP base URL; the escrow's fingerprint must
   match its public key and the pin: ``escrow_fingerprint`` from the settings, else the one
   pinned for this gateway in ``escrow-pins.json`` (0600; the first one seen is pinned, trust on
   first use). A different fingerprint is refused loudly and nothing is deposited. A gateway
   without an escrow (404) is recorded as ``unavailable`` and not asked again on the
   connection.
2. Unless ``escrow-deposits.json`` (0600) already records the deposit of this rotation at this
   escrow: the writer's secret is sealed to the escrow's key (``seal_deposit``), the sealed
   package recorded durably, and ``POST /api/escrow`` sent, signed by the owner key, with the
   ``Idempotency-Key`` ``<relay key>:<rotation>:<package created-at ms>``. Retries (network
   errors, 5xx, ``idempotency-key-in-flight``; with the worker's backoff) send the very same
   body, so a deposit that was stored but whose answer was lost is answered again instead of
   stored twice, also after a restart. ``201`` and ``409 rotation-not-newer`` (the escrow already
   holds this rotation) are recorded as done, so restarts do not deposit again; any other 4xx
   is logged and kept in the status until the next connection, which seals afresh (a refused
   request stored nothing, and the refusal may be about the package's age or the clock).
3. The writer is admitted in the relay through the event writer
   (:class:`~hypertuna.actors.writer.AdmitWriter`, idempotent) — after the escrow holds its
   secret, so a relay never announces a gateway writer its escrow cannot unlock.

Logs and the status carry relay keys, public keys, fingerprints, deposit ids and the escrow's
refusal reasons; never the package or the secret. The writer's key pair is derived when needed
and never kept (only its public key is); it cannot be wiped, as the core store hands key pairs
out as immutable ``bytes`` (the plaintext buffer ``seal_deposit`` fills is zeroed by it).

Each relay's state is published in :meth:`EscrowDepositor.statuses` (the worker's status file).
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpx
import nacl.signing
import trio

from hypertuna.actors.runtime import Inbox, Reply
from hypertuna.actors.writer import Admission, AdmitWriter, WriterMessage
from hypertuna.escrow.keys import fingerprint as escrow_fingerprint
from hypertuna.escrow.package import seal_deposit
from hypertuna.protocol.signed_request import sign_ed25519
from hypertuna.storage.cores import CoreIdentity, Manifest
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import RelayRecord
from hypertuna.storage.hosted import owner_core_name
from hypertuna.storage.relay_records import WriterRole
from hypertuna.worker.backoff import ReconnectBackoff
from hypertuna.worker.identity import write_durably
from hypertuna.worker.settings import WorkerSettings

__all__ = [
    "DEPOSITS_FILE",
    "FIRST_ROTATION",
    "GATEWAY_WRITER_PREFIX",
    "PINS_FILE",
    "DepositRecord",
    "EscrowDepositor",
    "EscrowRelayStatus",
    "EscrowState",
    "EscrowStateError",
    "gateway_writer_core_key",
    "gateway_writer_name",
    "read_deposits",
    "read_pins",
]

log = logging.getLogger(__name__)

GATEWAY_WRITER_PREFIX: Final = "gateway-writer/"
FIRST_ROTATION: Final = 1
PINS_FILE: Final = "escrow-pins.json"
DEPOSITS_FILE: Final = "escrow-deposits.json"
POLICY_PATH: Final = "/api/escrow/policy"
DEPOSIT_PATH: Final = "/api/escrow"
_VERSION: Final = 1
_HEX64: Final = re.compile("[0-9a-f]{64}")
#: A recorded package is sealed again when it has less than this left of the deposit TTL.
_PACKAGE_MARGIN_MS: Final = 5 * 60 * 1000


def gateway_writer_name(relay_key: str, rotation: int) -> str:
    """The core-store name whose key pair is the gateway writer of ``relay_key`` at
    ``rotation``."""
    if not _HEX64.fullmatch(relay_key) or rotation < 1:
        raise ValueError("a gateway writer needs a relay key (64 hex) and a rotation >= 1")
    return f"{GATEWAY_WRITER_PREFIX}{relay_key}/{rotation}"


def gateway_writer_core_key(public_key: bytes) -> str:
    """The core key (hex) of the gateway writer core signed by ``public_key``: the key the
    relay admits it under (a default manifest core, as every core this code base writes)."""
    return CoreIdentity.for_manifest(Manifest(public_key=public_key)).key.hex()


class EscrowStateError(Exception):
    """A pin or deposit file of the worker cannot be read (the message names it)."""


class EscrowState(enum.StrEnum):
    """Where a relay's deposit stands (the ``state`` of its status)."""

    PENDING = "pending"
    """Being deposited on this connection."""
    RETRYING = "retrying"
    """The escrow could not be reached or answered 5xx: retried with backoff."""
    DEPOSITED = "deposited"
    """The escrow holds the writer's secret and the relay admits the writer."""
    REFUSED = "refused"
    """The escrow (or the relay) refused; tried again on the next connection."""
    UNAVAILABLE = "unavailable"
    """The gateway has no escrow (404): tried again on the next connection."""
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"
    """The escrow's fingerprint is not the pinned one: nothing is deposited."""


@attrs.frozen
class EscrowRelayStatus:
    """One relay's escrow deposit as the worker sees it."""

    relay_key: str
    state: EscrowState
    rotation: int
    writer_public_key: str
    #: The key the relay admits the writer under (its core key).
    writer_core_key: str
    escrow_fingerprint: str | None = None
    deposit_id: str | None = None
    #: Unix milliseconds when the escrow lets the deposit expire (None until known).
    expires_at_ms: int | None = None
    admitted: bool = False
    #: Why the last attempt failed ("" when it did not).
    last_error: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "state": str(self.state),
            "rotation": self.rotation,
            "writer_public_key": self.writer_public_key,
            "writer_core_key": self.writer_core_key,
            "escrow_fingerprint": self.escrow_fingerprint,
            "deposit_id": self.deposit_id,
            "expires_at_ms": self.expires_at_ms,
            "admitted": self.admitted,
            "last_error": self.last_error,
        }


@attrs.frozen
class DepositRecord:
    """One relay's deposit in ``escrow-deposits.json``.

    ``package`` (base64 of the sealed package, which only the escrow can open) is kept from
    before the first request until the escrow answered, so retries send the same body;
    ``done`` once the escrow holds this rotation (``deposit_id`` None when it said so with
    ``rotation-not-newer`` instead of a receipt).
    """

    rotation: int
    writer_public_key: str
    escrow_fingerprint: str
    created_at_ms: int
    package: str | None
    done: bool
    deposit_id: str | None = None
    expires_at_ms: int | None = None

    def idempotency_key(self, relay_key: str) -> str:
        return f"{relay_key}:{self.rotation}:{self.created_at_ms}"

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> DepositRecord:
        if not isinstance(data, dict):
            raise ValueError("a deposit record is an object")
        record = cls(**data)
        if type(record.rotation) is not int or type(record.created_at_ms) is not int:
            raise ValueError("rotation and created_at_ms are integers")
        return record


def _read_json(path: Path, member: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EscrowStateError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        raise EscrowStateError(f"{path} is not a version {_VERSION} file")
    items = data.get(member)
    if not isinstance(items, dict):
        raise EscrowStateError(f"{path}: {member!r} must be an object")
    return items


def _write_json(path: Path, member: str, items: Mapping[str, object]) -> None:
    text = json.dumps({"version": _VERSION, member: items}, sort_keys=True, indent=1) + "\n"
    write_durably(path, text.encode("utf-8"), exclusive=False)


def read_pins(data_dir: Path) -> dict[str, str]:
    """The pinned escrow fingerprints by gateway base URL; :class:`EscrowStateError` for a
    file that is not a pin file."""
    path = data_dir / PINS_FILE
    pins = _read_json(path, "pins")
    if not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in pins.values()):
        raise EscrowStateError(f"{path}: each pin is 64 lowercase hex characters")
    return pins


def read_deposits(data_dir: Path) -> dict[str, DepositRecord]:
    """The recorded deposits by relay key; :class:`EscrowStateError` for a bad file."""
    path = data_dir / DEPOSITS_FILE
    try:
        return {
            key: DepositRecord.from_json(value) for key, value in _read_json(path, "relays").items()
        }
    except (TypeError, ValueError) as exc:
        raise EscrowStateError(f"{path}: {exc}") from None


class _Retry(Exception):
    """Worth trying again after a delay (the text says why)."""


class _Stop(Exception):
    """Not worth trying again on this connection."""

    def __init__(self, state: EscrowState, message: str) -> None:
        super().__init__(message)
        self.state = state


@attrs.frozen
class _Policy:
    public_key: bytes
    fingerprint: str
    deposit_ttl_ms: int | None


def _error_text(response: httpx.Response) -> str:
    """``<status> <reason>: <message>`` from the escrow's JSON error (its words, no body)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("reason"), str):
        message = str(data.get("message", ""))[:300]
        return f"HTTP {response.status_code} {data['reason']}: {message}"
    return f"HTTP {response.status_code}"


def _reason(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else None


def _receipt(record: DepositRecord, response: httpx.Response) -> DepositRecord:
    """``record`` done, with what the escrow's ``201`` receipt says."""
    try:
        receipt = response.json()
        deposit_id = receipt["depositId"]
        expires_at = receipt.get("expiresAt")
    except (ValueError, TypeError, KeyError, AttributeError):
        deposit_id = expires_at = None
    return attrs.evolve(
        record,
        package=None,
        done=True,
        deposit_id=deposit_id if isinstance(deposit_id, str) else None,
        expires_at_ms=expires_at if type(expires_at) is int else None,
    )


class EscrowDepositor:
    """Deposits the gateway writers of a worker's relays (see the module docstring). One per
    worker, shared by its control connections; :meth:`deposit` runs as a task of the
    connection that registered the relay, and ends with it."""

    def __init__(
        self,
        *,
        cores: CoreStore,
        writer: Inbox[WriterMessage],
        data_dir: Path,
        settings: WorkerSettings,
        rng: random.Random | None = None,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._cores = cores
        self._writer = writer
        self._data_dir = data_dir
        self._settings = settings
        self._rng = rng or random.Random()
        self._wall_clock_ms = wall_clock_ms
        self._base_url = settings.http_url
        self._statuses: dict[str, EscrowRelayStatus] = {}
        # The files are read once, then kept here; the lock serialises their writes (and the
        # trust-on-first-use pin, so two relays cannot pin two keys).
        self._lock = trio.Lock()
        self._pins: dict[str, str] | None = None
        self._deposits: dict[str, DepositRecord] | None = None

    def statuses(self) -> tuple[EscrowRelayStatus, ...]:
        """The escrow state of every relay handled since the worker started."""
        return tuple(self._statuses[key] for key in sorted(self._statuses))

    async def deposit(self, relay: RelayRecord) -> None:
        """Deposit and admit ``relay``'s gateway writer, retrying transient failures until
        done or cancelled. Never raises anything but cancellation: a failure is logged and
        kept in the relay's status."""
        rotation = FIRST_ROTATION
        public_key = self._cores.key_pair(gateway_writer_name(relay.key, rotation)).public_key
        previous = self._statuses.get(relay.key)
        self._statuses[relay.key] = EscrowRelayStatus(
            relay_key=relay.key,
            state=EscrowState.PENDING,
            rotation=rotation,
            writer_public_key=public_key.hex(),
            writer_core_key=gateway_writer_core_key(public_key),
            escrow_fingerprint=previous.escrow_fingerprint if previous else None,
            deposit_id=previous.deposit_id if previous else None,
            expires_at_ms=previous.expires_at_ms if previous else None,
            admitted=previous.admitted if previous else False,
        )
        backoff = ReconnectBackoff(self._settings.backoff, self._rng)
        timeout = httpx.Timeout(self._settings.escrow_timeout_s)
        try:
            async with httpx.AsyncClient(base_url=self._base_url, timeout=timeout) as client:
                while True:
                    try:
                        await self._deposit_once(client, relay, rotation)
                        return
                    except _Retry as exc:
                        delay = backoff.next_delay(None)
                        self._update(relay.key, state=EscrowState.RETRYING, last_error=str(exc))
                        log.warning(
                            "escrow deposit for relay %s (%s): %s; retrying in %.1f s",
                            relay.name,
                            relay.key,
                            exc,
                            delay,
                        )
                        await trio.sleep(delay)
        except _Stop as exc:
            self._update(relay.key, state=exc.state, last_error=str(exc))
            if exc.state is EscrowState.UNAVAILABLE:
                log.warning("relay %s (%s): %s", relay.name, relay.key, exc)
            else:
                log.error(
                    "escrow deposit for relay %s (%s) not made: %s", relay.name, relay.key, exc
                )
        except EscrowStateError as exc:
            # A damaged file is the operator's to look at; rewriting it could deposit twice.
            self._update(relay.key, state=EscrowState.REFUSED, last_error=str(exc))
            log.error("escrow deposit for relay %s (%s) not made: %s", relay.name, relay.key, exc)
        except Exception as exc:
            self._update(relay.key, state=EscrowState.REFUSED, last_error=f"internal: {exc}")
            log.exception("escrow deposit for relay %s (%s) failed", relay.name, relay.key)

    def _update(self, relay_key: str, **changes: Any) -> None:
        self._statuses[relay_key] = attrs.evolve(self._statuses[relay_key], **changes)

    async def _deposit_once(
        self, client: httpx.AsyncClient, relay: RelayRecord, rotation: int
    ) -> None:
        policy = await self._policy(client)
        await self._check_pin(policy.fingerprint)
        self._update(relay.key, escrow_fingerprint=policy.fingerprint)
        record = await self._record(relay.key)
        if not (
            record is not None
            and record.done
            and record.escrow_fingerprint == policy.fingerprint
            and record.rotation == rotation
        ):
            record = await self._post(client, relay, rotation, policy, record)
        self._update(
            relay.key,
            deposit_id=record.deposit_id,
            expires_at_ms=record.expires_at_ms,
        )
        await self._admit(relay)
        self._update(relay.key, state=EscrowState.DEPOSITED, admitted=True, last_error="")

    # -- the escrow's policy and its pin ---------------------------------------------------------

    async def _policy(self, client: httpx.AsyncClient) -> _Policy:
        response = await self._request(client, "GET", POLICY_PATH)
        if response.status_code == 404 and _reason(response) is None:
            raise _Stop(
                EscrowState.UNAVAILABLE,
                f"escrow unavailable at gateway {self._base_url} (no {POLICY_PATH})",
            )
        if response.status_code != 200:
            raise _Stop(EscrowState.REFUSED, f"{POLICY_PATH} answered {_error_text(response)}")
        try:
            data = response.json()
            public_key = bytes.fromhex(data["publicKey"])
            claimed = data["fingerprint"]
            ttl = data.get("depositTtlMs")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise _Stop(
                EscrowState.REFUSED, f"{POLICY_PATH} is not an escrow policy document"
            ) from None
        if len(public_key) != 32 or escrow_fingerprint(public_key) != claimed:
            raise _Stop(
                EscrowState.FINGERPRINT_MISMATCH,
                f"the escrow policy's fingerprint {str(claimed)[:64]!r} is not that of its"
                " public key",
            )
        return _Policy(public_key, claimed, ttl if type(ttl) is int and ttl > 0 else None)

    async def _check_pin(self, fingerprint: str) -> None:
        pinned = self._settings.escrow_fingerprint
        source = "escrow_fingerprint setting"
        if pinned is None:
            path = self._data_dir / PINS_FILE
            source = str(path)
            async with self._lock:
                if self._pins is None:
                    self._pins = await trio.to_thread.run_sync(read_pins, self._data_dir)
                pinned = self._pins.get(self._base_url)
                if pinned is None:
                    pins = {**self._pins, self._base_url: fingerprint}
                    await trio.to_thread.run_sync(_write_json, path, "pins", pins)
                    self._pins = pins
                    log.warning(
                        "trusting the escrow of %s on first use: fingerprint %s pinned in %s"
                        " (compare it with the one the gateway operator published)",
                        self._base_url,
                        fingerprint,
                        path,
                    )
                    return
        if pinned != fingerprint:
            raise _Stop(
                EscrowState.FINGERPRINT_MISMATCH,
                f"the escrow of {self._base_url} presents fingerprint {fingerprint}, but"
                f" {pinned} is pinned ({source}); no deposit is made. If its key really"
                " changed, confirm the new fingerprint with the gateway operator, then set"
                f" escrow_fingerprint or remove the pin from {self._data_dir / PINS_FILE}",
            )

    # -- the deposit -----------------------------------------------------------------------------

    async def _record(self, relay_key: str) -> DepositRecord | None:
        async with self._lock:
            if self._deposits is None:
                self._deposits = await trio.to_thread.run_sync(read_deposits, self._data_dir)
            return self._deposits.get(relay_key)

    async def _save(self, relay_key: str, record: DepositRecord) -> None:
        async with self._lock:
            assert self._deposits is not None
            deposits = {**self._deposits, relay_key: record}
            await trio.to_thread.run_sync(
                _write_json,
                self._data_dir / DEPOSITS_FILE,
                "relays",
                {key: value.to_json() for key, value in deposits.items()},
            )
            self._deposits = deposits

    async def _post(
        self,
        client: httpx.AsyncClient,
        relay: RelayRecord,
        rotation: int,
        policy: _Policy,
        record: DepositRecord | None,
    ) -> DepositRecord:
        now_ms = self._wall_clock_ms()
        reusable = (
            record is not None
            and record.package is not None
            and record.escrow_fingerprint == policy.fingerprint
            and record.rotation == rotation
            and policy.deposit_ttl_ms is not None
            and record.created_at_ms + policy.deposit_ttl_ms - _PACKAGE_MARGIN_MS > now_ms
        )
        owner = self._cores.key_pair(owner_core_name(relay.name))
        owner_key = owner.public_key.hex()
        if not reusable:
            record = await trio.to_thread.run_sync(
                self._seal, relay.key, owner_key, rotation, policy, now_ms
            )
            # Recorded before it is sent: a retry after a restart sends this same body.
            await self._save(relay.key, record)
        assert record is not None and record.package is not None
        body = json.dumps(
            {"relay_key": relay.key, "owner_key": owner_key, "package": record.package}
        ).encode()
        signed = sign_ed25519(
            nacl.signing.SigningKey(owner.seed),
            "POST",
            urlsplit(self._base_url).path + DEPOSIT_PATH,
            body,
            timestamp=now_ms // 1000,
        )
        response = await self._request(
            client,
            "POST",
            DEPOSIT_PATH,
            content=body,
            headers={
                **signed.as_dict(),
                "Content-Type": "application/json",
                "Idempotency-Key": record.idempotency_key(relay.key),
            },
        )
        status = response.status_code
        reason = _reason(response)
        if status == 201:
            done = _receipt(record, response)
            await self._save(relay.key, done)
            log.info(
                "relay %s (%s): gateway writer %s (rotation %d) deposited in escrow %s as %s%s",
                relay.name,
                relay.key,
                record.writer_public_key,
                rotation,
                policy.fingerprint,
                done.deposit_id,
                " (answer replayed)" if response.headers.get("Idempotent-Replayed") else "",
            )
            return done
        if status == 409 and reason == "rotation-not-newer":
            done = attrs.evolve(record, package=None, done=True)
            await self._save(relay.key, done)
            log.info(
                "relay %s (%s): the escrow already holds rotation %d (%s)",
                relay.name,
                relay.key,
                rotation,
                _error_text(response),
            )
            return done
        if status == 409 and reason == "idempotency-key-in-flight":
            raise _Retry(f"{DEPOSIT_PATH} answered {_error_text(response)}")
        # A refusal stored nothing: the next attempt seals afresh (new time, new key), so a
        # refusal for the package's age or the clock does not repeat itself.
        await self._save(relay.key, attrs.evolve(record, package=None))
        if status == 404 and reason is None:
            # No such route (an escrow's own 404s, like relay-not-registered, say why).
            raise _Stop(
                EscrowState.UNAVAILABLE,
                f"escrow unavailable at gateway {self._base_url} ({DEPOSIT_PATH} answered 404)",
            )
        raise _Stop(EscrowState.REFUSED, f"{DEPOSIT_PATH} answered {_error_text(response)}")

    def _seal(
        self, relay_key: str, owner_key: str, rotation: int, policy: _Policy, now_ms: int
    ) -> DepositRecord:
        """A new sealed package of the writer's secret (in a worker thread: key derivation and
        sealing are CPU work)."""
        writer = self._cores.key_pair(gateway_writer_name(relay_key, rotation))
        try:
            package = seal_deposit(
                policy.public_key,
                relay_key=relay_key,
                writer=writer,
                owner_key=owner_key,
                created_at_ms=now_ms,
                rotation=rotation,
            )
            public_key = writer.public_key.hex()
        finally:
            del writer  # the only reference to the secret: gone as soon as it is sealed
        return DepositRecord(
            rotation=rotation,
            writer_public_key=public_key,
            escrow_fingerprint=policy.fingerprint,
            created_at_ms=now_ms,
            package=base64.b64encode(package).decode("ascii"),
            done=False,
        )

    async def _request(
        self, client: httpx.AsyncClient, method: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _Retry(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            raise _Retry(f"{method} {path} answered {_error_text(response)}")
        return response

    # -- the relay ---------------------------------------------------------------------------------

    async def _admit(self, relay: RelayRecord) -> None:
        status = self._statuses[relay.key]

        def admit(reply: Reply[Admission]) -> AdmitWriter:
            return AdmitWriter(relay.id, status.writer_core_key, WriterRole.GATEWAY, reply)

        outcome = await self._writer.request(admit)
        if outcome not in (Admission.ADMITTED, Admission.ALREADY_ADMITTED):
            raise _Stop(
                EscrowState.REFUSED,
                f"the relay did not admit its gateway writer {status.writer_core_key}:"
                f" {outcome.value}",
            )
