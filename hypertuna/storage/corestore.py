"""All the cores of one process, under one directory, found by key.

A :class:`CoreStore` keeps every core it holds in ``<root>/<dk[:2]>/<dk>/`` (``dk`` = the
core's discovery key in hex), so a core's files never reveal its key and the directory of any
core can be found from the key alone. It owns two kinds of core:

- **named writable cores** (:meth:`CoreStore.writable`): their key pairs are derived from the
  store's 32-byte *primary key* and a name, exactly as Corestore 7 does
  (:func:`~hypertuna.storage.cores.corestore_key_pair`), so the same name always gives the same
  core and no per-core secret needs to be stored. The primary key lives in ``<root>/primary-key``
  with 0600 permissions; it is created once and never replaced: a store whose primary key is
  missing while cores exist, unreadable or malformed refuses to open (:class:`CoreStoreError`).
- **mirrors** (:meth:`CoreStore.mirror`) of other writers' cores, verified block by block.

A core is open at most once per process (each holds an exclusive lock on its files); the store
caches open cores and closes them all in :meth:`CoreStore.close`. Calls block on disk; actors run
them through ``trio.to_thread``.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from hypertuna.storage.cores import (
    Core,
    CoreError,
    CoreIdentity,
    KeyPair,
    Mirror,
    corestore_key_pair,
    discovery_key,
)
from hypertuna.storage.cores.layout import HEADER_FILE

__all__ = ["PRIMARY_KEY_FILE", "CoreStore", "CoreStoreError"]

PRIMARY_KEY_FILE: Final = "primary-key"
_PRIMARY_KEY_BYTES: Final = 32


class CoreStoreError(Exception):
    """The store cannot be opened or a core is not what was asked for."""


def _load_primary_key(root: Path) -> bytes:
    path = root / PRIMARY_KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if any(child.is_dir() for child in root.iterdir()):
            # Cores exist, so a key existed: making a new one would silently orphan them.
            raise CoreStoreError(
                f"{path} is missing but {root} already holds cores; restore the primary key"
                " from a backup (a new one would not open the existing cores)"
            ) from None
        return _create_primary_key(path)
    except OSError as exc:
        raise CoreStoreError(f"cannot read the primary key {path}: {exc}") from exc
    if len(data) != _PRIMARY_KEY_BYTES:
        raise CoreStoreError(
            f"{path} holds {len(data)} bytes, a primary key is {_PRIMARY_KEY_BYTES}"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CoreStoreError(f"{path} is readable by others (mode {mode:o}); run chmod 600 on it")
    return data


def _create_primary_key(path: Path) -> bytes:
    key = secrets.token_bytes(_PRIMARY_KEY_BYTES)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


class CoreStore:
    """The cores under ``root``; build it with :meth:`open`."""

    def __init__(self, root: Path, primary_key: bytes) -> None:
        self.root = root
        self._primary_key = primary_key
        self._open: dict[bytes, Core | Mirror] = {}
        # Actors call in from worker threads; the cache is the only shared state here.
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> CoreStore:
        """The store at ``root`` (created with a new primary key if it does not exist yet)."""
        path = Path(root)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise CoreStoreError(f"cannot create the core directory {path}: {exc}") from exc
        return cls(path, _load_primary_key(path))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def key_pair(self, name: str) -> KeyPair:
        """The key pair of the named core ``name`` (the same for the same name, always)."""
        if not name:
            raise ValueError("a core name must not be empty")
        return corestore_key_pair(self._primary_key, name)

    def key_for(self, name: str) -> bytes:
        """The core key of the named core ``name``, without opening or creating it."""
        return CoreIdentity.for_key_pair(self.key_pair(name)).key

    def directory_for(self, key: bytes) -> Path:
        """Where the core ``key`` lives (whether or not it exists)."""
        hex_dk = discovery_key(key).hex()
        return self.root / hex_dk[:2] / hex_dk

    def has(self, key: bytes) -> bool:
        """Whether the core ``key`` exists in this store."""
        return (self.directory_for(key) / HEADER_FILE).exists()

    def writable(self, name: str) -> Core:
        """The named core ``name``, created empty if it does not exist; writable."""
        key_pair = self.key_pair(name)
        key = CoreIdentity.for_key_pair(key_pair).key
        with self._lock:
            self._check_open()
            cached = self._open.get(key)
            if isinstance(cached, Core):
                return cached
            if cached is not None:
                raise CoreStoreError(f"core {key.hex()} is open as a mirror")
            core = Core.open_or_create(self.directory_for(key), key_pair)
            self._open[key] = core
            return core

    def mirror(self, identity: CoreIdentity) -> Mirror:
        """The mirror of the core ``identity``, created empty if it does not exist."""
        with self._lock:
            self._check_open()
            cached = self._open.get(identity.key)
            if isinstance(cached, Mirror):
                return cached
            if cached is not None:
                raise CoreStoreError(f"core {identity.key.hex()} is written here, not mirrored")
            directory = self.directory_for(identity.key)
            if (directory / HEADER_FILE).exists():
                mirror = Mirror.open(directory)
                if mirror.key != identity.key:
                    mirror.close()
                    raise CoreStoreError(f"{directory} holds another core")
            else:
                mirror = Mirror.create(directory, identity)
            self._open[identity.key] = mirror
            return mirror

    def open_mirror(self, key: bytes) -> Mirror | None:
        """The existing mirror of the core ``key`` (opened without its manifest), or None when
        this store holds no such core or holds it as a writable core."""
        with self._lock:
            self._check_open()
            cached = self._open.get(key)
            if isinstance(cached, Mirror):
                return cached
            if cached is not None:
                return None
            directory = self.directory_for(key)
            if not (directory / HEADER_FILE).exists():
                return None
            mirror = Mirror.open(directory)
            if mirror.key != key:
                mirror.close()
                raise CoreStoreError(f"{directory} holds another core")
            self._open[key] = mirror
            return mirror

    def release(self, key: bytes) -> None:
        """Close the core ``key`` if it is open (it can be opened again later)."""
        with self._lock:
            core = self._open.pop(key, None)
        if core is not None:
            core.close()

    def remove(self, key: bytes) -> Path:
        """Close the core ``key`` if it is open and take its files out of the store: its
        directory is renamed to a hidden name under the root, which is returned for the caller
        to delete (so the slow part can run elsewhere). ``CoreStoreError`` when the store holds
        no such core."""
        with self._lock:
            self._check_open()
            directory = self.directory_for(key)
            if not directory.exists():
                raise CoreStoreError(f"no core {key.hex()} in this store")
            core = self._open.pop(key, None)
            if core is not None:
                core.close()
            trash = self.root / f".removed-{directory.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(directory, trash)
            return trash

    def close(self) -> None:
        """Close every open core. Idempotent."""
        with self._lock:
            self._closed = True
            cores = list(self._open.values())
            self._open.clear()
        errors: list[CoreError | OSError] = []
        for core in cores:
            try:
                core.close()
            except (CoreError, OSError) as exc:
                errors.append(exc)
        if errors:
            raise CoreStoreError(f"closing {len(errors)} core(s) failed: {errors[0]}")

    def _check_open(self) -> None:
        if self._closed:
            raise CoreStoreError("the core store is closed")
