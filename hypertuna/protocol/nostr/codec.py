"""The NIP-01 codec: events, filters, and client and relay messages. Pure functions, no I/O.

Everything that comes off the wire is checked here; what leaves this module as an
:class:`~hypertuna.protocol.nostr.model.Event` or a message object is valid (shape, ranges, id
and BIP-340 signature). Every rejection is a :class:`~hypertuna.protocol.nostr.errors.NostrError`
with the ``invalid`` prefix and a text that names the offending field; nothing else escapes the
``parse_*`` functions, whatever the input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
import string
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import Final, NoReturn, TypeAlias, assert_never

import attrs
import coincurve

from hypertuna.protocol.nostr.errors import NostrError, Prefix, reason
from hypertuna.protocol.nostr.model import Event, Filter

__all__ = [
    "MAX_KIND",
    "MAX_TIMESTAMP",
    "AuthMessage",
    "ClientMessage",
    "CloseMessage",
    "CountMessage",
    "EventMessage",
    "NostrError",
    "Prefix",
    "RelayAuth",
    "RelayClosed",
    "RelayCount",
    "RelayEose",
    "RelayEvent",
    "RelayMessage",
    "RelayNotice",
    "RelayOk",
    "ReqMessage",
    "compute_event_id",
    "event_frame",
    "parse_client_message",
    "parse_event",
    "parse_filter",
    "parse_relay_message",
    "public_key_hex",
    "reason",
    "serialize_client_message",
    "serialize_event",
    "serialize_filter",
    "serialize_relay_message",
    "sign_event",
]

MAX_TIMESTAMP: Final = 2**63 - 1
"""Largest accepted ``created_at``, ``since``, ``until`` and ``limit``: it fits a signed 64-bit
column in both storage back ends (SQLite raises OverflowError beyond it)."""

MAX_KIND: Final = 65535

_is_hex64 = re.compile("[0-9a-f]{64}").fullmatch
_is_hex128 = re.compile("[0-9a-f]{128}").fullmatch
_TAG_LETTERS: Final = frozenset(string.ascii_letters)

# One encoder built once: ``json.dumps`` with non-default arguments builds a new encoder on every
# call, which is measurable on the hot path. Output is identical to
# ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``.
_encode_compact = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), check_circular=False
).encode


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"JSON does not allow {name}")


# Python's decoder accepts NaN, Infinity and -Infinity by default; JSON does not.
_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode


def _invalid(text: str, *, event_id: str | None = None, sub_id: str | None = None) -> NostrError:
    return NostrError(Prefix.INVALID, text, event_id=event_id, sub_id=sub_id)


def _quote(value: object) -> str:
    """A short, ASCII-only rendering of client-supplied text for an error message: the text may
    go back to the client, so it must stay bounded and encodable (no lone surrogates)."""
    if isinstance(value, str):
        if len(value) > 40:
            value = value[:40] + "..."
        return json.dumps(value)
    return f"of type {type(value).__name__}"


def _is_utf8_text(value: str) -> bool:
    """Whether ``value`` can be encoded as UTF-8, i.e. holds no lone surrogate (which a JSON
    ``\\ud800`` escape can produce, and which neither a WebSocket frame nor a database takes)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------------------- events


def compute_event_id(
    pubkey: str,
    created_at: int,
    kind: int,
    tags: Sequence[Sequence[str]],
    content: str,
) -> str:
    """The NIP-01 event id: lowercase hex SHA-256 of the UTF-8 compact JSON of
    ``[0, pubkey, created_at, kind, tags, content]`` (``ensure_ascii=False``).

    Raises NostrError(INVALID) when the text holds a lone surrogate and so has no UTF-8 form.
    """
    text = _encode_compact([0, pubkey, created_at, kind, [list(tag) for tag in tags], content])
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("event content or tags hold a lone surrogate (not valid unicode)") from None
    return hashlib.sha256(data).hexdigest()


