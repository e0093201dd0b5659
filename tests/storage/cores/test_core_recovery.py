"""Crash and damage on disk: torn tails are cut back to the last signed state; damaged blocks
and node records are found, reported and never served."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hypertuna.storage.cores import Core, CoreCorruptError, KeyPair, Mirror, flat_tree
from hypertuna.storage.cores.layout import (
    NODE_RECORD_BYTES,
    STATE_RECORD_BYTES,
    STATE_SLOT_BYTES,
)

KEY_PAIR = KeyPair.from_seed(bytes([11]) * 32)
BLOCKS = [f"block number {i} ".encode() * (i % 4 + 1) for i in range(10)]


def _make(directory: Path, blocks: list[bytes] = BLOCKS) -> None:
    with Core.create(directory, KEY_PAIR) as core:
        core.append(blocks[:6])
        core.append(blocks[6:])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _block_offset(index: int, blocks: list[bytes] = BLOCKS) -> int:
    return sum(len(block) for block in blocks[:index])


def _node_offset(index: int) -> int:
    return flat_tree.node_position(index) * NODE_RECORD_BYTES


def _assert_intact(directory: Path, blocks: list[bytes] = BLOCKS) -> None:
    with Core.open(directory, KEY_PAIR) as core:
        assert core.length == len(blocks)
        assert [core.get(i) for i in range(core.length)] == blocks
        assert core.verify_all().ok
        assert (directory / "blocks").stat().st_size == core.byte_length
        assert (directory / "nodes").stat().st_size == (
            flat_tree.node_count(core.length) * NODE_RECORD_BYTES
        )


@pytest.mark.parametrize(
    "tail",
    [
        {"blocks": b"half a block"},
        {"nodes": b"\x07" * (NODE_RECORD_BYTES + 13)},
        {"state": b"\x01" * 100},
        {"state": b"\x02" * STATE_SLOT_BYTES},
        {"blocks": b"x" * 40, "nodes": b"y" * 96, "state": b"z" * 7},
    ],
    ids=["blocks", "nodes", "partial-state", "garbage-state", "all"],
)
def test_torn_tail_is_cut_back(tmp_path: Path, tail: dict[str, bytes]) -> None:
    _make(tmp_path / "c")
    for name, junk in tail.items():
        with open(tmp_path / "c" / name, "ab") as file:
            file.write(junk)
    _assert_intact(tmp_path / "c")
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        core.append([b"after the cut"])
    _assert_intact(tmp_path / "c", [*BLOCKS, b"after the cut"])


def test_batch_written_without_its_state_record_is_dropped(tmp_path: Path) -> None:
    # The crash window of a real append: blocks and nodes are on disk, the state is not.
    _make(tmp_path / "c")
    saved_state = (tmp_path / "c" / "state").read_bytes()
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        core.append([b"never acknowledged"] * 5)
    (tmp_path / "c" / "state").write_bytes(saved_state)
    _assert_intact(tmp_path / "c")
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        core.append([b"instead"])
        assert core.get(10) == b"instead"


def test_one_damaged_copy_of_the_last_state_is_enough(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    state = tmp_path / "c" / "state"
    last_slot = state.stat().st_size - STATE_SLOT_BYTES
    _flip(state, last_slot + 70)  # inside the first copy's signature
    _assert_intact(tmp_path / "c")
    _flip(state, last_slot + STATE_RECORD_BYTES + 70)  # and now the second copy
    # With both copies gone the last write cannot be told from a torn one: the core falls
    # back to the state before it, which is still fully signed.
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        assert core.length == 6
        assert core.verify_all().ok


def test_missing_signed_bytes_are_corruption(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    with open(tmp_path / "c" / "blocks", "r+b") as file:
        file.truncate(10)
    with pytest.raises(CoreCorruptError, match="blocks file"):
        Core.open(tmp_path / "c", KEY_PAIR)


def test_damaged_header_is_corruption(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    _flip(tmp_path / "c" / "header", 20)
    with pytest.raises(CoreCorruptError, match="header"):
        Core.open(tmp_path / "c", KEY_PAIR)


@pytest.mark.parametrize("reopen", [True, False])
def test_flipped_block_byte_is_never_served(tmp_path: Path, reopen: bool) -> None:
    _make(tmp_path / "c")
    core = Core.open(tmp_path / "c", KEY_PAIR)
    if not reopen:
        # The open core has already proven every node; the damage still shows.
        assert core.get(6) == BLOCKS[6]
    _flip(tmp_path / "c" / "blocks", _block_offset(6) + 3)
    if reopen:
        core.close()
        core = Core.open(tmp_path / "c", KEY_PAIR)
    with core:
        with pytest.raises(CoreCorruptError, match="block 6"):
            core.get(6)
        with pytest.raises(CoreCorruptError, match="block 6"):
            core.prove(6)
        with pytest.raises(CoreCorruptError, match="block 6"):
            core.export_update(0)
        assert [core.get(i) for i in range(10) if i != 6] == BLOCKS[:6] + BLOCKS[7:]
        report = core.verify_all(repair_nodes=True)
        assert (report.bad_blocks, report.bad_nodes, report.repaired_nodes) == ((6,), (), ())
        assert not report.ok


def test_flipped_leaf_record_is_found_and_repaired(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    _flip(tmp_path / "c" / "nodes", _node_offset(6) + 5)  # the hash of block 3's leaf
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        # Block 2's proof runs through the bad record, so block 2 cannot be proven...
        with pytest.raises(CoreCorruptError, match="block 2"):
            core.get(2)
        with pytest.raises(CoreCorruptError):
            core.prove(2)
        # ...but block 3 hashes its own bytes and proves through intact siblings, and that
        # proof vouches for block 2's leaf as well.
        assert core.get(3) == BLOCKS[3]
        assert core.get(2) == BLOCKS[2]
        report = core.verify_all()
        assert (report.bad_blocks, report.bad_nodes) == ((), (6,))
        report = core.verify_all(repair_nodes=True)
        assert report.repaired_nodes == (6,)
        assert core.get(2) == BLOCKS[2]
        assert core.verify_all().ok
    _assert_intact(tmp_path / "c")


@pytest.mark.parametrize(
    ("node", "field_offset"),
    [(5, 0), (5, 33), (11, 10), (8, 41)],
    ids=["parent-hash", "parent-size", "parent-11", "leaf-offset"],
)
def test_flipped_node_record_is_found_and_repaired(
    tmp_path: Path, node: int, field_offset: int
) -> None:
    _make(tmp_path / "c")
    _flip(tmp_path / "c" / "nodes", _node_offset(node) + field_offset)
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        report = core.verify_all(repair_nodes=True)
        assert (report.bad_blocks, report.bad_nodes, report.repaired_nodes) == (
            (),
            (node,),
            (node,),
        )
    _assert_intact(tmp_path / "c")


def test_flipped_root_record_still_opens(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    assert flat_tree.full_roots(10) == [7, 17]
    _flip(tmp_path / "c" / "nodes", _node_offset(7) + 1)
    with Core.open(tmp_path / "c", KEY_PAIR) as core:
        # The roots were recomputed from the blocks and checked against the signature.
        assert [core.get(i) for i in range(10)] == BLOCKS
        assert (
            core.tree_node(7).hash
            != (tmp_path / "c" / "nodes").read_bytes()[_node_offset(7) : _node_offset(7) + 32]
        )
        report = core.verify_all(repair_nodes=True)
        assert (report.bad_nodes, report.repaired_nodes) == ((7,), (7,))
    _assert_intact(tmp_path / "c")


def test_damaged_roots_and_blocks_refuse_to_open(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    _flip(tmp_path / "c" / "nodes", _node_offset(7) + 1)
    _flip(tmp_path / "c" / "blocks", _block_offset(0))
    with pytest.raises(CoreCorruptError, match="signed state"):
        Core.open(tmp_path / "c", KEY_PAIR)


def test_mirror_of_a_damaged_core_is_refused_the_damage(tmp_path: Path) -> None:
    _make(tmp_path / "c")
    shutil.copytree(tmp_path / "c", tmp_path / "copy")
    _flip(tmp_path / "copy" / "blocks", _block_offset(9))
    with Mirror.open(tmp_path / "copy") as damaged:
        with pytest.raises(CoreCorruptError, match="block 9"):
            damaged.export_update(0)
        assert damaged.verify_all().bad_blocks == (9,)
