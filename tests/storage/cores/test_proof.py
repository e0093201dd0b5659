"""Block proofs: ours equal the vectors' ``proofForBlock2``, and verification accepts exactly
the genuine proofs."""

from __future__ import annotations

import attrs
import pytest

from hypertuna.storage.cores import (
    CoreIdentity,
    CoreVerificationError,
    Proof,
    TreeNode,
    VectorCore,
    VectorSet,
    create_proof,
    verify_proof,
)
from tests.storage.cores.conftest import LETTERS


def _identity(core: VectorCore) -> CoreIdentity:
    if core.compat:
        return CoreIdentity.from_key(core.key, compat=True)
    return CoreIdentity.from_key(core.key, manifest=core.encoded_manifest)


@pytest.mark.parametrize("letter", LETTERS)
def test_create_reproduces_vector_proof(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    by_index = {node.index: node for node in core.nodes}
    proof = create_proof(
        index=2,
        value=core.blocks[2],
        length=core.length,
        fork=core.fork,
        signature=core.signature,
        node=by_index.__getitem__,
    )
    assert proof == core.proof


@pytest.mark.parametrize("letter", LETTERS)
def test_verify_accepts_vector_proof(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    verified = verify_proof(core.proof, _identity(core))
    assert verified.index == 2
    assert verified.value == core.blocks[2]
    assert (verified.length, verified.fork) == (core.length, core.fork)
    assert verified.roots == core.roots
    assert verified.tree_hash == core.tree_hash


@pytest.mark.parametrize("letter", LETTERS)
def test_every_block_proves_and_verifies(vectors: VectorSet, letter: str) -> None:
    core = vectors.core(letter)
    by_index = {node.index: node for node in core.nodes}
    for index in range(core.length):
        proof = create_proof(
            index=index,
            value=core.blocks[index],
            length=core.length,
            fork=core.fork,
            signature=core.signature,
            node=by_index.__getitem__,
        )
        assert verify_proof(proof, _identity(core)).value == core.blocks[index]


def _flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _tamperings(proof: Proof) -> dict[str, Proof]:
    block, upgrade = proof.block, proof.upgrade
    first, second = block.nodes
    return {
        "value": attrs.evolve(proof, block=attrs.evolve(block, value=_flip(block.value))),
        "value extended": attrs.evolve(proof, block=attrs.evolve(block, value=block.value + b"!")),
        "index": attrs.evolve(proof, block=attrs.evolve(block, index=3)),
        "node hash": attrs.evolve(
            proof,
            block=attrs.evolve(block, nodes=(attrs.evolve(first, hash=_flip(first.hash)), second)),
        ),
        "node size": attrs.evolve(
            proof,
            block=attrs.evolve(block, nodes=(attrs.evolve(first, size=first.size + 1), second)),
        ),
        "node index": attrs.evolve(
            proof, block=attrs.evolve(block, nodes=(attrs.evolve(first, index=8), second))
        ),
        "node missing": attrs.evolve(proof, block=attrs.evolve(block, nodes=(first,))),
        "nodes swapped": attrs.evolve(proof, block=attrs.evolve(block, nodes=(second, first))),
        "upgrade node hash": attrs.evolve(
            proof,
            upgrade=attrs.evolve(
                upgrade,
                nodes=(
                    attrs.evolve(upgrade.nodes[0], hash=_flip(upgrade.nodes[0].hash)),
                    *upgrade.nodes[1:],
                ),
            ),
        ),
        "upgrade node dropped": attrs.evolve(
            proof, upgrade=attrs.evolve(upgrade, nodes=upgrade.nodes[:-1])
        ),
        "signature": attrs.evolve(
            proof, upgrade=attrs.evolve(upgrade, signature=_flip(upgrade.signature, 10))
        ),
        "signature envelope": attrs.evolve(
            proof, upgrade=attrs.evolve(upgrade, signature=_flip(upgrade.signature, 0))
        ),
        "length": attrs.evolve(proof, upgrade=attrs.evolve(upgrade, length=upgrade.length + 1)),
        "shorter length": attrs.evolve(
            proof, upgrade=attrs.evolve(upgrade, length=upgrade.length - 1)
        ),
        "fork": attrs.evolve(proof, fork=proof.fork + 1),
        "start": attrs.evolve(proof, upgrade=attrs.evolve(upgrade, start=1)),
        "additional nodes": attrs.evolve(
            proof,
            upgrade=attrs.evolve(
                upgrade, additional_nodes=(TreeNode(index=14, size=1, hash=bytes(32)),)
            ),
        ),
    }


@pytest.mark.parametrize("letter", LETTERS)
@pytest.mark.parametrize(
    "what",
    [
        "value",
        "value extended",
        "index",
        "node hash",
        "node size",
        "node index",
        "node missing",
        "nodes swapped",
        "upgrade node hash",
        "upgrade node dropped",
        "signature",
        "signature envelope",
        "length",
        "shorter length",
        "fork",
        "start",
        "additional nodes",
    ],
)
def test_verify_rejects_tampered_proof(vectors: VectorSet, letter: str, what: str) -> None:
    core = vectors.core(letter)
    with pytest.raises(CoreVerificationError):
        verify_proof(_tamperings(core.proof)[what], _identity(core))


def test_verify_rejects_other_cores_identity(vectors: VectorSet) -> None:
    a, b, c = vectors.core("A"), vectors.core("B"), vectors.core("C")
    # Same key pair and tree, but a compat signature is not valid for the manifest core and
    # the other way round; and C's signer is someone else.
    with pytest.raises(CoreVerificationError, match="signature"):
        verify_proof(b.proof, _identity(a))
    with pytest.raises(CoreVerificationError, match="signature"):
        verify_proof(a.proof, _identity(b))
    with pytest.raises(CoreVerificationError, match="signature"):
        verify_proof(a.proof, _identity(c))


def test_tampered_vectors_proofs(tampered: VectorSet, vectors: VectorSet) -> None:
    # The tampered file flips a byte of A's block 1 (a sibling leaf in the proof for block 2,
    # where the proof carries its hash, not its bytes) and of C's stored signature. A proof
    # built from the tampered block 1 must fail; C's signature must not verify.
    a = tampered.core("A")
    proof = create_proof(
        index=1,
        value=a.blocks[1],
        length=a.length,
        fork=a.fork,
        signature=a.signature,
        node={node.index: node for node in a.nodes}.__getitem__,
    )
    with pytest.raises(CoreVerificationError, match="signature"):
        verify_proof(proof, _identity(a))
    c = tampered.core("C")
    forged = attrs.evolve(c.proof, upgrade=attrs.evolve(c.proof.upgrade, signature=c.signature))
    with pytest.raises(CoreVerificationError, match="signature"):
        verify_proof(forged, _identity(c))
    assert verify_proof(vectors.core("C").proof, _identity(c)).length == c.length
