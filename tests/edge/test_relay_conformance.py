"""NIP-01 conformance of a hosted relay, over real sockets with a real WebSocket client."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected

from hypertuna.protocol.nostr import compute_event_id
from tests.support import TIMEOUT, Gateway, Signer, connect, event_json

NOW = 1_700_000_000


def tampered(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = dict(event)
    data.update(changes)
    return data


# --- ids and signatures --------------------------------------------------------------------


async def test_valid_event_is_accepted_and_served(gw: Gateway, alice: Signer) -> None:
    event = alice.event(content="first")
    async with connect(gw.url) as client:
        assert await client.publish(event) == (True, "")
        assert await client.query("s", {"ids": [event.id]}) == [event_json(event)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"content": "tampered"}, "invalid: event id does not match"),
        ({"tags": [["t", "x"]]}, "invalid: event id does not match"),
        ({"created_at": NOW + 1}, "invalid: event id does not match"),
    ],
)
async def test_id_must_match_content(
    gw: Gateway, alice: Signer, change: dict[str, Any], expected: str
) -> None:
    data = tampered(event_json(alice.event()), **change)
    async with connect(gw.url) as client:
        accepted, message = await client.publish(data)
        assert not accepted
        assert message.startswith(expected)
        assert await client.query("s", {}) == []


async def test_bad_signature_is_refused(gw: Gateway, alice: Signer, bob: Signer) -> None:
    good = event_json(alice.event())
    other = event_json(bob.event())
    forged = tampered(good, sig=other["sig"])
    stolen_key = tampered(good, pubkey=other["pubkey"])
    stolen_key["id"] = compute_event_id(
        other["pubkey"], good["created_at"], good["kind"], good["tags"], good["content"]
    )
    async with connect(gw.url) as client:
        for data in (forged, stolen_key):
            accepted, message = await client.publish(data)
            assert not accepted
            assert message.startswith("invalid:"), message
        assert await client.query("s", {}) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "A" * 64),
        ("id", "ab" * 31),
        ("pubkey", "zz" * 32),
        ("sig", "00" * 63),
        ("kind", "1"),
        ("kind", True),
        ("tags", [["t", 1]]),
        ("tags", "t"),
        ("content", 5),
    ],
)
async def test_malformed_fields_are_refused(
    gw: Gateway, alice: Signer, field: str, value: Any
) -> None:
    data = tampered(event_json(alice.event()), **{field: value})
    async with connect(gw.url) as client:
        await client.send("EVENT", data)
        reply = await client.recv()
        assert reply[0] in ("OK", "NOTICE"), reply
        if reply[0] == "OK":
            assert reply[2] is False
            assert reply[3].startswith("invalid:")
        else:
            assert reply[1].startswith("invalid:")
        # The connection stays usable and nothing was stored.
        assert await client.query("s", {}) == []


# --- JSON escapes and text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        'quote " backslash \\ newline \n tab \t cr \r bs \b ff \f',
        "control \u0001\u001f and del \u007f",
        "non-ASCII: café, 日本語, emoji 🎉, RTL שלום",
        "line separator \u2028 paragraph \u2029",
        "",
    ],
)
async def test_escapes_and_unicode_round_trip(gw: Gateway, alice: Signer, content: str) -> None:
    event = alice.event(content=content, tags=[["t", "ünïcödé"], ["e", "x\ny"]])
    async with connect(gw.url) as client:
        assert await client.publish(event) == (True, "")
        [served] = await client.query("s", {"ids": [event.id]})
        assert served["content"] == content
        assert served == event_json(event)


async def test_non_ascii_raw_frame_is_utf8(gw: Gateway, alice: Signer) -> None:
    event = alice.event(content="ñ🎉")
    async with connect(gw.url) as client:
        await client.publish(event)
        await client.send("REQ", "s", {"ids": [event.id]})
        raw = await client.ws.get_message()
        assert "ñ🎉" in raw  # served as UTF-8, not \u escapes


# --- created_at edge values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created_at", "accepted"),
    [
        (0, True),
        (NOW + 60, True),
        (NOW + 10_000, False),
        (2**32 + 1, False),
        (2**62, False),
    ],
)
async def test_created_at_range(
    gw: Gateway, alice: Signer, created_at: int, accepted: bool
) -> None:
    event = alice.event(created_at=created_at)
    async with connect(gw.url) as client:
        ok, message = await client.publish(event)
        assert ok is accepted, message
        if not accepted:
            assert message == "invalid: created_at is too far in the future"
        assert len(await client.query("s", {"ids": [event.id]})) == int(accepted)


@pytest.mark.parametrize("created_at", [-1, 1.5, 1_700_000_000.0, "1700000000", None, 2**64])
async def test_created_at_must_be_a_sane_integer(
    gw: Gateway, alice: Signer, created_at: Any
) -> None:
    data = event_json(alice.event())
    data["created_at"] = created_at
    async with connect(gw.url) as client:
        accepted, message = await client.publish(data)
        assert not accepted
        assert message.startswith("invalid:") and "created_at" in message
        assert await client.query("s", {}) == []


# --- ordering, limits, ranges, OR, tags ------------------------------------------------------


async def _publish_all(gw: Gateway, events: list[Any]) -> None:
    async with connect(gw.url) as client:
        for event in events:
            ok, message = await client.publish(event)
            assert ok, message


async def test_newest_first_ties_by_lowest_id_and_limit(gw: Gateway, alice: Signer) -> None:
    events = [alice.event(content=f"n{i}", created_at=NOW - (i // 2)) for i in range(10)]
    await _publish_all(gw, events)
    expected = sorted(events, key=lambda e: (-e.created_at, e.id))
    async with connect(gw.url) as client:
        got = await client.query("all", {"kinds": [1]})
        assert [e["id"] for e in got] == [e.id for e in expected]
        got = await client.query("few", {"kinds": [1], "limit": 3})
        assert [e["id"] for e in got] == [e.id for e in expected[:3]]


async def test_limit_zero_gives_only_live_events(gw: Gateway, alice: Signer) -> None:
    await _publish_all(gw, [alice.event(content="old")])
    async with connect(gw.url) as client:
        assert await client.query("live", {"kinds": [1], "limit": 0}) == []
        fresh = alice.event(content="new", created_at=NOW + 1)
        async with connect(gw.url) as publisher:
            await publisher.publish(fresh)
        assert await client.recv() == ["EVENT", "live", event_json(fresh)]


async def test_since_until_inclusive(gw: Gateway, alice: Signer) -> None:
    events = [alice.event(created_at=NOW - 10 + i, content=str(i)) for i in range(10)]
    await _publish_all(gw, events)
    async with connect(gw.url) as client:
        got = await client.query("r", {"since": NOW - 7, "until": NOW - 4})
        assert sorted(e["created_at"] for e in got) == [NOW - 7, NOW - 6, NOW - 5, NOW - 4]
        assert await client.query("empty", {"since": NOW, "until": NOW - 1}) == []


async def test_filters_are_ored_and_deduplicated(gw: Gateway, alice: Signer, bob: Signer) -> None:
    a = alice.event(kind=1, content="a")
    b = bob.event(kind=7, content="b")
    c = bob.event(kind=1, content="c", created_at=NOW - 5)
    await _publish_all(gw, [a, b, c])
    async with connect(gw.url) as client:
        got = await client.query(
            "or", {"authors": [alice.event().pubkey]}, {"kinds": [7]}, {"kinds": [1]}
        )
        assert [e["id"] for e in got] == [
            e.id for e in sorted([a, b, c], key=lambda e: (-e.created_at, e.id))
        ]


async def test_tag_filters(gw: Gateway, alice: Signer) -> None:
    tagged = alice.event(tags=[["t", "nostr"], ["p", "ab" * 32]], content="1")
    other = alice.event(tags=[["t", "python"]], content="2")
    untagged = alice.event(content="3")
    multi_letter = alice.event(tags=[["title", "nostr"]], content="4")
    await _publish_all(gw, [tagged, other, untagged, multi_letter])
    async with connect(gw.url) as client:
        assert [e["id"] for e in await client.query("t", {"#t": ["nostr"]})] == [tagged.id]
        both = await client.query("or", {"#t": ["nostr", "python"]})
        assert {e["id"] for e in both} == {tagged.id, other.id}
        assert [
            e["id"] for e in await client.query("and", {"#t": ["nostr"], "#p": ["ab" * 32]})
        ] == [tagged.id]
        assert await client.query("none", {"#t": ["nostr"], "#p": ["cd" * 32]}) == []


# --- kinds semantics -------------------------------------------------------------------------


async def test_replaceable_newest_wins_and_older_rejected(gw: Gateway, alice: Signer) -> None:
    v1 = alice.event(kind=0, content='{"name":"v1"}', created_at=NOW - 10)
    v2 = alice.event(kind=0, content='{"name":"v2"}', created_at=NOW)
    older = alice.event(kind=0, content='{"name":"old"}', created_at=NOW - 20)
    async with connect(gw.url) as client:
        assert (await client.publish(v1))[0]
        assert (await client.publish(v2))[0]
        accepted, message = await client.publish(older)
        assert not accepted and message.startswith("duplicate:")
        assert [e["id"] for e in await client.query("p", {"kinds": [0]})] == [v2.id]


async def test_replaceable_tie_keeps_lowest_id(gw: Gateway, alice: Signer) -> None:
    first, second = (alice.event(kind=10002, content=str(i), created_at=NOW) for i in range(2))
    low, high = sorted([first, second], key=lambda e: e.id)
    async with connect(gw.url) as client:
        assert (await client.publish(high))[0]
        assert (await client.publish(low))[0]
        accepted, _ = await client.publish(high)
        assert not accepted
        assert [e["id"] for e in await client.query("p", {"kinds": [10002]})] == [low.id]


async def test_addressable_by_d_tag(gw: Gateway, alice: Signer) -> None:
    a1 = alice.event(kind=30023, tags=[["d", "a"]], content="a1", created_at=NOW - 5)
    a2 = alice.event(kind=30023, tags=[["d", "a"]], content="a2", created_at=NOW)
    b1 = alice.event(kind=30023, tags=[["d", "b"]], content="b1", created_at=NOW - 5)
    a0 = alice.event(kind=30023, tags=[["d", "a"]], content="a0", created_at=NOW - 9)
    async with connect(gw.url) as client:
        for event in (a1, a2, b1):
            assert (await client.publish(event))[0]
        assert not (await client.publish(a0))[0]
        got = await client.query("p", {"kinds": [30023]})
        assert {e["id"] for e in got} == {a2.id, b1.id}


async def test_ephemeral_delivered_live_never_stored(gw: Gateway, alice: Signer) -> None:
    event = alice.event(kind=20001, content="now only")
    async with connect(gw.url) as listener, connect(gw.url) as publisher:
        assert await listener.query("live", {"kinds": [20001]}) == []
        assert await publisher.publish(event) == (True, "")
        assert await listener.recv() == ["EVENT", "live", event_json(event)]
        assert await publisher.query("later", {"kinds": [20001]}) == []
    assert await gw.system.store.event_count(gw.relay.id) == 0


# --- NIP-09 deletion -------------------------------------------------------------------------


async def test_deletion_removes_own_events_only(gw: Gateway, alice: Signer, bob: Signer) -> None:
    mine = alice.event(content="mine")
    theirs = bob.event(content="theirs")
    await _publish_all(gw, [mine, theirs])
    deletion = alice.event(kind=5, tags=[["e", mine.id], ["e", theirs.id]], created_at=NOW + 1)
    async with connect(gw.url) as client:
        assert (await client.publish(deletion))[0]
        ids = {e["id"] for e in await client.query("s", {})}
        assert ids == {theirs.id, deletion.id}
        accepted, message = await client.publish(mine)
        assert not accepted and message.startswith("blocked:"), message
        assert (await client.publish(theirs)) == (False, "duplicate: already have this event")


async def test_deletion_before_event_blocks_it(gw: Gateway, alice: Signer) -> None:
    future = alice.event(content="not yet sent")
    deletion = alice.event(kind=5, tags=[["e", future.id]])
    async with connect(gw.url) as client:
        assert (await client.publish(deletion))[0]
        accepted, message = await client.publish(future)
        assert not accepted and message.startswith("blocked:")


async def test_deletion_of_address(gw: Gateway, alice: Signer) -> None:
    article = alice.event(kind=30023, tags=[["d", "post"]], content="v1", created_at=NOW - 5)
    deletion = alice.event(kind=5, tags=[["a", f"30023:{article.pubkey}:post"]], created_at=NOW - 1)
    older_again = alice.event(kind=30023, tags=[["d", "post"]], content="v0", created_at=NOW - 2)
    newer = alice.event(kind=30023, tags=[["d", "post"]], content="v2", created_at=NOW)
    async with connect(gw.url) as client:
        assert (await client.publish(article))[0]
        assert (await client.publish(deletion))[0]
        assert await client.fetch("a", {"kinds": [30023]}) == []
        assert not (await client.publish(older_again))[0]
        assert (await client.publish(newer))[0]
        assert [e["id"] for e in await client.query("b", {"kinds": [30023]})] == [newer.id]


# --- NIP-40 expiration -----------------------------------------------------------------------


async def test_expired_events_rejected_and_never_served(gw: Gateway, alice: Signer) -> None:
    expired = alice.event(tags=[["expiration", str(NOW - 1)]], content="gone")
    soon = alice.event(tags=[["expiration", str(NOW + 30)]], content="soon gone")
    async with connect(gw.url) as client:
        accepted, message = await client.publish(expired)
        assert not accepted and message == "invalid: event has expired"
        assert (await client.publish(soon))[0]
        assert [e["id"] for e in await client.query("a", {})] == [soon.id]
        assert await client.count("c1", {}) == 1
        gw.clock.now = NOW + 30
        assert await client.query("b", {}) == []
        assert await client.count("c2", {}) == 0


# --- COUNT -----------------------------------------------------------------------------------


async def test_count(gw: Gateway, alice: Signer, bob: Signer) -> None:
    await _publish_all(gw, [alice.event(content=str(i)) for i in range(5)] + [bob.event(kind=7)])
    async with connect(gw.url) as client:
        assert await client.count("c", {"kinds": [1]}) == 5
        assert await client.count("c", {"kinds": [1]}, {"kinds": [7]}) == 6
        assert await client.count("c", {"authors": [bob.event().pubkey]}) == 1
        assert await client.count("c", {"kinds": [1], "limit": 1}) == 5


# --- subscriptions ---------------------------------------------------------------------------


async def test_live_events_after_eose(gw: Gateway, alice: Signer) -> None:
    stored = alice.event(content="stored", created_at=NOW - 1)
    await _publish_all(gw, [stored])
    async with connect(gw.url) as listener, connect(gw.url) as publisher:
        assert await listener.query("s", {"kinds": [1]}) == [event_json(stored)]
        new = [alice.event(content=f"live {i}", created_at=NOW + i) for i in range(3)]
        for event in new:
            await publisher.publish(event)
        for event in new:
            assert await listener.recv() == ["EVENT", "s", event_json(event)]
        unrelated = alice.event(kind=7, content="+")
        await publisher.publish(unrelated)
        await listener.recv_nothing()


async def test_req_with_same_id_replaces_subscription(gw: Gateway, alice: Signer) -> None:
    async with connect(gw.url) as listener, connect(gw.url) as publisher:
        await listener.query("s", {"kinds": [1]})
        await listener.query("s", {"kinds": [7]})
        await publisher.publish(alice.event(kind=1, content="old filter"))
        reaction = alice.event(kind=7, content="+")
        await publisher.publish(reaction)
        assert await listener.recv() == ["EVENT", "s", event_json(reaction)]
        await listener.recv_nothing()


async def test_close_ends_subscription(gw: Gateway, alice: Signer) -> None:
    async with connect(gw.url) as listener, connect(gw.url) as publisher:
        await listener.query("s", {"kinds": [1]})
        await listener.send("CLOSE", "s")
        assert await listener.recv() == ["CLOSED", "s", ""]
        await publisher.publish(alice.event())
        await listener.recv_nothing()


async def test_max_subscriptions(tmp_path: Any, alice: Signer) -> None:
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d", max_subscriptions=2) as gw, connect(gw.url) as client:
        await client.query("a", {})
        await client.query("b", {})
        await client.send("REQ", "c", {})
        reply = await client.recv()
        assert reply[:2] == ["CLOSED", "c"] and reply[2].startswith("blocked:")
        await client.query("a", {"kinds": [1]})  # replacing an open one is allowed
        await client.send("CLOSE", "b")
        assert (await client.recv())[0] == "CLOSED"
        await client.query("c", {})


async def test_no_duplicates_while_publishing_during_req(gw: Gateway, alice: Signer) -> None:
    """Events committed around the moment of a REQ arrive exactly once."""
    events = [alice.event(content=f"race {i}", created_at=NOW - 100 + i) for i in range(60)]
    seen: list[str] = []
    async with (
        connect(gw.url) as listener,
        connect(gw.url) as publisher,
        trio.open_nursery() as nursery,
    ):

        async def publish_all() -> None:
            for event in events:
                await publisher.send("EVENT", event_json(event))
            for _ in events:
                assert (await publisher.recv())[2] is True

        nursery.start_soon(publish_all)
        await trio.lowlevel.checkpoint()
        await listener.send("REQ", "s", {"kinds": [1], "limit": 500})
        with trio.fail_after(TIMEOUT):
            while len(seen) < len(events):
                reply = await listener.recv()
                if reply[0] == "EVENT":
                    seen.append(reply[2]["id"])
    assert sorted(seen) == sorted(e.id for e in events)


async def test_reconnect_sees_stored_events(gw: Gateway, alice: Signer) -> None:
    event = alice.event()
    async with connect(gw.url) as client:
        await client.publish(event)
    async with connect(gw.url) as client:
        assert await client.query("s", {}) == [event_json(event)]


async def test_restart_keeps_events(tmp_path: Any, alice: Signer) -> None:
    from tests.support import open_gateway

    event = alice.event()
    async with open_gateway(tmp_path / "d") as gw, connect(gw.url) as client:
        await client.publish(event)
        key = gw.relay.key
    async with open_gateway(tmp_path / "d") as gw, connect(gw.url) as client:
        assert gw.relay.key == key
        assert await client.query("s", {}) == [event_json(event)]


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "{}",
        "[]",
        "[1, 2]",
        '["NOPE", 1]',
        '["EVENT"]',
        '["EVENT", "x"]',
        '["REQ"]',
        '["REQ", 5, {}]',
        '["REQ", "", {}]',
        '["REQ", "' + "x" * 65 + '", {}]',
        '["CLOSE"]',
        "[NaN]",
    ],
)
async def test_malformed_messages_get_notice_and_connection_survives(
    gw: Gateway, alice: Signer, frame: str
) -> None:
    async with connect(gw.url) as client:
        await client.send_raw(frame)
        reply = await client.recv()
        assert reply[0] == "NOTICE" and reply[1].startswith("invalid:"), reply
        assert (await client.publish(alice.event()))[0]


@pytest.mark.parametrize(
    ("filters", "fragment"),
    [
        ([{"kinds": ["1"]}], "kinds"),
        ([{"ids": ["abc"]}], "ids"),
        ([{"limit": -1}], "limit"),
        ([{"search": "x"}], "search"),
        ([], "filter"),
    ],
)
async def test_bad_filters_get_closed(
    gw: Gateway, filters: list[dict[str, Any]], fragment: str
) -> None:
    async with connect(gw.url) as client:
        await client.send("REQ", "bad", *filters)
        reply = await client.recv()
        assert reply[:2] == ["CLOSED", "bad"], reply
        assert reply[2].startswith("invalid:") and fragment in reply[2]
        assert await client.query("good", {}) == []


async def test_too_many_filters(tmp_path: Any) -> None:
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d", max_filters=2) as gw, connect(gw.url) as client:
        await client.send("REQ", "s", {}, {}, {})
        reply = await client.recv()
        assert reply[:2] == ["CLOSED", "s"] and reply[2].startswith("invalid:")


async def test_oversize_frame_closes_with_1009(tmp_path: Any, alice: Signer) -> None:
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d", max_frame_bytes=4096) as gw:
        async with connect(gw.url) as client:
            await client.send("EVENT", event_json(alice.event(content="x" * 5000)))
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason.code == 1009
        assert await gw.system.store.event_count(gw.relay.id) == 0


async def test_rate_limit(tmp_path: Any, alice: Signer) -> None:
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d", events_per_second=1, events_burst=3) as gw:
        async with connect(gw.url) as client:
            results = [await client.publish(alice.event(content=str(i))) for i in range(6)]
        accepted = [ok for ok, _ in results]
        assert accepted[:3] == [True, True, True]
        refused = [message for ok, message in results if not ok]
        assert refused and all(m.startswith("rate-limited:") for m in refused)


async def test_unknown_relay_is_404(gw: Gateway) -> None:
    url = gw.url.rsplit("/", 1)[0] + "/" + "ab" * 32
    with pytest.raises(ConnectionRejected) as rejected:
        async with connect(url):
            pass
    assert rejected.value.status_code == 404
    assert json.loads(rejected.value.body)["error"].startswith("no relay")


async def test_alias_path_reaches_the_same_relay(gw: Gateway, alice: Signer) -> None:
    event = alice.event()
    async with connect(gw.url) as client:
        await client.publish(event)
    alias = gw.url.rsplit("/", 1)[0] + "/" + gw.relay.name
    async with connect(alias) as client:
        assert await client.query("s", {}) == [event_json(event)]


async def test_relays_are_isolated(gw: Gateway, alice: Signer) -> None:
    other = await gw.system.create_relay("other")
    event = alice.event()
    async with connect(gw.url) as client:
        await client.publish(event)
    async with connect(gw.system.relay_url(other)) as client:
        assert await client.query("s", {}) == []
        assert await client.count("c", {}) == 0


async def test_limit_is_capped_at_max_limit(tmp_path: Any, alice: Signer) -> None:
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d", max_limit=3) as gw, connect(gw.url) as client:
        for i in range(5):
            assert (await client.publish(alice.event(content=str(i))))[0]
        assert len(await client.fetch("big", {"limit": 100})) == 3
        assert len(await client.fetch("none", {})) == 3


async def test_relay_sockets_have_tcp_nodelay_and_keepalive(gw: Gateway) -> None:
    """Small frames (OK, EOSE) must not wait for Nagle: every accepted socket has
    TCP_NODELAY (trio's SocketStream sets it; this guards against a server change)."""
    import gc
    import socket

    port = int(gw.http.rsplit(":", 1)[1])
    async with connect(gw.url) as client:
        await client.query("s", {})
        streams = [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, trio.SocketStream)
            and obj.socket.fileno() != -1
            and obj.socket.family == socket.AF_INET
            and obj.socket.getsockname()[1] == port
        ]
        assert streams
        for stream in streams:
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            # Relay sockets also detect clients that vanished without closing.
            assert stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 120


async def test_relay_created_by_another_process_is_served_at_once(
    tmp_path: Any, alice: Signer
) -> None:
    """`hypertuna relay create` writes to the store from another process while the gateway
    runs; the directory finds the relay on its first request."""
    import secrets

    from hypertuna.storage.events import open_event_store
    from tests.support import open_gateway

    async with open_gateway(tmp_path / "d") as gw:
        async with open_event_store(None, tmp_path / "d") as other_process:
            created = await other_process.create_relay(
                key=secrets.token_hex(32), name="late", description="", created_at=1
            )
        async with connect(gw.system.relay_url(created)) as client:
            assert (await client.publish(alice.event()))[0]
        assert [r.name for r in await gw.system.list_relays()] == ["test", "late"]
