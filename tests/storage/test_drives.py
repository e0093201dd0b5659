"""Drives over in-memory cores: the entry codec, reads at every version, reopening, followers,
and bad data reported per file (hypertuna.storage.drives)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypertuna.storage.cores import CoreCorruptError
from hypertuna.storage.drives import (
    BLOCK_SIZE,
    MAX_METADATA_BYTES,
    PFP_DRIVE,
    BlobRange,
    CorruptContentError,
    CorruptEntryError,
    DeleteEntry,
    Drive,
    DriveError,
    EntryDecodeError,
    MissingBlobsError,
    PutEntry,
    ReadOnlyDrive,
    check_path,
    decode_entry,
    drive_core_names,
    encode_entry,
)
from tests.storage.memory_log import MemoryLog

RELAY_KEY = "ab" * 32


def content(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def new_drive() -> tuple[Drive, MemoryLog, MemoryLog]:
    entries, blobs = MemoryLog("entries"), MemoryLog("blobs")
    return Drive(entries, blobs), entries, blobs


def leb128(value: int) -> bytes:
    """Unsigned LEB128, written here independently of the module under test."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def raw_put(
    path: bytes = b"/a",
    start: int = 0,
    blocks: int = 1,
    length: int = 1,
    digest: bytes = bytes(32),
    metadata: bytes = b"",
) -> bytes:
    """A put entry built field by field from the documented format."""
    return (
        b"\x01\x01"
        + leb128(len(path))
        + path
        + leb128(start)
        + leb128(blocks)
        + leb128(length)
        + digest
        + leb128(len(metadata))
        + metadata
    )


class CountingLog:
    """A read-only view of a log that counts block reads."""

    def __init__(self, log: MemoryLog) -> None:
        self._log = log
        self.reads = 0

    @property
    def key(self) -> bytes:
        return self._log.key

    @property
    def length(self) -> int:
        return self._log.length

    def get(self, index: int) -> bytes:
        self.reads += 1
        return self._log.get(index)


class TamperedLog(CountingLog):
    """A read-only view of a log whose chosen blocks are replaced, or fail verification."""

    def __init__(self, log: MemoryLog, replace: dict[int, bytes], corrupt: set[int]) -> None:
        super().__init__(log)
        self._replace = replace
        self._corrupt = corrupt

    def get(self, index: int) -> bytes:
        if index in self._corrupt:
            raise CoreCorruptError(f"block {index}")
        return self._replace.get(index, super().get(index))


class ForkedLog(CountingLog):
    """A read-only view of a log that can be cut short, as a core truncated by a fork."""

    cut: int | None = None

    @property
    def length(self) -> int:
        length = super().length
        return length if self.cut is None else min(self.cut, length)


