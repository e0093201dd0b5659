"""Running a worker: the gateway's relay stack on the worker's own data directory and local
port (so direct clients are served by the same edge), plus the control client.

Stops gracefully on SIGINT/SIGTERM: forwarded sessions are closed and the control WebSocket
closed with 1001 first, then direct clients get their close frames, then the edge and the
storage stop in the stages of :func:`~hypertuna.system.open_system`.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import trio

from hypertuna.config import Config, load_config
from hypertuna.protocol.worker import Welcome
from hypertuna.storage.corestore import CoreStore
from hypertuna.storage.events import RelayRecord, open_event_store
from hypertuna.storage.hosted import create_hosted_relay
from hypertuna.system import open_system
from hypertuna.worker.control import Shutdown, WorkerControl
from hypertuna.worker.identity import StatementSeq, load_or_create_identity, worker_key
from hypertuna.worker.settings import WorkerSettings
from hypertuna.worker.status import status_document, write_status_periodically

__all__ = ["create_worker_relay", "list_worker_relays", "run_worker", "worker_config"]

log = logging.getLogger(__name__)


def worker_config(
    data_dir: Path, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"
) -> Config:
    """The relay-stack config of a worker: everything under ``data_dir`` (SQLite and cores),
    its local endpoint on ``host:port`` (0 = any free port), and the ``HYPERTUNA_<SECTION>_<KEY>``
    environment for the rest (limits, for example) — but never the gateway's config file.
    ``ConfigError`` for a bad value."""
    return load_config(
        default_file=False,
        overrides={
            "server.host": host,
            "server.port": port,
            "server.log_level": log_level,
            "storage.data_dir": str(data_dir),
        },
    )


def _printer(stream: TextIO) -> Callable[[str], None]:
    def emit(line: str) -> None:
        print(line, file=stream, flush=True)

    return emit


async def run_worker(
    settings: WorkerSettings, config: Config, *, stdout: TextIO | None = None
) -> None:
    """Run until SIGINT or SIGTERM. Prints (for people and for tests driving the process) the
    worker key and local URL, each relay's local WebSocket URL, and a line per welcome."""
    emit = _printer(stdout or sys.stdout)
    data_dir = config.storage.data_dir
    identity = await trio.to_thread.run_sync(load_or_create_identity, data_dir)
    seq = await trio.to_thread.run_sync(StatementSeq, data_dir)
    key = worker_key(identity)

    def connected(welcome: Welcome) -> None:
        emit(f"connected to gateway {settings.gateway_url} as {key}")

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_system(config) as system:
            emit(f"worker {key} serving on {system.base_url}")
            for relay in await system.list_relays():
                emit(f"  relay {relay.name}: {system.relay_url(relay)}")
            control = WorkerControl(system, identity, settings, seq, on_connected=connected)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(control.run)

                    def snapshot() -> dict[str, object]:
                        stats = control.statistics()
                        return status_document(
                            settings.gateway_url,
                            stats.connected,
                            stats.gateway_id,
                            stats.mirrors,
                            stats.escrow,
                        )

                    status_scope = trio.CancelScope()

                    async def write_status() -> None:
                        with status_scope:
                            await write_status_periodically(data_dir, snapshot)

                    nursery.start_soon(write_status)
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        break
                    await control.inbox.request(Shutdown)
                    status_scope.cancel()
            finally:
                # Direct clients hear the worker's reason; open_system's own stage then finds
                # them closing already.
                with trio.CancelScope(shield=True):
                    system.stopping.set()
                    with trio.move_on_after(config.server.graceful_timeout_s):
                        await system.sessions.close_all(1001, "worker shutting down")
    emit("worker stopped")


async def create_worker_relay(data_dir: Path, name: str, description: str) -> RelayRecord:
    """Create a relay hosted by the worker in ``data_dir`` (owner core, drive, view);
    :class:`~hypertuna.storage.events.RelayExistsError` if the name is taken."""
    async with open_event_store(None, data_dir) as store:
        cores = await trio.to_thread.run_sync(CoreStore.open, data_dir / "cores")
        try:
            return await create_hosted_relay(
                store, cores, name=name, description=description, created_at=int(time.time())
            )
        finally:
            cores.close()


async def list_worker_relays(data_dir: Path) -> list[RelayRecord]:
    async with open_event_store(None, data_dir) as store:
        return await store.list_relays()
