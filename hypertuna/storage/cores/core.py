"""Durable cores on disk: :class:`Core` (this process signs) and :class:`Mirror` (verified copy).

Opening and creating
    ``Core.create(directory, key_pair, compat=False, encryption_key=None)`` makes a new writable
    core (manifest v1 by default) in ``directory``; ``Core.open(directory, key_pair,
    encryption_key=None)`` opens it again (``Core.open_or_create`` does either).
    ``Mirror.create(directory, identity, encryption_key=None)`` makes an empty mirror of the
    core named by a :class:`~hypertuna.storage.cores.crypto.CoreIdentity` (its key and manifest,
    no secret); ``Mirror.open(directory, encryption_key=None)`` opens one. A directory holds one
    core (see :mod:`~hypertuna.storage.cores.layout`) and one open object at a time (an
    exclusive ``flock``; a second open raises :class:`~hypertuna.storage.cores.CoreError`).
    Close with ``close()`` or use the object as a context manager.

Reading (both)
    ``length``, ``byte_length``, ``fork``, ``signature`` (stored form, over the current length;
    ``None`` before the first one), ``roots``, ``tree_hash``, ``key``, ``discovery_key``,
    ``identity``, ``manifest``. ``get(i)`` returns block ``i`` (plaintext when the encryption
    key is known, else the stored form); ``get_stored(i)`` the stored form. Every block served
    has been checked against the signed roots (its leaf hash, then its path up to a node already
    proven in this process); a block that fails raises :class:`CoreCorruptError` and is never
    returned. ``tree_node(i)`` returns a proven node, ``prove(i)`` a
    :class:`~hypertuna.storage.cores.proof.Proof` for block ``i`` at the current length, and
    ``verify_all(repair_nodes=False)`` re-reads everything and returns a :class:`VerifyReport`
    naming bad blocks and bad node records (rewriting the records from the blocks if asked).

Writing
    ``Core.append(blocks)`` appends a batch: one signature and one round of ``fdatasync``; the
    blocks are durable when it returns (group commit). ``Core.truncate(length)`` cuts the core
    back and signs the shorter state with ``fork + 1``.

Mirroring
    ``export_update(start)`` (both) returns a :class:`CoreUpdate`: the stored blocks from
    ``start``, the fork and the signature of the current length, which is all a mirror needs
    besides the identity. ``Mirror.apply(update)`` recomputes the tree over the new blocks
    itself, checks the signature, and only then writes them durably; an update that does not
    verify (or does not follow on from the mirror) raises :class:`CoreVerificationError` and
    changes nothing. An update that starts below the mirror's length is a truncation and needs a
    higher fork.

On opening, bytes past the last state record (a write that was not acknowledged) are cut off;
the roots are read back and checked against the state's tree hash and signature. When they fail
the roots are recomputed from the blocks, and the core opens only if those verify.

Calls block on disk; actors run them through ``trio.to_thread``. Writes are serialised by a lock;
reads may run at the same time as one write and never see blocks before they are durable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import attrs

from hypertuna.storage.cores import flat_tree
from hypertuna.storage.cores.crypto import BlockCipher, CoreIdentity, KeyPair, Manifest
from hypertuna.storage.cores.layout import (
    BLOCKS_FILE,
    HEADER_FILE,
    NODE_RECORD_BYTES,
    NODE_TAIL,
    NODES_FILE,
    STATE_COMPACT_RECORDS,
    STATE_FILE,
    STATE_SLOT_BYTES,
    Header,
    StateKind,
    StateRecord,
    decode_state_slot,
    encode_state_slot,
    lock_exclusively,
    pread_exact,
    pwrite_all,
    pwritev_all,
    write_file_atomically,
)
from hypertuna.storage.cores.log import (
    AppendLog,
    BlockLog,
    CoreCorruptError,
    CoreError,
    CoreVerificationError,
)
from hypertuna.storage.cores.proof import Proof, create_proof
from hypertuna.storage.cores.tree import RawNode, TreeNode, grow, leaf_hash, parent_hash, tree_hash

__all__ = ["Core", "CoreUpdate", "Mirror", "VerifyReport"]

_OPEN_FLAGS: Final = os.O_RDWR | os.O_CLOEXEC
_EMPTY_TREE_HASH: Final = tree_hash(())


@attrs.frozen
class CoreUpdate:
    """What a mirror needs to follow a core: stored blocks ``start ..`` and the signature of
    ``(length, fork)`` where ``length = start + len(blocks)``.

    ``start`` below the mirror's length means the writer truncated: the mirror keeps its first
    ``start`` blocks and replaces the rest.
    """

    start: int = attrs.field()
    blocks: tuple[bytes, ...]
    fork: int = attrs.field()
    signature: bytes

    @start.validator
    def _check_start(self, _attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"start must be >= 0, got {value}")

    @fork.validator
    def _check_fork(self, _attribute: object, value: int) -> None:
        if value < 0:
            raise ValueError(f"fork must be >= 0, got {value}")

    @property
    def length(self) -> int:
        """The length the signature is over."""
        return self.start + len(self.blocks)


@attrs.frozen
class VerifyReport:
    """The outcome of :meth:`Core.verify_all` at ``(length, fork)``.

    ``bad_blocks``: blocks that cannot be served (their stored bytes do not match the signed
    tree, or nothing proves what they should be). ``bad_nodes``: flat-tree indices of stored
    node records whose hash, size or byte offset is wrong (as found, before any repair).
    ``repaired_nodes``: those of them rewritten by ``verify_all(repair_nodes=True)``.
    """

    length: int
    fork: int
    bad_blocks: tuple[int, ...]
    bad_nodes: tuple[int, ...]
    repaired_nodes: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether everything stored verified."""
        return not self.bad_blocks and not self.bad_nodes


