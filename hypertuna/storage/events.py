"""The relay view's event store: one interface, an embedded SQLite and a PostgreSQL implementation.

What every :class:`EventStore` promises, identically on both backends:

- **Relays** are named by a 64-hex key and a unique alias slug; events of one relay are never
  visible from another.
- **Ingest** applies a whole batch in one transaction that is committed and synced when the call
  returns. Items are applied in order (a later item sees the earlier ones) and each gets an
  :class:`IngestResult` carrying the NIP-01 ``OK`` message. The merge rules make the view a
  function of the events it was given: duplicates by id are refused; replaceable and
  addressable kinds keep the newest version (lowest id on a ``created_at`` tie); NIP-09
  deletions remove and tombstone only their author's events; NIP-40 expired events are refused
  and never returned; ephemeral kinds are a caller bug (:class:`ValueError`).
- **Query** answers NIP-01 filters newest first (lowest id on ties) with each filter's limit
  capped by ``max_limit``, through indexes only, and reports the largest ``seq`` visible in the
  same snapshot so a live subscription can continue exactly after it.
- **Failures** (lost database, broken file) raise :class:`StorageError`; rejections are values.

**Relays written through cores.** A relay whose events come from its signed cores (see
:mod:`hypertuna.storage.relay_view`) is *core-backed* from its first :meth:`EventStore.apply_view`
or :meth:`EventStore.reset_view`; from then on ``ingest`` refuses its items (``blocked:``) so its
content stays a function of its cores. ``apply_view`` uses the same merge rules with two
differences that make the stored view independent of the order and the time events arrive in:

- NIP-40 plays no part when events are applied: an expired event is stored like any other (and
  hidden by queries), so an expired deletion still deletes and an expired version of an address
  still replaces older ones.
- The newest version of an address always wins, even when it is deleted by id or purged: older
  versions stay refused ("address floors", kept for every relay by ``purge_expired``). For
  plain ingest an address whose stored version was deleted or purged takes an older version
  again, as before.

The store records, in the same transaction as the events, how far the view applied each core
(:class:`ViewCore`), so a restarted view resumes exactly where the last committed batch ended.

Tag values that contain NUL or are longer than :data:`MAX_INDEXED_TAG_BYTES` UTF-8 bytes are
kept in the event but not indexed, so ``#x`` filters never match them (PostgreSQL cannot index
them, and both backends must answer alike).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from hypertuna.protocol.nostr.model import Event, Filter

if TYPE_CHECKING:
    from hypertuna.storage.registrations import Registration, RegistrationOutcome, WorkerRelay

__all__ = [
    "MAX_INDEXED_TAG_BYTES",
    "MSG_EXPIRED",
    "BeforeCommit",
    "EventStore",
    "IngestItem",
    "IngestResult",
    "QueryResult",
    "RelayExistsError",
    "RelayRecord",
    "RelayRegisteredError",
    "StorageError",
    "StoredEvent",
    "ViewCore",
    "open_event_store",
]

MAX_INDEXED_TAG_BYTES = 1024
"""Longest tag value (in UTF-8 bytes) that ``#x`` filters can match."""

DEFAULT_SQLITE_FILE = "gateway.sqlite3"

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[a-z0-9-]{1,64}")


def _check_key(_instance: object, _attribute: object, value: str) -> None:
    if not _KEY_RE.fullmatch(value):
        raise ValueError(f"relay key must be 64 lowercase hex characters, got {value!r}")


def _check_name(_instance: object, _attribute: object, value: str) -> None:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"relay name must match [a-z0-9-]{{1,64}}, got {value!r}")
    # get_relay() accepts a key or a name, so a name must never be mistaken for a key.
    if _KEY_RE.fullmatch(value):
        raise ValueError("relay name must not look like a relay key (64 hex characters)")


@attrs.frozen
class RelayRecord:
    """A relay known to the store. ``key`` and ``name`` are each unique across the store."""

    id: int
    key: str = attrs.field(validator=_check_key)
    name: str = attrs.field(validator=_check_name)
    description: str
    created_at: int


def _check_core_key(_instance: object, _attribute: object, value: str) -> None:
    if not _KEY_RE.fullmatch(value):
        raise ValueError(f"core key must be 64 lowercase hex characters, got {value!r}")


