"""The reference worker deposits its gateway writers in a real gateway's embedded escrow: real
sockets, real signatures, real sealed boxes, the relay's real owner core and the gateway's
mirror of it."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import h11
import httpx
import pytest
import trio

from hypertuna.config import EscrowConfig
from hypertuna.escrow.keys import EscrowKey, create_audit_key, create_escrow_key
from hypertuna.escrow.policy import DepositStatus
from hypertuna.storage.hosted import owner_core_name
from hypertuna.storage.relay_records import AddWriter, WriterRole, decode_record
from hypertuna.system import System, open_system
from hypertuna.worker.escrow import (
    DEPOSITS_FILE,
    PINS_FILE,
    EscrowDepositor,
    EscrowRelayStatus,
    EscrowState,
    gateway_writer_core_key,
    gateway_writer_name,
)
from hypertuna.worker.settings import WorkerSettings
from hypertuna.worker.status import format_status, status_document
from tests.edge.test_workers import WORKERS
from tests.support import TIMEOUT, gateway_config
from tests.worker.support import RunningWorker, fast_settings, open_worker


@attrs.frozen
class EscrowGateway:
    system: System
    key: EscrowKey

    @property
    def url(self) -> str:
        return self.system.base_url

    async def deposits_active(self) -> int:
        assert self.system.escrow is not None
        return (await self.system.escrow.service.health()).deposits_active

    def deposits_made(self) -> int:
        assert self.system.escrow is not None
        return self.system.escrow.service.statistics().deposits


@contextlib.asynccontextmanager
async def open_escrow_gateway(data_dir: Path) -> AsyncIterator[EscrowGateway]:
    """A gateway with the embedded escrow (its keys made first, as ``escrow init`` does)."""
    key_dir = data_dir / "escrow-keys"
    key_dir.mkdir(parents=True)
    key = create_escrow_key(key_dir / "escrow.key")
    create_audit_key(key_dir / "audit.key")
    config = attrs.evolve(
        gateway_config(data_dir),
        workers=WORKERS,
        escrow=EscrowConfig(enabled=True, key_dir=str(key_dir)),
    )
    async with open_system(config, escrow_environ={}) as system:
        yield EscrowGateway(system, key)


def _settings(url: str, **changes: object) -> WorkerSettings:
    return fast_settings(url, mirror_poll_s=0.05, **changes)


def _escrow(worker: RunningWorker) -> EscrowRelayStatus | None:
    statuses = {s.relay_key: s for s in worker.control.statistics().escrow}
    return statuses.get(worker.relay.key)


async def _wait_state(worker: RunningWorker, state: EscrowState) -> EscrowRelayStatus:
    with trio.fail_after(TIMEOUT):
        while (status := _escrow(worker)) is None or status.state is not state:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return status


async def _wait_for(read: Callable[[], Awaitable[object]], expected: object) -> None:
    with trio.fail_after(TIMEOUT):
        while await read() != expected:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def _admitted(worker: RunningWorker) -> dict[str, str]:
    rows = await worker.system.store.view_cores(worker.relay.id)
    return {row.key: row.role for row in rows if row.end is None}


def _owner_records(worker: RunningWorker) -> list[object]:
    core = worker.system.cores.writable(owner_core_name(worker.relay.name))
    return [decode_record(core.get(i)) for i in range(core.length)]


async def test_worker_deposits_its_gateway_writer_once_and_admits_it(tmp_path: Path) -> None:
    data = tmp_path / "worker"
    async with open_escrow_gateway(tmp_path / "gateway") as gateway:
        async with open_worker(data, _settings(gateway.url)) as worker:
            relay = worker.relay
            status = await _wait_state(worker, EscrowState.DEPOSITED)
            writer = worker.system.cores.key_pair(gateway_writer_name(relay.key, 1))
            owner = worker.system.cores.key_pair(owner_core_name(relay.name))
            core_key = gateway_writer_core_key(writer.public_key)
            # A key of its own: neither the owner key nor the worker's identity.
            assert writer.public_key != owner.public_key
            assert writer.public_key.hex() != worker.control.worker_key

            assert gateway.system.escrow is not None
            deposit = await gateway.system.escrow.service.current_deposit(relay.key)
            assert deposit is not None
            assert (deposit.status, deposit.rotation) == (DepositStatus.ACTIVE, 1)
            assert deposit.writer_public_key == writer.public_key.hex()
            assert deposit.owner_key == owner.public_key.hex()
            assert await gateway.deposits_active() == 1
            assert status == EscrowRelayStatus(
                relay_key=relay.key,
                state=EscrowState.DEPOSITED,
                rotation=1,
                writer_public_key=writer.public_key.hex(),
                writer_core_key=core_key,
                escrow_fingerprint=gateway.key.fingerprint,
                deposit_id=deposit.deposit_id,
                expires_at_ms=deposit.expires_at_ms,
                admitted=True,
                last_error="",
            )

            # The relay admits the writer: its owner core says so, its view follows.
            assert _owner_records(worker)[-1] == AddWriter(core_key, WriterRole.GATEWAY)
            assert (await _admitted(worker))[core_key] == "gateway"
            # ... and so does the gateway's verified mirror of the owner core.
            await _wait_for(
                lambda: gateway.system.replicas.admitted_writers(relay.key, WriterRole.GATEWAY),
                (core_key,),
            )
            evidence = await gateway.system.evidence(relay.key)
            assert evidence.escrow_enabled is True

            # The escrow's fingerprint is pinned on first use, readable by the worker only.
            pins = data / PINS_FILE
            assert json.loads(pins.read_text())["pins"] == {gateway.url: gateway.key.fingerprint}
            assert os.stat(pins).st_mode & 0o777 == 0o600
            assert os.stat(data / DEPOSITS_FILE).st_mode & 0o777 == 0o600
            recorded = json.loads((data / DEPOSITS_FILE).read_text())["relays"][relay.key]
            assert recorded["done"] is True and recorded["package"] is None
            assert recorded["deposit_id"] == deposit.deposit_id

            # The status file carries it, the table says it.
            document = status_document(
                gateway.url, True, None, (), worker.control.statistics().escrow
            )
            [entry] = document["relays"]  # type: ignore[misc]
            assert entry["escrow"]["state"] == "deposited"
            assert entry["escrow"]["deposit_id"] == deposit.deposit_id
            assert f"escrow: deposited, rotation 1, deposit {deposit.deposit_id}" in (
                format_status({**document, "updated_at": 0}, now=0)
            )
            length = len(_owner_records(worker))
            await worker.shutdown()

        # A restart: registered again, nothing deposited or appended again.
        async with open_worker(data, _settings(gateway.url)) as worker:
            again = await _wait_state(worker, EscrowState.DEPOSITED)
            assert again.deposit_id == deposit.deposit_id
            assert gateway.deposits_made() == 1
            assert await gateway.deposits_active() == 1
            assert len(_owner_records(worker)) == length
            await worker.shutdown()

        # The record lost: the escrow says it already holds rotation 1, which counts as done.
        (data / DEPOSITS_FILE).unlink()
        async with open_worker(data, _settings(gateway.url)) as worker:
            lost = await _wait_state(worker, EscrowState.DEPOSITED)
            assert lost.deposit_id is None and lost.last_error == ""
            assert gateway.deposits_made() == 1
            assert len(_owner_records(worker)) == length
            await worker.shutdown()


async def test_a_fingerprint_other_than_the_pinned_one_gets_no_deposit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hypertuna.worker")
    data = tmp_path / "worker"
    async with open_escrow_gateway(tmp_path / "gateway") as gateway:
        wrong = "0f" * 32
        async with open_worker(data, _settings(gateway.url, escrow_fingerprint=wrong)) as worker:
            status = await _wait_state(worker, EscrowState.FINGERPRINT_MISMATCH)
            assert gateway.key.fingerprint in status.last_error and wrong in status.last_error
            assert "no deposit is made" in status.last_error
            assert status.deposit_id is None and not status.admitted
            assert "fingerprint" in caplog.text and wrong in caplog.text
            await worker.shutdown()

        # The same with a pin from an earlier first use (trust on first use, then a new key).
        (data / PINS_FILE).write_text(json.dumps({"version": 1, "pins": {gateway.url: wrong}}))
        async with open_worker(data, _settings(gateway.url)) as worker:
            status = await _wait_state(worker, EscrowState.FINGERPRINT_MISMATCH)
            assert str(data / PINS_FILE) in status.last_error
            assert worker.relay.key not in {
                s.relay_key for s in worker.control.statistics().escrow if s.admitted
            }
            assert "gateway" not in (await _admitted(worker)).values()
            await worker.shutdown()
        assert gateway.system.escrow is not None
        assert await gateway.system.escrow.service.current_deposit(worker.relay.key) is None
        assert gateway.deposits_made() == 0
        assert not (data / DEPOSITS_FILE).exists()

        # The right pin in the settings: deposited.
        right = _settings(gateway.url, escrow_fingerprint=gateway.key.fingerprint.upper())
        async with open_worker(data, right) as worker:
            await _wait_state(worker, EscrowState.DEPOSITED)
            await worker.shutdown()
        assert gateway.deposits_made() == 1


async def test_a_gateway_without_escrow_is_recorded_as_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hypertuna.worker.escrow")
    config = attrs.evolve(gateway_config(tmp_path / "gateway"), workers=WORKERS)
    async with (
        open_system(config) as gateway,
        open_worker(tmp_path / "worker", _settings(gateway.base_url)) as worker,
    ):
        status = await _wait_state(worker, EscrowState.UNAVAILABLE)
        assert status.last_error.startswith("escrow unavailable at gateway")
        assert not status.admitted
        assert "gateway" not in (await _admitted(worker)).values()
        # Not asked again on this connection: no hot loop.
        await trio.sleep(0.5)
        unavailable = [r for r in caplog.records if "escrow unavailable" in r.getMessage()]
        assert len(unavailable) == 1
        assert not (tmp_path / "worker" / PINS_FILE).exists()
        await worker.shutdown()


@attrs.define(eq=False)
class FlakyFront:
    """A real HTTP/1.1 server in front of a gateway's HTTP API that fails on purpose: it answers
    503 to the first ``unavailable`` requests, closes the connection without an answer for the
    next ``drop``, then forwards requests to the gateway — but closes the connection instead of
    answering the first ``lose`` POSTs it forwarded (stored by the escrow, answer lost)."""

    target: str
    unavailable: int = 0
    drop: int = 0
    lose: int = 0
    port: int = 0
    #: (method, path, body, Idempotency-Key) of every request, in arrival order.
    requests: list[tuple[str, str, bytes, str | None]] = attrs.Factory(list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def posts(self) -> list[tuple[str, str, bytes, str | None]]:
        return [r for r in self.requests if r[0] == "POST"]

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            method, path = request.method.decode(), request.target.decode()
            self.requests.append((method, path, body, headers.get("idempotency-key")))
            if self.unavailable:
                self.unavailable -= 1
                status = 503
                content = b'{"error":"unavailable","reason":"database-unavailable","message":"-"}'
            elif self.drop:
                self.drop -= 1
                return
            else:
                passed = {
                    k: v
                    for k, v in headers.items()
                    if k.startswith("x-hypertuna-") or k in ("idempotency-key", "content-type")
                }
                async with httpx.AsyncClient() as client:
                    forwarded = await client.request(
                        method, self.target + path, content=body, headers=passed
                    )
                if method == "POST" and self.lose:
                    self.lose -= 1
                    return
                status, content = forwarded.status_code, forwarded.content
            response = h11.Response(
                status_code=status,
                headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(content))),
                    ("connection", "close"),
                ],
            )
            await stream.send_all(conn.send(response) or b"")
            await stream.send_all(conn.send(h11.Data(data=content)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


@contextlib.asynccontextmanager
async def open_flaky_front(
    target: str, *, unavailable: int = 0, drop: int = 0, lose: int = 0
) -> AsyncIterator[FlakyFront]:
    front = FlakyFront(target, unavailable=unavailable, drop=drop, lose=lose)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, front.handle, 0, host="127.0.0.1")
        )
        front.port = listeners[0].socket.getsockname()[1]
        yield front
        nursery.cancel_scope.cancel()


async def _registered(worker: RunningWorker) -> None:
    with trio.fail_after(TIMEOUT):
        while worker.control.statistics().registered < 1:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_retries_send_the_same_deposit_until_the_escrow_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hypertuna.worker.escrow")
    async with (
        open_escrow_gateway(tmp_path / "gateway") as gateway,
        open_worker(tmp_path / "worker", _settings(gateway.url, deposit_escrow=False)) as worker,
        open_flaky_front(gateway.url, unavailable=1, drop=1, lose=1) as front,
    ):
        await _registered(worker)
        depositor = EscrowDepositor(
            cores=worker.system.cores,
            writer=worker.system.writer.inbox,
            data_dir=worker.data_dir,
            settings=_settings(front.url),
        )
        with trio.fail_after(TIMEOUT):
            await depositor.deposit(worker.relay)
        [status] = depositor.statuses()
        assert status.state is EscrowState.DEPOSITED and status.admitted
        assert gateway.system.escrow is not None
        deposit = await gateway.system.escrow.service.current_deposit(worker.relay.key)
        assert deposit is not None and status.deposit_id == deposit.deposit_id
        # 503, a dropped connection, then a deposit whose answer was lost: the retry sent the
        # very same body under the same key and got the stored answer, not a second deposit.
        posts = front.posts()
        assert len(posts) == 2 and posts[0][2:] == posts[1][2:]
        key = posts[0][3]
        assert key is not None and key.startswith(f"{worker.relay.key}:1:")
        assert gateway.deposits_made() == 1
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert len(retries) == 3
        assert "503 database-unavailable" in retries[0]
        # Nothing secret in what was logged: the package travels in the bodies only.
        package = json.loads(posts[0][2])["package"]
        assert all(package not in r.getMessage() for r in caplog.records)
        await worker.shutdown()


async def test_a_refused_deposit_is_logged_and_kept_in_the_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hypertuna.worker.escrow")
    async with (
        open_escrow_gateway(tmp_path / "gateway") as gateway,
        open_worker(tmp_path / "worker", _settings(gateway.url, deposit_escrow=False)) as worker,
    ):
        await _registered(worker)
        # A worker clock an hour behind: its signature's timestamp is refused as stale.
        depositor = EscrowDepositor(
            cores=worker.system.cores,
            writer=worker.system.writer.inbox,
            data_dir=worker.data_dir,
            settings=_settings(gateway.url),
            wall_clock_ms=lambda: time.time_ns() // 1_000_000 - 3_600_000,
        )
        with trio.fail_after(TIMEOUT):
            await depositor.deposit(worker.relay)
        [status] = depositor.statuses()
        assert status.state is EscrowState.REFUSED and not status.admitted
        assert "answered HTTP 401 stale-timestamp" in status.last_error
        assert "stale-timestamp" in caplog.text and worker.relay.key in caplog.text
        assert gateway.deposits_made() == 0
        # The refused package is not kept: the next attempt seals a fresh one.
        recorded = json.loads((worker.data_dir / DEPOSITS_FILE).read_text())["relays"]
        assert recorded[worker.relay.key]["package"] is None
        assert recorded[worker.relay.key]["done"] is False
        await worker.shutdown()


async def test_a_relay_the_gateway_does_not_know_is_refused_not_unavailable(
    tmp_path: Path,
) -> None:
    async with (
        open_escrow_gateway(tmp_path / "gateway") as gateway,
        open_worker(tmp_path / "worker", _settings(gateway.url, deposit_escrow=False)) as worker,
    ):
        await _registered(worker)
        # Created after the registrations went out (no rescan before the test ends).
        beta = await worker.system.create_relay("beta")
        depositor = EscrowDepositor(
            cores=worker.system.cores,
            writer=worker.system.writer.inbox,
            data_dir=worker.data_dir,
            settings=_settings(gateway.url),
        )
        with trio.fail_after(TIMEOUT):
            await depositor.deposit(beta)
        [status] = depositor.statuses()
        assert status.state is EscrowState.REFUSED
        assert "answered HTTP 404 relay-not-registered" in status.last_error
        assert gateway.deposits_made() == 0
        await worker.shutdown()


async def test_a_damaged_deposit_file_stops_the_deposit_and_is_left_alone(tmp_path: Path) -> None:
    async with (
        open_escrow_gateway(tmp_path / "gateway") as gateway,
        open_worker(tmp_path / "worker", _settings(gateway.url, deposit_escrow=False)) as worker,
    ):
        await _registered(worker)
        damaged = worker.data_dir / DEPOSITS_FILE
        damaged.write_text("{not json")
        depositor = EscrowDepositor(
            cores=worker.system.cores,
            writer=worker.system.writer.inbox,
            data_dir=worker.data_dir,
            settings=_settings(gateway.url),
        )
        with trio.fail_after(TIMEOUT):
            await depositor.deposit(worker.relay)
        [status] = depositor.statuses()
        assert status.state is EscrowState.REFUSED
        assert status.last_error.startswith(f"cannot read {damaged}")
        assert damaged.read_text() == "{not json"
        assert gateway.deposits_made() == 0
        await worker.shutdown()
