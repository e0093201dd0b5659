"""Drives: versioned file trees stored in two cores.

A drive is a pair of cores. The **entry core** holds one record per change (a file written or a
file deleted); the **blob core** holds file contents cut into blocks of :data:`BLOCK_SIZE`
(64 KiB) bytes. A drive's version (``driveVersion``) is the entry core's length: version ``n``
is the state after entries ``0 .. n-1``, version 0 is the empty drive. Every earlier version
stays readable, because neither core ever changes what it already holds.

Paths
    Absolute POSIX-style paths such as ``/avatars/a.png``, compared code point by code point:
    they start with ``/``, have no empty, ``.`` or ``..`` segment, no trailing ``/``, no control
    character (NUL included), at most :data:`MAX_SEGMENT_BYTES` UTF-8 bytes per segment and
    :data:`MAX_PATH_BYTES` in all. :func:`check_path` raises :class:`ValueError` otherwise;
    paths are never silently rewritten.

Entry format (version 1)
    Each entry is one block of the entry core. ``uvarint`` is unsigned LEB128 in its shortest
    form, at most ``2**53 - 1`` (so JavaScript peers read it exactly); strings are a ``uvarint``
    byte length followed by UTF-8::

        u8       format version = 1
        u8       kind: 1 = put, 2 = delete
        string   path
        -- put only --
        uvarint  blob start: index of the file's first block in the blob core
        uvarint  blob block count = ceil(byte length / 65536)
        uvarint  byte length = file size
        32 bytes BLAKE2b-256 of the content
        string   metadata: canonical JSON, or empty for no metadata

    Metadata is a JSON object of non-empty string keys to strings or integers within
    ``±(2**53 - 1)`` (no floats, booleans, nulls or nesting), at most
    :data:`MAX_METADATA_BYTES` bytes, written canonically: keys sorted by code point, no
    whitespace, non-ASCII characters as UTF-8. The blob range of an empty file is ``(0, 0, 0)``.
    Every block of a file is full except the last. Decoding is strict: exactly one byte string
    encodes each entry, and anything else (unknown version or kind, trailing bytes, a longer
    varint than needed, non-canonical metadata, inconsistent blob range) raises
    :class:`EntryDecodeError`. :func:`encode_entry` and :func:`decode_entry` are the codec.

Reading and writing
    :class:`ReadOnlyDrive` reads a drive over two :class:`~hypertuna.storage.cores.BlockLog`
    (for instance verified mirrors of another process's cores); :class:`Drive` also writes, over
    two :class:`~hypertuna.storage.cores.AppendLog`. Both scan the entry core when built and keep
    per path the indexes of its changes, so reading any path at any version costs a binary search
    and one entry block read. :meth:`ReadOnlyDrive.refresh` indexes entries that were appended
    since (by this or another object). Methods are synchronous and may block on disk; an actor
    owns a drive and calls it through ``trio.to_thread``, one call at a time.

    - ``put(path, data, metadata=...)`` / ``put_chunks``: append the content to the blob core
      first and the entry second, each durable on return, so an entry never points at blobs that
      are not stored. Return the new version.
    - ``delete(path)``: append a delete entry and return the new version (unchanged if the path
      does not exist).
    - ``stat(path, version=None)``, ``get(path, version=None)``, ``open_read(path, version=None)``
      and ``list(prefix="/", version=None)`` read at the current version or an earlier one.
      Content is checked against the entry's size and hash; ``open_read`` yields it block by
      block and holds back the last block until the whole content has matched the hash.

Bad data
    An entry that cannot be decoded, a blob range beyond the blob core, or content that does not
    match its entry is reported for that file at that version by a :class:`DriveFileError`
    (:class:`CorruptEntryError`, :class:`MissingBlobsError` or :class:`CorruptContentError`) when
    it is read; it never stops the other files from being indexed or read. An entry whose path
    cannot even be decoded belongs to no file: :meth:`ReadOnlyDrive.problems` lists it with the
    others, and :meth:`ReadOnlyDrive.statistics` counts them.

Core names
    :func:`drive_core_names` gives the names from which the core layer derives the key pairs of
    a relay's drive and of the shared :data:`PFP_DRIVE` drive.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import types
from collections.abc import Iterable, Iterator, Mapping

import attrs

from hypertuna.storage.cores.log import AppendLog, BlockLog, CoreCorruptError

__all__ = [
    "BLOCK_SIZE",
    "ENTRY_FORMAT_VERSION",
    "MAX_METADATA_BYTES",
    "MAX_PATH_BYTES",
    "MAX_SEGMENT_BYTES",
    "MAX_UINT",
    "PFP_DRIVE",
    "BlobRange",
    "CorruptContentError",
    "CorruptEntryError",
    "DeleteEntry",
    "Drive",
    "DriveCoreNames",
    "DriveError",
    "DriveFile",
    "DriveFileError",
    "DriveStatistics",
    "Entry",
    "EntryDecodeError",
    "EntryProblem",
    "FileReader",
    "MissingBlobsError",
    "PutEntry",
    "ReadOnlyDrive",
    "check_path",
    "decode_entry",
    "drive_core_names",
    "encode_entry",
]

BLOCK_SIZE = 64 * 1024
"""Bytes per blob block; every block of a file is this long except its last."""

ENTRY_FORMAT_VERSION = 1
"""The first byte of every entry this module writes."""

MAX_PATH_BYTES = 4096
"""Longest path, in UTF-8 bytes."""

MAX_SEGMENT_BYTES = 255
"""Longest path segment, in UTF-8 bytes (the usual file system limit, so a drive can be
exported to disk)."""

MAX_METADATA_BYTES = 4096
"""Longest metadata, as canonical JSON in UTF-8 bytes."""

MAX_UINT = 2**53 - 1
"""Largest integer in an entry (varints and metadata values); JavaScript reads it exactly."""

PFP_DRIVE = "pfp"
"""The drive id of the shared profile-picture drive (relay drives use the relay key)."""

_KIND_PUT = 1
_KIND_DELETE = 2
_HASH_BYTES = 32
# Each append is synced before it returns, so writing a large file in batches bounds both the
# memory held and the number of syncs.
_APPEND_BATCH_BLOCKS = 16

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_HEX_HASH_RE = re.compile(r"[0-9a-f]{64}")
_RELAY_KEY_RE = re.compile(r"[0-9a-f]{64}")


def _show(text: str, limit: int = 80) -> str:
    """``repr`` of a possibly huge user string, cut so that error messages stay readable."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def check_path(path: str) -> str:
    """Return ``path`` if it is a valid drive path (see the module docstring), else raise
    :class:`ValueError` saying what is wrong."""
    if not path.startswith("/"):
        raise ValueError(f"drive path must start with '/': {_show(path)}")
    if path == "/":
        raise ValueError("drive path must name a file, not the root '/'")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"drive path is not valid Unicode: {_show(path)}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"drive path is longer than {MAX_PATH_BYTES} UTF-8 bytes: {_show(path)}")
    control = _CONTROL_RE.search(path)
    if control is not None:
        what = "NUL" if control.group() == "\x00" else f"U+{ord(control.group()):04X}"
        raise ValueError(f"drive path contains a control character ({what}): {_show(path)}")
    for segment in path[1:].split("/"):
        if not segment:
            raise ValueError(f"drive path has an empty segment ('//' or a trailing '/'): {path!r}")
        if segment in {".", ".."}:
            raise ValueError(f"drive path has a {segment!r} segment: {path!r}")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise ValueError(
                f"drive path segment is longer than {MAX_SEGMENT_BYTES} UTF-8 bytes: {_show(path)}"
            )
    return path


