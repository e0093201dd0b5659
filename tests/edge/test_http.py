"""HTTP side of the edge: NIP-11, CORS, health, metrics, JSON errors."""

from __future__ import annotations

import httpx
import pytest

from tests.support import Gateway, Signer, connect


async def _get(url: str, **headers: str) -> httpx.Response:
    # httpx's sync client in a thread: the gateway runs on this trio loop.
    import trio

    def fetch() -> httpx.Response:
        return httpx.get(url, headers=headers, timeout=10)

    return await trio.to_thread.run_sync(fetch)


async def _request(method: str, url: str, **headers: str) -> httpx.Response:
    import trio

    def fetch() -> httpx.Response:
        return httpx.request(method, url, headers=headers, timeout=10)

    return await trio.to_thread.run_sync(fetch)


def _http_relay_url(gw: Gateway) -> str:
    return f"{gw.http}/relay/{gw.relay.key}"


async def test_nip11_document(gw: Gateway) -> None:
    response = await _get(_http_relay_url(gw), Accept="application/nostr+json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/nostr+json")
    assert response.headers["access-control-allow-origin"] == "*"
    doc = response.json()
    assert doc["name"] == "test"
    assert doc["description"] == "conformance relay"
    assert 1 in doc["supported_nips"] and 11 in doc["supported_nips"]
    limitation = doc["limitation"]
    assert limitation["max_message_length"] == gw.system.config.limits.max_frame_bytes
    assert limitation["max_subid_length"] == 64
    assert limitation["max_limit"] == gw.system.config.limits.max_limit


async def test_nip11_by_alias_and_cors_preflight(gw: Gateway) -> None:
    response = await _get(f"{gw.http}/relay/test", Accept="application/nostr+json")
    assert response.json()["name"] == "test"
    preflight = await _request("OPTIONS", _http_relay_url(gw))
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "GET" in preflight.headers["access-control-allow-methods"]


async def test_plain_get_explains_relay(gw: Gateway) -> None:
    response = await _get(_http_relay_url(gw))
    assert response.status_code == 200
    assert gw.url in response.text


@pytest.mark.parametrize("path", ["/relay/" + "cd" * 32, "/relay/nope", "/no/such/path"])
async def test_unknown_paths_are_json_404(gw: Gateway, path: str) -> None:
    response = await _get(gw.http + path, Accept="application/nostr+json")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]


async def test_health_ok(gw: Gateway) -> None:
    response = await _get(gw.http + "/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["storage"]["ok"] is True
    assert body["checks"]["event-writer"]["ok"] is True


async def test_health_503_when_storage_down(gw: Gateway) -> None:
    await gw.system.store.aclose()
    response = await _get(gw.http + "/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["storage"]["ok"] is False


def _sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or line.startswith(name + "{" + labels + "} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in metrics")


async def test_metrics_move(gw: Gateway, alice: Signer) -> None:
    before = (await _get(gw.http + "/metrics")).text
    async with connect(gw.url) as client:
        await client.publish(alice.event())
        await client.publish(alice.event(content="bad"))  # accepted too (distinct)
        await client.send_raw("garbage")
        await client.recv()
        await client.query("s", {})
        during = (await _get(gw.http + "/metrics")).text
        assert _sample(during, "gateway_connections_open") == 1
        assert _sample(during, "gateway_subscriptions_open") == 1
    assert _sample(before, "gateway_events_received_total", '{result="accepted"}') == 0
    assert _sample(during, "gateway_events_received_total", '{result="accepted"}') == 2
    assert _sample(during, "gateway_client_errors_total", '{kind="malformed"}') == 1
    assert _sample(during, "gateway_connections_total") == 1
    assert _sample(during, "gateway_events_delivered_total") == 2
    assert 'gateway_actor_inbox_capacity{actor="event-writer"}' in during