def serialize_event(
    id: str,
    pubkey: str,
    created_at: int,
    kind: int,
    tags: Sequence[Sequence[str]],
    content: str,
    sig: str,
) -> str:
    """The canonical text of an event object, as :attr:`Event.raw` holds it: compact JSON, keys
    in NIP-01 order (id, pubkey, created_at, kind, tags, content, sig), ``ensure_ascii=False``."""
    tags_json = _encode_compact([list(tag) for tag in tags])
    return _raw_event(id, pubkey, created_at, kind, tags_json, encode_basestring(content), sig)


def _raw_event(
    event_id: str,
    pubkey: str,
    created_at: int,
    kind: int,
    tags_json: str,
    content_json: str,
    sig: str,
) -> str:
    # Hex strings need no escaping and ints print as JSON does, so plain formatting is exact.
    return (
        f'{{"id":"{event_id}","pubkey":"{pubkey}","created_at":{created_at},"kind":{kind},'
        f'"tags":{tags_json},"content":{content_json},"sig":"{sig}"}}'
    )


def _digest(
    pubkey: str,
    created_at: int,
    kind: int,
    tags_json: str,
    content_json: str,
    event_id: str | None,
) -> bytes:
    # Built from the already-encoded tags and content so that ``raw`` can reuse them: the compact
    # JSON of a list is exactly its encoded items joined by commas. A test pins this against
    # compute_event_id.
    text = f'[0,"{pubkey}",{created_at},{kind},{tags_json},{content_json}]'
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(
            "event content or tags hold a lone surrogate (not valid unicode)", event_id=event_id
        ) from None
    return hashlib.sha256(data).digest()


@functools.lru_cache(maxsize=4096)
def _x_only_key(pubkey: str) -> coincurve.PublicKeyXOnly | None:
    # Parsing a point costs about a sixth of a verification, and the same authors keep writing.
    try:
        return coincurve.PublicKeyXOnly(bytes.fromhex(pubkey))
    except ValueError:
        return None


def _event_field_error(
    obj: dict[object, object], name: str, text: str, event_id: str | None
) -> NostrError:
    label = "event id" if name == "id" else name
    if name not in obj:
        return _invalid(f"{label} is missing", event_id=event_id)
    return _invalid(f"{label} {text}", event_id=event_id)


def _created_at_error(obj: dict[object, object], value: object, event_id: str) -> NostrError:
    if type(value) is int:
        if value < 0:
            return _invalid("created_at must not be negative", event_id=event_id)
        return _invalid(f"created_at must be at most {MAX_TIMESTAMP}", event_id=event_id)
    return _event_field_error(obj, "created_at", "must be an integer", event_id)


def _is_tag_list(tags: list[object]) -> bool:
    for tag in tags:
        if type(tag) is not list:
            return False
        for value in tag:
            if type(value) is not str:
                return False
    return True


