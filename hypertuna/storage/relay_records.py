"""The records a relay's cores hold: one record per block, version 1.

A relay is a set of cores (see :mod:`hypertuna.storage.relay_view`). Its *owner core* holds
all three record types below; every other writer core holds only ``event`` records.

Encoding (version 1)
--------------------

A block is one JSON object (RFC 8259) encoded as UTF-8, at most :data:`MAX_RECORD_BYTES`
bytes, without a byte order mark. It has a member ``"v"`` (the integer ``1``) and a member
``"type"`` naming one of three record types, and exactly the members listed for that type,
no others, each name at most once::

    {"v":1,"type":"event","event":{...}}
    {"v":1,"type":"add-writer","key":"<64 hex>","role":"worker"}
    {"v":1,"type":"remove-writer","key":"<64 hex>","at_length":17}

``event``
    ``event`` is a complete NIP-01 event object with exactly the members ``id``, ``pubkey``,
    ``created_at``, ``kind``, ``tags``, ``content`` and ``sig``: ``id`` the NIP-01 hash of its
    content and ``sig`` a valid BIP-340 signature of ``id`` by ``pubkey``. Ephemeral kinds
    (20000-29999) are well formed records but are never stored by a view.
``add-writer``
    Admits the core whose key is ``key`` (the 32-byte core key as 64 lowercase hex) as a writer
    of the relay, with ``role`` one of :class:`WriterRole` (``"worker"``: a worker's own
    core; ``"gateway"``: the gateway writer whose secret key is in escrow).
``remove-writer``
    Removes the writer ``key``; its blocks ``0 .. at_length - 1`` keep counting, later ones
    never count. ``at_length`` is an integer from 0 to 2**63 - 1 (JSON numbers without a
    fraction or exponent).

Integers are JSON integers (``1``, not ``1.0``, ``true`` or ``"1"``). Member order and
whitespace do not matter when decoding; :func:`encode_record` writes compact JSON (no
whitespace) with the members in the order shown and non-ASCII text unescaped, which is the
recommended form. Anything else (another version, an unknown type or member, a duplicate
member, a wrong type, invalid UTF-8, an event whose id or signature is wrong) is a
:class:`RecordError`; a view skips such blocks and reports them.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Final, TypeAlias

import attrs

from hypertuna.protocol.nostr.codec import parse_event
from hypertuna.protocol.nostr.errors import NostrError
from hypertuna.protocol.nostr.model import Event

__all__ = [
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "AddWriter",
    "EventRecord",
    "Record",
    "RecordError",
    "RemoveWriter",
    "WriterRole",
    "decode_record",
    "encode_record",
]

RECORD_VERSION: Final = 1
"""The record format this module reads and writes."""

MAX_RECORD_BYTES: Final = 512 * 1024
"""Largest block that decodes as a record."""

MAX_AT_LENGTH: Final = 2**63 - 1

_EVENT_MEMBERS: Final = frozenset({"id", "pubkey", "created_at", "kind", "tags", "content", "sig"})
_MEMBERS: Final = {
    "event": frozenset({"v", "type", "event"}),
    "add-writer": frozenset({"v", "type", "key", "role"}),
    "remove-writer": frozenset({"v", "type", "key", "at_length"}),
}
_ROLES: Final = frozenset(("worker", "gateway"))
_is_key = re.compile("[0-9a-f]{64}").fullmatch


class RecordError(Exception):
    """A block that is not a valid record; the text says what is wrong with it."""


class WriterRole(enum.StrEnum):
    """The roles a writer can be admitted with (a closed set)."""

    WORKER = "worker"
    GATEWAY = "gateway"


def _check_key(_instance: object, _attribute: object, value: str) -> None:
    if type(value) is not str or not _is_key(value):
        raise ValueError(f"writer key must be 64 lowercase hex characters, got {value!r}")


def _check_at_length(_instance: object, _attribute: object, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_AT_LENGTH:
        raise ValueError(f"at_length must be an integer from 0 to {MAX_AT_LENGTH}")


@attrs.frozen
class EventRecord:
    """A Nostr event appended to a core."""

    event: Event


@attrs.frozen
class AddWriter:
    """Admits the core ``key`` (64 lowercase hex) as a writer with ``role``."""

    key: str = attrs.field(validator=_check_key)
    role: WriterRole = attrs.field(validator=attrs.validators.instance_of(WriterRole))


@attrs.frozen
class RemoveWriter:
    """Removes the writer ``key``; only its blocks before ``at_length`` count."""

    key: str = attrs.field(validator=_check_key)
    at_length: int = attrs.field(validator=_check_at_length)


Record: TypeAlias = EventRecord | AddWriter | RemoveWriter

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_record(record: Record) -> bytes:
    """The version-1 block of ``record`` (compact UTF-8 JSON, members in documented order)."""
    match record:
        case EventRecord(event=event):
            # Event.raw is already the compact JSON of the event object.
            text = f'{{"v":{RECORD_VERSION},"type":"event","event":{event.raw}}}'
        case AddWriter(key=key, role=role):
            text = _encode({"v": RECORD_VERSION, "type": "add-writer", "key": key, "role": role})
        case RemoveWriter(key=key, at_length=at_length):
            text = _encode(
                {"v": RECORD_VERSION, "type": "remove-writer", "key": key, "at_length": at_length}
            )
    data = text.encode("utf-8")
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(data)} bytes is larger than {MAX_RECORD_BYTES}")
    return data


def _reject_constant(name: str) -> float:
    raise RecordError(f"JSON does not allow {name}")


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for name, value in pairs:
        if name in obj:
            raise RecordError(f"member {json.dumps(name)} appears twice")
        obj[name] = value
    return obj


_decode_json = json.JSONDecoder(
    object_pairs_hook=_unique_members, parse_constant=_reject_constant
).decode


def decode_record(block: bytes, *, verify_signature: bool = True) -> Record:
    """Decode one block strictly (module docstring). :class:`RecordError` for anything else.

    With ``verify_signature=False`` an event record is checked in full except for its
    signature, which the caller must then check with
    :func:`hypertuna.protocol.nostr.verify_signatures` before trusting the event.
    """
    if len(block) > MAX_RECORD_BYTES:
        raise RecordError(f"block of {len(block)} bytes is larger than {MAX_RECORD_BYTES}")
    try:
        text = bytes(block).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"block is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        raise RecordError("block starts with a byte order mark")
    try:
        obj = _decode_json(text)
    except ValueError as exc:  # JSONDecodeError, or an unsupported number
        raise RecordError(f"block is not JSON: {exc}") from None
    except RecursionError:
        raise RecordError("block is nested too deeply") from None
    if not isinstance(obj, dict):
        raise RecordError("record must be a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != RECORD_VERSION:
        raise RecordError(f'unsupported record version {_short(version)} (expected "v":1)')
    kind = obj.get("type")
    if type(kind) is not str or kind not in _MEMBERS:
        raise RecordError(f"unknown record type {_short(kind)}")
    _check_members(f"{kind} record", obj, _MEMBERS[kind])
    if kind == "event":
        return EventRecord(_decode_event(obj["event"], verify_signature))
    key = obj["key"]
    if type(key) is not str or not _is_key(key):
        raise RecordError(f"{kind} record: key must be 64 lowercase hex characters")
    if kind == "add-writer":
        role = obj["role"]
        if type(role) is not str or role not in _ROLES:
            raise RecordError(
                f"add-writer record: role must be one of {sorted(_ROLES)}, got {_short(role)}"
            )
        return AddWriter(key, WriterRole(role))
    at_length = obj["at_length"]
    if type(at_length) is not int or not 0 <= at_length <= MAX_AT_LENGTH:
        raise RecordError(
            f"remove-writer record: at_length must be an integer from 0 to {MAX_AT_LENGTH}"
        )
    return RemoveWriter(key, at_length)


def _decode_event(value: object, verify_signature: bool) -> Event:
    if not isinstance(value, dict):
        raise RecordError("event record: event must be a JSON object")
    _check_members("event record: event", value, _EVENT_MEMBERS)
    try:
        return parse_event(value, verify_signature=verify_signature)
    except NostrError as exc:
        raise RecordError(f"event record: {exc.text}") from None


def _check_members(what: str, obj: dict[str, object], expected: frozenset[str]) -> None:
    if obj.keys() == expected:
        return
    problems = []
    if missing := sorted(expected - obj.keys()):
        problems.append(f"missing members {missing}")
    if extra := sorted(obj.keys() - expected):
        problems.append(f"unknown members {extra}")
    raise RecordError(f"{what}: {', '.join(problems)}")


def _short(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else None
    if text is None:
        return f"of type {type(value).__name__}"
    return text if len(text) <= 40 else text[:40] + "..."
