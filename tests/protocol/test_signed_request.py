"""Signed requests: canonical form, both schemes, header parsing and replay protection."""

from __future__ import annotations

import nacl.signing
import pytest

from hypertuna.protocol.signed_request import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HMAC_HEADER_PREFIX,
    ReplayGuard,
    SignedRequestError,
    SignedRequestReason,
    canonical_request,
    header_names,
    parse_headers,
    sign_ed25519,
    sign_hmac,
    verify_ed25519,
    verify_hmac,
)

NOW = 1_800_000_000
KEY = nacl.signing.SigningKey(bytes(range(32)))
PUB = KEY.verify_key.encode().hex()


def _reason(exc: pytest.ExceptionInfo[SignedRequestError]) -> SignedRequestReason:
    return exc.value.reason


def test_canonical_form_binds_every_part() -> None:
    base = canonical_request("post", "/api/x?a=1", b"{}", NOW, "n" * 16, "k")
    assert base.startswith(b"hypertuna-signed-request-v1\nPOST\n/api/x?a=1\n")
    variants = [
        canonical_request("GET", "/api/x?a=1", b"{}", NOW, "n" * 16, "k"),
        canonical_request("POST", "/api/x?a=2", b"{}", NOW, "n" * 16, "k"),
        canonical_request("POST", "/api/x?a=1", b"{ }", NOW, "n" * 16, "k"),
        canonical_request("POST", "/api/x?a=1", b"{}", NOW + 1, "n" * 16, "k"),
        canonical_request("POST", "/api/x?a=1", b"{}", NOW, "m" * 16, "k"),
        canonical_request("POST", "/api/x?a=1", b"{}", NOW, "n" * 16, "j"),
    ]
    assert all(v != base for v in variants)


def test_ed25519_round_trip_and_tampering() -> None:
    signed = sign_ed25519(KEY, "POST", "/api/blind-peer/gc", b"{}", timestamp=NOW)
    parsed = parse_headers(signed.as_dict())
    verify_ed25519(parsed, "POST", "/api/blind-peer/gc", b"{}", frozenset({PUB}))
    for method, path, body in [
        ("GET", "/api/blind-peer/gc", b"{}"),
        ("POST", "/api/blind-peer", b"{}"),
        ("POST", "/api/blind-peer/gc", b'{"x":1}'),
    ]:
        with pytest.raises(SignedRequestError) as exc:
            verify_ed25519(parsed, method, path, body, frozenset({PUB}))
        assert _reason(exc) is SignedRequestReason.BAD_SIGNATURE
    other = nacl.signing.SigningKey(bytes(32)).verify_key.encode().hex()
    with pytest.raises(SignedRequestError) as exc:
        verify_ed25519(parsed, "POST", "/api/blind-peer/gc", b"{}", frozenset({other}))
    assert _reason(exc) is SignedRequestReason.UNKNOWN_KEY


def test_hmac_round_trip_and_wrong_secret() -> None:
    signed = sign_hmac("gateway-1", b"s" * 32, "POST", "/api/escrow", b"abc", timestamp=NOW)
    verify_hmac(signed, "POST", "/api/escrow", b"abc", {"gateway-1": b"s" * 32})
    with pytest.raises(SignedRequestError) as exc:
        verify_hmac(signed, "POST", "/api/escrow", b"abc", {"gateway-1": b"t" * 32})
    assert _reason(exc) is SignedRequestReason.BAD_SIGNATURE
    with pytest.raises(SignedRequestError) as exc:
        verify_hmac(signed, "POST", "/api/escrow", b"abc", {"gateway-2": b"s" * 32})
    assert _reason(exc) is SignedRequestReason.UNKNOWN_KEY


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (HEADER_SIGNATURE, None, SignedRequestReason.MISSING),
        (HEADER_SIGNATURE, "ZZ", SignedRequestReason.MALFORMED),
        (HEADER_NONCE, "short", SignedRequestReason.MALFORMED),
        ("X-Hypertuna-Timestamp", "12.5", SignedRequestReason.MALFORMED),
        ("X-Hypertuna-Key", "a b", SignedRequestReason.MALFORMED),
    ],
)
def test_bad_headers_are_refused(name: str, value: str | None, reason: SignedRequestReason) -> None:
    headers = sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW).as_dict()
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    with pytest.raises(SignedRequestError) as exc:
        parse_headers({k.lower(): v for k, v in headers.items()})
    assert _reason(exc) is reason


def test_replay_guard_refuses_replays_and_stale_timestamps() -> None:
    guard = ReplayGuard(max_skew_s=60)
    signed = sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW)
    guard.check(signed, NOW + 30)
    with pytest.raises(SignedRequestError) as exc:
        guard.check(signed, NOW + 31)
    assert _reason(exc) is SignedRequestReason.REPLAYED
    # Once the nonce could no longer pass the clock check it is forgotten, and still refused.
    with pytest.raises(SignedRequestError) as exc:
        guard.check(signed, NOW + 61)
    assert _reason(exc) is SignedRequestReason.STALE
    assert len(guard) == 0
    future = sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW + 120)
    with pytest.raises(SignedRequestError) as exc:
        guard.check(future, NOW)
    assert _reason(exc) is SignedRequestReason.STALE


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(max_skew_s=60, max_entries=2)
    for _ in range(2):
        guard.check(sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW), NOW)
    with pytest.raises(SignedRequestError):
        guard.check(sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW), NOW)
    guard.check(sign_ed25519(KEY, "GET", "/", b"", timestamp=NOW + 100), NOW + 100)
    assert len(guard) == 1


def test_headers_under_another_prefix_round_trip_and_stay_apart() -> None:
    signed = sign_hmac("gw", b"k" * 32, "POST", "/x", b"", timestamp=5, nonce="n" * 16)
    escrow = signed.as_dict(HMAC_HEADER_PREFIX)
    assert sorted(escrow) == sorted(header_names("X-Escrow-"))
    assert parse_headers(escrow, HMAC_HEADER_PREFIX) == signed
    assert parse_headers(signed.as_dict()) == signed
    with pytest.raises(SignedRequestError) as refused:
        parse_headers(escrow)
    assert refused.value.reason is SignedRequestReason.MISSING
