"""The in-process revocation bus."""

from __future__ import annotations

import pytest
import trio

from hypertuna.escrow.bus import RevocationBus
from hypertuna.escrow.service import Revocation


def _revocation(relay: str) -> Revocation:
    return Revocation(
        relay_key=relay, deposit_ids=("d",), lease_ids=("l",), at_ms=1, already_revoked=False
    )


async def test_subscribers_get_their_relays_revocations() -> None:
    bus = RevocationBus()
    with bus.subscribe("a" * 64) as only_a, bus.subscribe() as everything:
        bus.publish(_revocation("a" * 64))
        bus.publish(_revocation("b" * 64))
        assert only_a.receive_nowait().relay_key == "a" * 64
        with pytest.raises(trio.WouldBlock):
            only_a.receive_nowait()
        assert [everything.receive_nowait().relay_key for _ in range(2)] == ["a" * 64, "b" * 64]
    assert bus.statistics().subscribers == 0


async def test_a_subscriber_that_falls_behind_is_disconnected_not_silently_skipped() -> None:
    bus = RevocationBus()
    with bus.subscribe(buffer=1) as slow:
        bus.publish(_revocation("a" * 64))
        bus.publish(_revocation("a" * 64))  # publisher never blocks
        assert (await slow.receive()).relay_key == "a" * 64
        with pytest.raises(trio.EndOfChannel):
            await slow.receive()
    assert bus.statistics().dropped_subscribers == 1
