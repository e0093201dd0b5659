"""The control client against a scripted test gateway over real sockets, real signatures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from hypertuna.protocol.worker import (
    ClientFrames,
    ErrorCode,
    ErrorMessage,
    MirrorStatus,
    PendingWrites,
    RelayAction,
    RelayFrames,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    owner_relay_key,
)
from hypertuna.storage.hosted import owner_core_name
from hypertuna.worker.control import Rescan
from hypertuna.worker.identity import load_or_create_identity, worker_key
from tests.support import Signer, connect, event_json
from tests.worker.support import (
    GatewayConn,
    ScriptedGateway,
    fast_settings,
    open_test_gateway,
    open_worker,
    wait_until,
)


async def _frames(conn: GatewayConn, session: int, until: str) -> list[list[object]]:
    """Relay frames of ``session`` up to and including the first whose type is ``until``."""
    out: list[list[object]] = []
    while True:
        message = await conn.expect(RelayFrames)
        assert message.session == session
        for frame in message.frames:
            out.append(json.loads(frame))
            if out[-1][0] == until:
                return out


async def _connected(gateway: ScriptedGateway) -> GatewayConn:
    conn = await gateway.accept()
    await conn.handshake()
    return conn


async def test_registration_statement(tmp_path: Path) -> None:
    data = tmp_path / "w"
    async with (
        open_test_gateway() as gateway,
        open_worker(data, fast_settings(gateway.url)) as worker,
    ):
        conn = await gateway.accept()
        hello = await conn.handshake()
        assert hello.worker_key == worker_key(load_or_create_identity(data))
        register = await conn.registration()
        statement = register.statement
        owner = worker.system.cores.key_pair(owner_core_name("alpha"))
        assert statement.action is RelayAction.REGISTER
        assert statement.relay_key == worker.relay.key == owner_relay_key(statement.owner_key)
        assert statement.owner_key == owner.public_key.hex()
        assert statement.worker_key == hello.worker_key
        assert statement.name == "alpha"
        assert statement.seq >= 1
        await wait_until(lambda: worker.control.statistics().registered == 1)
        assert worker.control.statistics().connected
        await worker.shutdown()


async def test_seq_grows_across_restarts_and_reconnects(tmp_path: Path) -> None:
    data = tmp_path / "w"
    seqs: list[int] = []
    async with open_test_gateway() as gateway:
        for _ in range(2):
            async with open_worker(data, fast_settings(gateway.url)) as worker:
                conn = await _connected(gateway)
                seqs.append((await conn.registration()).statement.seq)
                # The gateway drops the connection: the worker comes back and registers anew.
                await conn.ws.aclose()
                conn.done.set()
                again = await _connected(gateway)
                seqs.append((await again.registration()).statement.seq)
                assert worker.control.statistics().connections == 2
                await worker.shutdown()
    assert seqs == sorted(seqs) and len(set(seqs)) == 4, seqs


async def test_forwarded_session_is_served_like_a_direct_client(tmp_path: Path) -> None:
    alice = Signer()
    first, second, third = (alice.event(content=f"note {i}") for i in range(3))
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        await conn.registration()
        await conn.send(SessionOpen(session=7, relay_key=worker.relay.key))
        assert await conn.expect(SessionReady) == SessionReady(session=7)

        # EVENT -> OK, through client-frames / relay-frames.
        await conn.send(ClientFrames(session=7, frames=(json.dumps(["EVENT", event_json(first)]),)))
        assert await _frames(conn, 7, "OK") == [["OK", first.id, True, ""]]

        # A direct client on the worker's local endpoint sees the same relay.
        async with connect(worker.system.relay_url(worker.relay)) as direct:
            assert await direct.publish(second) == (True, "")
            forwarded_req = ["REQ", "s", {"kinds": [1]}]
            await conn.send(ClientFrames(session=7, frames=(json.dumps(forwarded_req),)))
            forwarded = await _frames(conn, 7, "EOSE")
            direct_events = await direct.query("s", {"kinds": [1]})
            assert forwarded[-1] == ["EOSE", "s"]
            assert [f[2] for f in forwarded[:-1]] == direct_events
            assert {e["id"] for e in direct_events} == {first.id, second.id}

            # Live: an event published directly reaches the forwarded subscription.
            assert await direct.publish(third) == (True, "")
            assert await direct.recv() == ["EVENT", "s", event_json(third)]
            assert await _frames(conn, 7, "EVENT") == [["EVENT", "s", event_json(third)]]

        # CLOSE -> CLOSED, then the gateway ends the session.
        await conn.send(ClientFrames(session=7, frames=('["CLOSE","s"]',)))
        assert await _frames(conn, 7, "CLOSED") == [["CLOSED", "s", ""]]
        await conn.send(SessionClose(session=7, reason="client left"))
        await wait_until(lambda: worker.control.statistics().sessions_open == 0)
        await worker.shutdown()


async def test_unknown_relay_and_duplicate_session_are_refused(tmp_path: Path) -> None:
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        await conn.registration()
        await conn.send(SessionOpen(session=1, relay_key="ab" * 32))
        refused = await conn.expect(SessionRefused)
        assert refused.session == 1 and "not hosted" in refused.reason
        await conn.send(SessionOpen(session=2, relay_key=worker.relay.key))
        await conn.expect(SessionReady)
        await conn.send(SessionOpen(session=2, relay_key=worker.relay.key))
        assert "already open" in (await conn.expect(SessionRefused)).reason
        assert worker.control.statistics().sessions_refused == 2
        await worker.shutdown()


async def test_later_messages_and_bad_input_do_not_break_the_connection(
    tmp_path: Path,
) -> None:
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        await conn.registration()
        await conn.send(MirrorStatus(core_key=worker.relay.key, length=0, fork=0))
        await conn.send(
            PendingWrites(
                relay_key=worker.relay.key,
                kinds=("autobase",),
                drive_key=None,
                drive_version=None,
                lease_version=1,
            )
        )
        await conn.send_raw('{"v":1,"type":"session-open","session":"x"}')
        error = await conn.expect(ErrorMessage)
        assert error.code is ErrorCode.MALFORMED
        # Still serving.
        await conn.send(SessionOpen(session=3, relay_key=worker.relay.key))
        await conn.expect(SessionReady)
        assert worker.control.statistics().connections == 1
        await worker.shutdown()


async def test_refused_registration_is_logged_and_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hypertuna.worker")
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        register = await conn.registration(ack=False)
        await conn.send(
            ErrorMessage(id=register.id, code=ErrorCode.CONFLICT, message="owned by another")
        )
        await wait_until(lambda: worker.control.statistics().refused == 1)
        await worker.control.inbox.send(Rescan())
        await conn.recv_nothing(0.3)
        assert "refused relay alpha" in caplog.text and "owned by another" in caplog.text
        # Nor on the next connection: the refusal would not change.
        await conn.ws.aclose()
        conn.done.set()
        again = await _connected(gateway)
        await again.recv_nothing(0.3)
        await worker.shutdown()


async def test_relays_created_while_connected_are_registered(tmp_path: Path) -> None:
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        await conn.registration()
        beta = await worker.system.create_relay("beta")
        await worker.control.inbox.send(Rescan())
        assert (await conn.registration()).statement.relay_key == beta.key
        await worker.shutdown()


async def test_gateway_silence_ends_the_connection(tmp_path: Path) -> None:
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await gateway.accept()
        await conn.handshake(heartbeat_interval_ms=100, liveness_timeout_ms=300)
        await conn.registration()
        started = trio.current_time()
        # The test gateway says nothing more; the worker must give up on it and reconnect.
        again = await gateway.accept()
        silent_for = trio.current_time() - started
        assert 0.3 <= silent_for < 0.3 + 0.2 + 2.5, silent_for
        assert worker.control.statistics().disconnects >= 1
        await again.handshake()
        await again.registration()
        await worker.shutdown()


async def test_graceful_shutdown_closes_sessions_then_the_socket_with_1001(
    tmp_path: Path,
) -> None:
    async with (
        open_test_gateway() as gateway,
        open_worker(tmp_path / "w", fast_settings(gateway.url)) as worker,
    ):
        conn = await _connected(gateway)
        await conn.registration()
        await conn.send(SessionOpen(session=5, relay_key=worker.relay.key))
        await conn.expect(SessionReady)
        await conn.send(ClientFrames(session=5, frames=('["REQ","live",{}]',)))
        assert await _frames(conn, 5, "EOSE") == [["EOSE", "live"]]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.shutdown)
            assert await _frames(conn, 5, "CLOSED") == [
                ["CLOSED", "live", "error: worker shutting down"]
            ]
            assert await conn.expect(SessionClose) == SessionClose(
                session=5, reason="worker shutting down"
            )
            assert await conn.close_code() == 1001
        assert not worker.control.statistics().connected
