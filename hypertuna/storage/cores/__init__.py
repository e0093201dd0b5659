"""Signed append-only logs ("cores"), byte-compatible with hypercore 11's crypto."""

from __future__ import annotations

from hypertuna.storage.cores.log import AppendLog, BlockLog, CoreCorruptError

__all__ = ["AppendLog", "BlockLog", "CoreCorruptError"]
