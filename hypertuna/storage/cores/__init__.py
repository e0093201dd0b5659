"""Signed append-only logs ("cores"), byte-compatible with hypercore 11's crypto.

A core is a log of blocks under a Merkle tree whose roots one Ed25519 key signs. The public API:

Protocols (:mod:`.log`)
    :class:`BlockLog` (``key``, ``length``, ``get``) and :class:`AppendLog` (``append``) are what
    code above this layer programs against; :class:`Core` and :class:`Mirror` satisfy them.
    Errors: :class:`CoreError` ⊃ :class:`CoreCorruptError` (stored bytes fail verification) and
    :class:`CoreVerificationError` (offered data does not verify; nothing was changed).

Create, open, append, get (:mod:`.core`)
    ``Core.create(directory, KeyPair.from_seed(seed), compat=False, encryption_key=None)``,
    ``Core.open(directory, key_pair)``, ``core.append([b"...", ...]) -> length`` (one signature
    and one fsync round per batch, durable on return), ``core.truncate(length) -> fork``,
    ``core.get(i)``, ``core.verify_all() -> VerifyReport``.

Mirror
    ``Mirror.create(directory, CoreIdentity.from_key(key, manifest=...))``, then
    ``mirror.apply(core.export_update(mirror.length))`` verifies and stores new blocks.

Prove and verify (:mod:`.proof`)
    ``core.prove(i) -> Proof``; ``verify_proof(proof, identity) -> VerifiedBlock``.

Crypto and tree, pure functions (:mod:`.crypto`, :mod:`.tree`, :mod:`.flat_tree`)
    Namespaces, :class:`Manifest`, :class:`CoreIdentity`, :class:`KeyPair`,
    :func:`corestore_key_pair`, :func:`discovery_key`, :func:`signable`,
    :func:`encode_signature` / :func:`decode_signature`, :class:`BlockCipher`;
    :class:`TreeNode`, :func:`leaf_hash`, :func:`parent_hash`, :func:`tree_hash`,
    :func:`build_tree`.

Vectors (:mod:`.vectors`)
    ``load_vectors(path) -> VectorSet`` reads hypercore test vectors into typed values.
"""

from __future__ import annotations

from hypertuna.storage.cores import flat_tree
from hypertuna.storage.cores.core import Core, CoreUpdate, Mirror, VerifyReport
from hypertuna.storage.cores.crypto import (
    NAMESPACES,
    BlockCipher,
    CoreIdentity,
    KeyPair,
    Manifest,
    corestore_key_pair,
    decode_signature,
    discovery_key,
    encode_signature,
    manifest_hash,
    signable,
    verify_signature,
)
from hypertuna.storage.cores.log import (
    AppendLog,
    BlockLog,
    CoreCorruptError,
    CoreError,
    CoreVerificationError,
)
from hypertuna.storage.cores.proof import (
    BlockProof,
    Proof,
    UpgradeProof,
    VerifiedBlock,
    create_proof,
    verify_proof,
)
from hypertuna.storage.cores.tree import (
    TreeNode,
    build_tree,
    leaf_hash,
    parent_hash,
    tree_hash,
)
from hypertuna.storage.cores.vectors import VectorCore, VectorSet, load_vectors

__all__ = [
    "NAMESPACES",
    "AppendLog",
    "BlockCipher",
    "BlockLog",
    "BlockProof",
    "Core",
    "CoreCorruptError",
    "CoreError",
    "CoreIdentity",
    "CoreUpdate",
    "CoreVerificationError",
    "KeyPair",
    "Manifest",
    "Mirror",
    "Proof",
    "TreeNode",
    "UpgradeProof",
    "VectorCore",
    "VectorSet",
    "VerifiedBlock",
    "VerifyReport",
    "build_tree",
    "corestore_key_pair",
    "create_proof",
    "decode_signature",
    "discovery_key",
    "encode_signature",
    "flat_tree",
    "leaf_hash",
    "load_vectors",
    "manifest_hash",
    "parent_hash",
    "signable",
    "tree_hash",
    "verify_proof",
    "verify_signature",
]