def _check_length(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_LENGTH:
        raise ValueError(f"{attribute.name} must be an integer from 0 to {_MAX_LENGTH}")


_MAX_LENGTH = 2**63 - 1


@attrs.frozen
class ViewCore:
    """One core of a core-backed relay as its view has applied it.

    ``key`` is the core key (64 lowercase hex); ``role`` the role the owner core gave the writer
    (``"owner"`` for the owner core itself); ``length`` the number of blocks applied (blocks
    ``0 .. length - 1``); ``end`` None while the writer is admitted, else the ``at_length`` of
    its removal, and then ``length <= end``.
    """

    key: str = attrs.field(validator=_check_core_key)
    role: str = attrs.field(validator=attrs.validators.min_len(1))
    length: int = attrs.field(validator=_check_length)
    end: int | None = attrs.field(default=None, validator=attrs.validators.optional(_check_length))

    def __attrs_post_init__(self) -> None:
        if self.end is not None and self.length > self.end:
            raise ValueError(f"core {self.key}: length {self.length} is past its end {self.end}")


@attrs.frozen
class IngestItem:
    """One event to store in one relay."""

    relay_id: int
    event: Event


@attrs.frozen
class IngestResult:
    """The outcome of one :class:`IngestItem`: ``message`` is the NIP-01 ``OK`` text ("" when
    accepted, else prefixed ``duplicate:``, ``invalid:`` or ``blocked:``) and ``seq`` the store
    sequence of the newly stored row (None when rejected)."""

    accepted: bool
    message: str
    seq: int | None


MSG_EXPIRED = "invalid: event has expired"
"""The ``OK`` text for an event whose NIP-40 expiration has passed when it arrives."""

BeforeCommit = Callable[[Sequence[IngestResult]], Sequence[ViewCore]]
"""See :meth:`EventStore.apply_view`."""


@attrs.frozen
class StoredEvent:
    """A stored event as sent on the wire (``raw`` JSON) with its store sequence."""

    seq: int
    raw: str


@attrs.frozen
class QueryResult:
    """Events matching a query, newest first, and ``high_seq``: the largest ``seq`` of any event
    of the store visible in the same snapshot (0 when empty). Every event with ``seq <=
    high_seq`` was visible to the query; anything committed later has a larger ``seq``."""

    events: list[StoredEvent]
    high_seq: int


class StorageError(Exception):
    """The store could not do its job (database unreachable, connection lost, corrupt file,
    store closed). Never used for rejected events."""


class RelayExistsError(StorageError):
    """A relay with the same key or name already exists."""


class RelayRegisteredError(RelayExistsError):
    """The key or name is that of a relay registered by workers (see
    :mod:`hypertuna.storage.registrations`), so the gateway cannot host it itself."""


class EventStore(Protocol):
    """The relay view's event store (see the module docstring for the rules it applies)."""

    async def ping(self) -> None:
        """Return when the database answers; raise :class:`StorageError` otherwise."""

    async def create_relay(
        self, *, key: str, name: str, description: str, created_at: int
    ) -> RelayRecord:
        """Create a relay. :class:`ValueError` for a malformed key or name,
        :class:`RelayExistsError` when the key or the name is taken, by another relay or (then
        :class:`RelayRegisteredError`) by a worker registration."""

    async def list_relays(self) -> list[RelayRecord]:
        """Every relay, in creation order."""

    async def get_relay(self, key_or_name: str) -> RelayRecord | None:
        """The relay with this key or alias name, if any."""

    async def ingest(self, items: Sequence[IngestItem], *, now: int) -> list[IngestResult]:
        """Apply ``items`` in order in one transaction, durable when this returns; one result
        per item. :class:`ValueError` (and nothing written) if any item has an ephemeral kind.
        If the call is cancelled the batch may or may not have been committed."""

    async def query(
        self, relay_id: int, filters: Sequence[Filter], *, now: int, max_limit: int
    ) -> QueryResult:
        """Events of the relay matching any filter, deduplicated, newest first (lowest id on
        ties); each filter returns at most ``min(limit, max_limit)`` events (``max_limit`` when
        it has no limit). Events expired at ``now`` are left out."""

    async def count(self, relay_id: int, filters: Sequence[Filter], *, now: int) -> int:
        """Number of distinct unexpired events of the relay matching any filter (NIP-45);
        ``limit`` plays no part."""

    async def purge_expired(self, *, now: int) -> int:
        """Delete every event whose NIP-40 expiration is ``<= now``; return how many. A purged
        version of an address becomes that address's floor (see the module docstring)."""

    async def apply_view(
        self,
        relay_id: int,
        events: Sequence[Event],
        cores: Sequence[ViewCore],
        *,
        before_commit: BeforeCommit | None = None,
    ) -> list[IngestResult]:
        """Apply ``events`` to a core-backed relay with the view's merge rules (module
        docstring) and store the ``cores`` rows (replacing rows with the same key), all in one
        transaction, durable when this returns; one result per event. Marks the relay
        core-backed. :class:`ValueError` (and nothing written) for an ephemeral event or an
        unknown relay.

        ``before_commit``, if given, is called with the results inside the transaction, on the
        store's worker thread, just before it commits; the :class:`ViewCore` rows it returns
        are stored too. A writer uses it to append the accepted events to its own core so that
        the core and the view commit together. If it raises, nothing is written and the
        exception propagates."""

    async def view_cores(self, relay_id: int) -> list[ViewCore]:
        """The :class:`ViewCore` rows of the relay, ordered by key (empty for a relay whose
        view never started, or was just reset)."""

    async def reset_view(self, relay_id: int) -> None:
        """Forget everything the relay holds (events, tombstones, floors and ``view_cores``
        rows) in one transaction and mark it core-backed, so its view can be built again from
        block 0 of every core. :class:`ValueError` for an unknown relay."""

    async def event_count(self, relay_id: int) -> int:
        """Rows stored for the relay, including expired rows not purged yet."""

    async def apply_registration(
        self, registration: Registration, *, now: int
    ) -> tuple[RegistrationOutcome, WorkerRelay | None]:
        """Check and record a worker's relay statement in one write transaction (rules in
        :mod:`hypertuna.storage.registrations`); the relay as it now stands when accepted."""

    async def worker_relays(self) -> list[WorkerRelay]:
        """Every relay registered by workers, with its active workers."""

    async def worker_relay(self, relay_key: str) -> WorkerRelay | None:
        """The relay of ``relay_key`` if workers ever registered it (also when none serves it
        now), with its active workers; None otherwise."""

    async def aclose(self) -> None:
        """Release connections; later calls raise :class:`StorageError`. Idempotent."""


def resolve_sqlite_path(database_url: str | None, data_dir: Path) -> Path:
    """The SQLite file selected by ``database_url``: ``None`` -> ``data_dir/gateway.sqlite3``,
    ``sqlite:///abs/path`` -> ``/abs/path``, ``sqlite:rel/path`` -> ``data_dir/rel/path``."""
    if database_url is None:
        return data_dir / DEFAULT_SQLITE_FILE
    scheme, _, rest = database_url.partition(":")
    if scheme.lower() != "sqlite":
        raise ValueError(f"not a sqlite URL: {database_url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError("sqlite URLs take no query string or fragment")
    if rest.startswith("///"):
        return Path(rest[2:])
    if rest.startswith("//"):
        raise ValueError("sqlite URLs take no host: use sqlite:///abs/path or sqlite:rel/path")
    if rest in ("", ":memory:"):
        raise ValueError("a sqlite URL needs a file path (in-memory databases are not supported)")
    return data_dir / rest


@contextlib.asynccontextmanager
async def open_event_store(database_url: str | None, data_dir: Path) -> AsyncIterator[EventStore]:
    """Open the event store selected by ``database_url`` and apply pending migrations.

    ``None`` or ``sqlite:...`` selects SQLite (see :func:`resolve_sqlite_path`; missing
    directories are created), ``postgresql://...`` (or ``postgres://...``) PostgreSQL. Any other
    scheme is a :class:`ValueError`. The store is closed when the block exits.
    """
    scheme = "sqlite" if database_url is None else database_url.partition(":")[0].lower()
    if scheme == "sqlite":
        from hypertuna.storage.sqlite_events import open_sqlite_event_store

        path = resolve_sqlite_path(database_url, data_dir)
        async with open_sqlite_event_store(path) as sqlite_store:
            yield sqlite_store
    elif scheme in ("postgresql", "postgres"):
        from hypertuna.storage.postgres_events import open_postgres_event_store

        assert database_url is not None
        async with open_postgres_event_store(database_url) as pg_store:
            yield pg_store
    else:
        raise ValueError(
            f"unsupported database URL scheme {scheme!r}: use sqlite:... or postgresql://..."
        )