def _node_records(created: Sequence[RawNode], byte_offset: int) -> bytes:
    """The node-file records of ``created`` (creation order), the first block at
    ``byte_offset``."""
    pack = NODE_TAIL.pack
    records: list[bytes] = []
    append = records.append
    end = byte_offset
    for index, size, digest in created:
        if index & 1 == 0:
            append(digest + pack(size, end))
            end += size
        else:
            # A parent is created right after its rightmost block, so its span ends at `end`.
            append(digest + pack(size, end - size))
    return b"".join(records)


def _parse_record(record: bytes) -> tuple[bytes, int, int]:
    size, offset = NODE_TAIL.unpack_from(record, 32)
    return record[:32], size, offset


class _StoredCore:
    """The files, the verified in-memory state and everything both kinds of core read."""

    def __init__(
        self,
        directory: Path,
        header: Header,
        cipher: BlockCipher | None,
        fds: tuple[int, int, int, int],
    ) -> None:
        self._directory = directory
        self._header = header
        self._identity = header.identity
        self._cipher = cipher
        self._header_fd, self._blocks_fd, self._nodes_fd, self._state_fd = fds
        self._write_lock = threading.Lock()
        self._closed = False
        # Set when a write failed after it may have reached the disk: the files may now differ
        # from memory (and Linux may have dropped dirty pages after a failed fsync), so the
        # only safe way on is to reopen.
        self._broken: BaseException | None = None
        self._state_size = 0
        self._length = 0
        self._fork = 0
        self._byte_length = 0
        self._signature: bytes | None = None
        self._tree_hash = _EMPTY_TREE_HASH
        self._roots: list[RawNode] = []
        self._root_values: dict[int, tuple[int, bytes]] = {}
        # One byte per flat-tree index: 1 once the stored record's hash and size are proven
        # against the roots in this process. Proven nodes end later walks early, so reading
        # every block once costs about two node reads per block, not log(n).
        self._proven = bytearray()

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def _create_files(directory: Path, header: Header) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / HEADER_FILE).exists():
            raise FileExistsError(f"a core already exists in {directory}")
        initial = StateRecord(
            kind=StateKind.CREATE,
            length=0,
            fork=0,
            byte_length=0,
            tree_hash=_EMPTY_TREE_HASH,
            signature=None,
        )
        for name, content in (
            (BLOCKS_FILE, b""),
            (NODES_FILE, b""),
            (STATE_FILE, encode_state_slot(initial)),
        ):
            fd = os.open(
                directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            try:
                pwrite_all(fd, content, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        # The header goes last: a directory without one holds no core, whatever else it has.
        write_file_atomically(directory, HEADER_FILE, header.encode())

    @classmethod
    def _open_directory(
        cls, directory: Path, encryption_key: bytes | None, *, require_key: bool
    ) -> Self:
        directory = Path(directory)
        header_fd = os.open(directory / HEADER_FILE, os.O_RDONLY | os.O_CLOEXEC)
        fds = [header_fd]
        try:
            lock_exclusively(header_fd, directory)
            header = Header.decode(pread_exact(header_fd, os.fstat(header_fd).st_size, 0, "header"))
            cipher = cls._cipher_for(header, encryption_key, require_key=require_key)
            for name in (BLOCKS_FILE, NODES_FILE, STATE_FILE):
                fds.append(os.open(directory / name, _OPEN_FLAGS))
            core = cls(directory, header, cipher, (fds[0], fds[1], fds[2], fds[3]))
            core._load_state()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return core

    @staticmethod
    def _cipher_for(
        header: Header, encryption_key: bytes | None, *, require_key: bool
    ) -> BlockCipher | None:
        if encryption_key is None:
            if require_key and header.key_check is not None:
                raise ValueError("this core is encrypted: its encryption key is needed to write")
            return None
        if header.identity.manifest is None:
            raise ValueError("encryption of compat cores is not supported")
        cipher = BlockCipher.for_core(encryption_key, header.identity.key)
        if header.key_check is not None and cipher.key_check() != header.key_check:
            raise ValueError("wrong encryption key for this core")
        if header.key_check is None and require_key:
            raise ValueError("this core is not encrypted")
        return cipher

    def _load_state(self) -> None:
        size = os.fstat(self._state_fd).st_size
        whole = size // STATE_SLOT_BYTES
        data = pread_exact(self._state_fd, whole * STATE_SLOT_BYTES, 0, "state log")
        state: StateRecord | None = None
        last = whole - 1
        while last >= 0:
            offset = last * STATE_SLOT_BYTES
            state = decode_state_slot(data[offset : offset + STATE_SLOT_BYTES])
            if state is not None:
                break
            last -= 1
        if state is None:
            raise CoreCorruptError(f"no valid state record in {self._directory}")
        kept = (last + 1) * STATE_SLOT_BYTES
        if kept != size:
            # A slot that was being written when the process stopped: never acknowledged.
            os.ftruncate(self._state_fd, kept)
            os.fsync(self._state_fd)
        self._state_size = kept
        self._cut_files(state)
        roots = self._read_roots(state)
        if tree_hash(roots) != state.tree_hash:
            roots = self._recompute_roots(state)
        if state.signature is None:
            if state.kind not in (StateKind.CREATE, StateKind.TRUNCATE):
                raise CoreCorruptError("an unsigned state record that should be signed")
        elif not self._identity.verify(state.signature, state.tree_hash, state.length, state.fork):
            raise CoreCorruptError("the stored signature does not sign the stored state")
        if sum(size for _, size, _ in roots) != state.byte_length:
            raise CoreCorruptError("the roots do not add up to the stored byte length")
        self._set_state(state, roots)
        self._proven = bytearray(2 * state.length)

    def _cut_files(self, state: StateRecord) -> None:
        wanted = (
            (self._blocks_fd, state.byte_length, "blocks"),
            (self._nodes_fd, flat_tree.node_count(state.length) * NODE_RECORD_BYTES, "nodes"),
        )
        for fd, expected, what in wanted:
            actual = os.fstat(fd).st_size
            if actual < expected:
                raise CoreCorruptError(
                    f"the {what} file has {actual} bytes, the signed state needs {expected}"
                )
            if actual > expected:
                os.ftruncate(fd, expected)
                os.fsync(fd)

    def _read_roots(self, state: StateRecord) -> list[RawNode]:
        roots: list[RawNode] = []
        for index in flat_tree.full_roots(state.length):
            digest, size, _ = self._read_node(index)
            roots.append((index, size, digest))
        return roots

    def _recompute_roots(self, state: StateRecord) -> list[RawNode]:
        """The roots of ``state`` computed from the blocks, when the stored roots fail: a
        damaged root record must not make the blocks unreadable."""

        def stored_blocks() -> Iterator[bytes]:
            for block in range(state.length):
                _, size, offset = self._read_node(2 * block)
                yield os.pread(self._blocks_fd, size, offset)

        _, roots = grow((), 0, stored_blocks())
        if tree_hash(roots) != state.tree_hash:
            raise CoreCorruptError(
                f"neither the stored roots nor the blocks of {self._directory} match the signed "
                f"state (length {state.length}, fork {state.fork})"
            )
        return roots

    def _set_state(self, state: StateRecord, roots: list[RawNode]) -> None:
        self._roots = roots
        self._root_values = {index: (size, digest) for index, size, digest in roots}
        self._fork = state.fork
        self._byte_length = state.byte_length
        self._signature = state.signature
        self._tree_hash = state.tree_hash
        self._length = state.length

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the files (and the directory lock). Idempotent."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._blocks_fd, self._nodes_fd, self._state_fd, self._header_fd):
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise CoreError("the core is closed")

    def _check_writable(self) -> None:
        self._check_usable()
        if self._broken is not None:
            raise CoreError("an earlier write failed; reopen the core") from self._broken

    # -- public state ----------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """Where the core's files are."""
        return self._directory

    @property
    def identity(self) -> CoreIdentity:
        """The core's key and signer."""
        return self._identity

    @property
    def key(self) -> bytes:
        """The 32-byte core key (manifest hash, or the public key of a compat core)."""
        return self._identity.key

    @property
    def discovery_key(self) -> bytes:
        """The discovery key peers announce for this core."""
        return self._identity.discovery_key

    @property
    def manifest(self) -> Manifest | None:
        """The manifest (``None`` for a compat core)."""
        return self._identity.manifest

    @property
    def compat(self) -> bool:
        """Whether this is a compat core."""
        return self._identity.manifest is None

    @property
    def encrypted(self) -> bool:
        """Whether this object knows an encryption key (``get`` returns plaintext)."""
        return self._cipher is not None

    @property
    def length(self) -> int:
        """Number of blocks."""
        return self._length

    @property
    def byte_length(self) -> int:
        """Total size of the stored blocks (with padding, for encrypted cores)."""
        return self._byte_length

    @property
    def fork(self) -> int:
        """0, plus one per truncation."""
        return self._fork

    @property
    def signature(self) -> bytes | None:
        """The stored signature of ``(tree_hash, length, fork)``."""
        return self._signature

    @property
    def tree_hash(self) -> bytes:
        """The hash of the roots of the current length."""
        return self._tree_hash

    @property
    def roots(self) -> tuple[TreeNode, ...]:
        """The roots of the current length, left to right."""
        return tuple(TreeNode.from_raw(root) for root in self._roots)

    # -- reading ---------------------------------------------------------------------------------

    def _read_node(self, index: int) -> tuple[bytes, int, int]:
        """Stored ``(hash, size, byte offset)`` of node ``index`` (not checked)."""
        position = flat_tree.node_position(index) * NODE_RECORD_BYTES
        return _parse_record(
            pread_exact(self._nodes_fd, NODE_RECORD_BYTES, position, f"tree node {index}")
        )

    def _prove(self, index: int, size: int, digest: bytes) -> None:
        """Check that ``(size, digest)`` is node ``index`` of the signed tree, walking up the
        stored siblings to a root or an already proven node; raise :class:`CoreCorruptError`
        otherwise. The siblings used are proven by a successful walk."""
        proven, root_values = self._proven, self._root_values
        current = index
        siblings: list[int] = []
        while True:
            root = root_values.get(current)
            if root is not None:
                ok = root == (size, digest)
                break
            if current != index and proven[current]:
                stored_digest, stored_size, _ = self._read_node(current)
                ok = (stored_size, stored_digest) == (size, digest)
                break
            sibling = flat_tree.sibling(current)
            sibling_digest, sibling_size, _ = self._read_node(sibling)
            if sibling < current:
                digest = parent_hash(sibling_size, sibling_digest, size, digest)
            else:
                digest = parent_hash(size, digest, sibling_size, sibling_digest)
            size += sibling_size
            siblings.append(sibling)
            current = flat_tree.parent(current)
        if not ok:
            raise CoreCorruptError(f"tree node {index} does not verify against the signed roots")
        for sibling in siblings:
            proven[sibling] = 1

    def _proven_node(self, index: int) -> RawNode:
        """Stored node ``index`` after checking it against the roots."""
        root = self._root_values.get(index)
        if root is not None:
            return (index, root[0], root[1])
        digest, size, _ = self._read_node(index)
        if not self._proven[index]:
            self._prove(index, size, digest)
            self._proven[index] = 1
        return (index, size, digest)

    def tree_node(self, index: int) -> TreeNode:
        """Node ``index`` of the current tree, checked against the signed roots.

        ``IndexError`` unless it is a complete node of the current length;
        :class:`CoreCorruptError` if its record is damaged.
        """
        self._check_usable()
        if index < 0 or flat_tree.right_span(index) >= 2 * self._length:
            raise IndexError(f"node {index} is not in a tree of length {self._length}")
        return TreeNode.from_raw(self._proven_node(index))

    def get_stored(self, index: int) -> bytes:
        """Block ``index`` as stored (ciphertext with padding for an encrypted core), checked
        against the signed tree. ``IndexError`` out of range; :class:`CoreCorruptError` if it
        fails verification."""
        self._check_usable()
        length = self._length
        if not 0 <= index < length:
            raise IndexError(f"block {index} is not below length {length}")
        try:
            return self._read_block(index)
        except (CoreCorruptError, OSError):
            if index >= self._length:
                # A truncation cut the block away while we read it.
                raise IndexError(f"block {index} is not below length {self._length}") from None
            raise

    def _read_block(self, index: int) -> bytes:
        leaf = 2 * index
        stored_digest, size, offset = self._read_node(leaf)
        data = os.pread(self._blocks_fd, size, offset)
        if len(data) != size:
            raise CoreCorruptError(f"block {index} is cut short")
        digest = leaf_hash(data)
        root = self._root_values.get(leaf)
        if root is not None:
            if root != (size, digest):
                raise CoreCorruptError(f"block {index} does not match the signed tree")
        elif self._proven[leaf]:
            if digest != stored_digest:
                raise CoreCorruptError(f"block {index} does not match its tree node")
        else:
            try:
                self._prove(leaf, size, digest)
            except CoreCorruptError:
                raise CoreCorruptError(f"block {index} does not match the signed tree") from None
            if digest == stored_digest:
                self._proven[leaf] = 1
        return data

    def get(self, index: int) -> bytes:
        """Block ``index``: plaintext when the encryption key is known, else as stored.
        ``IndexError`` out of range; :class:`CoreCorruptError` if it fails verification (a
        damaged block is never returned)."""
        stored = self.get_stored(index)
        if self._cipher is None:
            return stored
        return self._cipher.decrypt(index, stored)

    def _prefix_roots(self, length: int) -> list[RawNode]:
        if length == self._length:
            return list(self._roots)
        return [self._proven_node(index) for index in flat_tree.full_roots(length)]

    def _stored_range(self, start: int) -> list[bytes]:
        """Stored blocks ``start .. length``, checked by rebuilding their part of the tree."""
        length = self._length
        if start == length:
            return []
        prefix = self._prefix_roots(start)
        offset = sum(size for _, size, _ in prefix)
        first = flat_tree.node_count(start)
        count = flat_tree.node_count(length) - first
        records = pread_exact(
            self._nodes_fd, count * NODE_RECORD_BYTES, first * NODE_RECORD_BYTES, "tree nodes"
        )
        sizes: list[int] = []
        position = 0
        for block in range(start, length):
            sizes.append(NODE_TAIL.unpack_from(records, position + 32)[0])
            # Skip the leaf and the parents this block completed (one per trailing one bit).
            position += NODE_RECORD_BYTES * (1 + ((block + 1) & -(block + 1)).bit_length() - 1)
        data = os.pread(self._blocks_fd, self._byte_length - offset, offset)
        blocks: list[bytes] = []
        cursor = 0
        for size in sizes:
            blocks.append(data[cursor : cursor + size])
            cursor += size
        if cursor == len(data) and grow(prefix, start, blocks)[1] == self._roots:
            return blocks
        # Something is off: read block by block so the error names the damaged block.
        return [self._read_block(block) for block in range(start, length)]

    def export_update(self, start: int) -> CoreUpdate:
        """The blocks from ``start`` with the current fork and signature, for a mirror that
        holds the first ``start`` blocks of this fork (``start`` lower after a truncation).
        The blocks are read (and checked) into memory at once.

        ``ValueError`` if ``start`` is above the length; :class:`CoreError` if the current
        state is not signed.
        """
        self._check_usable()
        with self._write_lock:
            if not 0 <= start <= self._length:
                raise ValueError(f"start {start} is not within length {self._length}")
            if self._signature is None:
                raise CoreError("the current state of the core is not signed")
            return CoreUpdate(
                start=start,
                blocks=tuple(self._stored_range(start)),
                fork=self._fork,
                signature=self._signature,
            )

    def prove(self, index: int) -> Proof:
        """A proof of block ``index`` with an upgrade from 0 to the current length and fork."""
        self._check_usable()
        with self._write_lock:
            if self._signature is None:
                raise CoreError("the current state of the core is not signed")
            value = self.get_stored(index)
            return create_proof(
                index=index,
                value=value,
                length=self._length,
                fork=self._fork,
                signature=self._signature,
                node=lambda i: TreeNode.from_raw(self._proven_node(i)),
            )

    # -- full check ------------------------------------------------------------------------------

    def verify_all(self, *, repair_nodes: bool = False) -> VerifyReport:
        """Read every block and node record and check them against the signed roots.

        Each block's leaf is recomputed from its bytes; then, from the roots down, the value
        every node must have is derived from the recomputed or the stored children, whichever
        hashes to its parent. Blocks whose bytes differ from that value (or whose value cannot
        be derived) are bad blocks; records that differ are bad nodes. A bad node record can
        keep neighbouring good blocks from being served (their proof runs through it);
        ``repair_nodes=True`` rewrites bad records from the derived values, durably, when every
        block's value is known. Damaged blocks can only be replaced from another copy. Memory
        grows with the number of nodes.
        """
        with self._write_lock:
            if repair_nodes:
                self._check_writable()
            else:
                self._check_usable()
            return self._verify_all(repair_nodes)

    def _verify_all(self, repair_nodes: bool) -> VerifyReport:
        length = self._length
        total = flat_tree.node_count(length)
        records = pread_exact(self._nodes_fd, total * NODE_RECORD_BYTES, 0, "tree nodes")
        width = 2 * length
        stored: list[tuple[int, bytes] | None] = [None] * width
        offsets: list[int] = [0] * width
        computed: list[tuple[int, bytes] | None] = [None] * width
        position = 0
        for block in range(length):
            # Records come in creation order: the block's leaf, then one parent per trailing
            # one bit of the block index, bottom-up.
            node = 2 * block
            parents = ((block + 1) & -(block + 1)).bit_length() - 1
            for level in range(parents + 1):
                if level:
                    node = flat_tree.parent(node)
                digest, size, offset = _parse_record(
                    records[position : position + NODE_RECORD_BYTES]
                )
                position += NODE_RECORD_BYTES
                stored[node] = (size, digest)
                offsets[node] = offset
                if level == 0:
                    data = os.pread(self._blocks_fd, size, offset)
                    if len(data) == size:
                        computed[node] = (size, leaf_hash(data))
                else:
                    left, right = flat_tree.children(node)
                    computed[node] = _join(computed[left], computed[right])

        trusted: list[tuple[int, bytes] | None] = [None] * width
        pending = list(self._roots)
        for index, size, digest in self._roots:
            trusted[index] = (size, digest)
        while pending:
            index, size, digest = pending.pop()
            if index & 1 == 0:
                continue
            left, right = flat_tree.children(index)
            pair = _matching_children(
                (size, digest),
                computed[index],
                (stored[left], stored[right]),
                (computed[left], computed[right]),
            )
            if pair is None:
                continue
            for child, child_value in zip((left, right), pair, strict=True):
                trusted[child] = child_value
                pending.append((child, child_value[0], child_value[1]))

        leaf_offsets: list[int] = [0] * length
        byte_offset = 0
        for block in range(length):
            leaf_offsets[block] = byte_offset
            value = trusted[2 * block] or stored[2 * block]
            byte_offset += value[0] if value is not None else 0
        for block in range(length):
            node, value = 2 * block, trusted[2 * block]
            if (
                value is not None
                and computed[node] != value
                and offsets[node] != leaf_offsets[block]
            ):
                # The record pointed at the wrong bytes; the block itself may be intact.
                data = os.pread(self._blocks_fd, value[0], leaf_offsets[block])
                if len(data) == value[0]:
                    computed[node] = (value[0], leaf_hash(data))
        bad_blocks: list[int] = []
        bad_nodes: list[int] = []
        for node in range(width):
            if node & 1 and flat_tree.right_span(node) >= width:
                continue  # not complete at this length
            value = trusted[node]
            if node & 1 == 0 and (value is None or computed[node] != value):
                bad_blocks.append(node // 2)
            expected_offset = leaf_offsets[flat_tree.left_span(node) // 2]
            if stored[node] != (computed[node] if value is None else value) or (
                offsets[node] != expected_offset
            ):
                bad_nodes.append(node)
            elif value is not None:
                self._proven[node] = 1

        repaired: list[int] = []
        if repair_nodes and bad_nodes and all(trusted[2 * b] is not None for b in range(length)):
            pack = NODE_TAIL.pack
            try:
                for node in bad_nodes:
                    value = trusted[node]
                    if value is None:
                        continue
                    record = value[1] + pack(value[0], leaf_offsets[flat_tree.left_span(node) // 2])
                    position = flat_tree.node_position(node) * NODE_RECORD_BYTES
                    pwrite_all(self._nodes_fd, record, position)
                    repaired.append(node)
                os.fdatasync(self._nodes_fd)
            except BaseException as exc:
                self._broken = exc
                raise
            for node in repaired:
                self._proven[node] = 1
        return VerifyReport(
            length=length,
            fork=self._fork,
            bad_blocks=tuple(bad_blocks),
            bad_nodes=tuple(bad_nodes),
            repaired_nodes=tuple(repaired),
        )

    # -- writing ---------------------------------------------------------------------------------

    def _commit_append(
        self,
        kind: StateKind,
        start: int,
        blocks: Sequence[bytes],
        created: Sequence[RawNode],
        roots: list[RawNode],
        fork: int,
        signature: bytes,
    ) -> None:
        """Write blocks ``start ..`` and their nodes after the first ``start`` blocks, then the
        new signed state; durable on return."""
        byte_offset = sum(size for _, size, _ in self._prefix_roots(start))
        byte_length = byte_offset + sum(len(block) for block in blocks)
        length = start + len(blocks)
        state = StateRecord(
            kind=kind,
            length=length,
            fork=fork,
            byte_length=byte_length,
            tree_hash=tree_hash(roots),
            signature=signature,
        )
        try:
            pwritev_all(self._blocks_fd, blocks, byte_offset)
            pwrite_all(
                self._nodes_fd,
                _node_records(created, byte_offset),
                flat_tree.node_count(start) * NODE_RECORD_BYTES,
            )
            os.fdatasync(self._blocks_fd)
            os.fdatasync(self._nodes_fd)
            self._write_state(state)
        except BaseException as exc:
            self._broken = exc
            raise
        proven = self._proven
        if len(proven) < 2 * length:
            proven.extend(bytes(2 * length - len(proven)))
        for index, _, _ in created:
            proven[index] = 1
        self._set_state(state, roots)
        self._maybe_compact_state()

    def _commit_truncate(
        self, length: int, fork: int, signature: bytes | None, roots: list[RawNode]
    ) -> None:
        """Cut the core back to ``length`` blocks on ``fork``; durable on return."""
        state = StateRecord(
            kind=StateKind.TRUNCATE,
            length=length,
            fork=fork,
            byte_length=sum(size for _, size, _ in roots),
            tree_hash=tree_hash(roots),
            signature=signature,
        )
        try:
            self._write_state(state)
        except BaseException as exc:
            self._broken = exc
            raise
        # Forget what was proven: nodes above the new roots no longer exist.
        self._proven = bytearray(2 * length)
        self._set_state(state, roots)
        try:
            # Bytes past the state are ignored and cut on open anyway; cutting now keeps the
            # files tidy and a crash here harmless.
            os.ftruncate(self._blocks_fd, state.byte_length)
            os.ftruncate(self._nodes_fd, flat_tree.node_count(length) * NODE_RECORD_BYTES)
        except OSError as exc:
            self._broken = exc
            raise
        self._maybe_compact_state()

    def _write_state(self, state: StateRecord) -> None:
        pwrite_all(self._state_fd, encode_state_slot(state), self._state_size)
        os.fdatasync(self._state_fd)
        self._state_size += STATE_SLOT_BYTES

    def _maybe_compact_state(self) -> None:
        if self._state_size < STATE_COMPACT_RECORDS * STATE_SLOT_BYTES:
            return
        last = pread_exact(
            self._state_fd, STATE_SLOT_BYTES, self._state_size - STATE_SLOT_BYTES, "state"
        )
        write_file_atomically(self._directory, STATE_FILE, last)
        fd = os.open(self._directory / STATE_FILE, _OPEN_FLAGS)
        os.close(self._state_fd)
        self._state_fd = fd
        self._state_size = STATE_SLOT_BYTES


def _join(
    left: tuple[int, bytes] | None, right: tuple[int, bytes] | None
) -> tuple[int, bytes] | None:
    if left is None or right is None:
        return None
    return (left[0] + right[0], parent_hash(left[0], left[1], right[0], right[1]))


def _matching_children(
    parent: tuple[int, bytes],
    computed_parent: tuple[int, bytes] | None,
    stored: tuple[tuple[int, bytes] | None, tuple[int, bytes] | None],
    computed: tuple[tuple[int, bytes] | None, tuple[int, bytes] | None],
) -> tuple[tuple[int, bytes], tuple[int, bytes]] | None:
    """The pair of child values (stored or recomputed, mixed) that hashes to ``parent``."""
    computed_left, computed_right = computed
    if computed_parent == parent and computed_left is not None and computed_right is not None:
        # The recomputed parent already matches, so its recomputed children are right.
        return computed_left, computed_right
    stored_left, stored_right = stored
    for left, right in (
        (stored_left, stored_right),
        (computed_left, stored_right),
        (stored_left, computed_right),
    ):
        if left is not None and right is not None and _join(left, right) == parent:
            return left, right
    return None


class Core(_StoredCore):
    """A core this process writes: it holds the key pair. Satisfies
    :class:`~hypertuna.storage.cores.AppendLog`."""

    def __init__(
        self,
        directory: Path,
        header: Header,
        cipher: BlockCipher | None,
        fds: tuple[int, int, int, int],
    ) -> None:
        super().__init__(directory, header, cipher, fds)
        self._key_pair: KeyPair | None = None

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        key_pair: KeyPair,
        *,
        compat: bool = False,
        encryption_key: bytes | None = None,
    ) -> Core:
        """A new, empty core in ``directory`` (created if missing) written with ``key_pair``:
        manifest v1 by default, a compat core if ``compat``, encrypted under
        ``encryption_key`` if given. ``FileExistsError`` if the directory holds a core."""
        identity = CoreIdentity.for_key_pair(key_pair, compat=compat)
        key_check = None
        if encryption_key is not None:
            if compat:
                raise ValueError("encryption of compat cores is not supported")
            key_check = BlockCipher.for_core(encryption_key, identity.key).key_check()
        path = Path(directory)
        cls._create_files(path, Header(identity=identity, key_check=key_check))
        return cls.open(path, key_pair, encryption_key=encryption_key)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        key_pair: KeyPair,
        *,
        encryption_key: bytes | None = None,
    ) -> Core:
        """The core in ``directory``, writable with ``key_pair`` (``ValueError`` if it is not
        the core's signer, or if the encryption key is missing or wrong)."""
        core = cls._open_directory(Path(directory), encryption_key, require_key=True)
        if key_pair.public_key != core.identity.public_key:
            core.close()
            raise ValueError("the key pair is not this core's signer")
        core._key_pair = key_pair
        return core

    @classmethod
    def open_or_create(
        cls,
        directory: str | os.PathLike[str],
        key_pair: KeyPair,
        *,
        compat: bool = False,
        encryption_key: bytes | None = None,
    ) -> Core:
        """:meth:`open` if ``directory`` holds a core, else :meth:`create`."""
        if (Path(directory) / HEADER_FILE).exists():
            return cls.open(directory, key_pair, encryption_key=encryption_key)
        return cls.create(directory, key_pair, compat=compat, encryption_key=encryption_key)

    def _signer(self) -> KeyPair:
        assert self._key_pair is not None
        return self._key_pair

    def append(self, blocks: Sequence[bytes]) -> int:
        """Append ``blocks`` (plaintext) in order, sign the new length, and return it. Durable
        when it returns. An empty batch changes nothing."""
        with self._write_lock:
            self._check_writable()
            start = self._length
            if not blocks:
                return start
            fork = self._fork
            cipher = self._cipher
            if cipher is None:
                stored = [bytes(block) for block in blocks]
            else:
                stored = [
                    cipher.encrypt(start + offset, fork, bytes(block))
                    for offset, block in enumerate(blocks)
                ]
            created, roots = grow(self._roots, start, stored)
            length = start + len(stored)
            signature = self._identity.sign(self._signer(), tree_hash(roots), length, fork)
            self._commit_append(StateKind.APPEND, start, stored, created, roots, fork, signature)
            return length

    def export_range(self, start: int, end: int) -> CoreUpdate:
        """Blocks ``start .. end`` of the current fork, signed for the state the core had (or
        would have had) at length ``end``: a mirror holding the first ``start`` blocks can
        apply it and verify it like any update. Lets a large core be mirrored in bounded
        messages. ``ValueError`` unless ``0 <= start <= end <= length``."""
        with self._write_lock:
            self._check_writable()
            if not 0 <= start <= end <= self._length:
                raise ValueError(f"range {start}..{end} is not within length {self._length}")
            blocks = tuple(self.get_stored(index) for index in range(start, end))
            fork = self._fork
            # The Merkle roots of a prefix are fixed once written, so the prefix can be signed
            # at any later time with the same result a signature made back then would have.
            roots = self._prefix_roots(end)
            signature = self._identity.sign(self._signer(), tree_hash(roots), end, fork)
            return CoreUpdate(start=start, blocks=blocks, fork=fork, signature=signature)

    def truncate(self, length: int) -> int:
        """Cut the core back to ``length`` blocks (at most the current length), sign it with
        ``fork + 1`` and return the new fork. Durable when it returns."""
        with self._write_lock:
            self._check_writable()
            if not 0 <= length <= self._length:
                raise ValueError(f"cannot truncate length {self._length} to {length}")
            roots = self._prefix_roots(length)
            fork = self._fork + 1
            signature = self._identity.sign(self._signer(), tree_hash(roots), length, fork)
            self._commit_truncate(length, fork, signature, roots)
            return fork


class Mirror(_StoredCore):
    """A verified copy of someone else's core: no secret key, every block checked against the
    core key before it is stored. Satisfies :class:`~hypertuna.storage.cores.BlockLog`."""

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        identity: CoreIdentity,
        *,
        encryption_key: bytes | None = None,
    ) -> Mirror:
        """A new, empty mirror of the core ``identity`` in ``directory``. With
        ``encryption_key`` ``get`` decrypts; without it the mirror is blind and ``get``
        returns blocks as stored. ``FileExistsError`` if the directory holds a core."""
        key_check = None
        if encryption_key is not None:
            if identity.manifest is None:
                raise ValueError("encryption of compat cores is not supported")
            key_check = BlockCipher.for_core(encryption_key, identity.key).key_check()
        path = Path(directory)
        cls._create_files(path, Header(identity=identity, key_check=key_check))
        return cls.open(path, encryption_key=encryption_key)

    @classmethod
    def open(
        cls, directory: str | os.PathLike[str], *, encryption_key: bytes | None = None
    ) -> Mirror:
        """The mirror (or any core) in ``directory``, opened without its secret key."""
        return cls._open_directory(Path(directory), encryption_key, require_key=False)

    def apply(self, update: CoreUpdate) -> int:
        """Verify ``update`` against the core key and store it; return the new length.

        The blocks' tree is recomputed here from the mirror's first ``update.start`` blocks and
        the new blocks, and the signature must sign it at ``(update.length, update.fork)``.
        :class:`CoreVerificationError` (nothing changed) if it does not, if the fork goes back,
        if ``start`` is past the mirror's length, or if ``start`` is below it without a new fork.
        """
        with self._write_lock:
            self._check_writable()
            start, fork = update.start, update.fork
            if fork < self._fork:
                raise CoreVerificationError(
                    f"update is on fork {fork}, the mirror is already on fork {self._fork}"
                )
            if start > self._length:
                raise CoreVerificationError(
                    f"update starts at block {start}, the mirror has {self._length} blocks"
                )
            if start < self._length and fork == self._fork:
                raise CoreVerificationError(
                    f"update rewrites blocks from {start} on fork {fork} without a new fork"
                )
            blocks = [bytes(block) for block in update.blocks]
            prefix = self._prefix_roots(start)
            created, roots = grow(prefix, start, blocks)
            length = start + len(blocks)
            if not self._identity.verify(update.signature, tree_hash(roots), length, fork):
                raise CoreVerificationError(
                    f"the signature does not sign these blocks at length {length} fork {fork}"
                )
            if (length, fork, update.signature) == (self._length, self._fork, self._signature):
                return length
            if not blocks:
                self._commit_truncate(length, fork, update.signature, roots)
            elif start < self._length:
                # New blocks overwrite old ones, so the shorter state must be durable first; it
                # has no signature of its own, its tree hash guards it until the next record.
                self._commit_truncate(start, fork, None, prefix)
                self._commit_append(
                    StateKind.APPEND, start, blocks, created, roots, fork, update.signature
                )
            else:
                self._commit_append(
                    StateKind.APPEND, start, blocks, created, roots, fork, update.signature
                )
            return length


if TYPE_CHECKING:

    def _satisfies_protocols(core: Core, mirror: Mirror) -> tuple[AppendLog, BlockLog]:
        # Code above this layer depends on the protocols; mypy proves the classes fit them.
        return core, mirror
