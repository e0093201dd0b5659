"""Nostr data model shared by the codec, the event store and the edge.

Everything here is pure and immutable: an :class:`Event` has already passed validation (shape,
id and signature) when it exists, and a :class:`Filter` has already been checked for types and
ranges. Parsing and validation live in :mod:`hypertuna.protocol.nostr.codec`.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "Event",
    "Filter",
    "KindClass",
    "kind_class",
]


class KindClass(enum.Enum):
    """How a kind is stored (NIP-01 "Kinds")."""

    REGULAR = "regular"
    REPLACEABLE = "replaceable"
    EPHEMERAL = "ephemeral"
    ADDRESSABLE = "addressable"


def kind_class(kind: int) -> KindClass:
    """Classify a kind: 0, 3 and 10000-19999 replaceable, 20000-29999 ephemeral,
    30000-39999 addressable, everything else regular."""
    if kind in (0, 3) or 10000 <= kind < 20000:
        return KindClass.REPLACEABLE
    if 20000 <= kind < 30000:
        return KindClass.EPHEMERAL
    if 30000 <= kind < 40000:
        return KindClass.ADDRESSABLE
    return KindClass.REGULAR


@attrs.frozen(slots=True)
class Event:
    """A validated Nostr event.

    ``raw`` is the compact JSON of the event object exactly as relays send it (keys in NIP-01
    order, ``ensure_ascii=False``), computed once so every delivery reuses the same text.
    """

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: tuple[tuple[str, ...], ...]
    content: str
    sig: str
    raw: str = attrs.field(eq=False, repr=False)

    @property
    def kind_class(self) -> KindClass:
        return kind_class(self.kind)

    def first_tag_value(self, name: str) -> str | None:
        """The value (second element) of the first tag called ``name``, if any."""
        for tag in self.tags:
            if len(tag) >= 2 and tag[0] == name:
                return tag[1]
        return None

    @property
    def d_tag(self) -> str:
        """The ``d`` tag value that names an addressable event ("" when absent)."""
        return self.first_tag_value("d") or ""

    @property
    def expiration(self) -> int | None:
        """NIP-40 expiration timestamp, or None when absent or not an integer string."""
        value = self.first_tag_value("expiration")
        # isdigit() alone accepts characters such as "²" that int() refuses.
        if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
            return None
        return int(value)

    def indexed_tags(self) -> list[tuple[str, str]]:
        """Single-letter tags as (letter, value) pairs: what ``#x`` filters can match."""
        return [
            (tag[0], tag[1])
            for tag in self.tags
            if len(tag) >= 2 and len(tag[0]) == 1 and tag[0].isascii() and tag[0].isalpha()
        ]


@attrs.frozen(slots=True)
class Filter:
    """A validated NIP-01 filter. ``None`` means the condition is absent; an empty set means the
    filter can match nothing. ``tags`` maps a single letter to the accepted values (AND across
    letters, OR within one)."""

    ids: frozenset[str] | None = None
    authors: frozenset[str] | None = None
    kinds: frozenset[int] | None = None
    tags: tuple[tuple[str, frozenset[str]], ...] = ()
    since: int | None = None
    until: int | None = None
    limit: int | None = None

    def matches(self, event: Event) -> bool:
        """Whether ``event`` satisfies every condition (``limit`` plays no part)."""
        if self.ids is not None and event.id not in self.ids:
            return False
        if self.authors is not None and event.pubkey not in self.authors:
            return False
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.since is not None and event.created_at < self.since:
            return False
        if self.until is not None and event.created_at > self.until:
            return False
        if self.tags:
            present = event.indexed_tags()
            for letter, values in self.tags:
                if not any(name == letter and value in values for name, value in present):
                    return False
        return True

    @property
    def can_match(self) -> bool:
        """False when an empty list or an empty time window makes any match impossible."""
        if self.ids is not None and not self.ids:
            return False
        if self.authors is not None and not self.authors:
            return False
        if self.kinds is not None and not self.kinds:
            return False
        if any(not values for _, values in self.tags):
            return False
        return not (self.since is not None and self.until is not None and self.since > self.until)
