"""The worker control protocol codec and its signatures."""

from __future__ import annotations

import json
import secrets
import struct

import attrs
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypertuna.protocol.worker import (
    MAX_FRAMES_PER_MESSAGE,
    Ack,
    Challenge,
    ClientFrames,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    MirrorRequest,
    MirrorStatus,
    MirrorUpdate,
    PendingWrites,
    PendingWritesAck,
    ProtocolError,
    RelayAction,
    RelayFrames,
    RelayRegister,
    RelayStatement,
    SessionClose,
    SessionOpen,
    SessionReady,
    SessionRefused,
    Welcome,
    binary_size,
    decode,
    encode,
    encode_binary,
    owner_relay_key,
    sign_hello,
    sign_statement,
    verify_hello,
    verify_statement,
)
from hypertuna.storage.cores import CoreIdentity, KeyPair

GATEWAY = "ab" * 32
KEY = "cd" * 32


def statement(owner: nacl.signing.SigningKey, **changes: object) -> RelayStatement:
    owner_key = bytes(owner.verify_key).hex()
    base = RelayStatement(
        action=RelayAction.REGISTER,
        relay_key=owner_relay_key(owner_key),
        owner_key=owner_key,
        gateway_id=GATEWAY,
        worker_key=KEY,
        seq=1,
        name="demo",
        description="a relay ✓",
    )
    return attrs.evolve(base, **changes)  # type: ignore[misc]


EXAMPLES = [
    Challenge(gateway_id=GATEWAY, nonce=KEY),
    Welcome(
        worker_id=KEY,
        heartbeat_interval_ms=5000,
        liveness_timeout_ms=15000,
        max_message_bytes=1 << 20,
    ),
    Ack(id=3),
    ErrorMessage(id=None, code=ErrorCode.MALFORMED, message="bad"),
    ErrorMessage(id=4, code=ErrorCode.UNAUTHORIZED, message="no"),
    Heartbeat(t=123),
    SessionOpen(session=1, relay_key=KEY),
    SessionReady(session=1),
    SessionRefused(session=1, reason="not hosted here"),
    ClientFrames(session=1, frames=('["REQ","a",{}]', '["CLOSE","a"]')),
    RelayFrames(session=1, frames=('["EOSE","a"]',)),
    SessionClose(session=1, reason="bye"),
    MirrorUpdate(
        core_key=KEY,
        manifest=None,
        start=2,
        fork=1,
        blocks=(b"x", b""),
        signature=bytes(64),
        meta={"relay": KEY, "announce": True, "priority": 1},
    ),
    MirrorRequest(core_key=KEY),
    MirrorStatus(core_key=KEY, length=10, fork=0),
    ErrorMessage(id=None, code=ErrorCode.QUOTA_EXCEEDED, message=f"mirror {KEY}: full"),
    PendingWrites(
        relay_key=KEY, kinds=("autobase", "drive"), drive_key=KEY, drive_version=3, lease_version=2
    ),
    PendingWritesAck(relay_key=KEY, lease_version=2),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    frame = encode(message)  # type: ignore[arg-type]
    assert json.loads(frame)["v"] == 1
    assert decode(frame) == message
    assert decode(frame.encode()) == message


def test_registration_round_trip_and_signature() -> None:
    owner = nacl.signing.SigningKey.generate()
    signed = statement(owner)
    message = RelayRegister(id=9, statement=signed, sig=sign_statement(owner, signed))
    decoded = decode(encode(message))
    assert decoded == message
    assert isinstance(decoded, RelayRegister)
    assert verify_statement(decoded.statement, decoded.sig)


def test_owner_relay_key_is_the_owner_core_key() -> None:
    pair = KeyPair.from_seed(bytes(range(32)))
    assert owner_relay_key(pair.public_key.hex()) == CoreIdentity.for_key_pair(pair).key.hex()


def test_statements_bind_every_field() -> None:
    owner, other = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    signed = statement(owner)
    sig = sign_statement(owner, signed)
    for change in (
        {"seq": 2},
        {"gateway_id": "ef" * 32},
        {"worker_key": "ef" * 32},
        {"action": RelayAction.REMOVE},
        {"name": "other"},
        {"description": "changed"},
    ):
        assert not verify_statement(attrs.evolve(signed, **change), sig), change  # type: ignore[misc]
    # Another key cannot sign for this relay, even with a valid signature of its own.
    stolen = attrs.evolve(signed, owner_key=bytes(other.verify_key).hex())
    assert not verify_statement(stolen, sign_statement(other, stolen))
    assert not verify_statement(signed, sign_statement(other, signed))


def test_hello_is_bound_to_its_challenge() -> None:
    worker = nacl.signing.SigningKey.generate()
    challenge = Challenge(gateway_id=GATEWAY, nonce=secrets.token_hex(32))
    hello = sign_hello(worker, challenge, "test-agent")
    assert verify_hello(decode(encode(hello)), challenge)  # type: ignore[arg-type]
    assert not verify_hello(hello, Challenge(gateway_id=GATEWAY, nonce=secrets.token_hex(32)))
    assert not verify_hello(hello, attrs.evolve(challenge, gateway_id="ef" * 32))
    impostor = attrs.evolve(
        hello, worker_key=bytes(nacl.signing.SigningKey.generate().verify_key).hex()
    )
    assert not verify_hello(impostor, challenge)


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [
        ("{", ErrorCode.MALFORMED, None),
        ("[]", ErrorCode.MALFORMED, None),
        ('{"type":"ack","id":1}', ErrorCode.UNSUPPORTED_VERSION, 1),
        ('{"v":2,"type":"ack","id":1}', ErrorCode.UNSUPPORTED_VERSION, 1),
        ('{"v":true,"type":"ack","id":1}', ErrorCode.UNSUPPORTED_VERSION, 1),
        ('{"v":1,"type":"nope","id":5}', ErrorCode.UNKNOWN_TYPE, 5),
        ('{"v":1,"id":5}', ErrorCode.UNKNOWN_TYPE, 5),
        ('{"v":1,"type":"ack","id":1,"extra":0}', ErrorCode.MALFORMED, 1),
        ('{"v":1,"type":"ack"}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"ack","id":-1}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"ack","id":1.0}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"heartbeat","t":9007199254740992}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"session-open","session":1,"relay_key":"AB"}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"client-frames","session":1,"frames":[]}', ErrorCode.MALFORMED, None),
        ('{"v":1,"type":"client-frames","session":1,"frames":[1]}', ErrorCode.MALFORMED, None),
        (
            '{"v":1,"type":"error","id":null,"code":"whatever","message":""}',
            ErrorCode.MALFORMED,
            None,
        ),
        (
            '{"v":1,"type":"mirror-update","core_key":"' + KEY + '","manifest":null,"start":0,'
            '"fork":0,"blocks":["***"],"signature":"00","meta":{}}',
            ErrorCode.MALFORMED,
            None,
        ),
        (
            '{"v":1,"type":"pending-writes","relay_key":"' + KEY + '","kinds":["disk"],'
            '"drive_key":null,"drive_version":null,"lease_version":1}',
            ErrorCode.MALFORMED,
            None,
        ),
    ],
)
def test_bad_frames_are_refused_with_a_code(
    frame: str, code: ErrorCode, request_id: int | None
) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode(frame)
    assert refused.value.code is code
    assert refused.value.request_id == request_id
    assert refused.value.message


