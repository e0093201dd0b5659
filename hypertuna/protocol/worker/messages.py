"""Message classes, codec and signatures of the worker control protocol (see the package
docstring for the conversation)."""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import nacl.exceptions
import nacl.signing

from hypertuna.storage.cores.crypto import Manifest

__all__ = [
    "AGENT_MAX",
    "HELLO_CONTEXT",
    "MAX_FRAMES_PER_MESSAGE",
    "PROTOCOL_VERSION",
    "STATEMENT_CONTEXT",
    "Ack",
    "Challenge",
    "ClientFrames",
    "ErrorCode",
    "ErrorMessage",
    "Heartbeat",
    "Hello",
    "Message",
    "MirrorRequest",
    "MirrorStatus",
    "MirrorUpdate",
    "PendingWrites",
    "PendingWritesAck",
    "ProtocolError",
    "RelayAction",
    "RelayFrames",
    "RelayRegister",
    "RelayStatement",
    "SessionClose",
    "SessionOpen",
    "SessionReady",
    "SessionRefused",
    "Welcome",
    "binary_size",
    "decode",
    "encode",
    "encode_binary",
    "hello_signable",
    "owner_relay_key",
    "sign_hello",
    "sign_statement",
    "statement_signable",
    "verify_hello",
    "verify_statement",
]

PROTOCOL_VERSION: Final = 1
HELLO_CONTEXT: Final = b"hypertuna-worker-hello-v1\x00"
STATEMENT_CONTEXT: Final = b"hypertuna-relay-statement-v1\x00"
AGENT_MAX: Final = 128
MAX_FRAMES_PER_MESSAGE: Final = 1024
_MAX_SAFE_INT: Final = 2**53 - 1
_MAX_TEXT: Final = 4096
_MAX_BLOCKS: Final = 4096
_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{128}")
_NAME = re.compile(r"[a-z0-9-]{1,64}")


class ErrorCode(enum.StrEnum):
    """Why a message was refused (``error.code``)."""

    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown-type"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNEXPECTED = "unexpected"
    """Valid, but not allowed now (before the handshake, or from the wrong side)."""
    UNAUTHORIZED = "unauthorized"
    REPLAYED = "replayed"
    CONFLICT = "conflict"
    NOT_FOUND = "not-found"
    NOT_IMPLEMENTED = "not-implemented"
    INTERNAL = "internal"
    VERIFICATION_FAILED = "verification-failed"
    """Mirror blocks or signature that do not verify against the core key (or a fork that
    goes back, or rewrites blocks without a signed truncation)."""
    QUOTA_EXCEEDED = "quota-exceeded"
    TOO_LARGE = "too-large"


