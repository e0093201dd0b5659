"""The client-frame parser and server-frame builders (pure)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameDecoder

from hypertuna.edge.frames import (
    BinaryMessage,
    Close,
    FrameReader,
    Ping,
    ProtocolViolation,
    Received,
    TextMessage,
    _unmask,
    _unmask_python,
    close_frame,
    pong_frame,
    text_frame,
    text_frames,
)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    """A client frame as a browser would send it (masked with a random key)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, (0x80 if masked else 0) | size))
    elif size < 65536:
        head = bytes((first, (0x80 if masked else 0) | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, (0x80 if masked else 0) | 127)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_all(data: bytes, *, limit: int = 1 << 20, chunk: int | None = None) -> list[Received]:
    reader = FrameReader(limit)
    out: list[Received] = []
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        reader.feed(data[start : start + step])
        out.extend(reader.messages())
    return out


def violation(data: bytes, *, limit: int = 1 << 20) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as raised:
        read_all(data, limit=limit)
    return raised.value


def test_text_binary_ping_close() -> None:
    data = (
        client_frame(0x1, "héllo".encode())
        + client_frame(0x2, b"\x00\xff")
        + client_frame(0x9, b"ping?")
        + client_frame(0xA, b"unsolicited pong is ignored")
        + client_frame(0x8, (1000).to_bytes(2, "big") + b"bye")
    )
    assert read_all(data) == [
        TextMessage("héllo"),
        BinaryMessage(b"\x00\xff"),
        Ping(b"ping?"),
        Close(1000, "bye"),
    ]


def test_extended_lengths() -> None:
    medium, large = "m" * 300, "L" * 70000
    assert read_all(client_frame(0x1, medium.encode()) + client_frame(0x1, large.encode())) == [
        TextMessage(medium),
        TextMessage(large),
    ]


def test_fragments_with_interleaved_control_frame() -> None:
    data = (
        client_frame(0x1, b"frag", fin=False)
        + client_frame(0x9, b"p")
        + client_frame(0x0, b"men", fin=False)
        + client_frame(0x0, b"ted")
    )
    assert read_all(data) == [Ping(b"p"), TextMessage("fragmented")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x1, b"x", masked=False), 1002),
        (client_frame(0x1, b"x", rsv=0b100), 1002),
        (client_frame(0x3, b"x"), 1002),
        (client_frame(0x0, b"x"), 1002),
        (client_frame(0x1, b"a", fin=False) + client_frame(0x1, b"b"), 1002),
        (client_frame(0x9, b"x" * 126), 1002),
        (client_frame(0x9, b"x", fin=False), 1002),
        (client_frame(0x8, b"\x03"), 1002),
        (client_frame(0x8, (1005).to_bytes(2, "big")), 1002),
        (client_frame(0x8, (999).to_bytes(2, "big")), 1002),
        (client_frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),
        (client_frame(0x1, b"\xff\xfe"), 1007),
        (client_frame(0x1, "é".encode()[:1]), 1007),
    ],
)
def test_violations_carry_their_close_code(data: bytes, code: int) -> None:
    assert violation(data).code == code


def test_oversize_is_refused_from_the_header() -> None:
    # Only the header of a 1 GB frame has arrived: refused before any payload is buffered.
    header = bytes((0x81, 0x80 | 127)) + (1 << 30).to_bytes(8, "big") + b"mask"
    assert violation(header, limit=4096).code == 1009
    fragments = client_frame(0x1, b"a" * 3000, fin=False) + client_frame(0x0, b"b" * 3000)
    assert violation(fragments, limit=4096).code == 1009
    assert read_all(client_frame(0x1, b"a" * 4096), limit=4096) == [TextMessage("a" * 4096)]


def test_close_without_status() -> None:
    assert read_all(client_frame(0x8, b"")) == [Close(None, "")]


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            st.text(max_size=300).map(TextMessage),
            st.binary(max_size=300).map(BinaryMessage),
            st.binary(max_size=125).map(Ping),
        ),
        max_size=8,
    ),
    pieces=st.integers(min_value=1, max_value=4),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_any_split_and_fragmentation_gives_the_same_messages(
    messages: list[Received], pieces: int, chunk: int
) -> None:
    data = b""
    for message in messages:
        if isinstance(message, Ping):
            data += client_frame(0x9, message.payload)
            continue
        opcode, payload = (
            (0x1, message.text.encode())
            if isinstance(message, TextMessage)
            else (0x2, message.data)
        )
        size = max(1, -(-len(payload) // pieces))
        parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for index, part in enumerate(parts):
            data += client_frame(opcode if index == 0 else 0x0, part, fin=index == len(parts) - 1)
    assert read_all(data, chunk=chunk) == messages


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_server_frames_decode_with_an_independent_parser(size: int) -> None:
    text = "é" * (size // 2) + "x" * (size % 2)
    for frame, opcode, payload in (
        (text_frame(text), 0x1, text),
        (pong_frame(b"p" * min(size, 125)), 0xA, b"p" * min(size, 125)),
    ):
        decoder = FrameDecoder(client=True)
        decoder.receive_bytes(frame)
        parsed = decoder.process_buffer()
        assert parsed is not None
        assert parsed.opcode.value == opcode and parsed.frame_finished
        expected = payload.encode() if isinstance(payload, str) else payload
        got = parsed.payload.encode() if isinstance(parsed.payload, str) else parsed.payload
        assert got == expected


def test_close_frame_reason_is_cut_to_fit() -> None:
    frame = close_frame(1001, "é" * 200)
    assert frame[0] == 0x88 and frame[1] <= 125
    assert int.from_bytes(frame[2:4], "big") == 1001
    frame[4:].decode("utf-8")  # still valid UTF-8 after the cut


@given(st.binary(max_size=20_000), st.binary(min_size=4, max_size=4))
def test_unmask_is_xor_with_the_repeated_key_at_every_size(payload: bytes, mask: bytes) -> None:
    # The C helper and both pure-Python ways (big integers below 4 KiB, byte tables above)
    # agree with the definition, including sizes that are not a multiple of 4.
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert _unmask(payload, mask) == expected
    assert _unmask_python(payload, mask) == expected


@given(st.lists(st.text(max_size=130), max_size=50))
def test_text_frames_are_the_single_frames_concatenated(texts: list[str]) -> None:
    assert text_frames(texts) == b"".join(text_frame(text) for text in texts)


def test_text_frames_at_every_length_form() -> None:
    # 7-bit, 16-bit and 64-bit lengths, at their edges, in bytes (not characters).
    texts = ["a" * size for size in (0, 125, 126, 65535, 65536, 70_000)] + ["é" * 63, "é" * 64]
    assert text_frames(texts) == b"".join(text_frame(text) for text in texts)
