"""The Merkle tree of a core: node hashes, roots and the tree hash (hypercore 11 byte for byte).

- :func:`leaf_hash` ``= B2b(0x00 ‖ u64(len(block)) ‖ block)``; block ``i`` is node ``2i``.
- :func:`parent_hash` ``= B2b(0x01 ‖ u64(left.size + right.size) ‖ left.hash ‖ right.hash)``.
- :func:`tree_hash` ``= B2b(0x02 ‖ Σ(root.hash ‖ u64(root.index) ‖ u64(root.size)))`` over the
  roots of the length (:func:`~hypertuna.storage.cores.flat_tree.full_roots`), left to right.

:class:`TreeNode` is the public value. The append and verify paths work on plain
``(index, size, hash)`` tuples (:data:`RawNode`) through :func:`grow`, because building an object
per node would cost more than hashing a small block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import attrs

from hypertuna.storage.cores import flat_tree

__all__ = [
    "RawNode",
    "TreeNode",
    "build_tree",
    "grow",
    "leaf_hash",
    "parent_hash",
    "parent_node",
    "tree_hash",
]

RawNode: TypeAlias = tuple[int, int, bytes]
"""``(flat-tree index, size in bytes, 32-byte hash)``."""

_blake2b = hashlib.blake2b


@attrs.frozen
class TreeNode:
    """One Merkle tree node: its flat-tree ``index``, the byte ``size`` of the blocks under it,
    and its 32-byte ``hash``."""

    index: int = attrs.field()
    size: int = attrs.field()
    hash: bytes = attrs.field()

    @index.validator
    def _check_index(self, _attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"node index must be >= 0, got {value}")

    @size.validator
    def _check_size(self, _attribute: object, value: int) -> None:
        if not 0 <= value < 2**64:
            raise ValueError(f"node size must fit in a u64, got {value}")

    @hash.validator
    def _check_hash(self, _attribute: object, value: bytes) -> None:
        if len(value) != 32:
            raise ValueError(f"node hash must be 32 bytes, got {len(value)}")

    @classmethod
    def from_raw(cls, raw: RawNode) -> TreeNode:
        """The node of an ``(index, size, hash)`` tuple."""
        return cls(index=raw[0], size=raw[1], hash=raw[2])

    def raw(self) -> RawNode:
        """This node as an ``(index, size, hash)`` tuple."""
        return (self.index, self.size, self.hash)


def leaf_hash(block: bytes) -> bytes:
    """The hash of a block's leaf node."""
    h = _blake2b(b"\x00" + len(block).to_bytes(8, "little"), digest_size=32)
    h.update(block)
    return h.digest()


def parent_hash(left_size: int, left_hash: bytes, right_size: int, right_hash: bytes) -> bytes:
    """The hash of the parent of two sibling nodes (``left`` has the lower index)."""
    return _blake2b(
        b"\x01" + (left_size + right_size).to_bytes(8, "little") + left_hash + right_hash,
        digest_size=32,
    ).digest()


def parent_node(left: TreeNode, right: TreeNode) -> TreeNode:
    """The parent of two sibling nodes; ``ValueError`` if they are not siblings."""
    if flat_tree.sibling(left.index) != right.index or left.index > right.index:
        raise ValueError(f"nodes {left.index} and {right.index} are not left/right siblings")
    return TreeNode(
        index=flat_tree.parent(left.index),
        size=left.size + right.size,
        hash=parent_hash(left.size, left.hash, right.size, right.hash),
    )


def tree_hash(roots: Iterable[RawNode | TreeNode]) -> bytes:
    """The hash of a tree state over its roots, left to right."""
    h = _blake2b(b"\x02", digest_size=32)
    for root in roots:
        index, size, digest = root.raw() if isinstance(root, TreeNode) else root
        h.update(digest + index.to_bytes(8, "little") + size.to_bytes(8, "little"))
    return h.digest()


def grow(
    roots: Sequence[RawNode], length: int, blocks: Iterable[bytes]
) -> tuple[list[RawNode], list[RawNode]]:
    """Append ``blocks`` to a tree of ``length`` blocks whose roots are ``roots``.

    Returns the new nodes in the order appends create them (each block's leaf, then the parents
    it completes, bottom-up) and the roots of the new length. The caller vouches that ``roots``
    are the roots of ``length``; only their hashes and sizes are read.
    """
    new_roots = list(roots)
    created: list[RawNode] = []
    append_created = created.append
    block_index = length
    for block in blocks:
        size = len(block)
        h = _blake2b(b"\x00" + size.to_bytes(8, "little"), digest_size=32)
        h.update(block)
        node: RawNode = (2 * block_index, size, h.digest())
        append_created(node)
        # Block i completes one parent per trailing one bit of i, each joining the newest root.
        pending = block_index
        while pending & 1:
            left_index, left_size, left_digest = new_roots.pop()
            right_index, right_size, right_digest = node
            total = left_size + right_size
            node = (
                (left_index + right_index) >> 1,
                total,
                _blake2b(
                    b"\x01" + total.to_bytes(8, "little") + left_digest + right_digest,
                    digest_size=32,
                ).digest(),
            )
            append_created(node)
            pending >>= 1
        new_roots.append(node)
        block_index += 1
    return created, new_roots


def build_tree(blocks: Iterable[bytes]) -> tuple[list[TreeNode], list[TreeNode]]:
    """Every node of the tree of ``blocks`` sorted by index, and its roots left to right."""
    created, roots = grow((), 0, blocks)
    nodes = sorted((TreeNode.from_raw(raw) for raw in created), key=lambda node: node.index)
    return nodes, [TreeNode.from_raw(raw) for raw in roots]
