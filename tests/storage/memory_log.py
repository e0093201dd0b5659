"""An in-memory core for tests of code above the core layer (relay views, drives).

It satisfies :class:`hypertuna.storage.cores.AppendLog` without any crypto, so those tests stay
about their own logic; the real cores have their own tests against the hypercore vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


class MemoryLog:
    """A list of blocks with a key; ``append`` returns the new length."""

    def __init__(self, name: str) -> None:
        self._key = hashlib.blake2b(name.encode(), digest_size=32).digest()
        self._blocks: list[bytes] = []

    @property
    def key(self) -> bytes:
        return self._key

    @property
    def length(self) -> int:
        return len(self._blocks)

    def get(self, index: int) -> bytes:
        if not 0 <= index < len(self._blocks):
            raise IndexError(index)
        return self._blocks[index]

    def append(self, blocks: Sequence[bytes]) -> int:
        self._blocks.extend(bytes(block) for block in blocks)
        return len(self._blocks)
