"""Random histories of appends and truncations: a core, reopened at every step, and a mirror
that follows it agree with a plain list, and every block proves."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypertuna.storage.cores import Core, KeyPair, Mirror, verify_proof

KEY_PAIR = KeyPair.from_seed(bytes([21]) * 32)

_operation = st.one_of(
    st.tuples(st.just("append"), st.lists(st.binary(max_size=40), min_size=1, max_size=9)),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=30)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_operation, min_size=1, max_size=8), st.booleans())
def test_core_and_mirror_follow_a_list(
    operations: list[tuple[str, object]], encrypted: bool
) -> None:
    encryption_key = bytes([4]) * 32 if encrypted else None
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        model: list[bytes] = []
        fork = 0
        Core.create(root / "w", KEY_PAIR, encryption_key=encryption_key).close()
        with Core.open(root / "w", KEY_PAIR, encryption_key=encryption_key) as first:
            mirror = Mirror.create(root / "m", first.identity, encryption_key=encryption_key)
        with mirror:
            for operation, argument in operations:
                with Core.open(root / "w", KEY_PAIR, encryption_key=encryption_key) as core:
                    if operation == "append":
                        assert isinstance(argument, list)
                        model.extend(argument)
                        assert core.append(argument) == len(model)
                        start = mirror.length
                    else:
                        assert isinstance(argument, int)
                        cut = min(argument, len(model))
                        del model[cut:]
                        fork += 1
                        assert core.truncate(cut) == fork
                        start = min(cut, mirror.length)
                    mirror.apply(core.export_update(start))
                    assert (core.length, core.fork) == (len(model), fork)
                    assert [core.get(i) for i in range(core.length)] == model
                    for index in range(core.length):
                        assert verify_proof(core.prove(index), core.identity).index == index
                    assert (mirror.length, mirror.fork, mirror.roots) == (
                        core.length,
                        core.fork,
                        core.roots,
                    )
                    assert [mirror.get(i) for i in range(mirror.length)] == model
            assert mirror.verify_all().ok
