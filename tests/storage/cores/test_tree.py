"""The Merkle tree functions reproduce every node, root and tree hash of the vectors."""

from __future__ import annotations

import pytest

from hypertuna.storage.cores import (
    TreeNode,
    VectorSet,
    build_tree,
    leaf_hash,
    parent_hash,
    tree_hash,
)
from hypertuna.storage.cores.tree import parent_node
from tests.storage.cores.conftest import LETTERS


@pytest.mark.parametrize("letter", LETTERS)
def test_nodes_roots_and_tree_hash(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    nodes, roots = build_tree(core.blocks)
    assert tuple(nodes) == core.nodes
    assert tuple(roots) == core.roots
    assert tree_hash(roots) == core.tree_hash
    assert sum(root.size for root in roots) == core.byte_length


def test_leaf_and_parent_definitions(vectors: VectorSet) -> None:
    core = vectors.core("A")
    by_index = {node.index: node for node in core.nodes}
    assert leaf_hash(core.blocks[0]) == by_index[0].hash
    left, right = by_index[0], by_index[2]
    assert parent_hash(left.size, left.hash, right.size, right.hash) == by_index[1].hash
    assert parent_node(left, right) == by_index[1]
    with pytest.raises(ValueError, match="not left/right siblings"):
        parent_node(right, left)


def test_tampered_block_changes_its_leaf(vectors: VectorSet, tampered: VectorSet) -> None:
    good, bad = vectors.core("A"), tampered.core("A")
    changed = [i for i, (x, y) in enumerate(zip(good.blocks, bad.blocks, strict=True)) if x != y]
    assert changed == [1]
    nodes, roots = build_tree(bad.blocks)
    assert [n.index for n, m in zip(nodes, good.nodes, strict=True) if n != m] == [1, 2, 3]
    assert tree_hash(roots) != good.tree_hash


def test_tree_node_validates() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TreeNode(index=0, size=1, hash=b"x")
    with pytest.raises(ValueError, match="u64"):
        TreeNode(index=0, size=2**64, hash=bytes(32))
    with pytest.raises(ValueError, match=">= 0"):
        TreeNode(index=-1, size=0, hash=bytes(32))
