"""Tar archives in and out of a store.

``ingest_tar`` follows the reference's archive import: entries may come in any order; a
path is made relative by dropping ``.`` and resolving ``..`` (an absolute path, or one that
climbs above the archive, is refused); regular files (including GNU sparse and contiguous
ones) become files, executable when the owner-execute bit is set; symlinks keep their
target; directories may be implicit (a parent that has no entry of its own); pax headers are
skipped; hard links, devices and fifos are refused. The archive must have exactly one
top-level directory, whose node is returned: the same digest as importing the extracted
directory. When a path occurs twice and one of the two is not a directory, the later entry
replaces the earlier (with what was below it); two directories merge. Plain, gzip and zstd
archives are told apart by their first bytes.

``write_tar`` writes a tree as a deterministic tar: entries sorted by name, parents before
children, owner 0/0 without names, mtime 0, modes 0755 (directories, executables), 0644
(files), 0777 (symlinks). It streams: file contents go from the blob service to the output
block by block, each verified by the service's reader; nothing is spooled to disk.

Both run the blocking tar side (``tarfile``, the file, decompression) in a worker thread
and the service calls on the event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import IO, Any, Final, TypeVar

import attrs

from castore_di.blobservice.base import BlobReader, BlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import StorageError, UnsupportedFileTypeError, ValidationError
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["ingest_tar", "write_tar", "ArchiveError", "TarStats"]

T = TypeVar("T")

SMALL_FILE: Final = 1 << 20  # read whole and uploaded in the background, as the reference does
MAX_BUFFERED: Final = 128 << 20  # bytes of small files buffered for background uploads at most
_BLOCK: Final = 1 << 20
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC: Final = b"\x1f\x8b"
_FILE_TYPES: Final = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_TYPE_NAMES: Final = {
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


class ArchiveError(ValidationError):
    """An archive the import cannot represent: bad paths, entry types or top-level entries."""


@attrs.define
class TarStats:
    """What an archive import or export did."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0


class _Dir:
    __slots__ = ("children",)

    def __init__(self) -> None:
        self.children: dict[bytes, "_Dir | Node | Future[Node]"] = {}


def _components(name: str) -> list[bytes]:
    """The archive path as castore components: ``.`` dropped, ``..`` resolved, never absolute."""
    raw = os.fsencode(name)
    if raw.startswith(b"/"):
        raise ArchiveError(f"archive entry {name!r}: absolute paths are refused")
    out: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not out:
                raise ArchiveError(f"archive entry {name!r}: the path leaves the archive")
            out.pop()
            continue
        out.append(part)
    return out


class _Decompressing(io.RawIOBase):
    """Detects gzip/zstd by the first bytes and hands ``tarfile`` a plain stream."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        head = b""
        while len(head) < 4:
            more = raw.read(4 - len(head))
            if not more:
                break
            head += more
        self._head = head
        self._stream: Any = None
        self._errors: tuple[type[Exception], ...] = ()  # the decompressor's "damaged data" errors
        if head.startswith(_ZSTD_MAGIC):
            import zstandard

            self._stream = zstandard.ZstdDecompressor().stream_reader(self._prefixed(), read_across_frames=True)
            self._errors = (zstandard.ZstdError,)
        elif head.startswith(_GZIP_MAGIC):
            self._stream = gzip.GzipFile(fileobj=self._prefixed(), mode="rb")
            self._errors = (gzip.BadGzipFile, zlib.error)
        else:
            self._stream = self._prefixed()

    def _prefixed(self) -> Any:
        outer = self

        class Prefixed(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, b: Any) -> int:
                if outer._head:
                    n = min(len(b), len(outer._head))
                    b[:n] = outer._head[:n]
                    outer._head = outer._head[n:]
                    return n
                data = outer._raw.read(len(b))
                b[: len(data)] = data
                return len(data)

        return io.BufferedReader(Prefixed(), _BLOCK)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._stream.read(len(b))
        except EOFError as e:
            raise ArchiveError(f"the compressed archive is truncated: {e}") from e
        except self._errors as e:
            raise ArchiveError(f"cannot decompress the archive: {e}") from e
        b[: len(data)] = data
        return len(data)


class _Bridge:
    """Runs coroutines on the event loop from the worker thread and waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()

    def submit(self, make: Callable[[], Awaitable[T]]) -> "Future[T]":
        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop)


