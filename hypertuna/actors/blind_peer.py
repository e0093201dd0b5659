"""BlindPeerStore: verified mirrors of the cores of worker-registered relays.

Workers send ``mirror-update``s over their control connection; the store checks who may mirror
what, verifies every block and signature against the core key (:meth:`Mirror.apply`, in a worker
thread) and stores them in the gateway's :class:`~hypertuna.storage.corestore.CoreStore`.

**Who may mirror which core.** ``meta.relay_key`` must name a relay the sending worker has an
active registration of. A core of type ``owner`` must be that relay's owner core (its key *is*
the relay key); any other core (``writer``, ``drive-entries``, ``drive-blobs``) is accepted on the
worker's word that it belongs to the relay — its blocks are still verified against its own key,
so the worker can only ever store what that core's writer signed — but it may not use the relay
key, and a core already mirrored for one relay is never re-assigned to another. Quotas are
charged to the relay's owner key.

**Metadata** (core key, relay key, owner key, core type, announce flag, priority, relay name,
last activity as wall-clock seconds, length, bytes) is kept durably in ``blind-peer.json`` next
to each mirror's files, written atomically after each stored update, and read back at start.

**Length, lag, readiness.** Each update carries the worker's own length of the core
(``meta.length``). A mirror is *ready* when it holds at least that length. When an update leaves it
behind, the lag clock starts (trio time); the lag is the time since then, 0 once it caught up.
State: ``ready``, ``syncing`` (behind for less than ``stale_after_s``) or ``stale``.

Refusals are values (:class:`MirrorRefused` with a protocol :class:`ErrorCode`), counted by
code; nothing is stored for a refused update.

**Garbage collection.** A mirror whose last activity (wall clock) is more than ``mirror_ttl_s``
ago is removed — closed in the core store, its files and ``blind-peer.json`` deleted, its bytes
no longer counted against the quotas — every ``gc_interval_s`` (trio time; the periodic task
sends :class:`CollectGarbage` to the actor's own inbox) and on demand (:class:`CollectGarbage`,
answered with the removed mirrors); an operator can remove one mirror at once
(:class:`RemoveMirror`). A mirror of a *held* relay is never removed. A relay is held while it
has at least one reason from :class:`Hold` (taken back by :class:`Release`) — the hook
for pending writes and active leases — or while the constructor's ``is_held(relay_key)``
predicate says so; the gateway passes the replica manager's "has this relay open (or is opening
it)" there, so a mirror a replica reads is never removed under it. The check and the removal
from the core store happen in one step of the actor's task (the mirror's directory is renamed
away before anything can open it again); only deleting the renamed files runs in a thread.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import attrs
import trio

from hypertuna.actors.runtime import ActorStatistics, Inbox, Reply
from hypertuna.protocol.worker import ErrorCode, MirrorUpdate
from hypertuna.storage.cores import CoreError, CoreIdentity, CoreUpdate, CoreVerificationError
from hypertuna.storage.corestore import CoreStore, CoreStoreError
from hypertuna.storage.registrations import WorkerRelay

__all__ = [
    "CORE_TYPES",
    "META_FILE",
    "MIRROR_STATES",
    "ApplyMirror",
    "BlindPeerStatistics",
    "BlindPeerStore",
    "CollectGarbage",
    "Hold",
    "ListMirrors",
    "MirrorAccepted",
    "MirrorInfo",
    "MirrorLength",
    "MirrorRefused",
    "Release",
    "Removal",
    "RemovalOutcome",
    "RemoveMirror",
    "RemovedMirror",
]

log = logging.getLogger(__name__)

META_FILE: Final = "blind-peer.json"
CORE_TYPES: Final = ("owner", "writer", "drive-entries", "drive-blobs")
#: The closed set of mirror states (label values of ``gateway_blind_peer_mirror_state``).
MIRROR_STATES: Final = ("ready", "syncing", "stale")
_HEX32 = re.compile(r"[0-9a-f]{64}")
#: How long the list of worker registrations is trusted before it is read again.
_RELAYS_TTL_S: Final = 5.0


@attrs.frozen
class MirrorAccepted:
    core_key: str
    length: int
    fork: int


@attrs.frozen
class MirrorRefused:
    code: ErrorCode
    message: str


MirrorOutcome = MirrorAccepted | MirrorRefused


@attrs.frozen
class ApplyMirror:
    """Verify and store ``update`` from the authenticated worker ``worker_key``."""

    worker_key: str
    update: MirrorUpdate
    reply: Reply[MirrorOutcome]


@attrs.frozen
class MirrorLength:
    """The stored ``(length, fork)`` of ``core_key``; ``(0, 0)`` for a core not mirrored."""

    core_key: str
    reply: Reply[tuple[int, int]]


@attrs.frozen
class MirrorInfo:
    core_key: str
    relay_key: str
    owner_key: str
    core_type: str
    announce: bool
    priority: int
    relay_id: str
    length: int
    fork: int
    bytes: int
    last_activity: int
    """Wall-clock seconds of the last stored update."""
    announced_length: int
    lag_ms: int
    state: str

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@attrs.frozen
class ListMirrors:
    reply: Reply[tuple[MirrorInfo, ...]]


@attrs.frozen
class RemovedMirror:
    """A mirror removed by garbage collection."""

    core_key: str
    relay_key: str
    core_type: str
    bytes: int
    last_activity: int


@attrs.frozen
class CollectGarbage:
    """Remove the mirrors idle past the TTL whose relay is not held; replies with them."""

    reply: Reply[tuple[RemovedMirror, ...]]


class RemovalOutcome(enum.Enum):
    """What :class:`RemoveMirror` did (the value is the machine-readable outcome)."""

    REMOVED = "removed"
    NOT_FOUND = "not-found"
    #: The mirror's relay is held (see :class:`Hold`): nothing was removed.
    HELD = "held"


@attrs.frozen
class Removal:
    outcome: RemovalOutcome
    #: The removed mirror when ``outcome`` is ``REMOVED``, else the mirror left in place (HELD)
    #: or None (NOT_FOUND).
    mirror: RemovedMirror | None = None


@attrs.frozen
class RemoveMirror:
    """Remove the mirror of ``core_key`` now, whatever its age, unless its relay is held."""

    core_key: str
    reply: Reply[Removal]


@attrs.frozen
class Hold:
    """Keep every mirror of ``relay_key`` from garbage collection until :class:`Release` with
    the same ``reason`` (reasons are counted once: holding twice for one reason is one hold)."""

    relay_key: str
    reason: str


@attrs.frozen
class Release:
    """Take back the hold :class:`Hold` placed for ``reason``; unknown holds are ignored."""

    relay_key: str
    reason: str


BlindPeerMessage = (
    ApplyMirror | MirrorLength | ListMirrors | CollectGarbage | RemoveMirror | Hold | Release
)


@attrs.frozen
class BlindPeerStatistics:
    actor: ActorStatistics
    mirrors: int
    bytes: int
    states: tuple[tuple[str, int], ...]
    """Mirrors per state, every state of :data:`MIRROR_STATES` listed."""
    max_lag_ms: int
    accepted: int
    blocks: int
    """Blocks received in accepted updates."""
    refused: tuple[tuple[str, int], ...]
    """Refused updates per error code."""
    collected: int = 0
    """Mirrors removed by garbage collection since start."""


@attrs.define(eq=False)
class _Held:
    """One mirror as the actor tracks it; ``persisted`` is what goes to ``blind-peer.json``."""

    core_key: str
    relay_key: str
    owner_key: str
    core_type: str
    announce: bool
    priority: int
    relay_id: str
    manifest: str
    length: int
    fork: int
    bytes: int
    last_activity: int
    announced_length: int = 0
    behind_since: float | None = None

    def persisted(self) -> dict[str, object]:
        return {
            "core_key": self.core_key,
            "relay_key": self.relay_key,
            "owner_key": self.owner_key,
            "core_type": self.core_type,
            "announce": self.announce,
            "priority": self.priority,
            "relay_id": self.relay_id,
            "manifest": self.manifest,
            "length": self.length,
            "fork": self.fork,
            "bytes": self.bytes,
            "last_activity": self.last_activity,
        }


@attrs.frozen
class _Meta:
    relay_key: str
    core_type: str
    announced: int | None
    announce: bool
    priority: int
    relay_id: str


def _read_meta(meta: Mapping[str, str | int | bool]) -> _Meta | str:
    """The checked metadata of an update, or why it is malformed."""
    relay_key = meta.get("relay_key")
    if not isinstance(relay_key, str) or not _HEX32.fullmatch(relay_key):
        return "meta.relay_key must be 64 lowercase hex characters"
    core_type = meta.get("type")
    if not isinstance(core_type, str) or core_type not in CORE_TYPES:
        return f"meta.type must be one of {', '.join(CORE_TYPES)}"
    announced = meta.get("length")
    if announced is not None and type(announced) is not int:
        return "meta.length must be an integer"
    announce = meta.get("announce", True)
    if type(announce) is not bool:
        return "meta.announce must be a boolean"
    priority = meta.get("priority", 0)
    if type(priority) is not int:
        return "meta.priority must be an integer"
    relay_id = meta.get("relay_id", "")
    if not isinstance(relay_id, str):
        return "meta.relay_id must be a string"
    return _Meta(relay_key, core_type, announced, announce, priority, relay_id)


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _load_held(root: Path) -> list[_Held]:
    # Mirrors taken out by a collection that did not finish deleting them.
    _delete(sorted(root.glob(".removed-*")))
    held: list[_Held] = []
    for path in sorted(root.glob(f"*/*/{META_FILE}")):
        try:
            data = json.loads(path.read_text())
            held.append(_Held(**data))
        except (OSError, ValueError, TypeError) as exc:
            log.error("ignoring unreadable mirror metadata %s: %s", path, exc)
    return held


class BlindPeerStore:
    """The blind-peer actor (see the module docstring). ``on_grow(core_key, length, relay_key)``
    is called from the actor's task after every stored update, and once per mirror at start (so
    that replica views catch up with what was stored before a restart); ``on_removed`` after
    a mirror was taken out (garbage collection or on request). Neither may block."""

    def __init__(
        self,
        cores: CoreStore,
        relays: Callable[[], Awaitable[list[WorkerRelay]]],
        *,
        wall_clock: Callable[[], int],
        max_bytes: int,
        max_bytes_per_owner: int = 0,
        max_block_bytes: int = 512 * 1024,
        stale_after_s: float = 60.0,
        mirror_ttl_s: float = 7 * 24 * 3600.0,
        gc_interval_s: float = 3600.0,
        is_held: Callable[[str], bool] | None = None,
        on_grow: Callable[[bytes, int, str], None] | None = None,
        on_removed: Callable[[RemovedMirror], None] | None = None,
        inbox_capacity: int = 256,
    ) -> None:
        self.inbox: Inbox[BlindPeerMessage] = Inbox("blind-peer", inbox_capacity)
        self._cores = cores
        self._relays_source = relays
        self._wall_clock = wall_clock
        self._max_bytes = max_bytes
        self._max_bytes_per_owner = max_bytes_per_owner
        self._max_block_bytes = max_block_bytes
        self._stale_after_s = stale_after_s
        self._on_grow = on_grow or (lambda _key, _length, _relay: None)
        self._on_removed = on_removed or (lambda _removed: None)
        self._mirror_ttl_s = mirror_ttl_s
        self._gc_interval_s = gc_interval_s
        self._is_held = is_held or (lambda _relay_key: False)
        #: Relay key -> the reasons it is held for (never empty).
        self._holds: dict[str, set[str]] = {}
        self._collected = 0
        self._held: dict[str, _Held] = {}
        self._relays: dict[str, WorkerRelay] = {}
        self._relays_read_at: float | None = None
        self._accepted = 0
        self._blocks = 0
        self._refused: dict[str, int] = {}

    # -- reading state -----------------------------------------------------------------------

    def _state(self, held: _Held, now: float) -> tuple[str, int]:
        if held.behind_since is None:
            return "ready", 0
        lag = now - held.behind_since
        return ("stale" if lag >= self._stale_after_s else "syncing"), int(lag * 1000)

    def _info(self, held: _Held, now: float) -> MirrorInfo:
        state, lag_ms = self._state(held, now)
        return MirrorInfo(
            core_key=held.core_key,
            relay_key=held.relay_key,
            owner_key=held.owner_key,
            core_type=held.core_type,
            announce=held.announce,
            priority=held.priority,
            relay_id=held.relay_id,
            length=held.length,
            fork=held.fork,
            bytes=held.bytes,
            last_activity=held.last_activity,
            announced_length=held.announced_length,
            lag_ms=lag_ms,
            state=state,
        )

    def mirrors(self) -> tuple[MirrorInfo, ...]:
        """A snapshot of every mirror held (like :meth:`statistics`, safe to call from any
        task of the same trio run)."""
        now = trio.current_time()
        return tuple(self._info(held, now) for held in self._held.values())

    def statistics(self) -> BlindPeerStatistics:
        try:
            now = trio.current_time()
        except RuntimeError:
            now = 0.0
        states = dict.fromkeys(MIRROR_STATES, 0)
        max_lag = 0
        for held in self._held.values():
            state, lag = self._state(held, now)
            states[state] += 1
            max_lag = max(max_lag, lag)
        total = sum(held.bytes for held in self._held.values())
        return BlindPeerStatistics(
            actor=self.inbox.statistics(
                mirrors=len(self._held),
                accepted=self._accepted,
                refused=sum(self._refused.values()),
            ),
            mirrors=len(self._held),
            bytes=total,
            states=tuple(states.items()),
            max_lag_ms=max_lag,
            accepted=self._accepted,
            blocks=self._blocks,
            refused=tuple(sorted(self._refused.items())),
            collected=self._collected,
        )

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for held in await trio.to_thread.run_sync(_load_held, self._cores.root):
            # A mirror whose worker has not spoken since the restart is taken as caught up
            # with what the worker last announced.
            held.announced_length = held.length
            self._held[held.core_key] = held
        for held in self._held.values():
            self._notify_grow(held.core_key, held.length, held.relay_key)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._collect_periodically)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            for pending in self.inbox.drain():
                if not isinstance(pending, Hold | Release):
                    pending.reply.fail_if_pending(RuntimeError("blind-peer store stopped"))

    async def _collect_periodically(self) -> None:
        def build(reply: Reply[tuple[RemovedMirror, ...]]) -> CollectGarbage:
            return CollectGarbage(reply)

        while True:
            await trio.sleep(self._gc_interval_s)
            try:
                await self.inbox.request(build)
            except (trio.ClosedResourceError, trio.BrokenResourceError, RuntimeError):
                return

    async def _serve(self) -> None:
        while True:
            try:
                message = await self.inbox.receive()
            except trio.EndOfChannel:
                return
            match message:
                case ApplyMirror(reply=reply):
                    try:
                        reply.send(await self._apply(message))
                    except Exception as exc:
                        reply.fail_if_pending(exc)
                        raise
                case MirrorLength(core_key=key, reply=reply):
                    found = self._held.get(key)
                    reply.send((0, 0) if found is None else (found.length, found.fork))
                case ListMirrors(reply=reply):
                    reply.send(self.mirrors())
                case CollectGarbage(reply=reply):
                    try:
                        reply.send(await self._collect())
                    except Exception as exc:
                        reply.fail_if_pending(exc)
                        raise
                case RemoveMirror(core_key=core_key, reply=reply):
                    try:
                        reply.send(await self._remove(core_key))
                    except Exception as exc:
                        reply.fail_if_pending(exc)
                        raise
                case Hold(relay_key=relay_key, reason=reason):
                    self._holds.setdefault(relay_key, set()).add(reason)
                case Release(relay_key=relay_key, reason=reason):
                    reasons = self._holds.get(relay_key)
                    if reasons is not None:
                        reasons.discard(reason)
                        if not reasons:
                            del self._holds[relay_key]

    def held(self, relay_key: str) -> bool:
        """Whether the mirrors of ``relay_key`` are kept from garbage collection."""
        return relay_key in self._holds or self._is_held(relay_key)

    async def _collect(self) -> tuple[RemovedMirror, ...]:
        cutoff = self._wall_clock() - self._mirror_ttl_s
        removed: list[RemovedMirror] = []
        trash: list[Path] = []
        for held in list(self._held.values()):
            if held.last_activity >= cutoff or self.held(held.relay_key):
                continue
            # No checkpoint between the hold check and taking the mirror out of the store.
            try:
                trash.append(self._take_out(held.core_key))
            except (CoreError, CoreStoreError, OSError) as exc:
                log.error("mirror %s cannot be removed: %s", held.core_key[:16], exc)
                continue
            del self._held[held.core_key]
            self._collected += 1
            gone = RemovedMirror(
                held.core_key, held.relay_key, held.core_type, held.bytes, held.last_activity
            )
            removed.append(gone)
            self._notify_removed(gone)
            log.info(
                "removed mirror %s of relay %s (idle since %d)",
                held.core_key[:16],
                held.relay_key[:16],
                held.last_activity,
            )
        if trash:
            await trio.to_thread.run_sync(_delete, trash)
        return tuple(removed)

    async def _remove(self, core_key: str) -> Removal:
        held = self._held.get(core_key)
        if held is None:
            return Removal(RemovalOutcome.NOT_FOUND)
        mirror = RemovedMirror(
            held.core_key, held.relay_key, held.core_type, held.bytes, held.last_activity
        )
        if self.held(held.relay_key):
            return Removal(RemovalOutcome.HELD, mirror)
        # As in _collect: no checkpoint between the hold check and taking the mirror out.
        trash = self._take_out(core_key)
        del self._held[core_key]
        self._notify_removed(mirror)
        log.info("removed mirror %s of relay %s on request", core_key[:16], held.relay_key[:16])
        await trio.to_thread.run_sync(_delete, [trash])
        return Removal(RemovalOutcome.REMOVED, mirror)

    def _take_out(self, core_key: str) -> Path:
        """Close the mirror ``core_key`` and rename its directory away (quick; the caller
        deletes the returned path)."""
        return self._cores.remove(bytes.fromhex(core_key))

    def _refuse(self, code: ErrorCode, core_key: str, text: str) -> MirrorRefused:
        self._refused[code.value] = self._refused.get(code.value, 0) + 1
        log.info("refused mirror update of %s: %s: %s", core_key[:16], code.value, text)
        return MirrorRefused(code, f"mirror {core_key}: {text}")

    async def _relay(self, relay_key: str) -> WorkerRelay | None:
        now = trio.current_time()
        stale = self._relays_read_at is None or now - self._relays_read_at > _RELAYS_TTL_S
        if stale or relay_key not in self._relays:
            self._relays = {r.relay_key: r for r in await self._relays_source()}
            self._relays_read_at = now
        return self._relays.get(relay_key)

    async def _apply(self, message: ApplyMirror) -> MirrorOutcome:
        update = message.update
        key = update.core_key
        meta = _read_meta(update.meta)
        if isinstance(meta, str):
            return self._refuse(ErrorCode.MALFORMED, key, meta)
        relay = await self._relay(meta.relay_key)
        if relay is None or message.worker_key not in relay.workers:
            return self._refuse(
                ErrorCode.UNAUTHORIZED, key, "the relay is not registered by this worker"
            )
        if (meta.core_type == "owner") != (key == meta.relay_key):
            return self._refuse(
                ErrorCode.UNAUTHORIZED, key, "only the owner core has the relay key"
            )
        held = self._held.get(key)
        if held is not None and (held.relay_key, held.core_type) != (
            meta.relay_key,
            meta.core_type,
        ):
            return self._refuse(
                ErrorCode.UNAUTHORIZED, key, "the core is mirrored for another relay or type"
            )
        if any(len(block) > self._max_block_bytes for block in update.blocks):
            return self._refuse(
                ErrorCode.TOO_LARGE, key, f"a block is over {self._max_block_bytes} bytes"
            )
        added = sum(len(block) for block in update.blocks)
        total = sum(h.bytes for h in self._held.values())
        if total + added > self._max_bytes:
            return self._refuse(ErrorCode.QUOTA_EXCEEDED, key, "the gateway's mirror quota is full")
        if self._max_bytes_per_owner:
            owned = sum(h.bytes for h in self._held.values() if h.owner_key == relay.owner_key)
            if owned + added > self._max_bytes_per_owner:
                return self._refuse(
                    ErrorCode.QUOTA_EXCEEDED, key, "the relay owner's mirror quota is full"
                )
        try:
            core_update = CoreUpdate(update.start, update.blocks, update.fork, update.signature)
        except ValueError as exc:
            return self._refuse(ErrorCode.MALFORMED, key, str(exc))
        if held is None:
            if update.manifest is None:
                return self._refuse(
                    ErrorCode.MALFORMED, key, "the first update of a core must carry its manifest"
                )
            try:
                identity = CoreIdentity.from_key(bytes.fromhex(key), manifest=update.manifest)
            except ValueError as exc:
                return self._refuse(ErrorCode.VERIFICATION_FAILED, key, f"manifest: {exc}")
            manifest_hex = update.manifest.hex()
        else:
            identity = CoreIdentity.from_key(
                bytes.fromhex(key), manifest=bytes.fromhex(held.manifest)
            )
            manifest_hex = held.manifest
        new = _Held(
            core_key=key,
            relay_key=meta.relay_key,
            owner_key=relay.owner_key,
            core_type=meta.core_type,
            announce=meta.announce,
            priority=meta.priority,
            relay_id=meta.relay_id or (held.relay_id if held else ""),
            manifest=manifest_hex,
            length=0,
            fork=0,
            bytes=0,
            last_activity=self._wall_clock(),
        )
        cores = self._cores

        def store() -> tuple[int, int, int, bool]:
            directory = cores.directory_for(identity.key)
            existed = cores.has(identity.key)
            mirror = cores.mirror(identity)
            before = (mirror.length, mirror.fork, mirror.signature)
            try:
                length = mirror.apply(core_update)
            except CoreVerificationError:
                if not existed:
                    # Refused before anything was stored: leave no empty mirror behind.
                    cores.release(identity.key)
                    shutil.rmtree(directory, ignore_errors=True)
                raise
            changed = before != (mirror.length, mirror.fork, mirror.signature)
            new.length, new.fork, new.bytes = length, mirror.fork, mirror.byte_length
            _write_json(directory / META_FILE, new.persisted())
            return length, mirror.fork, mirror.byte_length, changed

        try:
            length, fork, _, changed = await trio.to_thread.run_sync(store)
        except CoreVerificationError as exc:
            return self._refuse(ErrorCode.VERIFICATION_FAILED, key, str(exc))
        except CoreStoreError as exc:
            return self._refuse(ErrorCode.CONFLICT, key, str(exc))
        except ValueError as exc:
            return self._refuse(ErrorCode.MALFORMED, key, str(exc))
        except CoreError as exc:
            log.error("mirror %s cannot be stored: %s", key[:16], exc)
            return self._refuse(ErrorCode.INTERNAL, key, "the mirror cannot be stored")
        announced = meta.announced if meta.announced is not None else length
        new.announced_length = max(announced, length)
        if length >= new.announced_length:
            new.behind_since = None
        elif held is not None and held.behind_since is not None:
            new.behind_since = held.behind_since
        else:
            new.behind_since = trio.current_time()
        self._held[key] = new
        self._accepted += 1
        self._blocks += len(update.blocks)
        if changed:
            self._notify_grow(key, length, meta.relay_key)
        return MirrorAccepted(key, length, fork)

    def _notify_removed(self, removed: RemovedMirror) -> None:
        try:
            self._on_removed(removed)
        except Exception:
            log.exception("on_removed failed for mirror %s", removed.core_key[:16])

    def _notify_grow(self, core_key: str, length: int, relay_key: str) -> None:
        try:
            self._on_grow(bytes.fromhex(core_key), length, relay_key)
        except Exception:
            log.exception("on_grow failed for mirror %s", core_key[:16])
