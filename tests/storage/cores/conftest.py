"""Fixtures for the core tests: the hypercore vectors and helpers to write a vector core.

The files under ``vectors/`` are copies of ``shared/vectors/hypercore`` (produced by the real
``hypercore`` npm package; see ``vectors/README.md``), kept here so the suite runs anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hypertuna.storage.cores import Core, KeyPair, VectorCore, VectorSet, corestore_key_pair
from hypertuna.storage.cores.vectors import load_vectors

VECTOR_DIR = Path(__file__).parent / "vectors"
LETTERS = ("A", "B", "E", "D", "C")


@pytest.fixture(scope="session")
def vectors() -> VectorSet:
    return load_vectors(VECTOR_DIR / "vectors.json")


@pytest.fixture(scope="session")
def tampered() -> VectorSet:
    return load_vectors(VECTOR_DIR / "vectors-tampered.json")


def key_pair_for(vectors: VectorSet, core: VectorCore) -> KeyPair:
    """The writer key pair of a vector core: the seed, or Corestore's derivation for C."""
    if core.primary_key is not None:
        assert core.name is not None
        return corestore_key_pair(core.primary_key, core.name)
    return KeyPair.from_seed(vectors.seed)


def write_vector_core(directory: Path, vectors: VectorSet, core: VectorCore) -> Core:
    """Write ``core`` from its seed with our code, the way the vector generator did."""
    written = Core.create(
        directory,
        key_pair_for(vectors, core),
        compat=core.compat,
        encryption_key=core.encryption_key,
    )
    plaintext = core.plaintext_blocks if core.plaintext_blocks is not None else core.blocks
    if core.letter == "E":
        # E: append 7 blocks, truncate to 4, append 2 more (fork 1).
        written.append(vectors.core("A").blocks)
        written.truncate(4)
        written.append(plaintext[4:])
    else:
        written.append(plaintext)
    return written
