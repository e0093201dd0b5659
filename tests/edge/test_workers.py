"""``/gateway/worker`` and forwarded client sessions, over real sockets with real signatures.

The gateway under test (*front*) forwards to test workers (:mod:`tests.edge.worker_support`)
that pipe each session to a relay hosted by a second gateway (*backend*).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import httpx
import nacl.signing
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from hypertuna.config import WorkersConfig
from hypertuna.protocol.worker import (
    Ack,
    ErrorCode,
    ErrorMessage,
    RelayAction,
    sign_hello,
)
from hypertuna.storage.events import RelayRegisteredError
from hypertuna.system import System, open_system
from tests.edge.worker_support import Owner, TestWorker, handshake, open_worker, worker_url
from tests.support import TIMEOUT, Gateway, Signer, connect, gateway_config, open_gateway

WORKERS = WorkersConfig(
    heartbeat_interval_s=0.1,
    liveness_timeout_s=0.6,
    sweep_timeout_s=0.5,
    handshake_timeout_s=2.0,
    max_message_bytes=64 * 1024,
)


@contextlib.asynccontextmanager
async def open_front(data_dir: Path, database_url: str = "") -> AsyncIterator[System]:
    config = attrs.evolve(gateway_config(data_dir, database_url=database_url), workers=WORKERS)
    async with open_system(config) as system:
        yield system


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with open_gateway(tmp_path / "backend") as gateway:
        yield gateway


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[System]:
    async with open_front(tmp_path / "front") as system:
        yield system


def metric(system: System, name: str, **labels: str) -> float:
    value = system.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_metric(
    system: System, name: str, check: Callable[[float], bool], **labels: str
) -> None:
    """Poll a metric until ``check`` holds (metrics have no change notification)."""
    with trio.fail_after(TIMEOUT):
        while not check(metric(system, name, **labels)):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def registered(front: System, worker: TestWorker, owner: Owner, seq: int = 1) -> None:
    reply = await worker.register(owner, gateway_id=front.gateway_id, seq=seq)
    assert isinstance(reply, Ack), reply


# -- handshake --------------------------------------------------------------------------------


async def test_gateway_identity_is_stable(tmp_path: Path) -> None:
    async with open_front(tmp_path) as system:
        first = system.gateway_id
    async with open_front(tmp_path) as system:
        assert system.gateway_id == first and len(first) == 64


async def test_handshake_welcomes_with_settings(front: System) -> None:
    async with open_worker(front.base_url) as worker:
        assert worker.welcome.worker_id == worker.public
        assert worker.welcome.heartbeat_interval_ms == 100
        assert worker.welcome.liveness_timeout_ms == 600
        assert worker.welcome.max_message_bytes == 64 * 1024
        await wait_metric(front, "gateway_workers_connected", lambda v: v == 1)
    await wait_metric(front, "gateway_workers_connected", lambda v: v == 0)


async def _refused(ws: object, expected: ErrorCode) -> None:
    from tests.edge.worker_support import decode

    assert hasattr(ws, "get_message")
    with trio.fail_after(TIMEOUT):
        error = decode(await ws.get_message())
        assert isinstance(error, ErrorMessage) and error.code is expected, error
        with pytest.raises(ConnectionClosed):
            await ws.get_message()


async def test_bad_hello_signature_is_refused(front: System) -> None:
    from tests.edge.worker_support import Challenge, decode, encode

    key = nacl.signing.SigningKey.generate()
    async with open_websocket_url(worker_url(front.base_url)) as ws:
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge)
        hello = sign_hello(key, challenge, "x")
        forged = attrs.evolve(hello, sig=("0" if hello.sig[0] != "0" else "1") + hello.sig[1:])
        await ws.send_message(encode(forged))
        await _refused(ws, ErrorCode.UNAUTHORIZED)


async def test_hello_for_another_nonce_or_replayed_is_refused(front: System) -> None:
    from tests.edge.worker_support import Challenge, decode, encode

    key = nacl.signing.SigningKey.generate()
    async with open_websocket_url(worker_url(front.base_url)) as first:
        challenge, welcome = await handshake(first, key)
        assert welcome.TYPE == "welcome"
        old_hello = sign_hello(key, challenge, "x")
        # The same hello on a new connection (new nonce): refused.
        async with open_websocket_url(worker_url(front.base_url)) as second:
            fresh = decode(await second.get_message())
            assert isinstance(fresh, Challenge) and fresh.nonce != challenge.nonce
            await second.send_message(encode(old_hello))
            await _refused(second, ErrorCode.UNAUTHORIZED)
        # A hello signed over the right nonce but claiming it answers another one: refused.
        async with open_websocket_url(worker_url(front.base_url)) as third:
            fresh = decode(await third.get_message())
            assert isinstance(fresh, Challenge)
            hello = sign_hello(key, fresh, "x")
            await third.send_message(encode(attrs.evolve(hello, nonce=challenge.nonce)))
            await _refused(third, ErrorCode.UNAUTHORIZED)


async def test_only_hello_before_welcome(front: System) -> None:
    from tests.edge.worker_support import Heartbeat, decode, encode

    async with open_websocket_url(worker_url(front.base_url)) as ws:
        decode(await ws.get_message())
        await ws.send_message(encode(Heartbeat(1)))
        await _refused(ws, ErrorCode.UNEXPECTED)


# -- registrations ----------------------------------------------------------------------------


async def test_registration_and_owner_binding(front: System) -> None:
    alice, mallory = Owner(), Owner()
    async with open_worker(front.base_url) as worker:
        await registered(front, worker, alice)
        route = await front.route_relay("chat")
        assert route is not None and route.relay_key == alice.relay_key
        assert await front.route_relay(alice.relay_key) == route
        # Mallory's key cannot register, update or remove Alice's relay: neither claiming to be
        # the owner (the signature does not verify) nor as herself (the key is not hers).
        for action in RelayAction:
            for owner_key_holder in (alice, mallory):
                statement_owner = owner_key_holder
                reply = await worker.register(
                    statement_owner,
                    gateway_id=front.gateway_id,
                    seq=10,
                    action=action,
                    signer=mallory.key,
                    relay_key=alice.relay_key,
                )
                assert isinstance(reply, ErrorMessage), reply
                assert reply.code is ErrorCode.UNAUTHORIZED
        # Another owner cannot take the name either.
        reply = await worker.register(mallory, gateway_id=front.gateway_id, seq=1, name="chat")
        assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.CONFLICT
        # The relay is unchanged and still Alice's.
        assert await front.route_relay("chat") == route


async def test_statement_for_another_gateway_or_worker_is_refused(front: System) -> None:
    alice = Owner()
    async with open_worker(front.base_url) as worker:
        reply = await worker.register(alice, gateway_id="ab" * 32, seq=1)
        assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.UNAUTHORIZED
        reply = await worker.register(
            alice, gateway_id=front.gateway_id, seq=1, worker_key="cd" * 32
        )
        assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.UNAUTHORIZED
        assert await front.route_relay("chat") is None
        # A relay name or key the gateway hosts itself is a conflict.
        hosted = await front.create_relay("mine")
        reply = await worker.register(alice, gateway_id=front.gateway_id, seq=1, name="mine")
        assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.CONFLICT
        assert hosted.key != alice.relay_key


@pytest.mark.parametrize(
    "backend_kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_replayed_registration_is_refused_also_after_restart(
    tmp_path: Path, backend_kind: str, request: pytest.FixtureRequest
) -> None:
    database_url = request.getfixturevalue("pg_url") if backend_kind == "postgres" else ""
    alice = Owner()
    key = nacl.signing.SigningKey.generate()
    async with (
        open_front(tmp_path, database_url) as front,
        open_worker(front.base_url, key=key) as w,
    ):
        await registered(front, w, alice, seq=5)
        for seq in (5, 4):
            reply = await w.register(alice, gateway_id=front.gateway_id, seq=seq)
            assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.REPLAYED
    async with (
        open_front(tmp_path, database_url) as front,
        open_worker(front.base_url, key=key) as w,
    ):
        # Durable: the relay is known at start, and the old statement stays refused.
        assert await front.route_relay("chat") is not None
        reply = await w.register(alice, gateway_id=front.gateway_id, seq=5)
        assert isinstance(reply, ErrorMessage) and reply.code is ErrorCode.REPLAYED
        reply = await w.register(
            alice, gateway_id=front.gateway_id, seq=6, action=RelayAction.REMOVE
        )
        assert isinstance(reply, Ack)
        assert await front.route_relay("chat") is None


async def test_bad_messages_get_typed_errors_and_change_nothing(front: System) -> None:
    alice = Owner()
    async with open_worker(front.base_url) as worker:
        cases = [
            ("not json", ErrorCode.MALFORMED),
            ('{"v":1,"type":"no-such"}', ErrorCode.UNKNOWN_TYPE),
            ('{"v":2,"type":"heartbeat","t":1}', ErrorCode.UNSUPPORTED_VERSION),
            ('{"v":1,"type":"relay-register","id":7}', ErrorCode.MALFORMED),
            (
                '{"v":1,"type":"session-open","session":1,"relay_key":"' + "a" * 64 + '"}',
                ErrorCode.UNEXPECTED,
            ),
            (
                '{"v":1,"type":"pending-writes-ack","relay_key":"'
                + "a" * 64
                + '","lease_version":1}',
                ErrorCode.NOT_IMPLEMENTED,
            ),
        ]
        for text, code in cases:
            await worker.send_raw(text)
            reply = await worker.reply()
            assert isinstance(reply, ErrorMessage) and reply.code is code, (text, reply)
        assert await front.route_relay("chat") is None
        # The connection is still up and usable.
        await registered(front, worker, alice)


async def test_oversize_message_closes_1009(front: System) -> None:
    async with open_websocket_url(worker_url(front.base_url)) as ws:
        await handshake(ws, nacl.signing.SigningKey.generate())
        await ws.send_message("x" * (64 * 1024 + 1))
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 1009
        assert closed.value.reason.reason


# -- forwarding -------------------------------------------------------------------------------


async def test_publish_query_and_live_subscription_through_a_worker(
    front: System, backend: Gateway
) -> None:
    alice, author = Owner(), Signer()
    async with open_worker(front.base_url, backend.url) as worker:
        await registered(front, worker, alice)
        url = front.config.relay_ws_url(alice.relay_key, front.base_url)
        before = metric(front, "gateway_forwarded_frames_total", direction="to_worker")
        async with connect(url) as client, connect(url.replace(alice.relay_key, "chat")) as other:
            stored = author.event(content="first")
            assert await client.publish(stored) == (True, "")
            assert [e["id"] for e in await client.query("s1", {"kinds": [1]})] == [stored.id]
            live = author.event(content="live")
            assert await other.publish(live) == (True, "")
            reply = await client.recv()
            assert reply[:2] == ["EVENT", "s1"] and reply[2]["id"] == live.id
            assert await client.count("c", {"kinds": [1]}) == 2
        assert metric(front, "gateway_forwarded_frames_total", direction="to_worker") > before
        assert metric(front, "gateway_forwarded_frames_total", direction="to_client") > 0
        assert metric(front, "gateway_peer_sweep_total", result="hit") >= 2
        assert metric(front, "gateway_worker_relays") == 1
    await wait_metric(front, "gateway_relay_served_seconds_total", lambda v: v > 0, mode="peer")


async def test_failover_to_a_second_worker_without_duplicates(
    front: System, backend: Gateway
) -> None:
    alice, author = Owner(), Signer()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    async with (
        open_worker(front.base_url, backend.url) as second,
        open_worker(front.base_url, backend.url) as first,
    ):
        await registered(front, second, alice)
        await registered(front, first, alice)
        second.refuse = True  # the first worker gets the session
        async with connect(url) as client:
            early = [author.event(content=f"e{i}", created_at=1_700_000_000 + i) for i in range(3)]
            for event in early:
                assert (await client.publish(event))[0]
            assert len(await client.query("s", {"kinds": [1]})) == 3
            assert first.opened == 1
            second.refuse = False
            await first.ws.aclose()
            # The first worker stopped: the session moves to the second, which re-runs REQ
            # "s"; the stored events and EOSE are not sent again.
            await client.recv_nothing(0.5)
            assert second.opened == 1
            late = author.event(content="late", created_at=1_700_000_100)
            async with connect(backend.url) as direct:
                assert await direct.publish(late) == (True, "")
            reply = await client.recv()
            assert reply[:2] == ["EVENT", "s"] and reply[2]["id"] == late.id
            await client.recv_nothing(0.3)
            # New subscriptions and events go to the second worker.
            assert len(await client.query("t", {"kinds": [1]})) == 4
            assert (await client.publish(author.event(content="after")))[0]
    assert metric(front, "gateway_peer_sweep_total", result="refused") >= 1


async def test_silent_worker_is_detected_within_the_liveness_timeout(
    front: System, backend: Gateway
) -> None:
    alice = Owner()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    async with open_worker(front.base_url, backend.url) as worker:
        await registered(front, worker, alice)
        async with connect(url) as client:
            await client.query("s", {"kinds": [1]})
            worker.heartbeats = False
            started = trio.current_time()
            # The link is aborted: the session sweeps again and, with the only worker gone,
            # the client is told so.
            reply = await client.recv()
            elapsed = trio.current_time() - started
            assert reply[0] == "NOTICE" and "no worker" in reply[1], reply
            assert await client.recv() == [
                "CLOSED",
                "s",
                "error: no worker of this relay is reachable right now",
            ]
            assert elapsed < WORKERS.liveness_timeout_s + 0.4, elapsed
    stats = front.router.statistics()
    assert stats.actor.extra and dict(stats.actor.extra)["dead_workers"] == 1


async def test_no_worker_then_worker_back(front: System, backend: Gateway) -> None:
    alice, author = Owner(), Signer()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    key = nacl.signing.SigningKey.generate()
    async with open_worker(front.base_url, backend.url, key=key) as worker:
        await registered(front, worker, alice)
    none_before = metric(front, "gateway_peer_sweep_total", result="none")
    async with connect(url) as client:
        notice = await client.recv()
        assert notice[0] == "NOTICE" and "no worker" in notice[1]
        await client.send("REQ", "s", {"kinds": [1]})
        closed = await client.recv()
        assert closed[:2] == ["CLOSED", "s"] and closed[2].startswith("error: ")
        event = author.event()
        ok, message = await client.publish(event)
        assert not ok and message.startswith("error: ")
        await client.send("CLOSE", "x")
        assert await client.recv() == ["CLOSED", "x", ""]
        assert metric(front, "gateway_peer_sweep_total", result="none") > none_before
        # The worker comes back (its registration is durable): new REQs go to it.
        async with open_worker(front.base_url, backend.url, key=key) as back:
            assert (await client.publish(event)) == (True, "")
            assert [e["id"] for e in await client.query("t", {"kinds": [1]})] == [event.id]
            assert back.opened == 1
    assert metric(front, "gateway_relay_served_seconds_total", mode="replica") > 0


async def test_unknown_relay_is_404(front: System) -> None:
    from trio_websocket import HandshakeError

    with pytest.raises(HandshakeError):
        async with open_websocket_url(front.config.relay_ws_url("e" * 64, front.base_url)):
            pass


async def test_slow_worker_is_a_sweep_timeout(front: System, backend: Gateway) -> None:
    alice = Owner()
    url = front.config.relay_ws_url(alice.relay_key, front.base_url)
    async with open_worker(front.base_url, backend.url) as worker:
        await registered(front, worker, alice)
        worker.ignore_opens = True
        async with connect(url) as client:
            notice = await client.recv()
            assert notice[0] == "NOTICE"
        assert metric(front, "gateway_peer_sweep_total", result="timeout") == 1
        # A sweep waits at most sweep_timeout_s per worker.
        worker.ignore_opens = False
        async with connect(url) as client:
            assert await client.query("s", {"kinds": [1]}) == []


async def test_hosted_relays_count_as_local_time(front: System, alice: Signer) -> None:
    relay = await front.create_relay("here")
    async with connect(front.relay_url(relay)) as client:
        assert await client.publish(alice.event()) == (True, "")
    await wait_metric(front, "gateway_relay_served_seconds_total", lambda v: v > 0, mode="local")


# -- relay information and names ----------------------------------------------------------------


async def _get(url: str, **headers: str) -> httpx.Response:
    # httpx's sync client in a thread: the gateway runs on this trio loop.
    return await trio.to_thread.run_sync(lambda: httpx.get(url, headers=headers, timeout=10))


async def test_nip11_of_a_worker_relay(front: System) -> None:
    alice = Owner()
    by_key = f"{front.base_url}/relay/{alice.relay_key}"
    async with open_worker(front.base_url) as worker:
        await registered(front, worker, alice)
        for url in (by_key, f"{front.base_url}/relay/chat"):
            response = await _get(url, Accept="application/nostr+json")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/nostr+json")
            assert response.headers["access-control-allow-origin"] == "*"
            doc = response.json()
            assert doc["name"] == "chat" and doc["description"] == "test relay"
            assert doc["supported_nips"] == [1, 11]
            assert doc["limitation"] == {"max_message_length": front.config.limits.max_frame_bytes}
            assert doc["software"] == front.config.relay_info.software
        plain = await _get(by_key)
        assert plain.status_code == 200
        assert front.config.relay_ws_url(alice.relay_key, front.base_url) in plain.text
    # Known from the registration, not the connection: answered with no worker connected too.
    assert (await _get(by_key, Accept="application/nostr+json")).status_code == 200
    async with open_worker(front.base_url, key=worker.key) as again:
        reply = await again.register(
            alice, gateway_id=front.gateway_id, seq=2, action=RelayAction.REMOVE
        )
        assert isinstance(reply, Ack)
    gone = await _get(by_key, Accept="application/nostr+json")
    assert gone.status_code == 404
    assert gone.headers["access-control-allow-origin"] == "*"
    assert gone.headers["content-type"].startswith("application/json") and gone.json()["error"]


async def test_hosted_relay_cannot_take_a_worker_relays_name(front: System) -> None:
    alice = Owner()
    async with open_worker(front.base_url) as worker:
        await registered(front, worker, alice)
    with pytest.raises(RelayRegisteredError):
        await front.create_relay("chat")
    # The refusal left nothing behind: the name still leads to the workers' relay.
    assert await front.lookup_relay("chat") is None
    assert await front.list_relays() == []
    route = await front.route_relay("chat")
    assert route is not None and route.relay_key == alice.relay_key
    hosted = await front.create_relay("other")
    assert await front.lookup_relay("other") == hosted
