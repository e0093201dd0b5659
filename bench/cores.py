"""Benchmark of the signed-log storage: append, mirror verification, relay view rebuild.

    .venv/bin/python bench/cores.py [--quick]

Three phases, each on real files in a fresh temporary directory (durable writes: every batch is
fsynced before it counts):

1. **Append.** A writable core appends batches of blocks (one signature and one fsync round per
   batch) for each block size in ``--append-sizes``. ``append_blocks_per_s`` is measured with
   ``--append-block`` byte blocks (a typical Nostr event record), ``append_mb_per_s`` with
   64 KiB blocks.
2. **Mirror verification.** A second core mirrors the first batch by batch: every batch's tree
   is recomputed from the stored blocks and its signature checked against the core key before it
   is stored (``Mirror.apply``). ``verify_mb_per_s`` is the slowest of the 4 KiB and 64 KiB runs;
   ``verify_cpu_mb_per_s`` is the same work without the disk (the tree and signature check only).
3. **View rebuild.** A relay owner core holding ``--rebuild-events`` signed kind-1 events is
   turned into the relay view (signature checks, merge rules, SQLite indexes) from scratch.
   ``rebuild_100k_s`` scales the measured time to 100k events when ``--quick`` used fewer.

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from relay_load import load_events  # the signed-event cache shared with the relay benchmark

from hypertuna.protocol.nostr import parse_event
from hypertuna.storage.cores import Core, KeyPair, Mirror
from hypertuna.storage.cores.tree import grow, tree_hash
from hypertuna.storage.events import open_event_store
from hypertuna.storage.relay_records import EventRecord, encode_record
from hypertuna.storage.relay_view import RelayView

KIB = 1024
MIB = 1024 * 1024


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def batches_of(blocks: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [blocks[i : i + size] for i in range(0, len(blocks), size)]


def make_blocks(count: int, size: int) -> list[bytes]:
    # Distinct blocks (a counter in each) so nothing can be deduplicated or cached.
    filler = os.urandom(size)
    return [i.to_bytes(8, "little") + filler[8:] if size >= 8 else filler for i in range(count)]


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def bench_append(root: Path, block_size: int, total_bytes: int, batch: int, runs: int) -> float:
    """Blocks per second appended, median of ``runs`` fresh cores."""
    count = max(batch, total_bytes // block_size)
    blocks = make_blocks(count, block_size)
    groups = batches_of(blocks, batch)

    def once() -> float:
        directory = Path(tempfile.mkdtemp(dir=root))
        core = Core.create(directory / "core", KeyPair.from_seed(os.urandom(32)))
        try:
            started = time.perf_counter()
            for group in groups:
                core.append(group)
            elapsed = time.perf_counter() - started
        finally:
            core.close()
        return count / elapsed

    return median_of(runs, once)


def bench_verify(
    root: Path, block_size: int, total_bytes: int, batch: int, runs: int
) -> tuple[float, float]:
    """(bytes/s through ``Mirror.apply``, bytes/s of the tree and signature check alone)."""
    count = max(batch, total_bytes // block_size)
    directory = Path(tempfile.mkdtemp(dir=root))
    core = Core.create(directory / "source", KeyPair.from_seed(os.urandom(32)))
    updates = []
    try:
        for group in batches_of(make_blocks(count, block_size), batch):
            start = core.length
            core.append(group)
            updates.append(core.export_update(start))
        identity = core.identity
    finally:
        core.close()
    total = count * block_size

    def once() -> float:
        mirror = Mirror.create(Path(tempfile.mkdtemp(dir=root)) / "mirror", identity)
        try:
            started = time.perf_counter()
            for update in updates:
                mirror.apply(update)
            elapsed = time.perf_counter() - started
        finally:
            mirror.close()
        return total / elapsed

    def cpu_only() -> float:
        # The verification a mirror does, without writing: grow the tree, check the signature.
        started = time.perf_counter()
        roots: list[Any] = []
        for update in updates:
            _created, roots = grow(roots, update.start, list(update.blocks))
            if not identity.verify(update.signature, tree_hash(roots), update.length, update.fork):
                raise AssertionError("a benchmark update failed verification")
        return total / (time.perf_counter() - started)

    return median_of(runs, once), median_of(runs, cpu_only)


def build_relay_core(root: Path, raws: Sequence[str]) -> Core:
    """An owner core holding one event record per signed event, appended in batches."""
    core = Core.create(root / "owner", KeyPair.from_seed(os.urandom(32)))
    records = [encode_record(EventRecord(parse_event(json.loads(raw)))) for raw in raws]
    for group in batches_of(records, 1000):
        core.append(group)
    return core


async def rebuild_seconds(root: Path, owner: Core) -> tuple[float, int]:
    """Seconds to build the owner core's relay view from scratch into a fresh SQLite store, and
    the number of events the view then holds."""
    async with open_event_store(None, Path(tempfile.mkdtemp(dir=root))) as store:
        relay = await store.create_relay(
            key=owner.key.hex(), name="bench", description="", created_at=0
        )
        view = RelayView(relay_id=relay.id, owner=owner, writer_log=lambda _key: None, store=store)
        started = time.perf_counter()
        await view.rebuild()
        elapsed = time.perf_counter() - started
        return elapsed, await store.event_count(relay.id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per figure (median)")
    parser.add_argument("--append-block", type=int, default=1024, help="block size for blocks/s")
    parser.add_argument("--batch", type=int, default=256, help="blocks per appended batch")
    parser.add_argument(
        "--rebuild-events", type=int, default=None, help="events in the rebuilt relay"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put the cores")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    volume = (32 if args.quick else 128) * MIB
    small_volume = (8 if args.quick else 48) * MIB
    root = Path(tempfile.mkdtemp(prefix="hypertuna-cores-", dir=args.dir))
    figures: dict[str, Any] = {"quick": args.quick, "runs": runs}

    log(f"append: {args.append_block} B blocks, batches of {args.batch}")
    blocks_per_s = bench_append(root, args.append_block, small_volume, args.batch, runs)
    figures["append_blocks_per_s"] = round(blocks_per_s)
    figures["append_block_bytes"] = args.append_block
    for size in (4 * KIB, 64 * KIB):
        batch = max(1, min(args.batch, 4 * MIB // size))
        rate = bench_append(root, size, volume, batch, runs) * size / MIB
        figures[f"append_mb_per_s_{size // KIB}k"] = round(rate, 1)
        log(f"append: {size // KIB} KiB blocks, batches of {batch}: {rate:.1f} MB/s")
    figures["append_mb_per_s"] = figures["append_mb_per_s_64k"]
    log(f"append: {blocks_per_s:,.0f} blocks/s")

    verify_rates = []
    for size in (4 * KIB, 64 * KIB):
        batch = max(1, min(args.batch, 4 * MIB // size))
        stored, cpu = bench_verify(root, size, volume, batch, runs)
        figures[f"verify_mb_per_s_{size // KIB}k"] = round(stored / MIB, 1)
        figures[f"verify_cpu_mb_per_s_{size // KIB}k"] = round(cpu / MIB, 1)
        verify_rates.append((stored / MIB, cpu / MIB))
        log(
            f"verify: {size // KIB} KiB blocks: {stored / MIB:.1f} MB/s stored, {cpu / MIB:.1f} CPU"
        )
    figures["verify_mb_per_s"] = round(min(rate for rate, _ in verify_rates), 1)
    figures["verify_cpu_mb_per_s"] = round(min(cpu for _, cpu in verify_rates), 1)

    events = args.rebuild_events or (20_000 if args.quick else 100_000)
    log(f"rebuild: loading {events:,} signed events")
    raws = load_events(events, max(1, os.cpu_count() or 1), use_cache=True)
    owner = build_relay_core(root, raws)
    try:
        times = []
        for _ in range(1 if args.quick else 3):
            seconds, stored = trio.run(rebuild_seconds, root, owner)
            if stored != events:
                raise SystemExit(f"the rebuilt view holds {stored} events, expected {events}")
            times.append(seconds)
            log(f"rebuild: {events:,} events in {seconds:.2f} s")
    finally:
        owner.close()
    rebuild_s = statistics.median(times)
    figures["rebuild_events"] = events
    figures["rebuild_s"] = round(rebuild_s, 2)
    figures["rebuild_100k_s"] = round(rebuild_s * 100_000 / events, 2)

    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