async def ingest_tar(
    blob: BlobService, dirs: DirectoryService, source: IO[bytes], *, stats: TarStats | None = None
) -> DirectoryNode:
    """Import a tar (plain, gzip or zstd) read from ``source``; return its top-level directory.

    Raises:
        ArchiveError: a bad path, a refused entry type, not exactly one top-level directory.
        UnsupportedFileTypeError: a hard link, device or fifo (also an ``ArchiveError``'s sibling).
        StorageError: the archive is truncated or a service fails.
    """
    stats = stats if stats is not None else TarStats()
    bridge = _Bridge(asyncio.get_running_loop())
    tree = await asyncio.to_thread(_read_archive, blob, bridge, source, stats)
    return await _store_tree(dirs, tree, stats)


def _read_archive(blob: BlobService, bridge: _Bridge, source: IO[bytes], stats: TarStats) -> _Dir:
    top = _Dir()
    pending: list[tuple[Future[Node], int]] = []
    buffered = 0
    try:
        stream = _Decompressing(source)
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
            for info in archive:
                parts = _components(info.name)
                if not parts:
                    if info.isdir():
                        continue  # "./" names the top of the archive, which is no entry
                    raise ArchiveError(f"archive entry {info.name!r}: a non-directory with an empty path")
                node: _Dir | Node | Future[Node]
                if info.type in _FILE_TYPES:
                    executable = bool(info.mode & 0o100)
                    reader = archive.extractfile(info)
                    assert reader is not None
                    if info.size <= SMALL_FILE:
                        data = reader.read()
                        _check_size(info, len(data))
                        while pending and buffered + len(data) > MAX_BUFFERED:
                            done, size = pending.pop(0)
                            done.result()
                            buffered -= size
                        node = bridge.submit(lambda data=data, x=executable: _put_small(blob, data, x))  # type: ignore[misc]
                        pending.append((node, len(data)))
                        buffered += len(data)
                    else:
                        node = _put_large(blob, bridge, reader, info, executable)
                    stats.files += 1
                    stats.bytes += info.size
                elif info.issym():
                    if not info.linkname:
                        raise ArchiveError(f"archive entry {info.name!r}: symlink without a target")
                    try:
                        node = SymlinkNode(os.fsencode(info.linkname))
                    except ValidationError as e:
                        raise ArchiveError(f"archive entry {info.name!r}: invalid symlink target: {e}") from e
                    stats.symlinks += 1
                elif info.isdir():
                    node = _Dir()
                else:
                    kind = _TYPE_NAMES.get(info.type, f"entry type {info.type!r}")
                    raise UnsupportedFileTypeError(info.name, kind)
                _insert(top, parts, node, info.name)
        while stream.read(_BLOCK):  # to the end, so gzip checks its CRC (zstd its checksum, if any)
            pass
        for done, _size in pending:
            done.result()
    except tarfile.TarError as e:
        raise ArchiveError(f"cannot read the archive: {e}") from e
    except EOFError as e:
        raise StorageError(f"the archive is truncated: {e}") from e
    finally:
        for done, _size in pending:
            done.cancel()
    if len(top.children) != 1:
        raise ArchiveError(f"unexpected number of top level entries in the archive ({len(top.children)}); "
                           "an archive holds exactly one top-level directory")
    (root,) = top.children.values()
    if not isinstance(root, _Dir):
        raise ArchiveError("the archive's top-level entry is not a directory")
    return root


def _check_size(info: tarfile.TarInfo, got: int) -> None:
    if got != info.size:
        raise StorageError(f"archive entry {info.name!r}: wanted {info.size} bytes, got {got}")


async def _put_small(blob: BlobService, data: bytes, executable: bool) -> Node:
    digest = blake3_digest(data)
    if not await blob.has(digest):
        stored = await blob.put(data)
        if stored != digest:
            raise StorageError(f"blob service stored {stored}, expected {digest}")
    return FileNode(digest, len(data), executable)


def _put_large(blob: BlobService, bridge: _Bridge, reader: IO[bytes], info: tarfile.TarInfo, executable: bool) -> Node:
    writer = blob.open_write()
    size = 0
    try:
        while True:
            block = reader.read(_BLOCK)
            if not block:
                break
            size += len(block)
            bridge.run(lambda block=block: writer.write(block))  # type: ignore[misc]
        _check_size(info, size)
        digest = bridge.run(writer.close)
    except BaseException:
        bridge.run(writer.abort)
        raise
    return FileNode(digest, size, executable)


