"""Flat-tree index math: a binary tree laid out in one in-order array.

Block ``i`` is node ``2 * i`` (depth 0); a parent sits between its two children, so node
``1`` is the parent of nodes ``0`` and ``2``, node ``3`` the parent of ``1`` and ``5``, and so
on. Every function here is pure integer arithmetic on those indices; ``ValueError`` is raised
for negative indices and for questions that have no answer (the children of a leaf).

``full_roots(n)`` gives the roots (peaks) of a tree of ``n`` blocks, left to right: the nodes
whose hashes a signature covers.
"""

from __future__ import annotations

__all__ = [
    "children",
    "count",
    "depth",
    "full_roots",
    "index",
    "left_span",
    "node_count",
    "node_position",
    "offset",
    "parent",
    "right_span",
    "sibling",
    "spans",
]


def _check(i: int) -> None:
    if i < 0:
        raise ValueError(f"flat-tree index must be >= 0, got {i}")


def depth(i: int) -> int:
    """Depth of node ``i``: 0 for blocks, the number of trailing one bits otherwise."""
    _check(i)
    return ((i + 1) & -(i + 1)).bit_length() - 1


def offset(i: int) -> int:
    """Position of node ``i`` among the nodes of its depth, from the left."""
    return i >> (depth(i) + 1)


def index(d: int, o: int) -> int:
    """The node at depth ``d`` and offset ``o``."""
    if d < 0 or o < 0:
        raise ValueError(f"depth and offset must be >= 0, got {d}, {o}")
    return ((2 * o + 1) << d) - 1


def parent(i: int) -> int:
    """The parent of node ``i``."""
    d = depth(i)
    return index(d + 1, offset(i) >> 1)


def sibling(i: int) -> int:
    """The other child of ``parent(i)``."""
    d = depth(i)
    return index(d, offset(i) ^ 1)


def children(i: int) -> tuple[int, int]:
    """The left and right children of node ``i``; ``ValueError`` for a block (depth 0)."""
    d = depth(i)
    if d == 0:
        raise ValueError(f"node {i} is a block and has no children")
    half = 1 << (d - 1)
    return i - half, i + half


def left_span(i: int) -> int:
    """The leftmost block node (even index) under node ``i``."""
    d = depth(i)
    return i - (1 << d) + 1


def right_span(i: int) -> int:
    """The rightmost block node (even index) under node ``i``."""
    d = depth(i)
    return i + (1 << d) - 1


def spans(i: int) -> tuple[int, int]:
    """``(left_span(i), right_span(i))``."""
    return left_span(i), right_span(i)


def count(i: int) -> int:
    """Number of nodes in the subtree rooted at ``i`` (itself included)."""
    return (2 << depth(i)) - 1


def full_roots(length: int) -> list[int]:
    """The roots of a tree of ``length`` blocks, left to right (``7`` gives ``[3, 9, 12]``).

    Each root spans the largest power-of-two run of blocks that still fits after the roots to
    its left, so the roots of every length are complete nodes that never change afterwards.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    roots: list[int] = []
    start = 0
    remaining = length
    while remaining:
        factor = 1 << (remaining.bit_length() - 1)
        roots.append(start + factor - 1)
        start += 2 * factor
        remaining -= factor
    return roots


def node_count(length: int) -> int:
    """How many complete nodes (blocks and parents) a tree of ``length`` blocks has."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return 2 * length - length.bit_count()


def node_position(i: int) -> int:
    """Where node ``i`` falls when nodes are listed in the order an append creates them.

    Appending block ``b`` creates node ``2b`` and then, bottom-up, every parent whose rightmost
    block is ``b``. Listing nodes in that order makes the nodes of length ``n`` exactly the first
    ``node_count(n)`` entries, so a store can keep them in a file that only grows at its end and
    is cut back by truncation.
    """
    last_block = right_span(i) >> 1
    return node_count(last_block) + depth(i)
