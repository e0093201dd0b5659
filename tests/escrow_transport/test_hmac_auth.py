"""HMAC-signed requests on the escrow's quart-trio app: refused requests get a 401 with a
reason and change nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from hypertuna.edge.hmac_auth import HmacAuthenticator, parse_hmac_clients
from hypertuna.protocol.signed_request import HMAC_HEADER_PREFIX, header_names, sign_hmac
from tests.escrow_transport import (
    CLIENT_ID,
    NOW,
    SECRET,
    TIMEOUT,
    AppState,
    FakeWallClock,
    Pki,
    make_app,
    open_tls_server,
)

HMAC_SIGNATURE = header_names(HMAC_HEADER_PREFIX)[3]


class Escrow:
    """The test app behind mutual TLS and HMAC, and an httpx client that signs by hand."""

    def __init__(self, client: httpx.AsyncClient, state: AppState, clock: FakeWallClock) -> None:
        self.client = client
        self.state = state
        self.clock = clock

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        secret: bytes = SECRET,
        client_id: str = CLIENT_ID,
        timestamp: int = NOW,
        nonce: str | None = None,
        sent_path: str | None = None,
        sent_body: bytes | None = None,
        drop: str | None = None,
    ) -> httpx.Response:
        """Sign ``method path body`` and send it, possibly altered on the way."""
        signed = sign_hmac(
            client_id, secret, method, path, body, timestamp=timestamp, nonce=nonce
        ).as_dict(HMAC_HEADER_PREFIX)
        if drop is not None:
            del signed[drop]
        return await self.client.request(
            method,
            sent_path or path,
            content=body if sent_body is None else sent_body,
            headers=signed,
        )

    async def counter(self) -> int:
        response = await self.client.get("/count")
        value: int = response.json()["counter"]
        return value


@pytest.fixture
async def escrow(tmp_path: Path) -> AsyncIterator[Escrow]:
    pki = Pki(tmp_path)
    state = AppState()
    clock = FakeWallClock()
    auth = HmacAuthenticator({CLIENT_ID: SECRET, "other": b"o" * 32}, wall_clock=clock)
    client = httpx.AsyncClient(verify=pki.client_context(CLIENT_ID))
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state, auth), pki.server_context()) as port, client:
            client.base_url = httpx.URL(f"https://127.0.0.1:{port}")
            yield Escrow(client, state, clock)


def assert_refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401
    body: dict[str, Any] = response.json()
    assert body["error"] == "unauthorized"
    assert body["reason"] == reason
    assert isinstance(body["message"], str)
    assert body["message"]


async def test_a_valid_signature_gets_through(escrow: Escrow) -> None:
    response = await escrow.send("POST", "/counter", b'{"n":1}')
    assert response.status_code == 200
    assert response.json() == {"counter": 1}
    echo = await escrow.send("POST", "/echo?x=1&y=%2F", b"body")
    assert echo.json()["client_id"] == CLIENT_ID
    assert echo.json()["body"] == "body"


async def test_missing_headers_are_refused(escrow: Escrow) -> None:
    unsigned = await escrow.client.post("/counter")
    assert_refused(unsigned, "signature-missing")
    partial = await escrow.send("POST", "/counter", drop=HMAC_SIGNATURE)
    assert_refused(partial, "signature-missing")
    assert await escrow.counter() == 0


@pytest.mark.parametrize(
    ("alteration", "reason"),
    [
        ({"secret": b"x" * 32}, "bad-signature"),
        ({"client_id": "stranger"}, "unknown-key"),
        ({"sent_body": b'{"n":2}'}, "bad-signature"),
        ({"sent_path": "/counter?extra=1"}, "bad-signature"),
        ({"timestamp": NOW - 61}, "stale-timestamp"),
        ({"timestamp": NOW + 61}, "stale-timestamp"),
        ({"client_id": "other"}, "bad-signature"),
    ],
    ids=[
        "wrong-secret",
        "unknown-client",
        "tampered-body",
        "tampered-path",
        "old",
        "future",
        "other-client",
    ],
)
async def test_a_bad_signature_is_refused_and_changes_nothing(
    escrow: Escrow, alteration: dict[str, Any], reason: str
) -> None:
    response = await escrow.send("POST", "/counter", b'{"n":1}', **alteration)
    assert_refused(response, reason)
    assert await escrow.counter() == 0


async def test_a_replayed_nonce_is_refused(escrow: Escrow) -> None:
    nonce = "a" * 32
    assert (await escrow.send("POST", "/counter", nonce=nonce)).status_code == 200
    assert_refused(await escrow.send("POST", "/counter", nonce=nonce), "replayed-nonce")
    # Still refused later, while the timestamp could pass.
    escrow.clock.now += 30
    assert_refused(await escrow.send("POST", "/counter", nonce=nonce), "replayed-nonce")
    assert await escrow.counter() == 1


async def test_the_check_works_as_a_call_in_the_route(escrow: Escrow) -> None:
    assert_refused(await escrow.client.post("/checked"), "signature-missing")
    response = await escrow.send("POST", "/checked", b"{}")
    assert response.json() == {"counter": 1, "client_id": CLIENT_ID}


def test_clients_are_parsed_inline_and_from_a_file(tmp_path: Path) -> None:
    one, two = "11" * 32, "ab" * 40
    assert parse_hmac_clients(f" gw-1:{one} , gw.2:{two}") == {
        "gw-1": bytes.fromhex(one),
        "gw.2": bytes.fromhex(two),
    }
    file = tmp_path / "clients"
    file.write_text(f"# the gateways\n\ngw-1:{one}\n  gw-2 : {two}  \n")
    assert parse_hmac_clients(f"@{file}") == {
        "gw-1": bytes.fromhex(one),
        "gw-2": bytes.fromhex(two),
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no client"),
        ("gw-1", "client_id:hexsecret"),
        (f"gw 1:{'11' * 32}", "client_id:hexsecret"),
        ("gw-1:zz", "hex"),
        (f"gw-1:{'11' * 31}", "at least 32 bytes"),
        (f"gw-1:{'11' * 32},gw-1:{'22' * 32}", "twice"),
    ],
)
def test_bad_client_lists_are_refused_without_echoing_secrets(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_hmac_clients(value)
    assert "11" * 8 not in str(caught.value)


async def test_an_ed25519_header_set_is_not_taken_for_the_hmac_one(escrow: Escrow) -> None:
    """The HMAC scheme reads only ``X-Escrow-*``: an ``X-Hypertuna-*`` set (a worker's Ed25519
    signature riding along) neither satisfies nor disturbs it."""
    signed = sign_hmac(CLIENT_ID, SECRET, "POST", "/counter", b"", timestamp=NOW)
    only_default = await escrow.client.post("/counter", headers=signed.as_dict())
    assert_refused(only_default, "signature-missing")
    both = {**signed.as_dict(HMAC_HEADER_PREFIX), "X-Hypertuna-Key": "aa" * 32}
    accepted = await escrow.client.post("/counter", headers=both)
    assert accepted.status_code == 200
    assert await escrow.counter() == 1
