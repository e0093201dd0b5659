"""Block proofs with an upgrade: one block checked against a signed length, knowing only the key.

The structure is hypercore 11's wire proof (``proofForBlock2`` in the vectors)::

    Proof(fork,
          block=BlockProof(index, value, nodes),        # value: the block as stored
          upgrade=UpgradeProof(start=0, length, nodes, additional_nodes=(), signature))

``block.nodes`` are the siblings on the way from the block's leaf up to the root of ``length``
that holds it, bottom-up; ``upgrade.nodes`` are the other roots of ``length``, left to right;
``signature`` is the stored signature of ``(tree hash, length, fork)``.

- :func:`create_proof` builds a proof from a node lookup (a core's stored nodes); cores expose
  it as ``prove(index)``.
- :func:`verify_proof` checks a proof against a core's
  :class:`~hypertuna.storage.cores.crypto.CoreIdentity` and returns the
  :class:`VerifiedBlock`, or raises :class:`~hypertuna.storage.cores.CoreVerificationError`.

Only upgrades from ``start = 0`` (a reader that has no earlier state) are produced and accepted;
``additional_nodes`` is always empty for them.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from hypertuna.storage.cores import flat_tree
from hypertuna.storage.cores.crypto import CoreIdentity
from hypertuna.storage.cores.log import CoreVerificationError
from hypertuna.storage.cores.tree import TreeNode, leaf_hash, parent_hash, tree_hash

__all__ = [
    "BlockProof",
    "Proof",
    "UpgradeProof",
    "VerifiedBlock",
    "create_proof",
    "verify_proof",
]


def _non_negative(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class BlockProof:
    """A block as stored and the sibling nodes from its leaf up to its root."""

    index: int = attrs.field(validator=_non_negative)
    value: bytes
    nodes: tuple[TreeNode, ...]


@attrs.frozen
class UpgradeProof:
    """The rest of the roots of ``length`` and the signature over that state."""

    start: int = attrs.field(validator=_non_negative)
    length: int = attrs.field(validator=_non_negative)
    nodes: tuple[TreeNode, ...]
    additional_nodes: tuple[TreeNode, ...]
    signature: bytes


@attrs.frozen
class Proof:
    """A block proof with an upgrade to a signed ``(length, fork)``."""

    fork: int = attrs.field(validator=_non_negative)
    block: BlockProof
    upgrade: UpgradeProof


@attrs.frozen
class VerifiedBlock:
    """What a verified proof establishes: block ``index`` (as stored) belongs to the signed
    state ``(length, fork)`` whose roots and tree hash are given."""

    index: int
    value: bytes
    length: int
    fork: int
    roots: tuple[TreeNode, ...]
    tree_hash: bytes
    signature: bytes


def create_proof(
    *,
    index: int,
    value: bytes,
    length: int,
    fork: int,
    signature: bytes,
    node: Callable[[int], TreeNode],
) -> Proof:
    """The proof of block ``index`` (stored bytes ``value``) in the state ``(length, fork)``.

    ``node(i)`` returns stored node ``i``; the caller vouches for the nodes (a core checks them
    against its roots first). ``ValueError`` if ``index`` is not below ``length``.
    """
    if not 0 <= index < length:
        raise ValueError(f"block {index} is not below length {length}")
    roots = flat_tree.full_roots(length)
    current = 2 * index
    path: list[TreeNode] = []
    while current not in roots:
        path.append(node(flat_tree.sibling(current)))
        current = flat_tree.parent(current)
    return Proof(
        fork=fork,
        block=BlockProof(index=index, value=bytes(value), nodes=tuple(path)),
        upgrade=UpgradeProof(
            start=0,
            length=length,
            nodes=tuple(node(root) for root in roots if root != current),
            additional_nodes=(),
            signature=bytes(signature),
        ),
    )


def verify_proof(proof: Proof, identity: CoreIdentity) -> VerifiedBlock:
    """Check ``proof`` against the core ``identity``; :class:`CoreVerificationError` says why it
    fails. Nothing but the proof and the identity is trusted."""
    block, upgrade = proof.block, proof.upgrade
    if upgrade.start != 0:
        raise CoreVerificationError("only upgrades from start 0 are supported")
    if upgrade.additional_nodes:
        raise CoreVerificationError("an upgrade from start 0 has no additional nodes")
    if block.index >= upgrade.length:
        raise CoreVerificationError(
            f"block {block.index} is not below the upgrade length {upgrade.length}"
        )

    current, size, digest = 2 * block.index, len(block.value), leaf_hash(block.value)
    for sibling in block.nodes:
        if sibling.index != flat_tree.sibling(current):
            raise CoreVerificationError(
                f"proof node {sibling.index} is not the sibling of node {current}"
            )
        if size + sibling.size >= 2**64:
            raise CoreVerificationError("proof node sizes overflow a u64")
        if sibling.index < current:
            digest = parent_hash(sibling.size, sibling.hash, size, digest)
        else:
            digest = parent_hash(size, digest, sibling.size, sibling.hash)
        size += sibling.size
        current = flat_tree.parent(current)

    expected_roots = flat_tree.full_roots(upgrade.length)
    if current not in expected_roots:
        raise CoreVerificationError(
            f"block nodes lead to node {current}, not to a root of length {upgrade.length}"
        )
    others = [root for root in expected_roots if root != current]
    if [node.index for node in upgrade.nodes] != others:
        raise CoreVerificationError(
            f"upgrade nodes must be the other roots of length {upgrade.length}: {others}"
        )
    by_index = {node.index: node for node in upgrade.nodes}
    by_index[current] = TreeNode(index=current, size=size, hash=digest)
    roots = tuple(by_index[index] for index in expected_roots)
    state_hash = tree_hash(roots)
    if not identity.verify(upgrade.signature, state_hash, upgrade.length, proof.fork):
        raise CoreVerificationError(
            f"the signature does not sign length {upgrade.length} fork {proof.fork} "
            "with these nodes"
        )
    return VerifiedBlock(
        index=block.index,
        value=block.value,
        length=upgrade.length,
        fork=proof.fork,
        roots=roots,
        tree_hash=state_hash,
        signature=upgrade.signature,
    )
