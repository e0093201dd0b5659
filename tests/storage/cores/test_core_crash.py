"""A writer killed with SIGKILL in the middle of appending loses nothing it acknowledged."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypertuna.storage.cores import Core, KeyPair, Mirror
from tests.storage.cores.crash_writer import expected_block

SEED = bytes([13]) * 32
WRITER = Path(__file__).with_name("crash_writer.py")


def _run_and_kill(directory: Path, acks_before_kill: int, delay: float) -> int:
    """Start a writer, SIGKILL it ``delay`` seconds after it has acknowledged
    ``acks_before_kill`` batches, and return the highest length it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, str(WRITER), str(directory), SEED.hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    acknowledged = 0
    try:
        for _ in range(acks_before_kill):
            line = process.stdout.readline()
            assert line, "the writer stopped on its own"
            acknowledged = int(line)
        # The writer is already building its next batch; a batch takes about 2 ms to build and
        # write, so a random delay of that order lands the kill anywhere inside it.
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    # Lines printed before the kill landed were acknowledged too.
    for line in rest.split():
        acknowledged = int(line)
    return acknowledged


def test_sigkill_mid_append_keeps_every_acknowledged_block(tmp_path: Path) -> None:
    directory = tmp_path / "core"
    key_pair = KeyPair.from_seed(SEED)
    rng = random.Random(1)
    acknowledged = 0
    for _round in range(3):
        acked = _run_and_kill(directory, rng.randint(3, 12), rng.uniform(0, 0.004))
        assert acked > acknowledged
        acknowledged = acked
        with Core.open(directory, key_pair) as core:
            # Nothing acknowledged is lost; an unacknowledged batch is either whole or gone.
            assert core.length >= acknowledged
            assert core.length % 40 == 0
            assert all(core.get(i) == expected_block(i) for i in range(core.length))
            assert core.verify_all().ok
            signature = core.signature
            assert signature is not None
            assert core.identity.verify(signature, core.tree_hash, core.length, core.fork)
            update = core.export_update(0)
            identity = core.identity
        # An independent mirror, which trusts only the key, accepts the recovered core.
        with Mirror.create(tmp_path / f"mirror{_round}", identity) as mirror:
            assert mirror.apply(update) == update.length