class ProtocolError(Exception):
    """A frame that is not a valid message; ``code`` says which :class:`ErrorCode` to answer,
    ``request_id`` the ``id`` of the request when it could be read."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class RelayAction(enum.StrEnum):
    REGISTER = "register"
    UPDATE = "update"
    REMOVE = "remove"


# -- field readers ------------------------------------------------------------------------------


def _malformed(text: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED, text)


def _int(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_SAFE_INT:
        raise _malformed(f"{name} must be an integer from 0 to 2^53-1")
    return value


def _hex32(value: object, name: str) -> str:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise _malformed(f"{name} must be 64 lowercase hex characters")
    return value


def _hex64(value: object, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise _malformed(f"{name} must be 128 lowercase hex characters")
    return value


def _text(value: object, name: str, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _malformed(f"{name} must be a string of at most {limit} characters")
    return value


def _name(value: object, name: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or _HEX32.fullmatch(value):
        raise _malformed(f"{name} must match [a-z0-9-]{{1,64}} and not look like a key")
    return value


def _frames(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_FRAMES_PER_MESSAGE:
        raise _malformed(f"{name} must be a list of 1 to {MAX_FRAMES_PER_MESSAGE} strings")
    if not all(isinstance(item, str) for item in value):
        raise _malformed(f"{name} must hold only strings")
    return tuple(value)


def _blocks(value: object, name: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or len(value) > _MAX_BLOCKS:
        raise _malformed(f"{name} must be a list of at most {_MAX_BLOCKS} base64 strings")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise _malformed(f"{name} must hold base64 strings")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise _malformed(f"{name} holds invalid base64") from None
    return tuple(out)


def _hex_bytes(value: object, name: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit or len(value) % 2:
        raise _malformed(f"{name} must be hex of at most {limit} bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _malformed(f"{name} must be hex") from None


def _meta(value: object, name: str) -> Mapping[str, str | int | bool]:
    if not isinstance(value, dict) or len(value) > 32:
        raise _malformed(f"{name} must be an object of at most 32 members")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str | int | bool) or isinstance(item, float):
            raise _malformed(f"{name} members must be short names with string/int/bool values")
        if isinstance(item, str) and len(item) > 1024:
            raise _malformed(f"{name}.{key} is too long")
    return dict(value)


def _optional(reader: Callable[[object, str], Any]) -> Callable[[object, str], Any]:
    def read(value: object, name: str) -> Any:
        return None if value is None else reader(value, name)

    return read


def _enum(kind: type[enum.StrEnum]) -> Callable[[object, str], Any]:
    def read(value: object, name: str) -> Any:
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            return kind(value)
        except ValueError:
            allowed = ", ".join(member.value for member in kind)
            raise _malformed(f"{name} must be one of {allowed}") from None

    return read


def _kinds(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > 8:
        raise _malformed(f"{name} must be a list of 1 to 8 kinds")
    if not all(isinstance(item, str) and item in ("autobase", "drive") for item in value):
        raise _malformed(f"{name} must hold 'autobase' and/or 'drive'")
    return tuple(value)


# -- messages -----------------------------------------------------------------------------------

# Each message class lists its JSON members and how to read them; encode writes them back in the
# same form. Members not listed are refused, so a typo never passes silently.
_Readers: TypeAlias = Mapping[str, Callable[[object, str], Any]]


@attrs.frozen
class Challenge:
    TYPE: ClassVar[str] = "challenge"
    FIELDS: ClassVar[_Readers] = {"gateway_id": _hex32, "nonce": _hex32}
    gateway_id: str
    nonce: str


@attrs.frozen
class Hello:
    TYPE: ClassVar[str] = "hello"
    FIELDS: ClassVar[_Readers] = {
        "worker_key": _hex32,
        "nonce": _hex32,
        "sig": _hex64,
        "agent": lambda v, n: _text(v, n, AGENT_MAX),
    }
    worker_key: str
    nonce: str
    sig: str
    agent: str


@attrs.frozen
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    FIELDS: ClassVar[_Readers] = {
        "worker_id": _hex32,
        "heartbeat_interval_ms": _int,
        "liveness_timeout_ms": _int,
        "max_message_bytes": _int,
    }
    worker_id: str
    heartbeat_interval_ms: int
    liveness_timeout_ms: int
    max_message_bytes: int


@attrs.frozen
class RelayStatement:
    """What the relay owner signs: see the package docstring."""

    FIELDS: ClassVar[_Readers] = {
        "action": _enum(RelayAction),
        "relay_key": _hex32,
        "owner_key": _hex32,
        "gateway_id": _hex32,
        "worker_key": _hex32,
        "seq": _int,
        "name": _name,
        "description": lambda v, n: _text(v, n, 1024),
    }
    action: RelayAction
    relay_key: str
    owner_key: str
    gateway_id: str
    worker_key: str
    seq: int
    name: str
    description: str


@attrs.frozen
class RelayRegister:
    TYPE: ClassVar[str] = "relay-register"
    FIELDS: ClassVar[_Readers] = {
        "id": _int,
        "statement": lambda v, n: _read_members(RelayStatement, v, n),
        "sig": _hex64,
    }
    id: int
    statement: RelayStatement
    sig: str


@attrs.frozen
class Ack:
    TYPE: ClassVar[str] = "ack"
    FIELDS: ClassVar[_Readers] = {"id": _int}
    id: int


@attrs.frozen
class ErrorMessage:
    TYPE: ClassVar[str] = "error"
    FIELDS: ClassVar[_Readers] = {
        "id": _optional(_int),
        "code": _enum(ErrorCode),
        "message": lambda v, n: _text(v, n, 1024),
    }
    id: int | None
    code: ErrorCode
    message: str


@attrs.frozen
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    FIELDS: ClassVar[_Readers] = {"t": _int}
    t: int


@attrs.frozen
class SessionOpen:
    TYPE: ClassVar[str] = "session-open"
    FIELDS: ClassVar[_Readers] = {"session": _int, "relay_key": _hex32}
    session: int
    relay_key: str


@attrs.frozen
class SessionReady:
    TYPE: ClassVar[str] = "session-ready"
    FIELDS: ClassVar[_Readers] = {"session": _int}
    session: int


@attrs.frozen
class SessionRefused:
    TYPE: ClassVar[str] = "session-refused"
    FIELDS: ClassVar[_Readers] = {"session": _int, "reason": lambda v, n: _text(v, n, 1024)}
    session: int
    reason: str


@attrs.frozen
class ClientFrames:
    TYPE: ClassVar[str] = "client-frames"
    FIELDS: ClassVar[_Readers] = {"session": _int, "frames": _frames}
    session: int
    frames: tuple[str, ...]


@attrs.frozen
class RelayFrames:
    TYPE: ClassVar[str] = "relay-frames"
    FIELDS: ClassVar[_Readers] = {"session": _int, "frames": _frames}
    session: int
    frames: tuple[str, ...]


@attrs.frozen
class SessionClose:
    TYPE: ClassVar[str] = "session-close"
    FIELDS: ClassVar[_Readers] = {"session": _int, "reason": lambda v, n: _text(v, n, 1024)}
    session: int
    reason: str


@attrs.frozen
class MirrorUpdate:
    """New blocks of a core for the gateway's blind-peer mirror (verified before storing)."""

    TYPE: ClassVar[str] = "mirror-update"
    FIELDS: ClassVar[_Readers] = {
        "core_key": _hex32,
        "manifest": _optional(lambda v, n: _hex_bytes(v, n, 1024)),
        "start": _int,
        "fork": _int,
        "blocks": _blocks,
        "signature": lambda v, n: _hex_bytes(v, n, 128),
        "meta": _meta,
    }
    core_key: str
    manifest: bytes | None
    start: int
    fork: int
    blocks: tuple[bytes, ...]
    signature: bytes
    meta: Mapping[str, str | int | bool]


