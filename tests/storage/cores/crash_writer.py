"""A writer process for the crash test: appends batches forever, printing each acknowledged
length after ``append`` returns.

Usage: ``python crash_writer.py DIRECTORY SEED_HEX``. Block ``i`` is :func:`expected_block`
``(i)``, so the test can check every acknowledged block after killing this process.
"""

from __future__ import annotations

import sys

from hypertuna.storage.cores import Core, KeyPair

BATCH = 40


def expected_block(index: int) -> bytes:
    """The content of block ``index``: sizes from 16 bytes to 4 KiB, unique per index."""
    return index.to_bytes(8, "little") * (2 + (index * 7919) % 511)


def main() -> None:
    directory, seed_hex = sys.argv[1], sys.argv[2]
    with Core.open_or_create(directory, KeyPair.from_seed(bytes.fromhex(seed_hex))) as core:
        while True:
            start = core.length
            length = core.append([expected_block(i) for i in range(start, start + BATCH)])
            print(length, flush=True)


if __name__ == "__main__":
    main()
