"""Mutual TLS of the standalone escrow: who gets through, and reloading the files on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import trio

from hypertuna.edge.tls import (
    ReloadingClientContext,
    ReloadingServerContext,
    TlsContextError,
    describe_tls_error,
)
from tests.escrow_transport import (
    TIMEOUT,
    AppState,
    Pki,
    cert_der,
    fingerprint,
    make_app,
    open_tls_server,
    tls_get,
    write_atomically,
)

TLS_LOGGER = "hypertuna.edge.tls_server"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def body_of(response: bytes) -> dict[str, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    data: dict[str, object] = json.loads(body)
    return data


async def refusal_of(port: int, pki: Pki, name: str | None, **kwargs: object) -> str:
    """The reason the client sees when the server refuses it."""
    with pytest.raises(trio.BrokenResourceError) as caught:
        await tls_get(port, pki.client_context(name, **kwargs))  # type: ignore[arg-type]
    return describe_tls_error(caught.value)


async def test_a_client_with_a_valid_certificate_gets_through(pki: Pki) -> None:
    state = AppState()
    client = httpx.AsyncClient(verify=pki.client_context("gateway-1"))
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), pki.server_context()) as port, client:
            response = await client.post(f"https://127.0.0.1:{port}/echo", content=b"hi")
    assert response.status_code == 200
    assert response.json() == {
        "method": "POST",
        "scheme": "https",
        "body": "hi",
        "client_cn": "gateway-1",
        "client_id": None,
    }


async def test_no_client_certificate_is_refused_with_a_reason(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TLS_LOGGER)
    state = AppState()
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), pki.server_context()) as port:
            reason = await refusal_of(port, pki, None)
            # The server is still serving others.
            _der, response = await tls_get(port, pki.client_context("gateway-1"))
    assert "certificate required" in reason
    assert body_of(response) == {"counter": 0}
    refusals = [r for r in caplog.records if r.name == TLS_LOGGER and "refused" in r.message]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.INFO
    assert "127.0.0.1:" in refusals[0].message
    assert "peer did not return a certificate" in refusals[0].message
    assert refusals[0].exc_info is None


async def test_a_certificate_from_another_ca_is_refused_and_changes_nothing(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TLS_LOGGER)
    state = AppState()
    client = httpx.AsyncClient(verify=pki.client_context("intruder", pki.other_ca))
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), pki.server_context()) as port, client:
            with pytest.raises(httpx.ReadError) as caught:
                await client.post(f"https://127.0.0.1:{port}/counter")
    assert "unknown ca" in describe_tls_error(caught.value)
    assert state.counter == 0
    assert any("certificate verify failed" in r.message for r in caplog.records)


async def test_a_client_that_does_not_handshake_is_dropped(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TLS_LOGGER)
    state = AppState()
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(
            make_app(state), pki.server_context(), handshake_timeout_s=0.2
        ) as port:
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            async with silent:
                assert await silent.receive_some(100) == b""
            plain = await trio.open_tcp_stream("127.0.0.1", port)
            async with plain:
                await plain.send_all(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
                while await plain.receive_some(100):
                    pass
    messages = [r.message for r in caplog.records if "refused" in r.message]
    assert any("no TLS handshake within 0.2 s" in m for m in messages)
    assert len(messages) == 2


async def test_rotated_server_files_apply_to_new_connections(pki: Pki) -> None:
    state = AppState()
    holder = pki.server_context()
    client = pki.client_context("gateway-1")
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), holder) as port:
            first, _ = await tls_get(port, client)
            renewed = pki.issue_server()
            pki.install_server(renewed)
            second, response = await tls_get(port, client)
    assert fingerprint(first) == fingerprint(cert_der(pki.server))
    assert fingerprint(second) == fingerprint(cert_der(renewed))
    assert body_of(response) == {"counter": 0}
    assert holder.statistics().generation == 2


async def test_an_established_connection_survives_a_rotation(pki: Pki) -> None:
    state = AppState()
    client = httpx.AsyncClient(verify=pki.client_context("gateway-1"))
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), pki.server_context()) as port, client:
            url = f"https://127.0.0.1:{port}"
            assert (await client.post(f"{url}/counter")).status_code == 200
            pki.install_server(pki.issue_server())
            # Same keep-alive connection: it keeps the context it was made with.
            assert (await client.post(f"{url}/counter")).json() == {"counter": 2}


async def test_a_ca_removed_from_the_bundle_stops_being_accepted(pki: Pki) -> None:
    state = AppState()
    write_atomically(pki.ca_bundle, pki.ca.cert_pem.bytes() + pki.other_ca.cert_pem.bytes())
    partner = pki.client_context("partner", pki.other_ca)
    own = pki.client_context("gateway-1")
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), pki.server_context()) as port:
            _der, accepted = await tls_get(port, partner)
            write_atomically(pki.ca_bundle, pki.ca.cert_pem.bytes())
            with pytest.raises(trio.BrokenResourceError) as caught:
                await tls_get(port, partner)
            _der, still = await tls_get(port, own)
    assert body_of(accepted) == {"counter": 0}
    assert "unknown ca" in describe_tls_error(caught.value)
    assert body_of(still) == {"counter": 0}


async def test_a_broken_file_mid_rotation_keeps_the_previous_files(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hypertuna.edge.tls")
    state = AppState()
    holder = pki.server_context()
    client = pki.client_context("gateway-1")
    renewed = pki.issue_server()
    with trio.fail_after(TIMEOUT):
        async with open_tls_server(make_app(state), holder) as port:
            # Half a rotation: the new certificate next to the old key.
            write_atomically(pki.server_cert, renewed.cert_chain_pems[0].bytes())
            during, _ = await tls_get(port, client)
            again, _ = await tls_get(port, client)
            # A truncated bundle, then the rotation completes.
            write_atomically(pki.ca_bundle, pki.ca.cert_pem.bytes()[:40])
            await tls_get(port, client)
            write_atomically(pki.ca_bundle, pki.ca.cert_pem.bytes())
            write_atomically(pki.server_key, renewed.private_key_pem.bytes())
            after, response = await tls_get(port, client)
    assert fingerprint(during) == fingerprint(again) == fingerprint(cert_der(pki.server))
    assert fingerprint(after) == fingerprint(cert_der(renewed))
    assert body_of(response) == {"counter": 0}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # Logged once per broken state, not once per connection.
    assert len(errors) == 2
    assert all(r.exc_info is None for r in errors)
    stats = holder.statistics()
    assert (stats.generation, stats.failed_reloads, stats.last_error) == (2, 2, None)


def test_unusable_initial_files_fail_at_construction(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(TlsContextError, match=r"empty\.pem"):
        ReloadingServerContext(pki.server_cert, pki.server_key, empty)
    with pytest.raises(TlsContextError):
        ReloadingServerContext(pki.server_cert, tmp_path / "missing.key", pki.ca_bundle)
    with pytest.raises(TlsContextError):
        ReloadingClientContext(empty)
    with pytest.raises(ValueError, match="both"):
        ReloadingClientContext(pki.server_ca, pki.server_cert)


def test_files_are_checked_at_most_every_interval(pki: Pki) -> None:
    now = [100.0]
    holder = ReloadingServerContext(
        pki.server_cert, pki.server_key, pki.ca_bundle, check_interval_s=5, clock=lambda: now[0]
    )
    first = holder.context()
    pki.install_server(pki.issue_server())
    now[0] += 4.9
    assert holder.context() is first
    now[0] += 0.2
    second = holder.context()
    assert second is not first
    now[0] += 10
    assert holder.context() is second