def _insert(top: _Dir, parts: list[bytes], node: "_Dir | Node | Future[Node]", name: str) -> None:
    parent = top
    for part in parts[:-1]:
        child = parent.children.get(part)
        if not isinstance(child, _Dir):
            child = _Dir()  # implicit directory (or replaces a non-directory, as the reference does)
            parent.children[part] = child
        parent = child
    last = parts[-1]
    old = parent.children.get(last)
    if isinstance(old, _Dir) and isinstance(node, _Dir):
        return  # two directories at one path merge
    parent.children[last] = node


async def _store_tree(dirs: DirectoryService, root: _Dir, stats: TarStats) -> DirectoryNode:
    putter = dirs.put_multiple_start()

    async def store(d: _Dir, where: str) -> DirectoryNode:
        pairs: list[tuple[bytes, Node]] = []
        for name, child in d.children.items():
            if isinstance(child, _Dir):
                pairs.append((name, await store(child, f"{where}/{os.fsdecode(name)}")))
            elif isinstance(child, Future):
                pairs.append((name, child.result()))
            else:
                pairs.append((name, child))
        try:
            directory = Directory(pairs)
        except ValidationError as e:
            raise ArchiveError(f"archive directory {where}: {e}") from e
        await putter.put(directory)
        stats.directories += 1
        return directory.as_node()

    node = await store(root, ".")
    digest = await putter.close()
    assert digest == node.digest
    return node


# -- export -----------------------------------------------------------------------------


class _BlobStream(io.RawIOBase):
    """A blob's bytes for ``tarfile`` in the worker thread, read on the loop; exact size enforced."""

    def __init__(self, bridge: _Bridge, reader: BlobReader, node: FileNode, where: str) -> None:
        self._bridge = bridge
        self._reader = reader
        self._left = node.size
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left == 0:
            return 0
        data = self._bridge.run(lambda: self._reader.read(min(len(b), self._left, _BLOCK)))
        if not data:
            raise StorageError(f"{self._where}: the blob ended {self._left} bytes early")
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


async def write_tar(
    blob: BlobService,
    dirs: DirectoryService,
    root: B3Digest,
    out: IO[bytes],
    *,
    top: str,
    stats: TarStats | None = None,
) -> TarStats:
    """Write the tree ``root`` to ``out`` as a deterministic tar whose one top entry is ``top``."""
    stats = stats if stats is not None else TarStats()
    top_parts = _components(top)
    if len(top_parts) != 1:
        raise ValueError(f"the archive's top-level name must be one path component, not {top!r}")
    if await dirs.get(root) is None:
        raise StorageError(f"directory {root} not found")
    bridge = _Bridge(asyncio.get_running_loop())
    await asyncio.to_thread(_write_archive, blob, dirs, bridge, root, out, os.fsdecode(top_parts[0]), stats)
    return stats


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, target
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _write_archive(
    blob: BlobService, dirs: DirectoryService, bridge: _Bridge, root: B3Digest, out: IO[bytes], top: str,
    stats: TarStats,
) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        stack: list[tuple[str, Node]] = [(top, DirectoryNode(root, 0))]
        while stack:
            name, node = stack.pop()
            if type(node) is DirectoryNode:
                directory = bridge.run(lambda d=node.digest: dirs.get(d))  # type: ignore[misc]
                if directory is None:
                    raise StorageError(f"directory {node.digest} at {name} does not exist")
                archive.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
                stats.directories += 1
                # reversed onto the stack: children come out in name order
                for child_name, child in reversed(directory.items()):
                    stack.append((f"{name}/{os.fsdecode(child_name)}", child))
            elif type(node) is SymlinkNode:
                archive.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, target=os.fsdecode(node.target)))
                stats.symlinks += 1
            else:
                assert type(node) is FileNode
                reader = bridge.run(lambda d=node.digest: blob.open_read(d))  # type: ignore[misc]
                if reader is None:
                    raise StorageError(f"blob {node.digest} at {name} does not exist")
                try:
                    if reader.size != node.size:
                        raise StorageError(f"blob {node.digest} at {name}: {reader.size} bytes, the node says {node.size}")
                    info = _tarinfo(name, tarfile.REGTYPE, 0o755 if node.executable else 0o644, node.size)
                    archive.addfile(info, io.BufferedReader(_BlobStream(bridge, reader, node, name), _BLOCK))
                finally:
                    bridge.run(reader.close)
                stats.files += 1
                stats.bytes += node.size
