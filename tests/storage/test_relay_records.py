"""The record codec of relay cores: the documented encoding, round trips, strict rejection."""

from __future__ import annotations

import json
import re

import pytest

from hypertuna.storage.relay_records import (
    MAX_RECORD_BYTES,
    AddWriter,
    EventRecord,
    RecordError,
    RemoveWriter,
    WriterRole,
    decode_record,
    encode_record,
)
from tests.storage.view_support import ALICE, forged

KEY = "ab" * 32


def test_encoding_is_the_documented_compact_json() -> None:
    event = ALICE.event(content="héllo", tags=[["t", "x"]])
    assert encode_record(AddWriter(KEY, WriterRole.GATEWAY)) == (
        b'{"v":1,"type":"add-writer","key":"' + KEY.encode() + b'","role":"gateway"}'
    )
    assert encode_record(RemoveWriter(KEY, 17)) == (
        b'{"v":1,"type":"remove-writer","key":"' + KEY.encode() + b'","at_length":17}'
    )
    block = encode_record(EventRecord(event))
    assert block == ('{"v":1,"type":"event","event":' + event.raw + "}").encode()
    assert "héllo".encode() in block  # UTF-8, not \u escapes


@pytest.mark.parametrize(
    "record",
    [
        AddWriter(KEY, WriterRole.WORKER),
        AddWriter(KEY, WriterRole.GATEWAY),
        RemoveWriter(KEY, 0),
        RemoveWriter(KEY, 2**63 - 1),
        EventRecord(ALICE.event(kind=30023, tags=[["d", "x"], ["e", "f" * 64]], content="é\n")),
    ],
)
def test_records_round_trip(record: AddWriter | RemoveWriter | EventRecord) -> None:
    decoded = decode_record(encode_record(record))
    assert decoded == record
    if isinstance(record, EventRecord):
        assert isinstance(decoded, EventRecord)
        assert decoded.event.raw == record.event.raw


def test_member_order_and_whitespace_do_not_matter() -> None:
    """What a worker written in another language may produce."""
    event = ALICE.event()
    text = json.dumps(
        {"event": json.loads(event.raw), "type": "event", "v": 1}, indent=2, ensure_ascii=True
    )
    assert decode_record(text.encode()) == EventRecord(event)
    text = f' {{ "role" : "worker", "key" : "{KEY}", "type":"add-writer", "v":1 }}\n'
    assert decode_record(text.encode()) == AddWriter(KEY, WriterRole.WORKER)


def _event_object() -> dict[str, object]:
    data: dict[str, object] = json.loads(ALICE.event(content="x").raw)
    return data


def _add(**changes: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "type": "add-writer", "key": KEY, "role": "worker"}
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def _remove(**changes: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "type": "remove-writer", "key": KEY, "at_length": 3}
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def _event(**changes: object) -> bytes:
    event = _event_object()
    event.update(changes)
    return json.dumps(
        {"v": 1, "type": "event", "event": {k: v for k, v in event.items() if v is not ...}}
    ).encode()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"\xef\xbb\xbf" + _add(), "byte order mark"),
        (b"[1]", "JSON object"),
        (
            b'{"v":1,"v":1,"type":"add-writer","key":"' + KEY.encode() + b'","role":"worker"}',
            "appears twice",
        ),
        (b'{"v":NaN}', "NaN"),
        (_add(v=2), "unsupported record version 2"),
        (_add(v="1"), "unsupported record version"),
        (_add(v=1.0), "unsupported record version"),
        (_add(v=True), "unsupported record version"),
        (_add(v=...), "unsupported record version"),
        (_add(type="rename-writer"), "unknown record type"),
        (_add(type=...), "unknown record type"),
        (_add(extra=1), "unknown members ['extra']"),
        (_add(role=...), "missing members ['role']"),
        (_add(role="owner"), "role must be one of"),
        (_add(role="WORKER"), "role must be one of"),
        (_add(key=KEY.upper()), "64 lowercase hex"),
        (_add(key=KEY[:-2]), "64 lowercase hex"),
        (_add(key=7), "64 lowercase hex"),
        (_remove(at_length=-1), "at_length"),
        (_remove(at_length=2**63), "at_length"),
        (_remove(at_length=3.0), "at_length"),
        (_remove(at_length="3"), "at_length"),
        (_remove(at_length=True), "at_length"),
        (_event(content=...), "missing members ['content']"),
        (_event(relay="wss://x"), "unknown members ['relay']"),
        (_event(content="changed"), "id does not match"),
        (_event(kind="1"), "kind"),
        (json.dumps({"v": 1, "type": "event", "event": [1]}).encode(), "JSON object"),
        (b'{"v":1,"type":"event","event":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
        (b" " * (MAX_RECORD_BYTES + 1), "larger than"),
    ],
)
def test_malformed_blocks_are_refused_with_a_reason(block: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=re.escape(message)):
        decode_record(block)


def test_a_wrong_signature_is_refused_unless_the_caller_checks_it_later() -> None:
    block = forged(ALICE.event(content="forged"))
    with pytest.raises(RecordError, match="bad signature"):
        decode_record(block)
    record = decode_record(block, verify_signature=False)
    assert isinstance(record, EventRecord)


def test_values_are_validated_when_built() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        AddWriter("AB" * 32, WriterRole.WORKER)
    with pytest.raises(ValueError, match="at_length"):
        RemoveWriter(KEY, -1)
    with pytest.raises(TypeError):
        AddWriter(KEY, "worker")  # type: ignore[arg-type]