def parse_event(obj: object, *, verify_signature: bool = True) -> Event:
    """Validate a decoded JSON value as a NIP-01 event and return it.

    Checks, in order: the shape and type of every field (``id`` and ``pubkey`` 64 lowercase hex,
    ``sig`` 128 lowercase hex, ``created_at`` an integer in 0..2**63-1, ``kind`` an integer in
    0..65535, ``tags`` a list of lists of strings, ``content`` a string; booleans and floats are
    not integers), then that ``id`` is the hash of the content, then the BIP-340 signature.
    Unknown keys are ignored and left out of ``raw``.

    Raises NostrError(INVALID) naming the field; its ``event_id`` is set whenever ``id`` itself
    was well formed.

    With ``verify_signature=False`` everything but the signature is checked; the caller must
    then check it with :func:`verify_signatures` before trusting the event (the relay edge does
    so in batches on a worker thread, off the event loop).
    """
    if not isinstance(obj, dict):
        raise _invalid("event must be a JSON object")
    event_id = obj.get("id")
    if type(event_id) is not str or _is_hex64(event_id) is None:
        raise _event_field_error(obj, "id", "must be 64 lowercase hex characters", None)
    pubkey = obj.get("pubkey")
    if type(pubkey) is not str or _is_hex64(pubkey) is None:
        raise _event_field_error(obj, "pubkey", "must be 64 lowercase hex characters", event_id)
    created_at = obj.get("created_at")
    if type(created_at) is not int or not 0 <= created_at <= MAX_TIMESTAMP:
        raise _created_at_error(obj, created_at, event_id)
    kind = obj.get("kind")
    if type(kind) is not int or not 0 <= kind <= MAX_KIND:
        raise _event_field_error(obj, "kind", f"must be an integer from 0 to {MAX_KIND}", event_id)
    tags = obj.get("tags")
    if type(tags) is not list or not _is_tag_list(tags):
        raise _event_field_error(obj, "tags", "must be a list of lists of strings", event_id)
    content = obj.get("content")
    if type(content) is not str:
        raise _event_field_error(obj, "content", "must be a string", event_id)
    sig = obj.get("sig")
    if type(sig) is not str or _is_hex128(sig) is None:
        raise _event_field_error(obj, "sig", "must be 128 lowercase hex characters", event_id)

    tags_json = _encode_compact(tags)
    content_json = encode_basestring(content)
    digest = _digest(pubkey, created_at, kind, tags_json, content_json, event_id)
    if digest != bytes.fromhex(event_id):
        raise _invalid("event id does not match its content", event_id=event_id)
    if verify_signature and not _signature_ok(pubkey, sig, digest):
        raise _invalid("bad signature", event_id=event_id)
    return Event(
        id=event_id,
        pubkey=pubkey,
        created_at=created_at,
        kind=kind,
        tags=tuple([tuple(tag) for tag in tags]),
        content=content,
        sig=sig,
        raw=_raw_event(event_id, pubkey, created_at, kind, tags_json, content_json, sig),
    )


def _signature_ok(pubkey: str, sig: str, digest: bytes) -> bool:
    key = _x_only_key(pubkey)
    # An x coordinate that is not on the curve can sign nothing: same answer as a wrong signature.
    return key is not None and key.verify(bytes.fromhex(sig), digest)


def verify_signatures(events: Sequence[Event]) -> list[bool]:
    """Check the BIP-340 signature of each event (whose id is already known to match its
    content). Safe to call from a worker thread: the curve arithmetic runs without the GIL."""
    return [_signature_ok(e.pubkey, e.sig, bytes.fromhex(e.id)) for e in events]


def _checked_tag_lists(tags: Sequence[Sequence[str]]) -> list[list[str]]:
    # A str is itself a Sequence[str], so a missing level of nesting would type-check; refuse it.
    if not isinstance(tags, list | tuple) or not all(
        isinstance(tag, list | tuple) and all(type(value) is str for value in tag) for tag in tags
    ):
        raise _invalid("tags must be a list of lists of strings")
    return [list(tag) for tag in tags]


def public_key_hex(secret_key: bytes) -> str:
    """The x-only (BIP-340) public key of a 32-byte secp256k1 secret key, as 64 lowercase hex.

    Raises ValueError when the secret key is not a valid scalar."""
    return coincurve.PrivateKey(secret_key).public_key_xonly.format().hex()


def sign_event(
    secret_key: bytes,
    *,
    created_at: int,
    kind: int,
    tags: Sequence[Sequence[str]] = (),
    content: str = "",
) -> Event:
    """Build and sign (BIP-340, fresh auxiliary randomness) an event that :func:`parse_event`
    accepts.

    Raises NostrError(INVALID) when the fields could not form a valid event (out-of-range
    ``created_at`` or ``kind``, malformed tags, lone surrogates) and ValueError for a bad key.
    """
    key = coincurve.PrivateKey(secret_key)
    pubkey = key.public_key_xonly.format().hex()
    if type(created_at) is not int or not 0 <= created_at <= MAX_TIMESTAMP:
        raise _invalid(f"created_at must be an integer from 0 to {MAX_TIMESTAMP}")
    if type(kind) is not int or not 0 <= kind <= MAX_KIND:
        raise _invalid(f"kind must be an integer from 0 to {MAX_KIND}")
    if type(content) is not str:
        raise _invalid("content must be a string")
    tag_lists = _checked_tag_lists(tags)
    tags_json = _encode_compact(tag_lists)
    content_json = encode_basestring(content)
    digest = _digest(pubkey, created_at, kind, tags_json, content_json, None)
    event_id = digest.hex()
    sig = key.sign_schnorr(digest).hex()
    return Event(
        id=event_id,
        pubkey=pubkey,
        created_at=created_at,
        kind=kind,
        tags=tuple([tuple(tag) for tag in tag_lists]),
        content=content,
        sig=sig,
        raw=_raw_event(event_id, pubkey, created_at, kind, tags_json, content_json, sig),
    )


