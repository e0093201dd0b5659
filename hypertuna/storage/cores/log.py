"""The two views of a core that code above the core layer depends on.

The relay view builder and drives read and write cores only through these protocols, so they do
not care whether a core is a local writable log, a verified mirror of someone else's log, or an
in-memory log in a test. Calls are synchronous and may block on disk; actors run them through
``trio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class BlockLog(Protocol):
    """A readable core: ``length`` blocks, each readable by index."""

    @property
    def key(self) -> bytes:
        """The 32-byte core key (manifest hash, or the public key of a compat core)."""

    @property
    def length(self) -> int:
        """Number of blocks; blocks ``0 .. length - 1`` can be read."""

    def get(self, index: int) -> bytes:
        """Block ``index`` (decrypted if the core is encrypted). :class:`IndexError` when
        ``index`` is out of range; :class:`CoreCorruptError` when the stored block fails
        verification (a corrupt block is never returned)."""


class AppendLog(BlockLog, Protocol):
    """A core this process can write: it holds the signing key."""

    def append(self, blocks: Sequence[bytes]) -> int:
        """Append ``blocks`` in order, sign the new length, and return the new length. Durable
        when it returns (all blocks, tree nodes and the signature are synced)."""


class CoreError(Exception):
    """Base of the errors of the core layer."""


class CoreCorruptError(CoreError):
    """Stored bytes of a core fail verification; the affected blocks are never served."""


class CoreVerificationError(CoreError):
    """Data offered from elsewhere (a proof, blocks with a signature, a manifest) does not
    verify against the core's key, or does not follow on from what is stored. Nothing was
    changed."""