def test_statement_fields_are_validated() -> None:
    owner = nacl.signing.SigningKey.generate()
    good = json.loads(encode(RelayRegister(id=1, statement=statement(owner), sig="00" * 64)))
    for name, value in (("name", "Upper"), ("name", KEY), ("action", "delete"), ("seq", "1")):
        bad = json.loads(json.dumps(good))
        bad["statement"][name] = value
        with pytest.raises(ProtocolError, match=name):
            decode(json.dumps(bad))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_decode_never_crashes(value: object) -> None:
    for candidate in (
        value,
        {"v": 1, "type": "relay-register", "id": 1, "statement": value, "sig": value},
    ):
        try:
            decode(json.dumps(candidate))
        except ProtocolError:
            pass


@pytest.mark.parametrize(
    "message",
    [
        ClientFrames(session=7, frames=('["REQ","a",{}]', '["EVENT",{"content":"é \\" ✓"}]')),
        RelayFrames(session=2**53 - 1, frames=("",)),
    ],
    ids=["client", "relay"],
)
def test_binary_round_trip(message: ClientFrames | RelayFrames) -> None:
    data = encode_binary(message)
    assert data[:1] == (b"\x01" if isinstance(message, ClientFrames) else b"\x02")
    assert decode(data) == message
    assert len(data) == binary_size(message.frames)


def _binary(kind: int, session: int, frames: list[bytes], count: int | None = None) -> bytes:
    head = struct.pack(">BQI", kind, session, len(frames) if count is None else count)
    return head + b"".join(struct.pack(">I", len(f)) + f for f in frames)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x00", "shorter than its header"),
        (_binary(1, 1, [], count=0), "1 to"),
        (_binary(2, 1, [b"x"], count=MAX_FRAMES_PER_MESSAGE + 1), "1 to"),
        (_binary(1, 2**53, [b"x"]), "session"),
        (_binary(1, 1, [b"x"], count=2), "cut short"),
        (_binary(1, 1, [b"x"])[:-1], "cut short"),
        (_binary(1, 1, [b"x"]) + b"!", "after the last frame"),
        (_binary(2, 1, [b"\xff\xfe"]), "UTF-8"),
    ],
)
def test_bad_binary_messages_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment) as refused:
        decode(data)
    assert refused.value.code is ErrorCode.MALFORMED