# -------------------------------------------------------------------------------------- filters


def _checked_list(name: str, value: object, what: str, max_values: int) -> list[object]:
    if type(value) is not list:
        raise _invalid(f'filter "{name}" must be a list of {what}')
    # Length first: a huge list is refused without walking it.
    if len(value) > max_values:
        raise _invalid(f'filter "{name}" has more than {max_values} values')
    return value


def _hex_set(name: str, value: object, max_values: int) -> frozenset[str]:
    what = "64-character lowercase hex strings"
    items = _checked_list(name, value, what, max_values)
    checked: list[str] = []
    for item in items:
        if type(item) is not str or _is_hex64(item) is None:
            raise _invalid(f'filter "{name}" must be a list of {what}')
        checked.append(item)
    return frozenset(checked)


def _kind_set(value: object, max_values: int) -> frozenset[int]:
    what = f"integers from 0 to {MAX_KIND}"
    items = _checked_list("kinds", value, what, max_values)
    checked: list[int] = []
    for item in items:
        if type(item) is not int or not 0 <= item <= MAX_KIND:
            raise _invalid(f'filter "kinds" must be a list of {what}')
        checked.append(item)
    return frozenset(checked)


def _string_set(name: str, value: object, max_values: int) -> frozenset[str]:
    items = _checked_list(name, value, "strings", max_values)
    checked: list[str] = []
    for item in items:
        if type(item) is not str or not _is_utf8_text(item):
            raise _invalid(f'filter "{name}" must be a list of strings')
        checked.append(item)
    return frozenset(checked)


