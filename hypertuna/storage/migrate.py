"""Numbered SQL migrations shipped with the package.

Files live in ``hypertuna/storage/migrations/<flavour>/NNNN_name.sql``; each backend applies the
ones its ``schema_migrations`` table does not list yet, in number order, each in its own
transaction together with the row that records it, so reopening a database is a no-op.
"""

from __future__ import annotations

import importlib.resources
import re

import attrs

__all__ = ["Migration", "load_migrations"]

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@attrs.frozen
class Migration:
    """One migration: its number, its name (file stem without the number) and its SQL."""

    version: int
    name: str
    sql: str


def load_migrations(flavour: str, package: str = "hypertuna.storage") -> list[Migration]:
    """The migrations of ``flavour`` ("sqlite" or "postgres") shipped in ``package``'s
    ``migrations`` folder, in order. Raises :class:`ValueError` if two files share a number, a
    file name is malformed, or there are none."""
    folder = importlib.resources.files(package).joinpath("migrations").joinpath(flavour)
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.fullmatch(entry.name)
        if match is None:
            raise ValueError(f"malformed {package} migration file name {flavour}/{entry.name}")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two {package} {flavour} migrations numbered {version}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    if not found:
        raise ValueError(f"no {package} {flavour} migrations found")
    return [found[v] for v in sorted(found)]
