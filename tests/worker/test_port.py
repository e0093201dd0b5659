"""Splitting relay frames into control messages within the gateway's size limit."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from hypertuna.protocol.worker import MAX_FRAMES_PER_MESSAGE, RelayFrames, encode_binary
from hypertuna.worker.port import split_frames


def _size(session: int, batch: tuple[str, ...]) -> int:
    # Relay frames travel in the binary form; its real length is what must fit.
    return len(encode_binary(RelayFrames(session=session, frames=batch)))


@given(
    st.lists(st.text(max_size=300), min_size=1, max_size=60),
    st.integers(min_value=200, max_value=4000),
)
def test_batches_fit_and_keep_order(frames: list[str], max_bytes: int) -> None:
    batches = list(split_frames(12345, frames, max_bytes))
    fitting = [f for f in frames if _size(12345, (f,)) <= max_bytes]
    assert [f for batch in batches for f in batch] == fitting
    assert all(_size(12345, batch) <= max_bytes for batch in batches)


def test_one_message_when_it_fits_and_count_limit() -> None:
    frames = [json.dumps(["EVENT", "s", {"n": i}]) for i in range(MAX_FRAMES_PER_MESSAGE + 5)]
    assert list(split_frames(1, frames[:3], 1 << 20)) == [tuple(frames[:3])]
    batches = list(split_frames(1, frames, 1 << 24))
    assert [len(b) for b in batches] == [MAX_FRAMES_PER_MESSAGE, 5]
