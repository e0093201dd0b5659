"""Typed access to hypercore test vectors (the JSON format of ``shared/vectors/hypercore``).

``load_vectors(path)`` reads a ``vectors.json`` file and returns a :class:`VectorSet`; each
:class:`VectorCore` carries one dumped core with bytes already decoded from hex, nodes and roots
as :class:`~hypertuna.storage.cores.tree.TreeNode` and ``proofForBlock2`` as a
:class:`~hypertuna.storage.cores.proof.Proof`. ``VectorSet.core("A")`` picks a core by the
letter its label starts with. A file that does not follow the format raises ``ValueError``.
Nothing here checks the values: that is what the tests do with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from hypertuna.storage.cores.crypto import Manifest
from hypertuna.storage.cores.proof import BlockProof, Proof, UpgradeProof
from hypertuna.storage.cores.tree import TreeNode

__all__ = ["VectorCore", "VectorSet", "load_vectors", "parse_vectors"]


@attrs.frozen
class VectorCore:
    """One core of a vector file. Optional fields are set only for the cores that have them:
    ``encryption_key``/``plaintext_blocks`` (encrypted core), ``primary_key``/``name``/
    ``secret_key`` (Corestore core)."""

    label: str
    key: bytes
    discovery_key: bytes
    public_key: bytes
    compat: bool
    manifest: Manifest
    encoded_manifest: bytes
    length: int
    byte_length: int
    fork: int
    blocks: tuple[bytes, ...]
    nodes: tuple[TreeNode, ...]
    roots: tuple[TreeNode, ...]
    tree_hash: bytes
    signature: bytes
    signed_bytes: bytes
    signed_bytes_verifies: bool
    proof: Proof
    encryption_key: bytes | None = None
    plaintext_blocks: tuple[bytes, ...] | None = None
    primary_key: bytes | None = None
    name: str | None = None
    secret_key: bytes | None = None

    @property
    def letter(self) -> str:
        """The letter the label starts with (``"A"`` for ``"A: new Hypercore..."``)."""
        return self.label.split(":", 1)[0].strip()


@attrs.frozen
class VectorSet:
    """A whole vector file."""

    versions: Mapping[str, str]
    seed: bytes
    namespaces: Mapping[str, bytes]
    cores: tuple[VectorCore, ...]

    def core(self, letter: str) -> VectorCore:
        """The core whose label starts with ``letter``; ``KeyError`` if there is none."""
        for core in self.cores:
            if core.letter == letter:
                return core
        raise KeyError(letter)


def _field(data: Mapping[str, Any], name: str) -> Any:
    try:
        return data[name]
    except KeyError:
        raise ValueError(f"vector field {name!r} is missing") from None
    except TypeError:
        raise ValueError(f"expected an object holding {name!r}") from None


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what} is not valid hex") from None


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer")
    return value


def _nodes(value: Any, what: str) -> tuple[TreeNode, ...]:
    if not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list of nodes")
    return tuple(
        TreeNode(
            index=_int(_field(node, "index"), f"{what} index"),
            size=_int(_field(node, "size"), f"{what} size"),
            hash=_hex(_field(node, "hash"), f"{what} hash"),
        )
        for node in value
    )


def _manifest(value: Any) -> Manifest:
    signers = _field(value, "signers")
    if (
        _field(value, "version") != 1
        or _field(value, "hash") != "blake2b"
        or _field(value, "quorum") != 1
        or _field(value, "allowPatch") is not False
        or not isinstance(signers, Sequence)
        or len(signers) != 1
        or _field(signers[0], "signature") != "ed25519"
    ):
        raise ValueError("only version-1 manifests with one Ed25519 signer are supported")
    for absent in ("prologue", "linked", "userData"):
        if value.get(absent) is not None:
            raise ValueError(f"manifest field {absent!r} is not supported")
    signer = signers[0]
    return Manifest(
        public_key=_hex(_field(signer, "publicKey"), "manifest publicKey"),
        namespace=_hex(_field(signer, "namespace"), "manifest namespace"),
    )


def _proof(value: Any) -> Proof:
    block = _field(value, "block")
    upgrade = _field(value, "upgrade")
    return Proof(
        fork=_int(_field(value, "fork"), "proof fork"),
        block=BlockProof(
            index=_int(_field(block, "index"), "proof block index"),
            value=_hex(_field(block, "value"), "proof block value"),
            nodes=_nodes(_field(block, "nodes"), "proof block nodes"),
        ),
        upgrade=UpgradeProof(
            start=_int(_field(upgrade, "start"), "upgrade start"),
            length=_int(_field(upgrade, "length"), "upgrade length"),
            nodes=_nodes(_field(upgrade, "nodes"), "upgrade nodes"),
            additional_nodes=_nodes(_field(upgrade, "additionalNodes"), "additional nodes"),
            signature=_hex(_field(upgrade, "signature"), "upgrade signature"),
        ),
    )


def _blocks(value: Any, what: str) -> tuple[bytes, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{what} must be a list of hex strings")
    return tuple(_hex(block, what) for block in value)


def _optional_hex(data: Mapping[str, Any], name: str) -> bytes | None:
    value = data.get(name)
    return None if value is None else _hex(value, name)


def _core(data: Mapping[str, Any]) -> VectorCore:
    if not isinstance(data, Mapping):
        raise ValueError("each core must be an object")
    plaintext = data.get("plaintextBlocks")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")
    compat = _field(data, "compat")
    verifies = _field(data, "signedBytesVerifies")
    if not isinstance(compat, bool) or not isinstance(verifies, bool):
        raise ValueError("compat and signedBytesVerifies must be booleans")
    label = _field(data, "label")
    if not isinstance(label, str):
        raise ValueError("label must be a string")
    return VectorCore(
        label=label,
        key=_hex(_field(data, "key"), "key"),
        discovery_key=_hex(_field(data, "discoveryKey"), "discoveryKey"),
        public_key=_hex(_field(data, "publicKey"), "publicKey"),
        compat=compat,
        manifest=_manifest(_field(data, "manifest")),
        encoded_manifest=_hex(_field(data, "encodedManifest"), "encodedManifest"),
        length=_int(_field(data, "length"), "length"),
        byte_length=_int(_field(data, "byteLength"), "byteLength"),
        fork=_int(_field(data, "fork"), "fork"),
        blocks=_blocks(_field(data, "blocks"), "blocks"),
        nodes=_nodes(_field(data, "nodes"), "nodes"),
        roots=_nodes(_field(data, "roots"), "roots"),
        tree_hash=_hex(_field(data, "treeHash"), "treeHash"),
        signature=_hex(_field(data, "signature"), "signature"),
        signed_bytes=_hex(_field(data, "signedBytes"), "signedBytes"),
        signed_bytes_verifies=verifies,
        proof=_proof(_field(data, "proofForBlock2")),
        encryption_key=_optional_hex(data, "encryptionKey"),
        plaintext_blocks=None if plaintext is None else _blocks(plaintext, "plaintextBlocks"),
        primary_key=_optional_hex(data, "primaryKey"),
        name=name,
        secret_key=_optional_hex(data, "secretKeyHex"),
    )


def parse_vectors(data: Mapping[str, Any]) -> VectorSet:
    """The :class:`VectorSet` of an already parsed vector document."""
    versions = _field(data, "versions")
    namespaces = _field(data, "namespaces")
    cores = _field(data, "cores")
    if not isinstance(versions, Mapping) or not isinstance(namespaces, Mapping):
        raise ValueError("versions and namespaces must be objects")
    if not isinstance(cores, Sequence):
        raise ValueError("cores must be a list")
    return VectorSet(
        versions={str(name): str(version) for name, version in versions.items()},
        seed=_hex(_field(data, "seed"), "seed"),
        namespaces={str(name): _hex(value, name) for name, value in namespaces.items()},
        cores=tuple(_core(core) for core in cores),
    )


def load_vectors(path: str | Path) -> VectorSet:
    """Read a vector file (``vectors.json`` or ``vectors-tampered.json``)."""
    with open(path, encoding="utf-8") as file:
        document = json.load(file)
    if not isinstance(document, Mapping):
        raise ValueError("a vector file holds one JSON object")
    return parse_vectors(document)