@attrs.frozen
class MirrorRequest:
    """Ask for the gateway's length of a mirrored core (answered by ``mirror-status``)."""

    TYPE: ClassVar[str] = "mirror-request"
    FIELDS: ClassVar[_Readers] = {"core_key": _hex32}
    core_key: str


@attrs.frozen
class MirrorStatus:
    TYPE: ClassVar[str] = "mirror-status"
    FIELDS: ClassVar[_Readers] = {"core_key": _hex32, "length": _int, "fork": _int}
    core_key: str
    length: int
    fork: int


@attrs.frozen
class PendingWrites:
    TYPE: ClassVar[str] = "pending-writes"
    FIELDS: ClassVar[_Readers] = {
        "relay_key": _hex32,
        "kinds": _kinds,
        "drive_key": _optional(_hex32),
        "drive_version": _optional(_int),
        "lease_version": _int,
    }
    relay_key: str
    kinds: tuple[str, ...]
    drive_key: str | None
    drive_version: int | None
    lease_version: int


@attrs.frozen
class PendingWritesAck:
    TYPE: ClassVar[str] = "pending-writes-ack"
    FIELDS: ClassVar[_Readers] = {"relay_key": _hex32, "lease_version": _int}
    relay_key: str
    lease_version: int


Message: TypeAlias = (
    Challenge
    | Hello
    | Welcome
    | RelayRegister
    | Ack
    | ErrorMessage
    | Heartbeat
    | SessionOpen
    | SessionReady
    | SessionRefused
    | ClientFrames
    | RelayFrames
    | SessionClose
    | MirrorUpdate
    | MirrorRequest
    | MirrorStatus
    | PendingWrites
    | PendingWritesAck
)

