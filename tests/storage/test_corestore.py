"""The core store: named cores from a primary key, mirrors, one open per process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypertuna.storage.cores import (
    Core,
    CoreIdentity,
    CoreUpdate,
    CoreVerificationError,
    Mirror,
)
from hypertuna.storage.cores.vectors import load_vectors
from hypertuna.storage.corestore import PRIMARY_KEY_FILE, CoreStore, CoreStoreError
from tests.storage.cores.conftest import VECTOR_DIR

VECTORS = VECTOR_DIR / "vectors.json"


def test_primary_key_is_created_private_and_kept(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path / "cores") as store:
        key = store.key_for("relay/demo")
        store.writable("relay/demo").append([b"one"])
    path = tmp_path / "cores" / PRIMARY_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    with CoreStore.open(tmp_path / "cores") as again:
        assert again.key_for("relay/demo") == key
        core = again.writable("relay/demo")
        assert (core.key, core.length, core.get(0)) == (key, 1, b"one")


def test_named_keys_match_corestore(tmp_path: Path) -> None:
    vector = load_vectors(VECTORS).core("C")
    root = tmp_path / "cores"
    root.mkdir()
    assert vector.primary_key is not None and vector.name is not None
    (root / PRIMARY_KEY_FILE).write_bytes(vector.primary_key)
    os.chmod(root / PRIMARY_KEY_FILE, 0o600)
    with CoreStore.open(root) as store:
        assert store.key_for(vector.name) == vector.key
        assert store.writable(vector.name).key == vector.key


def test_different_names_different_cores(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path) as store:
        a, b = store.writable("a"), store.writable("b")
        assert a.key != b.key
        assert store.writable("a") is a
        assert store.directory_for(a.key) != store.directory_for(b.key)
        assert store.has(a.key) and not store.has(bytes(32))


def test_missing_primary_key_with_cores_refuses(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path) as store:
        store.writable("relay/x").append([b"data"])
    (tmp_path / PRIMARY_KEY_FILE).unlink()
    with pytest.raises(CoreStoreError, match="missing"):
        CoreStore.open(tmp_path)
    assert not (tmp_path / PRIMARY_KEY_FILE).exists()


@pytest.mark.parametrize("content", [b"", b"short", bytes(33)])
def test_malformed_primary_key_refuses(tmp_path: Path, content: bytes) -> None:
    (tmp_path / PRIMARY_KEY_FILE).write_bytes(content)
    os.chmod(tmp_path / PRIMARY_KEY_FILE, 0o600)
    with pytest.raises(CoreStoreError, match="primary key is 32"):
        CoreStore.open(tmp_path)


def test_world_readable_primary_key_refuses(tmp_path: Path) -> None:
    CoreStore.open(tmp_path).close()
    os.chmod(tmp_path / PRIMARY_KEY_FILE, 0o644)
    with pytest.raises(CoreStoreError, match="chmod 600"):
        CoreStore.open(tmp_path)


def test_mirror_follows_a_writer_in_another_store(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path / "writer") as writer, CoreStore.open(tmp_path / "gw") as gw:
        core = writer.writable("log")
        core.append([b"a", b"b"])
        mirror = gw.mirror(core.identity)
        assert isinstance(mirror, Mirror) and gw.mirror(core.identity) is mirror
        assert mirror.apply(core.export_update(0)) == 2
        # Same blocks, signed by another key: refused, and the mirror is unchanged.
        other = Core.create(tmp_path / "other", writer.key_pair("other"))
        other.append([b"a", b"b", b"c"])
        forged = CoreUpdate(2, (b"c",), 0, other.export_update(2).signature)
        other.close()
        with pytest.raises(CoreVerificationError):
            mirror.apply(forged)
        assert mirror.length == 2
    with CoreStore.open(tmp_path / "gw") as gw:
        mirror = gw.mirror(CoreIdentity.from_key(core.key, manifest=core.manifest))
        assert [mirror.get(i) for i in range(mirror.length)] == [b"a", b"b"]


def test_one_role_per_core(tmp_path: Path) -> None:
    with CoreStore.open(tmp_path) as store:
        core = store.writable("mine")
        with pytest.raises(CoreStoreError, match="written here"):
            store.mirror(core.identity)


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = CoreStore.open(tmp_path)
    store.close()
    store.close()
    with pytest.raises(CoreStoreError, match="closed"):
        store.writable("x")