def _bound(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TIMESTAMP:
        raise _invalid(f'filter "{name}" must be an integer from 0 to {MAX_TIMESTAMP}')
    return value


def parse_filter(obj: object, *, max_values: int = 1000) -> Filter:
    """Validate a decoded JSON value as a NIP-01 filter.

    Accepted keys: ``ids`` and ``authors`` (exact 64 lowercase hex, no prefixes), ``kinds``
    (integers 0..65535), ``since``, ``until`` and ``limit`` (integers 0..2**63-1; ``limit: 0``
    asks for live events only), and ``#x`` for one ASCII letter ``x`` (strings). Booleans are
    not integers. Any other key, or a list longer than ``max_values``, raises NostrError(INVALID).
    """
    if not isinstance(obj, dict):
        raise _invalid("filter must be a JSON object")
    ids: frozenset[str] | None = None
    authors: frozenset[str] | None = None
    kinds: frozenset[int] | None = None
    since: int | None = None
    until: int | None = None
    limit: int | None = None
    tags: list[tuple[str, frozenset[str]]] = []
    for key, value in obj.items():
        if key == "ids":
            ids = _hex_set(key, value, max_values)
        elif key == "authors":
            authors = _hex_set(key, value, max_values)
        elif key == "kinds":
            kinds = _kind_set(value, max_values)
        elif key == "since":
            since = _bound(key, value)
        elif key == "until":
            until = _bound(key, value)
        elif key == "limit":
            limit = _bound(key, value)
        elif type(key) is str and len(key) == 2 and key[0] == "#" and key[1] in _TAG_LETTERS:
            tags.append((key[1], _string_set(key, value, max_values)))
        else:
            raise _invalid(f"unsupported filter field {_quote(key)}")
    tags.sort(key=operator.itemgetter(0))
    return Filter(
        ids=ids,
        authors=authors,
        kinds=kinds,
        tags=tuple(tags),
        since=since,
        until=until,
        limit=limit,
    )


def serialize_filter(f: Filter) -> dict[str, object]:
    """The JSON object form of a filter, the inverse of :func:`parse_filter`: absent conditions
    are omitted and value lists are sorted so the output is deterministic."""
    out: dict[str, object] = {}
    if f.ids is not None:
        out["ids"] = sorted(f.ids)
    if f.authors is not None:
        out["authors"] = sorted(f.authors)
    if f.kinds is not None:
        out["kinds"] = sorted(f.kinds)
    for letter, values in f.tags:
        out["#" + letter] = sorted(values)
    if f.since is not None:
        out["since"] = f.since
    if f.until is not None:
        out["until"] = f.until
    if f.limit is not None:
        out["limit"] = f.limit
    return out


# ------------------------------------------------------------------------------------- messages
# Message objects are built by the parse functions below (which validate) or by the relay's own
# code from already-valid parts, so they carry no validators of their own: they sit on the
# per-delivery path.


@attrs.frozen(slots=True)
class EventMessage:
    """Client ``["EVENT", <event>]``: publish an event."""

    event: Event


@attrs.frozen(slots=True)
class ReqMessage:
    """Client ``["REQ", <sub_id>, <filter>, ...]``: stored events, ``EOSE``, then live ones."""

    sub_id: str
    filters: tuple[Filter, ...]


@attrs.frozen(slots=True)
class CloseMessage:
    """Client ``["CLOSE", <sub_id>]``: end a subscription."""

    sub_id: str


@attrs.frozen(slots=True)
class CountMessage:
    """Client ``["COUNT", <sub_id>, <filter>, ...]`` (NIP-45): how many events match."""

    sub_id: str
    filters: tuple[Filter, ...]


@attrs.frozen(slots=True)
class AuthMessage:
    """Client ``["AUTH", <event>]`` (NIP-42): a signed answer to the relay's challenge. Its kind,
    tags and age are checked by whoever holds the challenge, not here."""

    event: Event


ClientMessage: TypeAlias = EventMessage | ReqMessage | CloseMessage | CountMessage | AuthMessage


@attrs.frozen(slots=True)
class RelayEvent:
    """Relay ``["EVENT", <sub_id>, <event>]``."""

    sub_id: str
    event: Event


@attrs.frozen(slots=True)
class RelayOk:
    """Relay ``["OK", <event_id>, <accepted>, <message>]``; ``message`` is a prefixed reason
    (see :func:`reason`) when ``accepted`` is false."""

    event_id: str
    accepted: bool
    message: str


@attrs.frozen(slots=True)
class RelayEose:
    """Relay ``["EOSE", <sub_id>]``: the stored events have all been sent."""

    sub_id: str


@attrs.frozen(slots=True)
class RelayClosed:
    """Relay ``["CLOSED", <sub_id>, <message>]``: the relay ended a subscription."""

    sub_id: str
    message: str


@attrs.frozen(slots=True)
class RelayNotice:
    """Relay ``["NOTICE", <message>]``: human-readable information."""

    message: str


@attrs.frozen(slots=True)
class RelayCount:
    """Relay ``["COUNT", <sub_id>, {"count": <count>}]`` (NIP-45)."""

    sub_id: str
    count: int


@attrs.frozen(slots=True)
class RelayAuth:
    """Relay ``["AUTH", <challenge>]`` (NIP-42)."""

    challenge: str


RelayMessage: TypeAlias = (
    RelayEvent | RelayOk | RelayEose | RelayClosed | RelayNotice | RelayCount | RelayAuth
)


def _decode_array(text: str | bytes) -> list[object]:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("message is not valid UTF-8") from None
    try:
        value = _decode_json(text)
    except (ValueError, RecursionError):
        # ValueError covers syntax errors, NaN/Infinity and integers too long to convert;
        # RecursionError, nesting deeper than the interpreter allows.
        raise _invalid("malformed JSON") from None
    if type(value) is not list or not value:
        raise _invalid("message must be a non-empty JSON array")
    if type(value[0]) is not str:
        raise _invalid("message type must be a string")
    return value


def _client_sub_id(message: list[object], verb: str, max_length: int) -> str:
    if len(message) < 2:
        raise _invalid(f"{verb} message has no subscription id")
    sub_id = message[1]
    if type(sub_id) is not str or not 1 <= len(sub_id) <= max_length or not _is_utf8_text(sub_id):
        raise _invalid(f"subscription id must be a string of 1 to {max_length} characters")
    return sub_id


def _parse_filters(
    message: list[object],
    verb: str,
    sub_id: str,
    max_filters: int | None,
    max_filter_values: int,
) -> tuple[Filter, ...]:
    raw_filters = message[2:]
    if not raw_filters:
        raise _invalid(f"{verb} message needs at least one filter", sub_id=sub_id)
    if max_filters is not None and len(raw_filters) > max_filters:
        raise _invalid(f"too many filters (at most {max_filters})", sub_id=sub_id)
    try:
        return tuple([parse_filter(obj, max_values=max_filter_values) for obj in raw_filters])
    except NostrError as err:
        err.sub_id = sub_id
        raise


def parse_client_message(
    text: str | bytes,
    *,
    max_sub_id_length: int = 64,
    max_filters: int | None = None,
    max_filter_values: int = 1000,
    verify_signature: bool = True,
) -> ClientMessage:
    """Parse one client frame (NIP-01 ``EVENT``, ``REQ``, ``CLOSE``; NIP-45 ``COUNT``; NIP-42
    ``AUTH``), verifying any event in it (its signature only when ``verify_signature``; see
    :func:`parse_event`).

    Raises NostrError(INVALID) for anything else: bad UTF-8 or JSON (including NaN and
    Infinity), an unknown type, a wrong number or type of elements, a subscription id that is
    not 1..``max_sub_id_length`` characters, no filter or more than ``max_filters``, a bad
    filter or event. ``sub_id`` is set on the error once the subscription id was valid;
    ``event_id`` once an ``EVENT``'s or ``AUTH``'s event id was well formed (both are answered
    with ``OK``).
    """
    message = _decode_array(text)
    verb = message[0]
    if verb == "EVENT" or verb == "AUTH":
        if len(message) != 2:
            raise _invalid(f'{verb} message must be ["{verb}", <event>]')
        event = parse_event(message[1], verify_signature=verify_signature)
        return EventMessage(event) if verb == "EVENT" else AuthMessage(event)
    if verb == "REQ" or verb == "COUNT":
        sub_id = _client_sub_id(message, verb, max_sub_id_length)
        filters = _parse_filters(message, verb, sub_id, max_filters, max_filter_values)
        return ReqMessage(sub_id, filters) if verb == "REQ" else CountMessage(sub_id, filters)
    if verb == "CLOSE":
        sub_id = _client_sub_id(message, verb, max_sub_id_length)
        if len(message) != 2:
            raise _invalid('CLOSE message must be ["CLOSE", <subscription id>]', sub_id=sub_id)
        return CloseMessage(sub_id)
    raise _invalid(f"unknown message type {_quote(verb)}")


def serialize_client_message(msg: ClientMessage) -> str:
    """The compact JSON text of a client message (``ensure_ascii=False``); events are spliced
    in from their ``raw`` text."""
    match msg:
        case EventMessage(event=event):
            return '["EVENT",' + event.raw + "]"
        case AuthMessage(event=event):
            return '["AUTH",' + event.raw + "]"
        case ReqMessage(sub_id=sub_id, filters=filters):
            return _encode_compact(["REQ", sub_id, *[serialize_filter(f) for f in filters]])
        case CountMessage(sub_id=sub_id, filters=filters):
            return _encode_compact(["COUNT", sub_id, *[serialize_filter(f) for f in filters]])
        case CloseMessage(sub_id=sub_id):
            return _encode_compact(["CLOSE", sub_id])
        case _:
            assert_never(msg)


def event_frame(sub_id: str, raw: str) -> str:
    """``["EVENT", <sub_id>, <event>]`` with the event's ``raw`` text spliced in, not re-encoded:
    one event fans out to many subscriptions at the cost of a string concatenation each."""
    return '["EVENT",' + encode_basestring(sub_id) + "," + raw + "]"


def serialize_relay_message(msg: RelayMessage) -> str:
    """The compact JSON text of a relay message (``ensure_ascii=False``)."""
    match msg:
        case RelayEvent(sub_id=sub_id, event=event):
            return event_frame(sub_id, event.raw)
        case RelayOk(event_id=event_id, accepted=accepted, message=message):
            return _encode_compact(["OK", event_id, accepted, message])
        case RelayEose(sub_id=sub_id):
            return _encode_compact(["EOSE", sub_id])
        case RelayClosed(sub_id=sub_id, message=message):
            return _encode_compact(["CLOSED", sub_id, message])
        case RelayNotice(message=message):
            return _encode_compact(["NOTICE", message])
        case RelayCount(sub_id=sub_id, count=count):
            return _encode_compact(["COUNT", sub_id, {"count": count}])
        case RelayAuth(challenge=challenge):
            return _encode_compact(["AUTH", challenge])
        case _:
            assert_never(msg)


def _relay_arity(message: list[object], verb: str, length: int, shape: str) -> None:
    if len(message) != length:
        raise _invalid(f'{verb} message must be ["{verb}", {shape}]')


def _relay_text(value: object, what: str) -> str:
    if type(value) is not str:
        raise _invalid(f"{what} must be a string")
    return value


def _relay_sub_id(value: object) -> str:
    if type(value) is not str or not value:
        raise _invalid("subscription id must be a non-empty string")
    return value


def parse_relay_message(text: str | bytes) -> RelayMessage:
    """Parse one relay frame (``EVENT``, ``OK``, ``EOSE``, ``CLOSED``, ``NOTICE``, ``COUNT``,
    ``AUTH``), verifying any event in it with :func:`parse_event`.

    Raises NostrError(INVALID) for malformed JSON, an unknown type, or elements of the wrong
    number or type. ``COUNT`` keys other than ``count`` (such as ``approximate``) are ignored.
    """
    message = _decode_array(text)
    verb = message[0]
    if verb == "EVENT":
        _relay_arity(message, verb, 3, "<subscription id>, <event>")
        return RelayEvent(_relay_sub_id(message[1]), parse_event(message[2]))
    if verb == "OK":
        _relay_arity(message, verb, 4, "<event id>, <accepted>, <message>")
        event_id, accepted = message[1], message[2]
        if type(event_id) is not str or _is_hex64(event_id) is None:
            raise _invalid("OK event id must be 64 lowercase hex characters")
        if type(accepted) is not bool:
            raise _invalid("OK accepted flag must be true or false")
        return RelayOk(event_id, accepted, _relay_text(message[3], "OK message"))
    if verb == "EOSE":
        _relay_arity(message, verb, 2, "<subscription id>")
        return RelayEose(_relay_sub_id(message[1]))
    if verb == "CLOSED":
        _relay_arity(message, verb, 3, "<subscription id>, <message>")
        sub_id = _relay_sub_id(message[1])
        return RelayClosed(sub_id, _relay_text(message[2], "CLOSED message"))
    if verb == "NOTICE":
        _relay_arity(message, verb, 2, "<message>")
        return RelayNotice(_relay_text(message[1], "NOTICE message"))
    if verb == "COUNT":
        _relay_arity(message, verb, 3, '<subscription id>, {"count": <count>}')
        sub_id = _relay_sub_id(message[1])
        payload = message[2]
        count = payload.get("count") if isinstance(payload, dict) else None
        if type(count) is not int or count < 0:
            raise _invalid('COUNT result must be {"count": <non-negative integer>}')
        return RelayCount(sub_id, count)
    if verb == "AUTH":
        _relay_arity(message, verb, 2, "<challenge>")
        return RelayAuth(_relay_text(message[1], "AUTH challenge"))
    raise _invalid(f"unknown message type {_quote(verb)}")
