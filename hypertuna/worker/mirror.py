"""MirrorFeed: the worker's half of blind-peer mirroring, one per control connection.

After a relay is registered, the feed mirrors its cores to the gateway: the owner core (type
``owner``) and the relay's drive cores (``drive-entries``, ``drive-blobs``); this worker writes no
other writer cores. For each core it first asks ``mirror-request`` and learns the gateway's
length from ``mirror-status``, so after a reconnect nothing the gateway already holds is sent
again; then it polls the core's length every ``poll_s`` and sends the new blocks in
``mirror-update``s, one at a time per core, each waiting for its ``mirror-status``.

Each update must fit in the gateway's ``max_message_bytes``. An update ending at the core's
current length carries the core's own signature; a backlog too large for one message is cut
into batches that end at earlier lengths, which the worker signs itself with the core's key pair
(the same signer and fork, so the gateway verifies them exactly like the core's own
signatures). A core the gateway refuses (``verification-failed``, ``quota-exceeded``, ...) is not
offered again on this connection; a gateway that does not know mirroring (``unknown-type`` or
``not-implemented``) ends mirroring for the connection.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from hypertuna.protocol.worker import (
    ErrorCode,
    ErrorMessage,
    Message,
    MirrorRequest,
    MirrorStatus,
    MirrorUpdate,
)
from hypertuna.storage.cores import Core, CoreUpdate
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.drives import drive_core_names
from hypertuna.storage.events import RelayRecord
from hypertuna.storage.hosted import owner_core_name

__all__ = ["MirrorCoreStatus", "MirrorFeed"]

log = logging.getLogger(__name__)

#: Room kept in each message for everything but the blocks (keys, manifest, signature, meta).
_ENVELOPE_BYTES: Final = 4096
_CORE_IN_MESSAGE = re.compile(r"^mirror ([0-9a-f]{64}):")


@attrs.frozen
class MirrorCoreStatus:
    """One mirrored core as the worker sees it."""

    core_key: str
    relay_key: str
    core_type: str
    local_length: int
    gateway_length: int | None
    """None until the gateway answered."""
    refused: str
    last_sent: float | None = None
    """Wall-clock seconds of the last ``mirror-update`` sent for the core; None if none yet."""


@attrs.define(eq=False)
class _Tracked:
    name: str
    core: Core
    relay: RelayRecord
    core_type: str
    gateway_length: int | None = None
    gateway_fork: int = 0
    in_flight: bool = False
    requested: bool = False
    refused: str = ""
    last_sent: float | None = None


def _encoded_size(block: bytes) -> int:
    return 4 * ((len(block) + 2) // 3) + 3


def _batch(core: Core, start: int, budget: int) -> CoreUpdate | None:
    """The next update from ``start`` within ``budget`` bytes of base64 blocks; None when one
    block alone does not fit."""
    length = core.length
    end = start
    size = 0
    while end < length:
        size += _encoded_size(core.get_stored(end))
        if size > budget:
            break
        end += 1
    if end == length:
        update = core.export_update(start)
        if update.length == length:
            return update
        # The core grew since it was measured: send the measured part, signed below.
    if end == start:
        return None
    return core.export_range(start, end)


class MirrorFeed:
    """Mirrors the cores of registered relays over one control connection (see the module
    docstring). Its methods are called from the connection's tasks."""

    def __init__(
        self,
        cores: CoreStore,
        send: Callable[[Message], Awaitable[None]],
        *,
        max_message_bytes: int,
        poll_s: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cores = cores
        self._wall_clock = wall_clock
        self._send = send
        self._budget = max(max_message_bytes - _ENVELOPE_BYTES, 1024) * 3 // 4
        self._poll_s = poll_s
        self._tracked: dict[str, _Tracked] = {}
        self._wake = trio.Event()
        self._disabled = ""
        self.sent_blocks = 0
        self.sent_updates = 0

    @property
    def disabled(self) -> bool:
        """The gateway does not take mirrors: nothing more is sent on this connection."""
        return bool(self._disabled)

    def _gave_up(self) -> bool:
        # A method, not the property: the answer changes while ``run`` awaits.
        return bool(self._disabled)

    def statuses(self) -> tuple[MirrorCoreStatus, ...]:
        return tuple(
            MirrorCoreStatus(
                core_key=key,
                relay_key=t.relay.key,
                core_type=t.core_type,
                local_length=t.core.length,
                gateway_length=t.gateway_length,
                refused=t.refused or self._disabled,
                last_sent=t.last_sent,
            )
            for key, t in self._tracked.items()
        )

    async def add_relay(self, relay: RelayRecord) -> None:
        """Start mirroring the cores of ``relay`` (registered on this connection)."""
        drive = drive_core_names(relay.key)
        wanted = (
            (owner_core_name(relay.name), "owner"),
            (drive.entries, "drive-entries"),
            (drive.blobs, "drive-blobs"),
        )
        for name, core_type in wanted:
            core = await trio.to_thread.run_sync(self._cores.writable, name)
            key = core.key.hex()
            if key not in self._tracked:
                self._tracked[key] = _Tracked(name, core, relay, core_type)
        self._wake.set()

    def on_status(self, message: MirrorStatus) -> None:
        tracked = self._tracked.get(message.core_key)
        if tracked is None:
            return
        tracked.gateway_length = message.length
        tracked.gateway_fork = message.fork
        tracked.in_flight = False
        self._wake.set()

    def on_error(self, message: ErrorMessage) -> bool:
        """Take a gateway ``error`` that is about mirroring; False for any other error."""
        if message.code in (ErrorCode.UNKNOWN_TYPE, ErrorCode.NOT_IMPLEMENTED) and (
            "mirror" in message.message
        ):
            if not self._disabled:
                log.warning("the gateway does not take mirrors: %s", message.message)
            self._disabled = f"{message.code}: {message.message}"
            return True
        match = _CORE_IN_MESSAGE.match(message.message)
        tracked = self._tracked.get(match.group(1)) if match else None
        if tracked is None:
            return False
        tracked.in_flight = False
        tracked.refused = f"{message.code}: {message.message}"
        log.error("the gateway refused the mirror of core %s: %s", tracked.name, tracked.refused)
        return True

    async def run(self) -> None:
        """Send requests and updates until the connection ends (cancelled with it)."""
        while not self._gave_up():
            self._wake = trio.Event()
            for key, tracked in list(self._tracked.items()):
                if self._gave_up():
                    return
                await self._step(key, tracked)
            with trio.move_on_after(self._poll_s):
                await self._wake.wait()

    async def _step(self, key: str, tracked: _Tracked) -> None:
        if tracked.refused or tracked.in_flight:
            return
        if tracked.gateway_length is None:
            if not tracked.requested:
                tracked.requested = True
                await self._send(MirrorRequest(core_key=key))
            return
        core = tracked.core
        start = tracked.gateway_length
        if core.fork != tracked.gateway_fork:
            # The core was truncated since: send it again from the start on its new fork.
            start = 0
        elif core.length <= start:
            return
        update = await trio.to_thread.run_sync(_batch, core, start, self._budget)
        if update is None:
            tracked.refused = "a block is larger than the gateway's message limit"
            log.error("core %s: %s", tracked.name, tracked.refused)
            return
        manifest = core.manifest
        message = MirrorUpdate(
            core_key=key,
            manifest=None if manifest is None else manifest.encode(),
            start=update.start,
            fork=update.fork,
            blocks=update.blocks,
            signature=update.signature,
            meta={
                "relay_key": tracked.relay.key,
                "relay_id": tracked.relay.name,
                "type": tracked.core_type,
                "length": core.length,
                "announce": True,
                "priority": 0,
            },
        )
        tracked.in_flight = True
        tracked.last_sent = self._wall_clock()
        self.sent_updates += 1
        self.sent_blocks += len(update.blocks)
        await self._send(message)
