"""Reconnect delays: exponential backoff with full jitter, as a pure function of the attempt.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the reconnects of
many workers that lost the same gateway at the same moment, so a restarted gateway is not hit
by all of them in the same instant.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["BackoffPolicy", "ReconnectBackoff"]


@attrs.frozen
class BackoffPolicy:
    """Delays start at ``base_s``, double per failed attempt up to ``cap_s``; the ceiling is
    reset once a connection stayed healthy for ``healthy_after_s``."""

    base_s: float = attrs.field(default=0.2, validator=attrs.validators.gt(0))
    cap_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    healthy_after_s: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))

    def ceiling(self, attempt: int) -> float:
        """The largest delay before reconnect attempt ``attempt`` (0 = the first retry)."""
        # min() before the power would overflow for long outages; 2**64 is plenty of doubling.
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A delay drawn uniformly from [0, ceiling(attempt)]."""
        return rng.uniform(0.0, self.ceiling(attempt))


class ReconnectBackoff:
    """The attempt counter of one reconnect loop (owned by that loop's task)."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self.attempt = 0

    def next_delay(self, connected_for_s: float | None) -> float:
        """The delay before the next attempt, given how long the last connection was healthy
        (None when it never got through the handshake)."""
        if connected_for_s is not None and connected_for_s >= self.policy.healthy_after_s:
            self.attempt = 0
        delay = self.policy.delay(self.attempt, self._rng)
        self.attempt += 1
        return delay