class SnoopingLog(MemoryLog):
    """A blob log to which someone else appends one block between a put's batches."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.appends = 0

    def append(self, blocks: Sequence[bytes]) -> int:
        self.appends += 1
        if self.appends == 3:
            super().append([b"intruder"])
        return super().append(blocks)


# --- codec --------------------------------------------------------------------------------------


def test_put_entry_encoding_is_the_documented_format() -> None:
    entry = PutEntry("/a.png", BlobRange(3, 2, 70000), "cd" * 32, {"type": "image/png", "n": 3})
    expected = (
        bytes([1, 1])
        + bytes([6])
        + b"/a.png"
        + bytes([3, 2])
        + bytes.fromhex("f0a204")  # 70000
        + bytes.fromhex("cd" * 32)
        + bytes([26])
        + b'{"n":3,"type":"image/png"}'
    )
    assert encode_entry(entry) == expected
    assert decode_entry(expected) == entry


def test_delete_entry_encoding_is_the_documented_format() -> None:
    assert encode_entry(DeleteEntry("/dir/é")) == b"\x01\x02\x07/dir/\xc3\xa9"
    assert decode_entry(b"\x01\x02\x07/dir/\xc3\xa9") == DeleteEntry("/dir/é")


def test_empty_metadata_is_encoded_as_nothing() -> None:
    entry = PutEntry("/a", BlobRange(0, 0, 0), blake(b""))
    assert encode_entry(entry).endswith(bytes.fromhex(blake(b"")) + b"\x00")
    assert decode_entry(encode_entry(entry)).metadata == {}  # type: ignore[union-attr]


def test_every_proper_prefix_of_an_entry_is_rejected() -> None:
    block = encode_entry(PutEntry("/x", BlobRange(0, 1, 5), "00" * 32, {"k": "v"}))
    for end in range(len(block)):
        with pytest.raises(EntryDecodeError):
            decode_entry(block[:end])


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\x02\x02\x02/a", "unknown entry format version 2"),
        (b"\x01\x03\x02/a", "unknown entry kind 3"),
        (b"\x01\x02\x02/a\x00", "1 bytes follow the entry"),
        (raw_put() + b"\x00", "1 bytes follow the entry"),
        (b"\x01\x02\x82\x00/a", "not in its shortest varint form"),
        (raw_put(start=2**53), "larger than 2**53-1"),
        (raw_put(start=1 + 128 * (2**53)), "larger than 2**53-1"),
        (b"\x01\x02\x04/../", "'..' segment"),
        (b"\x01\x02\x02a/", "must start with '/'"),
        (b"\x01\x02\x02/\xff", "not valid UTF-8"),
        (raw_put(blocks=2, length=BLOCK_SIZE), "takes 1 blocks, not 2"),
        (raw_put(blocks=0, length=BLOCK_SIZE + 1), "takes 2 blocks, not 0"),
        (raw_put(start=5, blocks=0, length=0), "starts at block 0, not 5"),
        (raw_put(metadata=b"{}"), "not canonical"),
        (raw_put(metadata=b'{"n": 3}'), "not canonical"),
        (raw_put(metadata=b'{"t":"x","n":3}'), "not canonical"),
        (raw_put(metadata=b'{"n":3,"n":3}'), "not canonical"),
        (raw_put(metadata=b'{"a":"\\u00e9"}'), "not canonical"),
        (raw_put(metadata=b'{"n":1.0}'), "got float"),
        (raw_put(metadata=b'{"n":NaN}'), "got float"),
        (raw_put(metadata=b'{"n":true}'), "got bool"),
        (raw_put(metadata=b'{"n":null}'), "got NoneType"),
        (raw_put(metadata=b'{"n":{"m":1}}'), "got dict"),
        (raw_put(metadata=b"[1]"), "must be a JSON object"),
        (raw_put(metadata=b'{"n":9007199254740992}'), "outside"),
        (raw_put(metadata=b'{"":1}'), "non-empty strings"),
        (raw_put(metadata=b'{"a":"\xff"}'), "invalid"),
        (raw_put(metadata=b'{"a":"\\ud800"}'), "not valid Unicode"),
        (raw_put(metadata=b"[" * 3000), "nested too deeply"),
        (raw_put(metadata=b" " * (MAX_METADATA_BYTES + 1)), "longer than 4096 bytes"),
    ],
)
def test_strict_decoding(block: bytes, message: str) -> None:
    with pytest.raises(EntryDecodeError, match=re.escape(message)):
        decode_entry(block)


def test_raw_put_helper_builds_a_valid_entry() -> None:
    # The rejections above differ from this valid entry in one field only.
    assert decode_entry(raw_put()) == PutEntry("/a", BlobRange(0, 1, 1), "00" * 32)


@given(st.binary(max_size=80))
def test_any_block_decodes_to_its_only_encoding_or_is_rejected(block: bytes) -> None:
    try:
        entry = decode_entry(b"\x01" + block)
    except EntryDecodeError:
        return
    assert encode_entry(entry) == b"\x01" + block


metadata_values = st.one_of(
    st.text(max_size=8), st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
)


@given(
    path=st.lists(
        st.text(st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="/"))
        .filter(lambda s: s not in {"", ".", ".."})
        .map(lambda s: s[:50]),
        min_size=1,
        max_size=4,
    ).map(lambda segments: "/" + "/".join(segments)),
    start=st.integers(0, 2**40),
    size=st.integers(0, 2**40),
    digest=st.binary(min_size=32, max_size=32),
    metadata=st.dictionaries(st.text(min_size=1, max_size=8), metadata_values, max_size=5),
)
def test_put_entries_round_trip(
    path: str, start: int, size: int, digest: bytes, metadata: dict[str, str | int]
) -> None:
    blocks = -(-size // BLOCK_SIZE)
    entry = PutEntry(path, BlobRange(start if blocks else 0, blocks, size), digest.hex(), metadata)
    assert decode_entry(encode_entry(entry)) == entry


def test_entries_are_validated_when_built() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        PutEntry("/a", BlobRange(0, 0, 0), "AB" * 32)
    with pytest.raises(ValueError, match="takes 1 blocks"):
        BlobRange(0, 0, 1)
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        DeleteEntry("/a/..")


# --- paths, metadata and names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "must start with '/'"),
        ("a/b", "must start with '/'"),
        ("/", "not the root"),
        ("/a/", "empty segment"),
        ("//a", "empty segment"),
        ("/a//b", "empty segment"),
        ("/a/../b", "'..' segment"),
        ("/..", "'..' segment"),
        ("/./a", "'.' segment"),
        ("/a\x00b", "control character \\(NUL\\)"),
        ("/a\nb", "control character \\(U\\+000A\\)"),
        ("/a\x7f", "control character \\(U\\+007F\\)"),
        ("/\ud800", "not valid Unicode"),
        ("/" + "x" * 256, "segment is longer than 255"),
        ("/" + "/".join(["x" * 200] * 21), "longer than 4096"),
    ],
)
def test_invalid_paths_are_refused_before_anything_is_written(path: str, message: str) -> None:
    drive, entries, blobs = new_drive()
    with pytest.raises(ValueError, match=message):
        check_path(path)
    with pytest.raises(ValueError, match=message):
        drive.put(path, b"data")
    with pytest.raises(ValueError, match=message):
        drive.get(path)
    with pytest.raises(ValueError, match=message):
        drive.delete(path)
    assert (entries.length, blobs.length) == (0, 0)


@pytest.mark.parametrize(
    "path", ["/a", "/a/b.png", "/.hidden", "/a..b", "/é/ü 1", "/" + "x" * 255, "/a\\b"]
)
def test_valid_paths_are_kept_as_given(path: str) -> None:
    drive, _, _ = new_drive()
    assert check_path(path) == path
    drive.put(path, b"data")
    assert [entry.path for entry in drive.list()] == [path]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"": "x"}, "non-empty strings"),
        ({1: "x"}, "non-empty strings"),
        ({"a": 1.5}, "got float"),
        ({"a": True}, "got bool"),
        ({"a": None}, "got NoneType"),
        ({"a": [1]}, "got list"),
        ({"a": 2**53}, "outside"),
        ({"a": -(2**53)}, "outside"),
        ({"a": "\ud800"}, "not valid Unicode"),
        ({"a": "x" * MAX_METADATA_BYTES}, "more than 4096"),
    ],
)
def test_invalid_metadata_is_refused_before_anything_is_written(
    metadata: dict[object, object], message: str
) -> None:
    drive, entries, blobs = new_drive()
    with pytest.raises(ValueError, match=message):
        drive.put("/a", b"data", metadata=metadata)  # type: ignore[arg-type]
    assert (entries.length, blobs.length) == (0, 0)


def test_metadata_is_stored_read_only() -> None:
    drive, _, _ = new_drive()
    given_metadata: dict[str, str | int] = {
        "type": "image/png",
        "owner": "é",
        "width": 2**53 - 1,
        "skew": -(2**53 - 1),
    }
    drive.put("/a.png", b"png", metadata=given_metadata)
    given_metadata["type"] = "changed"
    entry = drive.stat("/a.png")
    assert entry is not None
    assert dict(entry.metadata) == {
        "type": "image/png",
        "owner": "é",
        "width": 2**53 - 1,
        "skew": -(2**53 - 1),
    }
    with pytest.raises(TypeError):
        entry.metadata["type"] = "x"  # type: ignore[index]


def test_drive_core_names() -> None:
    relay = drive_core_names(RELAY_KEY)
    assert (relay.entries, relay.blobs) == (
        f"drive/{RELAY_KEY}/entries",
        f"drive/{RELAY_KEY}/blobs",
    )
    pfp = drive_core_names(PFP_DRIVE)
    assert (pfp.entries, pfp.blobs) == ("drive/pfp/entries", "drive/pfp/blobs")
    for bad in [RELAY_KEY.upper(), RELAY_KEY[:-1], "", "PFP", "drive"]:
        with pytest.raises(ValueError, match="relay key"):
            drive_core_names(bad)


# --- writing and reading ------------------------------------------------------------------------


def test_put_get_delete() -> None:
    drive, entries, _ = new_drive()
    assert drive.version == 0
    assert drive.get("/a") is None
    assert drive.put("/a", b"hello", metadata={"type": "text/plain"}) == 1
    file = drive.get("/a")
    assert file is not None
    assert file.content == b"hello"
    assert file.entry == PutEntry("/a", BlobRange(0, 1, 5), blake(b"hello"), {"type": "text/plain"})
    assert file.entry.size == 5
    assert drive.stat("/a") == file.entry
    assert drive.delete("/a") == 2
    assert drive.get("/a") is None
    assert drive.stat("/a") is None
    assert drive.version == entries.length == 2


def test_delete_of_a_missing_file_writes_nothing() -> None:
    drive, entries, _ = new_drive()
    assert drive.delete("/nothing") == 0
    drive.put("/a", b"x")
    drive.delete("/a")
    assert drive.delete("/a") == 2
    assert entries.length == 2


def test_earlier_versions_after_overwrite_and_delete() -> None:
    drive, _, _ = new_drive()
    v1 = drive.put("/a", b"one", metadata={"n": 1})
    v2 = drive.put("/b", b"bee")
    v3 = drive.put("/a", b"two", metadata={"n": 2})
    v4 = drive.delete("/a")
    v5 = drive.put("/a", b"three")
    assert (v1, v2, v3, v4, v5) == (1, 2, 3, 4, 5)

    def read(version: int) -> tuple[bytes, dict[str, str | int]] | None:
        file = drive.get("/a", version)
        return None if file is None else (file.content, dict(file.entry.metadata))

    assert [read(version) for version in range(6)] == [
        None,
        (b"one", {"n": 1}),
        (b"one", {"n": 1}),
        (b"two", {"n": 2}),
        None,
        (b"three", {}),
    ]
    assert drive.get("/b", 1) is None
    assert drive.get("/b", 5) is not None
    assert [e.path for e in drive.list("/", 4)] == ["/b"]
    assert [e.path for e in drive.list("/", 3)] == ["/a", "/b"]


@pytest.mark.parametrize("version", [-1, 3])
def test_versions_outside_the_drive_are_refused(version: int) -> None:
    drive, _, _ = new_drive()
    drive.put("/a", b"x")
    drive.put("/b", b"y")
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        drive.get("/a", version)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        drive.list("/", version)


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536])
def test_block_boundaries(size: int) -> None:
    drive, _, blobs = new_drive()
    drive.put("/before", b"12345")  # the file under test does not start at block 0
    data = content(size, seed=size)
    drive.put("/f", data)
    blocks = -(-size // BLOCK_SIZE)
    entry = drive.stat("/f")
    assert entry is not None
    assert entry.blob == BlobRange(1 if blocks else 0, blocks, size)
    assert entry.hash == blake(data)
    assert blobs.length == 1 + blocks
    reader = drive.open_read("/f")
    assert reader is not None
    pieces = list(reader)
    assert b"".join(pieces) == data
    assert [len(piece) for piece in pieces] == [BLOCK_SIZE] * (size // BLOCK_SIZE) + (
        [size % BLOCK_SIZE] if size % BLOCK_SIZE else []
    )
    file = drive.get("/f")
    assert file is not None
    assert file.content == data


@pytest.mark.parametrize("chunk_size", [1000, BLOCK_SIZE, 70000, 5 * BLOCK_SIZE])
def test_put_chunks_writes_the_same_as_put(chunk_size: int) -> None:
    data = content(3 * BLOCK_SIZE + 123, seed=7)
    whole, whole_entries, whole_blobs = new_drive()
    chunked, chunked_entries, chunked_blobs = new_drive()
    whole.put("/f", data, metadata={"k": "v"})
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    chunked.put_chunks("/f", iter(chunks), metadata={"k": "v"})
    assert chunked_entries.get(0) == whole_entries.get(0)
    assert [chunked_blobs.get(i) for i in range(4)] == [whole_blobs.get(i) for i in range(4)]
    assert chunked_blobs.length == 4


def test_large_files_are_appended_in_batches_as_one_range() -> None:
    entries, blobs = MemoryLog("entries"), SnoopingLog("blobs")
    drive = Drive(entries, blobs)
    drive.put("/small", content(3 * BLOCK_SIZE))
    assert blobs.appends == 1
    with pytest.raises(DriveError, match="appended to by someone else"):
        drive.put("/big", content(20 * BLOCK_SIZE))
    assert blobs.appends == 3  # the first batch of 16 blocks, then the intruded one
    assert drive.stat("/big") is None
    assert drive.version == entries.length == 1


def test_a_failing_chunk_source_leaves_the_drive_unchanged() -> None:
    drive, entries, _ = new_drive()
    drive.put("/f", b"old")

    def chunks() -> Iterator[bytes]:
        yield content(40 * BLOCK_SIZE)
        raise OSError("upload interrupted")

    with pytest.raises(OSError, match="upload interrupted"):
        drive.put_chunks("/f", chunks())
    assert entries.length == drive.version == 1
    file = drive.get("/f")
    assert file is not None
    assert file.content == b"old"


def test_empty_file() -> None:
    drive, _, blobs = new_drive()
    drive.put("/x", b"abc")
    drive.put("/empty", b"", metadata={"type": "text/plain"})
    assert blobs.length == 1
    file = drive.get("/empty")
    assert file is not None
    assert file.content == b""
    assert file.entry.blob == BlobRange(0, 0, 0)
    assert file.entry.hash == blake(b"")
    reader = drive.open_read("/empty")
    assert reader is not None
    assert list(reader) == []


def test_list_returns_files_under_a_directory_sorted() -> None:
    drive, _, _ = new_drive()
    for path in ["/b", "/a/y/z", "/a", "/ab", "/a/x", "/a/gone", "/a-b"]:
        drive.put(path, path.encode())
    drive.delete("/a/gone")
    assert [e.path for e in drive.list()] == ["/a", "/a-b", "/a/x", "/a/y/z", "/ab", "/b"]
    assert [e.path for e in drive.list("/a")] == ["/a/x", "/a/y/z"]
    assert [e.path for e in drive.list("/a/")] == ["/a/x", "/a/y/z"]
    assert [e.path for e in drive.list("/a/y")] == ["/a/y/z"]
    assert [e.path for e in drive.list("/a", version=6)] == ["/a/gone", "/a/x", "/a/y/z"]
    assert drive.list("/nothing") == ()
    assert drive.list("/b") == ()
    with pytest.raises(ValueError, match="empty segment"):
        drive.list("//")
    with pytest.raises(ValueError, match="must start with '/'"):
        drive.list("a")


def test_reading_an_old_version_reads_one_entry_block() -> None:
    memory_entries, memory_blobs = MemoryLog("entries"), MemoryLog("blobs")
    writer = Drive(memory_entries, memory_blobs)
    for i in range(200):
        writer.put(f"/f{i % 7}", f"content {i}".encode())
    entries, blobs = CountingLog(memory_entries), CountingLog(memory_blobs)
    drive = ReadOnlyDrive(entries, blobs)
    assert entries.reads == 200  # opening scans each entry once
    entries.reads = 0
    file = drive.get("/f3", 100)
    assert file is not None
    assert file.content == b"content 94"
    assert (entries.reads, blobs.reads) == (1, 1)


def test_a_reopened_drive_has_the_same_state() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", content(70000, 1), metadata={"n": 1})
    drive.put("/b/c", b"c")
    drive.delete("/a")
    drive.put("/a", b"again")
    reopened = Drive(entries, blobs)
    assert reopened.version == 4
    assert reopened.statistics() == drive.statistics()
    for version in range(5):
        assert reopened.list("/", version) == drive.list("/", version)
        for path in ["/a", "/b/c"]:
            assert reopened.get(path, version) == drive.get(path, version)
    assert reopened.put("/d", b"d") == 5
    assert drive.refresh() == 5
    assert drive.get("/d") == reopened.get("/d")


def test_a_read_only_follower_sees_new_entries_after_refresh() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", b"one")
    follower = ReadOnlyDrive(entries, blobs)
    assert (follower.entries_key, follower.blobs_key) == (entries.key, blobs.key)
    drive.put("/a", b"two")
    drive.put("/b", b"bee")
    drive.delete("/a")
    file = follower.get("/a")
    assert file is not None
    assert file.content == b"one"
    assert follower.version == 1
    with pytest.raises(ValueError, match="call refresh"):
        follower.get("/a", 2)
    assert follower.refresh() == 4
    assert follower.get("/a") is None
    file = follower.get("/a", 2)
    assert file is not None
    assert file.content == b"two"
    assert [e.path for e in follower.list()] == ["/b"]
    assert follower.statistics().files == 1


def test_statistics_count_files_and_problems() -> None:
    drive, entries, _ = new_drive()
    drive.put("/a", b"a")
    drive.put("/a", b"aa")
    drive.put("/b", b"b")
    drive.delete("/b")
    entries.append([b"junk"])
    drive.refresh()
    stats = drive.statistics()
    assert (stats.version, stats.files, stats.problem_entries) == (5, 1, 1)


# --- bad data -----------------------------------------------------------------------------------


def test_an_undecodable_entry_does_not_stop_the_other_files() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", b"a")
    entries.append([b"\x07garbage"])
    drive.refresh()
    drive.put("/b", b"b")
    for view in [drive, ReadOnlyDrive(entries, blobs)]:
        assert view.version == 3
        assert [e.path for e in view.list()] == ["/a", "/b"]
        (problem,) = view.problems()
        assert (problem.index, problem.path) == (1, None)
        assert "unknown entry format version 7" in problem.reason


def test_a_broken_entry_of_a_known_path_is_reported_for_that_file() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", b"first")
    drive.put("/b", b"b")
    broken = encode_entry(PutEntry("/a", BlobRange(0, 1, 5), blake(b"x")))[:-3]
    entries.append([broken])
    follower = ReadOnlyDrive(entries, blobs)
    drive.refresh()
    for view in [drive, follower]:
        with pytest.raises(CorruptEntryError, match=r"/a \(drive entry 2\): entry ends inside"):
            view.get("/a")
        with pytest.raises(CorruptEntryError) as caught:
            view.stat("/a")
        assert (caught.value.path, caught.value.index) == ("/a", 2)
        old = view.get("/a", 2)
        assert old is not None
        assert old.content == b"first"
        assert [e.path for e in view.list()] == ["/b"]
        assert [(p.index, p.path) for p in view.problems()] == [(2, "/a")]
    # A delete is written even though the head is broken: it is how the file is cleared.
    assert drive.delete("/a") == 4
    assert drive.get("/a") is None


def test_a_blob_range_past_the_blob_core_is_reported_until_the_blobs_arrive() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/ok", b"ok")
    data = content(BLOCK_SIZE + 10, seed=3)
    entry = PutEntry("/late", BlobRange(1, 2, len(data)), blake(data))
    entries.append([encode_entry(entry)])
    mirror = ReadOnlyDrive(entries, blobs)
    assert mirror.stat("/late") == entry
    with pytest.raises(MissingBlobsError, match=r"blob blocks 1\.\.2 but the blob core has 1"):
        mirror.get("/late")
    with pytest.raises(MissingBlobsError):
        mirror.open_read("/late")
    ok = mirror.get("/ok")
    assert ok is not None
    assert ok.content == b"ok"
    blobs.append([data[:BLOCK_SIZE], data[BLOCK_SIZE:]])
    late = mirror.get("/late")
    assert late is not None
    assert late.content == data


def test_a_content_hash_mismatch_holds_back_the_last_block() -> None:
    drive, entries, blobs = new_drive()
    data = content(3 * BLOCK_SIZE, seed=4)
    drive.put("/f", data)
    drive.put("/g", b"fine")
    tampered_block = b"\x00" + data[1:BLOCK_SIZE]
    mirror = ReadOnlyDrive(entries, TamperedLog(blobs, {0: tampered_block}, set()))
    with pytest.raises(CorruptContentError, match=r"/f \(drive entry 0\): content hash is"):
        mirror.get("/f")
    reader = mirror.open_read("/f")
    assert reader is not None
    blocks = iter(reader)
    assert next(blocks) == tampered_block
    assert next(blocks) == data[BLOCK_SIZE : 2 * BLOCK_SIZE]
    with pytest.raises(CorruptContentError):
        next(blocks)
    g = mirror.get("/g")
    assert g is not None
    assert g.content == b"fine"


def test_an_entry_with_a_wrong_hash_is_detected() -> None:
    drive, entries, _ = new_drive()
    drive.put("/real", b"content")
    entries.append([encode_entry(PutEntry("/liar", BlobRange(0, 1, 7), blake(b"other!!")))])
    drive.refresh()
    with pytest.raises(CorruptContentError, match="content hash is"):
        drive.get("/liar")
    empty_liar = PutEntry("/empty", BlobRange(0, 0, 0), blake(b"not empty"))
    entries.append([encode_entry(empty_liar)])
    drive.refresh()
    with pytest.raises(CorruptContentError, match="content hash is"):
        drive.get("/empty")


@pytest.mark.parametrize(
    ("replace", "corrupt", "message"),
    [
        ({1: b"short"}, set(), "blob block 1 is 5 bytes, expected 65536"),
        ({2: b"x" * 11}, set(), "blob block 2 is 11 bytes, expected 10"),
        ({}, {1}, "blob block 1 fails verification"),
    ],
)
def test_bad_blob_blocks_are_detected(
    replace: dict[int, bytes], corrupt: set[int], message: str
) -> None:
    drive, entries, blobs = new_drive()
    drive.put("/f", content(2 * BLOCK_SIZE + 10))
    mirror = ReadOnlyDrive(entries, TamperedLog(blobs, replace, corrupt))
    with pytest.raises(CorruptContentError, match=message):
        mirror.get("/f")


def test_an_entry_block_failing_verification_is_a_problem_not_a_crash() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", b"a")
    drive.put("/b", b"b")
    drive.put("/c", b"c")
    mirror = ReadOnlyDrive(TamperedLog(entries, {}, {1}), blobs)
    assert mirror.version == 3
    assert [e.path for e in mirror.list()] == ["/a", "/c"]
    (problem,) = mirror.problems()
    assert (problem.index, problem.path) == (1, None)
    assert "fails verification" in problem.reason


def test_a_shrunk_entry_core_is_an_error() -> None:
    drive, entries, blobs = new_drive()
    drive.put("/a", b"a")
    drive.put("/b", b"b")
    forked = ForkedLog(entries)
    follower = ReadOnlyDrive(forked, blobs)
    forked.cut = 1
    with pytest.raises(DriveError, match="shrank from 2 to 1"):
        follower.refresh()


# --- against a model ----------------------------------------------------------------------------

PATHS = ["/a", "/a/b", "/a/c/d", "/b"]
SIZES = [0, 1, 100, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1]
METADATA: list[dict[str, str | int]] = [{}, {"type": "image/png"}, {"n": -5, "k": "v"}]

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(PATHS),
            st.sampled_from(SIZES),
            st.integers(0, 3),
            st.sampled_from(range(len(METADATA))),
        ),
        st.tuples(st.just("delete"), st.sampled_from(PATHS), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=12,
)

State = dict[str, tuple[bytes, dict[str, str | int]]]


def assert_matches(drive: ReadOnlyDrive, states: list[State]) -> None:
    assert drive.version == len(states) - 1
    for version, state in enumerate(states):
        assert [e.path for e in drive.list("/", version)] == sorted(state)
        assert [e.path for e in drive.list("/a", version)] == sorted(
            p for p in state if p.startswith("/a/")
        )
        for path in PATHS:
            file = drive.get(path, version)
            expected = state.get(path)
            if expected is None:
                assert file is None
            else:
                assert file is not None
                assert (file.content, dict(file.entry.metadata)) == expected


@settings(max_examples=60, deadline=None)
@given(operations)
def test_drive_agrees_with_a_dict_of_versions(
    ops: list[tuple[str, str, int, int, int]],
) -> None:
    drive, entries, blobs = new_drive()
    follower = ReadOnlyDrive(entries, blobs)
    states: list[State] = [{}]
    for op, path, size, seed, metadata_index in ops:
        state = dict(states[-1])
        if op == "put":
            data = content(size, seed)
            metadata = METADATA[metadata_index]
            state[path] = (data, metadata)
            assert drive.put(path, data, metadata=metadata) == len(states)
            states.append(state)
        else:
            changed = state.pop(path, None) is not None
            if changed:
                states.append(state)
            assert drive.delete(path) == len(states) - 1
    assert_matches(drive, states)
    follower.refresh()
    assert_matches(follower, states)
    assert_matches(Drive(entries, blobs), states)
