from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import FakeWallClock, Gateway, Signer, open_gateway


@pytest.fixture
def clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
async def gw(store_url: tuple[str | None, Path], clock: FakeWallClock) -> AsyncIterator[Gateway]:
    """A running gateway with one relay, on each storage backend (see ``store_url``)."""
    database_url, data_dir = store_url
    async with open_gateway(
        data_dir / "data", database_url=database_url or "", clock=clock
    ) as gateway:
        yield gateway


@pytest.fixture
def alice() -> Signer:
    return Signer()


@pytest.fixture
def bob() -> Signer:
    return Signer()