_BY_TYPE: Final[dict[str, type[Any]]] = {
    cls.TYPE: cls
    for cls in (
        Challenge,
        Hello,
        Welcome,
        RelayRegister,
        Ack,
        ErrorMessage,
        Heartbeat,
        SessionOpen,
        SessionReady,
        SessionRefused,
        ClientFrames,
        RelayFrames,
        SessionClose,
        MirrorUpdate,
        MirrorRequest,
        MirrorStatus,
        PendingWrites,
        PendingWritesAck,
    )
}


def _read_members(cls: type[Any], value: object, where: str) -> Any:
    if not isinstance(value, dict):
        raise _malformed(f"{where} must be a JSON object")
    fields: _Readers = cls.FIELDS
    extra = set(value) - set(fields) - ({"v", "type"} if where == "message" else set())
    if extra:
        raise _malformed(f"{where} has unknown members: {', '.join(sorted(extra))}")
    kwargs = {}
    for name, reader in fields.items():
        if name not in value:
            raise _malformed(f"{where} lacks {name!r}")
        kwargs[name] = reader(value[name], name)
    return cls(**kwargs)


# The binary form of client-frames and relay-frames: the forwarded NIP-01 texts travel as
# length-prefixed UTF-8, with no JSON escaping to add on one side and undo on the other.
_BINARY_HEAD: Final = struct.Struct(">BQI")  # kind, session, frame count
_BINARY_LENGTH: Final = struct.Struct(">I")
_BINARY_KINDS: Final[dict[int, type[ClientFrames] | type[RelayFrames]]] = {
    1: ClientFrames,
    2: RelayFrames,
}


