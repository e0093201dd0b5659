"""The vector loader reads the JSON format into typed values and refuses malformed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hypertuna.storage.cores import Proof, TreeNode, VectorSet, load_vectors
from hypertuna.storage.cores.vectors import parse_vectors
from tests.storage.cores.conftest import VECTOR_DIR


def test_loads_every_core(vectors: VectorSet) -> None:
    assert [core.letter for core in vectors.cores] == ["A", "B", "E", "D", "C"]
    assert vectors.seed == bytes([7]) * 32
    assert vectors.versions["hypercore"] == "11.37.1"
    a = vectors.core("A")
    assert a.nodes[0] == TreeNode(
        index=0,
        size=5,
        hash=bytes.fromhex("f2391083cfaa8043205fed76cdff843902146ca92aebcd7a196814ec45d8c8f8"),
    )
    assert isinstance(a.proof, Proof)
    assert a.proof.block.index == 2
    assert a.encryption_key is None and a.primary_key is None
    d = vectors.core("D")
    assert d.encryption_key == bytes([5]) * 32
    assert d.plaintext_blocks == a.blocks
    c = vectors.core("C")
    assert c.name == "worker-log" and c.primary_key == bytes([1]) * 32
    with pytest.raises(KeyError):
        vectors.core("Z")


def _document() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((VECTOR_DIR / "vectors.json").read_text())
    return result


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("seed"), "'seed' is missing"),
        (lambda d: d["cores"][0].pop("treeHash"), "'treeHash' is missing"),
        (lambda d: d["cores"][0].__setitem__("key", "zz"), "not valid hex"),
        (lambda d: d["cores"][0].__setitem__("length", "7"), "integer"),
        (lambda d: d["cores"][0]["manifest"].__setitem__("quorum", 2), "version-1"),
        (lambda d: d["cores"][0]["nodes"][0].pop("size"), "'size' is missing"),
    ],
)
def test_rejects_malformed_documents(mutate: Any, message: str) -> None:
    document = _document()
    mutate(document)
    with pytest.raises(ValueError, match=message):
        parse_vectors(document)


def test_rejects_non_object_file(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="one JSON object"):
        load_vectors(path)
