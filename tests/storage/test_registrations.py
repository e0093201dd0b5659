"""Worker registrations on both backends: binding, conflicts, seq replay across reopen."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from hypertuna.storage.events import RelayExistsError, RelayRegisteredError, open_event_store
from hypertuna.storage.registrations import Registration, RegistrationOutcome

RELAY = "a" * 64
OWNER = "b" * 64
W1, W2 = "c" * 64, "d" * 64


def reg(action: str = "register", seq: int = 1, **changes: object) -> Registration:
    base = Registration(
        action=action,
        relay_key=RELAY,
        owner_key=OWNER,
        worker_key=W1,
        seq=seq,
        name="chat",
        description="a chat",
    )
    return attrs.evolve(base, **changes)


async def test_register_update_remove_and_replay(store_url: tuple[str | None, Path]) -> None:
    async with open_event_store(*store_url) as store:
        outcome, relay = await store.apply_registration(reg(), now=1)
        assert outcome is RegistrationOutcome.ACCEPTED
        assert relay is not None and relay.workers == {W1} and relay.owner_key == OWNER
        assert (await store.apply_registration(reg(seq=1), now=2))[0] is (
            RegistrationOutcome.REPLAYED
        )
        outcome, relay = await store.apply_registration(reg("update", 2, description="new"), now=3)
        assert outcome is RegistrationOutcome.ACCEPTED and relay is not None
        assert relay.description == "new"
        # Another worker of the same relay has its own seq.
        outcome, relay = await store.apply_registration(
            reg(worker_key=W2, description="new"), now=4
        )
        assert outcome is RegistrationOutcome.ACCEPTED and relay is not None
        assert relay.workers == {W1, W2}
        outcome, relay = await store.apply_registration(reg("remove", 3), now=5)
        assert outcome is RegistrationOutcome.ACCEPTED and relay is not None
        assert relay.workers == {W2}
        assert (await store.apply_registration(reg("remove", 4), now=6))[0] is (
            RegistrationOutcome.NOT_FOUND
        )
        assert (await store.apply_registration(reg("update", 5), now=6))[0] is (
            RegistrationOutcome.NOT_FOUND
        )
    # Durable: the seq floor and the active workers survive a reopen.
    async with open_event_store(*store_url) as store:
        [relay] = await store.worker_relays()
        assert relay.workers == {W2} and relay.description == "new"
        assert (await store.apply_registration(reg(seq=3), now=7))[0] is (
            RegistrationOutcome.REPLAYED
        )
        assert (await store.apply_registration(reg(seq=4), now=7))[0] is (
            RegistrationOutcome.ACCEPTED
        )


async def test_conflicts_change_nothing(store_url: tuple[str | None, Path]) -> None:
    async with open_event_store(*store_url) as store:
        hosted = await store.create_relay(key="e" * 64, name="local", description="", created_at=1)
        assert (await store.apply_registration(reg(relay_key=hosted.key), now=1))[0] is (
            RegistrationOutcome.HOSTED
        )
        assert (await store.apply_registration(reg(name="local"), now=1))[0] is (
            RegistrationOutcome.HOSTED
        )
        assert (await store.apply_registration(reg(), now=1))[0] is RegistrationOutcome.ACCEPTED
        assert (await store.apply_registration(reg(relay_key="f" * 64, owner_key="1" * 64), now=2))[
            0
        ] is RegistrationOutcome.NAME_TAKEN
        assert (await store.apply_registration(reg(seq=9, owner_key="1" * 64), now=2))[0] is (
            RegistrationOutcome.OTHER_OWNER
        )
        [relay] = await store.worker_relays()
        assert relay.owner_key == OWNER and relay.workers == {W1}


async def test_hosted_relay_cannot_take_a_registered_key_or_name(
    store_url: tuple[str | None, Path],
) -> None:
    async with open_event_store(*store_url) as store:
        assert (await store.apply_registration(reg(), now=1))[0] is RegistrationOutcome.ACCEPTED
        with pytest.raises(RelayRegisteredError):
            await store.create_relay(key="e" * 64, name="chat", description="", created_at=2)
        with pytest.raises(RelayRegisteredError):
            await store.create_relay(key=RELAY, name="other", description="", created_at=2)
        # Removed by its only worker, the relay keeps its key and name (a worker may come back).
        assert (await store.apply_registration(reg("remove", 2), now=3))[0] is (
            RegistrationOutcome.ACCEPTED
        )
        with pytest.raises(RelayExistsError):
            await store.create_relay(key="e" * 64, name="chat", description="", created_at=4)
        assert await store.list_relays() == []
        created = await store.create_relay(key="e" * 64, name="mine", description="", created_at=5)
        assert [r.name for r in await store.list_relays()] == [created.name]


async def test_one_worker_relay_by_key(store_url: tuple[str | None, Path]) -> None:
    async with open_event_store(*store_url) as store:
        assert await store.worker_relay(RELAY) is None
        await store.apply_registration(reg(), now=1)
        relay = await store.worker_relay(RELAY)
        assert relay is not None and relay.owner_key == OWNER and relay.workers == {W1}
        # Its last worker gone, the relay stays known (and bound to its owner key).
        await store.apply_registration(reg("remove", 2), now=2)
        gone = await store.worker_relay(RELAY)
        assert gone is not None and gone.owner_key == OWNER and gone.workers == frozenset()
        assert await store.worker_relay("f" * 64) is None