def encode_binary(message: ClientFrames | RelayFrames) -> bytes:
    """The binary form of ``message`` (send it as a WebSocket *binary* message):
    ``u8 kind (1 client-frames, 2 relay-frames) ‖ u64 session ‖ u32 count`` then, per frame,
    ``u32 length ‖ UTF-8 text`` (all big-endian). :func:`decode` reads both forms."""
    kind = 1 if isinstance(message, ClientFrames) else 2
    parts = [_BINARY_HEAD.pack(kind, message.session, len(message.frames))]
    for frame in message.frames:
        data = frame.encode("utf-8")
        parts.append(_BINARY_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def binary_size(frames: tuple[str, ...] | list[str]) -> int:
    """Bytes of the binary form of a message holding ``frames``."""
    return _BINARY_HEAD.size + sum(
        _BINARY_LENGTH.size + len(frame.encode("utf-8")) for frame in frames
    )


def _decode_binary(data: bytes) -> Message:
    if len(data) < _BINARY_HEAD.size:
        raise _malformed("binary message shorter than its header")
    kind, session, count = _BINARY_HEAD.unpack_from(data)
    cls = _BINARY_KINDS[kind]
    name = cls.TYPE
    if session > _MAX_SAFE_INT:
        raise _malformed(f"{name}: session must be an integer from 0 to 2^53-1")
    if not 1 <= count <= MAX_FRAMES_PER_MESSAGE:
        raise _malformed(f"{name}: frames must be a list of 1 to {MAX_FRAMES_PER_MESSAGE}")
    frames: list[str] = []
    pos = _BINARY_HEAD.size
    end = len(data)
    for _ in range(count):
        if pos + _BINARY_LENGTH.size > end:
            raise _malformed(f"{name}: binary message cut short")
        (size,) = _BINARY_LENGTH.unpack_from(data, pos)
        pos += _BINARY_LENGTH.size
        if pos + size > end:
            raise _malformed(f"{name}: binary message cut short")
        try:
            frames.append(data[pos : pos + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise _malformed(f"{name}: a frame is not valid UTF-8") from None
        pos += size
    if pos != end:
        raise _malformed(f"{name}: bytes after the last frame")
    return cls(session=session, frames=tuple(frames))


def decode(frame: str | bytes) -> Message:
    """The message in ``frame`` (JSON text, or the binary form of client-frames and
    relay-frames); :class:`ProtocolError` if it is not a valid one."""
    if isinstance(frame, bytes | bytearray) and frame[:1] in (b"\x01", b"\x02"):
        return _decode_binary(bytes(frame))
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("not valid JSON") from None
    if not isinstance(obj, dict):
        raise _malformed("a message must be a JSON object")
    raw_id = obj.get("id")
    # Echo the request id only when it is one: an error must not carry a value the peer never
    # could have used as an id.
    request_id = raw_id if type(raw_id) is int and 0 <= raw_id <= _MAX_SAFE_INT else None
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {obj.get('v')!r} is not supported (this side speaks 1)",
            request_id,
        )
    kind = obj.get("type")
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}", request_id)
    try:
        message: Message = _read_members(cls, obj, "message")
    except ProtocolError as exc:
        exc.request_id = request_id
        exc.message = f"{kind}: {exc.message}"
        raise ProtocolError(exc.code, exc.message, request_id) from None
    return message


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [
            base64.b64encode(item).decode() if isinstance(item, bytes) else item for item in value
        ]
    if isinstance(value, RelayStatement):
        return _members(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _members(message: object) -> dict[str, object]:
    return {name: _json_value(getattr(message, name)) for name in type(message).FIELDS}  # type: ignore[attr-defined]


def encode(message: Message) -> str:
    """The frame text of ``message`` (compact JSON, non-ASCII unescaped)."""
    body = {"v": PROTOCOL_VERSION, "type": message.TYPE, **_members(message)}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


# -- signatures ---------------------------------------------------------------------------------


def hello_signable(gateway_id: str, nonce: str, worker_key: str) -> bytes:
    """The bytes a worker signs in its hello."""
    return (
        HELLO_CONTEXT + bytes.fromhex(gateway_id) + bytes.fromhex(nonce) + bytes.fromhex(worker_key)
    )


def sign_hello(signing_key: nacl.signing.SigningKey, challenge: Challenge, agent: str) -> Hello:
    """The hello answering ``challenge``, signed with the worker's identity key."""
    worker_key = bytes(signing_key.verify_key).hex()
    signable = hello_signable(challenge.gateway_id, challenge.nonce, worker_key)
    sig = signing_key.sign(signable).signature.hex()
    return Hello(worker_key=worker_key, nonce=challenge.nonce, sig=sig, agent=agent[:AGENT_MAX])


def _verify(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        nacl.signing.VerifyKey(bytes.fromhex(public_key_hex)).verify(
            message, bytes.fromhex(signature_hex)
        )
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_hello(hello: Hello, challenge: Challenge) -> bool:
    """Whether ``hello`` answers exactly ``challenge`` with a valid signature."""
    if hello.nonce != challenge.nonce:
        return False
    signable = hello_signable(challenge.gateway_id, challenge.nonce, hello.worker_key)
    return _verify(hello.worker_key, signable, hello.sig)


def statement_signable(statement: RelayStatement) -> bytes:
    """The bytes the relay owner signs: a fixed context and the statement's canonical JSON
    (members sorted, compact, non-ASCII unescaped)."""
    canonical = json.dumps(
        _members(statement), ensure_ascii=False, separators=(",", ":"), sort_keys=True
    )
    return STATEMENT_CONTEXT + canonical.encode("utf-8")


def sign_statement(signing_key: nacl.signing.SigningKey, statement: RelayStatement) -> str:
    """The owner's signature (hex) of ``statement``."""
    return signing_key.sign(statement_signable(statement)).signature.hex()


def owner_relay_key(owner_key: str) -> str:
    """The relay key owned by the Ed25519 public key ``owner_key``: the key of the owner core
    that key writes (default manifest, hex)."""
    return Manifest(public_key=bytes.fromhex(owner_key)).key.hex()


def verify_statement(statement: RelayStatement, sig: str) -> bool:
    """Whether ``sig`` is the owner's signature of ``statement`` and the owner key really owns
    the relay key."""
    if owner_relay_key(statement.owner_key) != statement.relay_key:
        return False
    return _verify(statement.owner_key, statement_signable(statement), sig)