def _check_prefix(prefix: str) -> str:
    """The directory prefix that :meth:`ReadOnlyDrive.list` matches: ``"/"`` or ``"/a/b/"``."""
    if prefix == "/":
        return prefix
    directory = prefix.removesuffix("/")
    if directory == "/":
        raise ValueError(f"directory prefix has an empty segment: {prefix!r}")
    return check_path(directory) + "/"


# --- the entry record ---------------------------------------------------------------------------


def _check_uint(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_UINT:
        raise ValueError(f"{attribute.name} must be in 0..2**53-1, got {value}")


@attrs.frozen
class BlobRange:
    """Where a file's content lies in the blob core: ``blocks`` blocks from block ``start``,
    ``byte_length`` bytes in all. ``blocks`` is always ``ceil(byte_length / BLOCK_SIZE)``, and
    an empty file's range is ``BlobRange(0, 0, 0)``."""

    start: int = attrs.field(validator=_check_uint)
    blocks: int = attrs.field(validator=_check_uint)
    byte_length: int = attrs.field(validator=_check_uint)

    def __attrs_post_init__(self) -> None:
        expected = -(-self.byte_length // BLOCK_SIZE)
        if self.blocks != expected:
            raise ValueError(
                f"a blob of {self.byte_length} bytes takes {expected} blocks, not {self.blocks}"
            )
        if self.blocks == 0 and self.start != 0:
            raise ValueError(f"an empty blob range starts at block 0, not {self.start}")
        if self.start + self.blocks > MAX_UINT:
            raise ValueError("blob range ends past block 2**53-1")

    @property
    def end(self) -> int:
        """Index just past the last block of the range."""
        return self.start + self.blocks


def _checked_metadata(value: object) -> Mapping[str, str | int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"metadata must be a JSON object, got {type(value).__name__}")
    items: dict[str, str | int] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        # type() rather than isinstance(): bool is an int subclass but means something else in
        # JSON, and an IntEnum would not survive a round trip.
        if type(item) is int:
            if not -MAX_UINT <= item <= MAX_UINT:
                raise ValueError(f"metadata integer {key!r} is outside ±(2**53-1): {item}")
        elif type(item) is not str:
            raise ValueError(
                f"metadata value {key!r} must be a string or an integer, got {type(item).__name__}"
            )
        items[key] = item
    try:
        size = len(_metadata_json(items))
    except UnicodeEncodeError:
        raise ValueError("metadata contains a string that is not valid Unicode") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON, more than {MAX_METADATA_BYTES}")
    return types.MappingProxyType(items)


def _freeze_metadata(value: Mapping[str, str | int] | None) -> Mapping[str, str | int]:
    return _checked_metadata({} if value is None else value)


def _metadata_json(items: Mapping[str, str | int]) -> bytes:
    if not items:
        return b""
    return json.dumps(
        dict(items), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def _check_path_field(_instance: object, _attribute: object, value: str) -> None:
    check_path(value)


def _check_hash(_instance: object, _attribute: object, value: str) -> None:
    if not _HEX_HASH_RE.fullmatch(value):
        raise ValueError(f"hash must be 64 lowercase hex characters, got {_show(value)}")


@attrs.frozen
class PutEntry:
    """A file written at ``path``: its content is ``blob`` in the blob core, ``hash`` is the
    BLAKE2b-256 of that content in lowercase hex, ``metadata`` a small read-only mapping of
    string keys to strings or integers (see the module docstring for its limits)."""

    path: str = attrs.field(validator=_check_path_field)
    blob: BlobRange
    hash: str = attrs.field(validator=_check_hash)
    # Excluded from hash(): a mapping proxy is not hashable. It still takes part in ==.
    metadata: Mapping[str, str | int] = attrs.field(
        default=None, converter=_freeze_metadata, hash=False
    )

    @property
    def size(self) -> int:
        """The file's length in bytes (the blob's byte length)."""
        return self.blob.byte_length


@attrs.frozen
class DeleteEntry:
    """The file at ``path`` was deleted."""

    path: str = attrs.field(validator=_check_path_field)


Entry = PutEntry | DeleteEntry


class EntryDecodeError(ValueError):
    """A block of an entry core is not a valid entry."""


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _uvarint(len(data)) + data


def encode_entry(entry: Entry) -> bytes:
    """The one byte string that encodes ``entry`` (format in the module docstring)."""
    path = entry.path.encode("utf-8")
    if isinstance(entry, DeleteEntry):
        return bytes([ENTRY_FORMAT_VERSION, _KIND_DELETE]) + _string(path)
    return b"".join(
        [
            bytes([ENTRY_FORMAT_VERSION, _KIND_PUT]),
            _string(path),
            _uvarint(entry.blob.start),
            _uvarint(entry.blob.blocks),
            _uvarint(entry.blob.byte_length),
            bytes.fromhex(entry.hash),
            _string(_metadata_json(entry.metadata)),
        ]
    )


class _Reader:
    """Strict reading of one entry block; every failure is an :class:`EntryDecodeError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def take(self, count: int, what: str) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise EntryDecodeError(f"entry ends inside its {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uvarint(self, what: str) -> int:
        value = 0
        shift = 0
        while True:
            byte = self.byte(what)
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 53:
                raise EntryDecodeError(f"{what} is larger than 2**53-1")
        if byte == 0 and shift > 7:
            raise EntryDecodeError(f"{what} is not in its shortest varint form")
        if value > MAX_UINT:
            raise EntryDecodeError(f"{what} is larger than 2**53-1")
        return value

    def string(self, what: str) -> bytes:
        return self.take(self.uvarint(f"{what} length"), what)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise EntryDecodeError(f"{len(self._data) - self._pos} bytes follow the entry")


def _decode_head(block: bytes) -> tuple[int, str, _Reader]:
    """Version, kind and path: enough to know which file a (possibly broken) entry is about."""
    reader = _Reader(block)
    version = reader.byte("format version")
    if version != ENTRY_FORMAT_VERSION:
        raise EntryDecodeError(f"unknown entry format version {version}")
    kind = reader.byte("kind")
    if kind not in {_KIND_PUT, _KIND_DELETE}:
        raise EntryDecodeError(f"unknown entry kind {kind}")
    try:
        path = reader.string("path").decode("utf-8")
        check_path(path)
    except UnicodeDecodeError:
        raise EntryDecodeError("entry path is not valid UTF-8") from None
    except ValueError as exc:
        raise EntryDecodeError(f"entry path is invalid: {exc}") from None
    return kind, path, reader


def _decode_body(kind: int, path: str, reader: _Reader) -> Entry:
    if kind == _KIND_DELETE:
        reader.end()
        return DeleteEntry(path)
    start = reader.uvarint("blob start")
    blocks = reader.uvarint("blob block count")
    byte_length = reader.uvarint("byte length")
    digest = reader.take(_HASH_BYTES, "hash")
    raw_metadata = reader.string("metadata")
    reader.end()
    if len(raw_metadata) > MAX_METADATA_BYTES:
        raise EntryDecodeError(f"entry metadata is longer than {MAX_METADATA_BYTES} bytes")
    try:
        blob = BlobRange(start, blocks, byte_length)
        text = raw_metadata.decode("utf-8")
        metadata = _checked_metadata(json.loads(text) if text else {})
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise EntryDecodeError(f"entry is invalid: {exc}") from None
    except RecursionError:
        raise EntryDecodeError("entry metadata is nested too deeply") from None
    # The entry core is signed byte for byte: one meaning must have one encoding.
    if _metadata_json(metadata) != raw_metadata:
        raise EntryDecodeError("entry metadata is not canonical JSON")
    return PutEntry(path, blob, digest.hex(), metadata)


def decode_entry(block: bytes) -> Entry:
    """The entry that ``block`` encodes; :class:`EntryDecodeError` if ``block`` is not exactly
    :func:`encode_entry` of some entry."""
    kind, path, reader = _decode_head(block)
    return _decode_body(kind, path, reader)


# --- errors -------------------------------------------------------------------------------------


class DriveError(Exception):
    """A drive cannot do what was asked because of its stored data or its cores."""


class DriveFileError(DriveError):
    """The file at ``path``, as written by entry ``index``, cannot be served."""

    path: str
    index: int
    reason: str

    def __init__(self, path: str, index: int, reason: str) -> None:
        super().__init__(path, index, reason)
        self.path = path
        self.index = index
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path} (drive entry {self.index}): {self.reason}"


class CorruptEntryError(DriveFileError):
    """The entry that last changed the file is not a valid entry."""


class MissingBlobsError(DriveFileError):
    """The entry points past the end of the blob core (a mirror that has not received the
    blocks yet, or a broken drive)."""


class CorruptContentError(DriveFileError):
    """The blob blocks do not match the entry: wrong block sizes, a block that fails the core's
    verification, or a content hash that differs."""


# --- reading ------------------------------------------------------------------------------------


@attrs.frozen
class DriveFile:
    """A file read whole: its entry and its verified content."""

    entry: PutEntry
    content: bytes


@attrs.frozen
class EntryProblem:
    """Entry ``index`` could not be used; ``path`` is ``None`` when even the path could not be
    decoded (the entry then belongs to no file)."""

    index: int
    path: str | None
    reason: str


@attrs.frozen
class DriveStatistics:
    """A snapshot of a drive's index: its ``version``, the number of readable ``files`` at that
    version, and the number of entries that could not be used (all versions)."""

    version: int
    files: int
    problem_entries: int


@attrs.frozen(eq=False)
class FileReader:
    """The content of one file, read block by block each time it is iterated.

    Iterating yields the blob blocks in order (each :data:`BLOCK_SIZE` bytes except the last)
    and raises a :class:`DriveFileError` if a block is missing, has the wrong size, fails the
    core's verification, or if the whole content does not match the entry's hash. The last
    block is only yielded after the hash matched, so a consumer that stops at an error never
    holds the complete content of a corrupt file.
    """

    entry: PutEntry
    index: int
    _blobs: BlockLog

    def check_available(self) -> None:
        """Raise :class:`MissingBlobsError` unless the blob core holds the whole range."""
        length = self._blobs.length
        if self.entry.blob.end > length:
            raise MissingBlobsError(
                self.entry.path,
                self.index,
                f"content is blob blocks {self.entry.blob.start}..{self.entry.blob.end - 1} "
                f"but the blob core has {length} blocks",
            )

    def __iter__(self) -> Iterator[bytes]:
        entry = self.entry
        self.check_available()
        hasher = hashlib.blake2b(digest_size=_HASH_BYTES)
        remaining = entry.size
        for block_index in range(entry.blob.start, entry.blob.end):
            try:
                block = self._blobs.get(block_index)
            except CoreCorruptError as exc:
                raise CorruptContentError(
                    entry.path, self.index, f"blob block {block_index} fails verification: {exc}"
                ) from exc
            except IndexError:
                raise MissingBlobsError(
                    entry.path, self.index, f"blob block {block_index} is missing"
                ) from None
            expected = min(BLOCK_SIZE, remaining)
            if len(block) != expected:
                raise CorruptContentError(
                    entry.path,
                    self.index,
                    f"blob block {block_index} is {len(block)} bytes, expected {expected}",
                )
            remaining -= expected
            hasher.update(block)
            if block_index == entry.blob.end - 1:
                self._check_hash(hasher.hexdigest())
            yield block
        if entry.blob.blocks == 0:
            self._check_hash(hasher.hexdigest())

    def read(self) -> bytes:
        """The whole content, verified."""
        return b"".join(self)

    def _check_hash(self, digest: str) -> None:
        if digest != self.entry.hash:
            raise CorruptContentError(
                self.entry.path,
                self.index,
                f"content hash is {digest}, the entry says {self.entry.hash}",
            )


_PUT = 0
_DELETE = 1
_CORRUPT = 2


class _History:
    """The changes of one path: entry indexes in increasing order and what each one did."""

    __slots__ = ("indexes", "kinds")

    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.kinds = bytearray()


class ReadOnlyDrive:
    """A drive read from an entry core and a blob core, at any version up to :attr:`version`.

    Building one scans the whole entry core. It is not thread-safe: one owner calls it, one call
    at a time.
    """

    def __init__(self, entries: BlockLog, blobs: BlockLog) -> None:
        self._entries = entries
        self._blobs = blobs
        self._version = 0
        self._histories: dict[str, _History] = {}
        # Sorted, so that the paths under a directory are one contiguous slice.
        self._paths: list[str] = []
        self._problems: dict[int, EntryProblem] = {}
        self._files = 0
        self.refresh()

    @property
    def version(self) -> int:
        """The number of entries indexed so far: the newest version this object can read."""
        return self._version

    @property
    def entries_key(self) -> bytes:
        """The key of the entry core, which names the drive."""
        return self._entries.key

    @property
    def blobs_key(self) -> bytes:
        """The key of the blob core."""
        return self._blobs.key

    def refresh(self) -> int:
        """Index the entries appended to the entry core since the last call; return the new
        :attr:`version`. :class:`DriveError` if the entry core became shorter."""
        length = self._entries.length
        if length < self._version:
            raise DriveError(
                f"the entry core shrank from {self._version} to {length} blocks; "
                "open the drive again"
            )
        for index in range(self._version, length):
            try:
                block = self._entries.get(index)
            except CoreCorruptError as exc:
                self._problems[index] = EntryProblem(
                    index, None, f"block fails verification: {exc}"
                )
            else:
                self._index_block(index, block)
            self._version = index + 1
        return self._version

    def _index_block(self, index: int, block: bytes) -> None:
        try:
            kind, path, reader = _decode_head(block)
        except EntryDecodeError as exc:
            self._problems[index] = EntryProblem(index, None, str(exc))
            return
        try:
            entry = _decode_body(kind, path, reader)
        except EntryDecodeError as exc:
            self._problems[index] = EntryProblem(index, path, str(exc))
            change = _CORRUPT
        else:
            change = _PUT if isinstance(entry, PutEntry) else _DELETE
        history = self._histories.get(path)
        if history is None:
            history = self._histories[path] = _History()
            bisect.insort(self._paths, path)
        elif history.kinds[-1] == _PUT:
            self._files -= 1
        history.indexes.append(index)
        history.kinds.append(change)
        if change == _PUT:
            self._files += 1

    def _resolve(self, version: int | None) -> int:
        if version is None:
            return self._version
        if not 0 <= version <= self._version:
            raise ValueError(
                f"drive version {version} is outside 0..{self._version} "
                "(call refresh() to see newer entries)"
            )
        return version

    def _latest(self, path: str, version: int) -> tuple[int, int] | None:
        """``(entry index, change)`` of the last change to ``path`` before ``version``."""
        history = self._histories.get(path)
        if history is None:
            return None
        position = bisect.bisect_left(history.indexes, version)
        if position == 0:
            return None
        return history.indexes[position - 1], history.kinds[position - 1]

    def _load(self, path: str, index: int, change: int) -> PutEntry | None:
        if change == _DELETE:
            return None
        if change == _CORRUPT:
            raise CorruptEntryError(path, index, self._problems[index].reason)
        try:
            entry = decode_entry(self._entries.get(index))
        except (CoreCorruptError, EntryDecodeError) as exc:
            raise CorruptEntryError(path, index, str(exc)) from exc
        # The block decoded as a put of this path when it was indexed; anything else means the
        # core under this object was replaced, which an append-only core must never allow.
        if not isinstance(entry, PutEntry) or entry.path != path:
            raise CorruptEntryError(path, index, "entry changed since it was indexed")
        return entry

    def stat(self, path: str, version: int | None = None) -> PutEntry | None:
        """The entry of the file at ``path`` at ``version`` (default: :attr:`version`), or
        ``None`` if there is no such file then. :class:`ValueError` for an invalid path or
        version; :class:`CorruptEntryError` if the entry that last changed it is unreadable."""
        check_path(path)
        latest = self._latest(path, self._resolve(version))
        if latest is None:
            return None
        return self._load(path, *latest)

    def open_read(self, path: str, version: int | None = None) -> FileReader | None:
        """A :class:`FileReader` for the file at ``path`` at ``version``, or ``None`` if there is
        no such file then. Raises like :meth:`stat`, and :class:`MissingBlobsError` if the blob
        core does not hold the content."""
        check_path(path)
        latest = self._latest(path, self._resolve(version))
        if latest is None:
            return None
        entry = self._load(path, *latest)
        if entry is None:
            return None
        reader = FileReader(entry, latest[0], self._blobs)
        reader.check_available()
        return reader

    def get(self, path: str, version: int | None = None) -> DriveFile | None:
        """The file at ``path`` at ``version`` with its whole content, verified; ``None`` if
        there is no such file then. Raises like :meth:`open_read` and when reading it."""
        reader = self.open_read(path, version)
        if reader is None:
            return None
        return DriveFile(reader.entry, reader.read())

    def list(self, prefix: str = "/", version: int | None = None) -> tuple[PutEntry, ...]:
        """The files under the directory ``prefix`` (``"/"``, ``"/a"`` or ``"/a/"``; at any depth,
        the file named ``prefix`` itself excluded) at ``version``, sorted by path. Files whose
        latest entry is unreadable are left out; :meth:`problems` names them. Costs one entry
        block read per file listed."""
        directory = _check_prefix(prefix)
        at = self._resolve(version)
        found: list[PutEntry] = []
        for position in range(bisect.bisect_left(self._paths, directory), len(self._paths)):
            path = self._paths[position]
            if not path.startswith(directory):
                break
            latest = self._latest(path, at)
            if latest is None:
                continue
            try:
                entry = self._load(path, *latest)
            except CorruptEntryError:
                continue
            if entry is not None:
                found.append(entry)
        return tuple(found)

    def problems(self) -> tuple[EntryProblem, ...]:
        """Every indexed entry that could not be used, in entry order."""
        return tuple(self._problems.values())

    def statistics(self) -> DriveStatistics:
        """Counters of the index at :attr:`version`."""
        return DriveStatistics(self._version, self._files, len(self._problems))


class _BlobWriter:
    """Cuts a stream of chunks into blob blocks and appends them in batches."""

    def __init__(self, blobs: AppendLog) -> None:
        self._blobs = blobs
        self._hasher = hashlib.blake2b(digest_size=_HASH_BYTES)
        self._partial = bytearray()
        self._batch: list[bytes] = []
        self._start: int | None = None
        self._appended = 0
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._hasher.update(chunk)
        self._size += len(chunk)
        view = memoryview(chunk)
        if self._partial:
            taken = BLOCK_SIZE - len(self._partial)
            self._partial += view[:taken]
            view = view[taken:]
            if len(self._partial) < BLOCK_SIZE:
                return
            self._add(bytes(self._partial))
            self._partial.clear()
        while len(view) >= BLOCK_SIZE:
            self._add(bytes(view[:BLOCK_SIZE]))
            view = view[BLOCK_SIZE:]
        self._partial += view

    def finish(self) -> BlobRange:
        """Append what is left and return the range of everything written."""
        if self._partial:
            self._add(bytes(self._partial))
            self._partial.clear()
        self._flush()
        return BlobRange(0 if self._start is None else self._start, self._appended, self._size)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def _add(self, block: bytes) -> None:
        self._batch.append(block)
        if len(self._batch) >= _APPEND_BATCH_BLOCKS:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        new_length = self._blobs.append(self._batch)
        if self._start is None:
            self._start = new_length - len(self._batch)
        elif new_length != self._start + self._appended + len(self._batch):
            # Another writer appended in between: the file would not be one contiguous range.
            raise DriveError("the blob core was appended to by someone else during a put")
        self._appended += len(self._batch)
        self._batch.clear()


class Drive(ReadOnlyDrive):
    """A drive this process writes: both cores are :class:`AppendLog`.

    Each write is durable when it returns. Content goes to the blob core before the entry goes
    to the entry core, so a crash in between leaves unreferenced blocks, never an entry without
    its content.
    """

    def __init__(self, entries: AppendLog, blobs: AppendLog) -> None:
        self._entry_log = entries
        self._blob_log = blobs
        super().__init__(entries, blobs)

    def put(
        self,
        path: str,
        data: bytes | bytearray | memoryview,
        *,
        metadata: Mapping[str, str | int] | None = None,
    ) -> int:
        """Write ``data`` at ``path`` (replacing any earlier file there) and return the new
        version. :class:`ValueError` for an invalid path or metadata, before anything is
        written."""
        return self.put_chunks(path, [bytes(data)], metadata=metadata)

    def put_chunks(
        self,
        path: str,
        chunks: Iterable[bytes],
        *,
        metadata: Mapping[str, str | int] | None = None,
    ) -> int:
        """Like :meth:`put`, with the content given as chunks of any size, so a large file is
        written without holding it in memory. If ``chunks`` raises, the blocks written so far
        stay unreferenced in the blob core and the drive does not change."""
        check_path(path)
        frozen_metadata = _freeze_metadata(metadata)
        writer = _BlobWriter(self._blob_log)
        for chunk in chunks:
            writer.write(chunk)
        entry = PutEntry(path, writer.finish(), writer.hexdigest(), frozen_metadata)
        self._entry_log.append([encode_entry(entry)])
        return self.refresh()

    def delete(self, path: str) -> int:
        """Delete the file at ``path`` and return the new version; if there is no file there
        (never written, or already deleted) nothing is written and the version is unchanged."""
        check_path(path)
        latest = self._latest(path, self._version)
        if latest is None or latest[1] == _DELETE:
            return self._version
        self._entry_log.append([encode_entry(DeleteEntry(path))])
        return self.refresh()


# --- naming -------------------------------------------------------------------------------------


@attrs.frozen
class DriveCoreNames:
    """The core names of one drive, from which the core layer derives its key pairs."""

    entries: str
    blobs: str


def drive_core_names(drive: str) -> DriveCoreNames:
    """The core names of a drive: ``drive`` is a relay key (64 lowercase hex) for that relay's
    drive, or :data:`PFP_DRIVE` for the shared profile-picture drive. The names are
    ``drive/<drive>/entries`` and ``drive/<drive>/blobs``. :class:`ValueError` otherwise."""
    # Keys are derived from the exact name, so one drive must have exactly one spelling
    # (an upper-case relay key would silently name a different, empty drive).
    if drive != PFP_DRIVE and not _RELAY_KEY_RE.fullmatch(drive):
        raise ValueError(
            f"drive id must be a relay key (64 lowercase hex) or {PFP_DRIVE!r}, got {_show(drive)}"
        )
    return DriveCoreNames(entries=f"drive/{drive}/entries", blobs=f"drive/{drive}/blobs")
