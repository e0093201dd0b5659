"""Flat-tree index math against hand-worked values and against a tree built by appends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypertuna.storage.cores import flat_tree
from hypertuna.storage.cores.tree import grow


def test_hand_worked_indices() -> None:
    assert [flat_tree.depth(i) for i in range(8)] == [0, 1, 0, 2, 0, 1, 0, 3]
    assert [flat_tree.offset(i) for i in (0, 2, 4, 1, 5, 3, 11)] == [0, 1, 2, 0, 1, 0, 1]
    assert flat_tree.index(2, 1) == 11
    assert flat_tree.parent(0) == 1
    assert flat_tree.parent(4) == 5
    assert flat_tree.parent(5) == 3
    assert flat_tree.parent(3) == 7
    assert flat_tree.sibling(4) == 6
    assert flat_tree.sibling(5) == 1
    assert flat_tree.sibling(3) == 11
    assert flat_tree.children(3) == (1, 5)
    assert flat_tree.children(9) == (8, 10)
    assert flat_tree.spans(3) == (0, 6)
    assert flat_tree.spans(12) == (12, 12)
    assert flat_tree.count(3) == 7


def test_full_roots() -> None:
    assert flat_tree.full_roots(0) == []
    assert flat_tree.full_roots(1) == [0]
    assert flat_tree.full_roots(4) == [3]
    assert flat_tree.full_roots(6) == [3, 9]
    assert flat_tree.full_roots(7) == [3, 9, 12]
    assert flat_tree.full_roots(8) == [7]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no children"):
        flat_tree.children(4)
    with pytest.raises(ValueError, match=">= 0"):
        flat_tree.parent(-1)
    with pytest.raises(ValueError, match=">= 0"):
        flat_tree.full_roots(-1)


@given(st.integers(min_value=0, max_value=2**40))
def test_parent_children_sibling_agree(i: int) -> None:
    p = flat_tree.parent(i)
    assert i in flat_tree.children(p)
    s = flat_tree.sibling(i)
    assert flat_tree.parent(s) == p
    assert s != i
    left, right = flat_tree.spans(p)
    assert left <= i <= right
    assert flat_tree.count(p) == right - left + 1


@given(st.integers(min_value=0, max_value=2**40))
def test_roots_cover_the_blocks_exactly(length: int) -> None:
    covered = 0
    for root in flat_tree.full_roots(length):
        left, right = flat_tree.spans(root)
        assert left == 2 * covered
        covered = right // 2 + 1
    assert covered == length


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 8, 13, 64, 100])
def test_node_positions_follow_creation_order(length: int) -> None:
    created, roots = grow((), 0, [bytes([i]) for i in range(length)])
    assert [flat_tree.node_position(index) for index, _, _ in created] == list(range(len(created)))
    assert len(created) == flat_tree.node_count(length)
    assert [index for index, _, _ in roots] == flat_tree.full_roots(length)
