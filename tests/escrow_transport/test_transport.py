"""The gateway's escrow transport against a real mutual-TLS, HMAC-checking server."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme

from hypertuna.edge.hmac_auth import HmacAuthenticator
from hypertuna.edge.tls import ReloadingClientContext
from hypertuna.escrow_client import (
    EscrowRefusedTlsError,
    EscrowResponse,
    EscrowTransport,
    EscrowUnavailableError,
    open_escrow_transport,
)
from hypertuna.worker.backoff import BackoffPolicy
from tests.escrow_transport import (
    CLIENT_ID,
    SECRET,
    TIMEOUT,
    AppState,
    FakeWallClock,
    Pki,
    make_app,
    open_tls_server,
    write_atomically,
)

FAST_BACKOFF = BackoffPolicy(base_s=0.01, cap_s=0.05)


@attrs.define
class Setup:
    pki: Pki
    state: AppState
    clock: FakeWallClock
    url: str

    def transport(
        self, name: str | None = CLIENT_ID, ca: trustme.CA | None = None, **options: Any
    ) -> EscrowTransport:
        settings: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "secret": SECRET,
            "ssl_context_holder": self.pki.client_holder(name, ca),
            "wall_clock": self.clock,
            "retries": 3,
            "backoff": FAST_BACKOFF,
            "rng": random.Random(7),
        }
        settings.update(options)
        return EscrowTransport(settings.pop("base_url", self.url), **settings)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    pki = Pki(tmp_path)
    state = AppState()
    clock = FakeWallClock()
    auth = HmacAuthenticator({CLIENT_ID: SECRET}, wall_clock=clock)
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state, auth), pki.server_context()) as port:
            yield Setup(pki, state, clock, f"https://127.0.0.1:{port}")


async def test_a_signed_request_gets_its_answer(setup: Setup) -> None:
    async with setup.transport() as transport:
        counted = await transport.request("POST", "/counter", {"deposit": "sealed"})
        echo = await transport.request("POST", "/echo?relay=abc", {"k": [1, 2]})
        empty = await transport.request(
            "GET", "/echo", headers={"x-hypertuna-signature": "0" * 64, "X-Request-Id": "r1"}
        )
    assert counted == EscrowResponse(status=200, json={"counter": 1})
    assert echo.json["body"] == '{"k":[1,2]}'
    assert echo.json["client_id"] == CLIENT_ID
    assert echo.json["client_cn"] == CLIENT_ID
    assert empty.json["body"] == ""
    assert transport.statistics().attempts == 3


async def test_a_503_is_retried_with_a_fresh_nonce_each_attempt(setup: Setup) -> None:
    setup.state.flaky_failures_left = 2
    async with setup.transport() as transport:
        response = await transport.request("POST", "/flaky", {"x": 1})
    assert response == EscrowResponse(status=200, json={"counter": 1})
    assert setup.state.flaky_attempts == 3
    assert len(set(setup.state.nonces)) == 3
    stats = transport.statistics()
    assert (stats.requests, stats.attempts, stats.retries, stats.failures) == (1, 3, 2, 0)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_it_gives_up_after_the_retries(setup: Setup, status: int) -> None:
    setup.state.flaky_failures_left = 100
    setup.state.flaky_failures = status
    async with setup.transport(retries=2) as transport:
        with pytest.raises(EscrowUnavailableError, match=f"after 3 attempt.*status {status}") as e:
            await transport.request("POST", "/flaky", {"x": 1})
    assert (e.value.attempts, e.value.last_failure) == (3, f"status {status}")
    assert setup.state.flaky_attempts == 3
    assert setup.state.counter == 0


async def test_a_4xx_answer_is_not_retried(setup: Setup) -> None:
    async with setup.transport() as transport:
        response = await transport.request("POST", "/bad", {"x": 1})
        authorized = await transport.request("POST", "/counter", headers={"X-Request": "1"})
        transport_other = setup.transport(secret=b"w" * 32)
        async with transport_other:
            refused = await transport_other.request("POST", "/counter")
    assert response == EscrowResponse(status=400, json={"error": "bad-request"})
    assert setup.state.flaky_attempts == 1
    assert authorized.status == 200
    assert refused.status == 401
    assert refused.json["reason"] == "bad-signature"
    assert transport_other.statistics().attempts == 1
    assert setup.state.counter == 1


async def test_the_request_timeout_is_honoured(setup: Setup) -> None:
    async with setup.transport(request_timeout_s=0.2, retries=1) as transport:
        started = trio.current_time()
        with pytest.raises(EscrowUnavailableError, match=r"timed out|no answer") as caught:
            await transport.request("GET", "/slow")
        elapsed = trio.current_time() - started
    assert caught.value.attempts == 2
    assert 0.4 <= elapsed < 2


async def test_a_raw_body_travels_unchanged_and_signed(setup: Setup) -> None:
    """A proxy passes on a body someone else signed: byte for byte, not re-encoded."""
    raw = b'{ "relay_key" : "ab",\n  "n": 1.50 }'
    async with setup.transport() as transport:
        echo = await transport.request("POST", "/echo", raw_body=raw)
        with pytest.raises(ValueError, match="not both"):
            await transport.request("POST", "/echo", {"x": 1}, raw_body=raw)
    assert echo.status == 200 and echo.json["body"] == raw.decode()
    assert echo.json["client_id"] == CLIENT_ID


async def test_a_longer_answer_timeout_for_one_request(setup: Setup) -> None:
    async with setup.transport(request_timeout_s=5.0, retries=0) as transport:
        assert transport.attempt_timeout_s == 10.0 and transport.request_timeout_s == 5.0
        started = trio.current_time()
        with pytest.raises(EscrowUnavailableError, match=r"timed out|no answer"):
            await transport.request("GET", "/slow", timeout_s=0.3)
        assert trio.current_time() - started < 2


async def test_an_unreachable_escrow_is_retried_then_reported(setup: Setup) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there
    async with setup.transport(base_url=f"https://127.0.0.1:{port}", retries=2) as transport:
        with pytest.raises(EscrowUnavailableError, match="ConnectError") as caught:
            await transport.request("GET", "/count")
    assert caught.value.attempts == 3


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [(False, "certificate required"), (True, "unknown ca")],
    ids=["no-certificate", "another-ca"],
)
async def test_a_refused_client_certificate_is_reported_not_retried(
    setup: Setup, caplog: pytest.LogCaptureFixture, foreign: bool, reason: str
) -> None:
    caplog.set_level(logging.DEBUG)
    name, ca = ("intruder", setup.pki.other_ca) if foreign else (None, None)
    async with setup.transport(name, ca) as transport:
        with pytest.raises(EscrowRefusedTlsError) as caught:
            await transport.request("POST", "/counter", {"secret": "do-not-log"})
    assert reason in caught.value.reason
    assert reason in str(caught.value)
    assert transport.statistics().attempts == 1
    assert setup.state.counter == 0
    assert "do-not-log" not in caplog.text


async def test_an_untrusted_escrow_certificate_is_reported(setup: Setup, tmp_path: Path) -> None:
    stranger_ca = tmp_path / "stranger-ca.pem"
    write_atomically(stranger_ca, setup.pki.other_ca.cert_pem.bytes())
    cert, key = setup.pki.client_files("gw-x")
    holder = ReloadingClientContext(stranger_ca, cert, key)
    async with open_escrow_transport(
        setup.url,
        client_id=CLIENT_ID,
        secret=SECRET,
        ssl_context_holder=holder,
        wall_clock=setup.clock,
    ) as transport:
        with pytest.raises(EscrowRefusedTlsError, match="certificate verify failed"):
            await transport.request("GET", "/count")


async def test_rotated_client_files_are_used_for_new_connections(setup: Setup) -> None:
    holder = setup.pki.client_holder(CLIENT_ID)
    async with setup.transport(ssl_context_holder=holder) as transport:
        first = await transport.request("GET", "/echo")
        # The client certificate is replaced by one with another name.
        assert holder.cert_path is not None and holder.key_path is not None
        renewed = setup.pki.ca.issue_cert("gw.clients.test", common_name="gateway-1-renewed")
        write_atomically(Path(holder.key_path), renewed.private_key_pem.bytes())
        write_atomically(Path(holder.cert_path), renewed.cert_chain_pems[0].bytes())
        second = await transport.request("GET", "/echo")
    assert first.json["client_cn"] == CLIENT_ID
    assert second.json["client_cn"] == "gateway-1-renewed"


async def test_bodies_and_secrets_are_never_logged(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    setup.state.flaky_failures_left = 1
    async with setup.transport() as transport:
        await transport.request("POST", "/flaky?token=t0ps3cret", {"sealed": "s3aled-key"})
    assert "s3aled-key" not in caplog.text
    # Our own lines name the path without its query string.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("hypertuna")]
    assert ours
    assert not any("t0ps3cret" in line for line in ours)
    assert SECRET.hex() not in caplog.text
    assert "/flaky" in caplog.text


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    holder = Pki(tmp_path).client_holder(CLIENT_ID)
    clock = FakeWallClock()
    common: dict[str, Any] = {"client_id": CLIENT_ID, "secret": SECRET, "wall_clock": clock}
    with pytest.raises(ValueError, match="needs the TLS files"):
        EscrowTransport("https://127.0.0.1:1", ssl_context_holder=None, **common)
    with pytest.raises(ValueError, match="plain http"):
        EscrowTransport("http://127.0.0.1:1", ssl_context_holder=holder, **common)
    with pytest.raises(ValueError, match="not an http"):
        EscrowTransport("ftp://x", ssl_context_holder=None, **common)
