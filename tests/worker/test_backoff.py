"""Reconnect backoff as a pure function of the attempt and a seeded random source."""

from __future__ import annotations

import random

import pytest

from hypertuna.worker.backoff import BackoffPolicy, ReconnectBackoff
from hypertuna.worker.settings import control_url


def test_ceiling_doubles_from_base_to_cap() -> None:
    policy = BackoffPolicy(base_s=0.2, cap_s=30)
    ceilings = [policy.ceiling(n) for n in range(10)]
    assert ceilings == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30])
    assert policy.ceiling(10_000) == 30


def test_delays_are_jittered_within_the_ceiling_and_reproducible() -> None:
    policy = BackoffPolicy(base_s=0.2, cap_s=30)
    rng = random.Random(7)
    delays = [[policy.delay(n, rng) for _ in range(200)] for n in range(12)]
    for attempt, draws in enumerate(delays):
        assert all(0 <= d <= policy.ceiling(attempt) for d in draws)
        # Full jitter: spread over the whole range, not clustered at the ceiling.
        assert (
            min(draws) < 0.1 * policy.ceiling(attempt) < 0.9 * policy.ceiling(attempt) < max(draws)
        )
    assert delays == [
        [policy.delay(n, rng2) for _ in range(200)]
        for rng2 in [random.Random(7)]
        for n in range(12)
    ]


def test_attempts_reset_only_after_a_healthy_connection() -> None:
    backoff = ReconnectBackoff(
        BackoffPolicy(base_s=1, cap_s=8, healthy_after_s=10), random.Random(1)
    )
    for _ in range(5):
        backoff.next_delay(None)
    assert backoff.attempt == 5
    backoff.next_delay(3.0)  # connected, but not for long: still backing off
    assert backoff.attempt == 6
    assert backoff.next_delay(10.0) <= 1  # healthy: back to the first ceiling
    assert backoff.attempt == 1


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/gateway/worker"),
        ("https://gw.example/", "wss://gw.example/gateway/worker"),
        ("https://gw.example/prefix", "wss://gw.example/prefix/gateway/worker"),
        ("ws://h:1/gateway/worker", "ws://h:1/gateway/worker"),
    ],
)
def test_control_url(given: str, expected: str) -> None:
    assert control_url(given) == expected


@pytest.mark.parametrize("bad", ["", "127.0.0.1:8080", "ftp://h", "http://h/?x=1"])
def test_control_url_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="gateway URL"):
        control_url(bad)
