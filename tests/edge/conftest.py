from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import FakeWallClock, Gateway, Signer, open_gateway


@pytest.fixture
def clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
async def gw(tmp_path: Path, clock: FakeWallClock) -> AsyncIterator[Gateway]:
    async with open_gateway(tmp_path / "data", clock=clock) as gateway:
        yield gateway


@pytest.fixture
def alice() -> Signer:
    return Signer()


@pytest.fixture
def bob() -> Signer:
    return Signer()
