"""Materializing castore nodes on the local filesystem.

Writing is defensive whatever the stored data says:

* every name is re-validated (no ``/``, ``..``, ``.``, NUL, empty) even though
  :class:`~castore_di.nodes.Directory` validates on decode, so a hostile or buggy backend
  cannot address anything outside the destination;
* all writes are relative to directory file descriptors (``dir_fd``) opened with
  ``O_NOFOLLOW``; files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a symlink
  (one we created, or one planted concurrently) is never followed;
* a file is written under a temporary name and renamed into place only after its size and
  BLAKE3 digest were checked, so a failed export leaves no half-written file under its
  final name;
* the whole directory closure is fetched (and validated) before anything is written.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
from typing import Final

import attrs
import blake3

from castore_di.blobservice.base import BlobService
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import leaves_first
from castore_di.errors import IntegrityError, StorageError, ValidationError
from castore_di.importer import ImportProgress
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode, validate_name

__all__ = [
    "ExportStats",
    "export_node",
    "export_directory",
    "export_file",
    "export_symlink",
    "fetch_closure",
    "DEFAULT_CONCURRENCY",
]

DEFAULT_CONCURRENCY: Final = 32
_TMP_PREFIX: Final = ".castore-tmp-"
_O_DIR: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# The parent of DEST is the user's own path: links on the way to it are followed.
_O_PARENT: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_O_NEW: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)


@attrs.define
class ExportStats:
    """What an export wrote."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0


class _DirFd:
    """A directory descriptor shared by pending jobs; closed when the last one is done."""

    __slots__ = ("fd", "path", "_refs")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._refs = 1  # the producer's own reference

    def acquire(self) -> None:
        self._refs += 1

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            os.close(self.fd)


def _totals(closure: dict[B3Digest, Directory], root: B3Digest) -> tuple[int, int]:
    """Files and bytes the export of ``root`` writes (shared subtrees count each time)."""
    memo: dict[B3Digest, tuple[int, int]] = {}
    for directory in leaves_first(root, closure.values()):
        files = sum(1 for _ in directory.files())
        nbytes = sum(n.size for _, n in directory.files())
        for _, child in directory.directories():
            f, b = memo.get(child.digest, (0, 0))
            files, nbytes = files + f, nbytes + b
        memo[directory.digest] = (files, nbytes)
    return memo.get(root, (0, 0))


def _check_name(name: bytes, where: str) -> bytes:
    try:
        return validate_name(name)
    except ValidationError as e:
        raise ValidationError(f"refusing to export {where}: {e}") from e


def _display(parent: str, name: bytes) -> str:
    return os.path.join(parent, os.fsdecode(name))


async def fetch_closure(dirs: DirectoryService, root: B3Digest) -> dict[B3Digest, Directory]:
    """The validated closure of ``root``; a missing root is a :class:`StorageError`."""
    closure: dict[B3Digest, Directory] = {}
    async for directory in dirs.get_recursive(root):
        closure[directory.digest] = directory
    if root not in closure:
        raise StorageError(f"directory {root} not found")
    return closure


def _prepare_dest(dest: str, merge: bool) -> bool:
    """Check ``dest``; returns whether it already existed."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StorageError(f"unable to stat {dest}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"destination {dest} exists and is not a directory")
    if not merge:
        with os.scandir(dest) as it:
            if any(True for _ in it):
                raise StorageError(f"destination {dest} is not empty (use --force to write into it)")
    return True


async def _write_blob(
    blob: BlobService, node: FileNode, dir_fd: int, name: bytes, shown: str, replace: bool
) -> None:
    """Write one verified file as ``name`` in ``dir_fd`` via a temporary name."""
    tmp = (_TMP_PREFIX + secrets.token_hex(8)).encode()
    mode = 0o777 if node.executable else 0o666
    fd = os.open(tmp, _O_NEW, mode, dir_fd=dir_fd)
    try:
        try:
            reader = await blob.open_read(node.digest)
            if reader is None:
                raise StorageError(f"{shown}: blob {node.digest} not found")
            async with reader:
                if reader.size != node.size:
                    raise IntegrityError(f"{shown}: blob {node.digest} has {reader.size} bytes, the node says {node.size}")
                hasher = blake3.blake3()
                written = 0
                async for block in reader.iter_blocks():
                    hasher.update(block)
                    written += len(block)
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view) :]
            if written != node.size or hasher.digest() != node.digest:
                raise IntegrityError(f"{shown}: blob {node.digest} does not match its digest or size")
            if node.executable:
                # The owner-execute bit is what the importer reads; keep it even under a strict umask.
                os.fchmod(fd, os.fstat(fd).st_mode & 0o7777 | 0o100)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            # link + unlink fails if the final name exists (rename would silently replace it).
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _make_symlink(node: SymlinkNode, dir_fd: int, name: bytes, replace: bool) -> None:
    if not replace:
        os.symlink(node.target, name, dir_fd=dir_fd)
        return
    tmp = (_TMP_PREFIX + secrets.token_hex(8)).encode()
    os.symlink(node.target, tmp, dir_fd=dir_fd)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


def _open_subdir(parent: _DirFd, name: bytes, merge: bool) -> int:
    try:
        os.mkdir(name, 0o777, dir_fd=parent.fd)
    except FileExistsError:
        if not merge:
            raise
    # O_NOFOLLOW | O_DIRECTORY: an existing symlink or file here is refused, not followed.
    return os.open(name, _O_DIR, dir_fd=parent.fd)


async def export_directory(
    blob: BlobService,
    dirs: DirectoryService,
    root: B3Digest,
    dest: str | os.PathLike[str],
    *,
    merge: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: ImportProgress | None = None,
) -> ExportStats:
    """Materialize the directory ``root`` at ``dest``.

    ``dest`` must not exist or be an empty directory; with ``merge`` an existing directory
    is written into (existing files of the same names are replaced, existing directories
    reused; a symlink in the way is refused). ``progress`` is told the totals once the
    closure is fetched, then each written file.
    """
    dest = os.fspath(dest)
    closure = await fetch_closure(dirs, root)
    existed = _prepare_dest(dest, merge)
    advance = None
    if progress is not None:
        progress.start(*_totals(closure, root))
        advance = progress.advance
    if not existed:
        try:
            os.mkdir(dest, 0o777)
        except OSError as e:
            raise StorageError(f"unable to create {dest}: {e.strerror or e}") from e
    stats = ExportStats(directories=1)
    top = _DirFd(os.open(dest, _O_DIR), dest)
    queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=4 * concurrency)
    failure: list[BaseException] = []

    async def worker() -> None:
        # A worker never dies before its sentinel: after the first failure it only
        # releases the jobs it takes, so the producer can never block on a full queue.
        while True:
            job = await queue.get()
            if job is None:
                return
            node, parent, name, shown = job
            try:
                if not failure:
                    await _write_blob(blob, node, parent.fd, name, shown, merge)
                    stats.files += 1
                    stats.bytes += node.size
                    if advance is not None:
                        advance(node.size)
            except Exception as e:
                failure.append(_storage_error(e, shown))
            finally:
                parent.release()

    async def produce() -> None:
        stack: list[tuple[Directory, _DirFd]] = [(closure[root], top)]
        try:
            while stack and not failure:
                directory, handle = stack.pop()
                try:
                    for raw, node in directory.items():
                        name = _check_name(raw, f"an entry of {handle.path}")
                        shown = _display(handle.path, name)
                        try:
                            if type(node) is FileNode:
                                handle.acquire()
                                await queue.put((node, handle, name, shown))
                            elif type(node) is SymlinkNode:
                                _make_symlink(node, handle.fd, name, merge)
                                stats.symlinks += 1
                            elif type(node) is DirectoryNode:
                                child = closure.get(node.digest)
                                if child is None:
                                    raise StorageError(f"{shown}: directory {node.digest} is not in the closure")
                                stack.append((child, _DirFd(_open_subdir(handle, name, merge), shown)))
                                stats.directories += 1
                            else:
                                raise ValidationError(f"{shown}: not a node: {node!r}")
                        except Exception as e:
                            raise _storage_error(e, shown) from e
                finally:
                    handle.release()
        finally:
            for _directory, handle in stack:
                handle.release()

    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, concurrency))]
    try:
        try:
            await produce()
        finally:
            for _ in workers:
                await queue.put(None)
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        while not queue.empty():
            job = queue.get_nowait()
            if job is not None:
                job[1].release()
        raise
    if failure:
        raise failure[0]
    return stats


_Job = tuple[FileNode, _DirFd, bytes, str]


def _storage_error(e: BaseException, shown: str) -> BaseException:
    """Our errors pass through; OS errors become a StorageError naming the path."""
    if isinstance(e, (StorageError, IntegrityError, ValidationError)) or not isinstance(e, OSError):
        return e
    return StorageError(f"unable to write {shown}: {e.strerror or e}")


def _open_parent(parent: str) -> int:
    try:
        return os.open(parent, _O_PARENT)
    except OSError as e:
        raise StorageError(f"unable to open directory {parent}: {e.strerror or e}") from e


async def export_file(blob: BlobService, node: FileNode, dest: str | os.PathLike[str], *, replace: bool = False) -> None:
    """Write one file (verified, executable bit restored) at ``dest``."""
    dest = os.fspath(dest)
    parent, base = os.path.split(os.path.abspath(dest))
    name = _check_name(os.fsencode(base), dest)
    fd = _open_parent(parent)
    try:
        await _write_blob(blob, node, fd, name, dest, replace)
    except FileExistsError as e:
        raise StorageError(f"destination {dest} exists (use --force to replace it)") from e
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"unable to write {dest}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def export_symlink(node: SymlinkNode, dest: str | os.PathLike[str], *, replace: bool = False) -> None:
    """Create the symlink ``dest`` pointing at ``node.target``."""
    dest = os.fspath(dest)
    parent, base = os.path.split(os.path.abspath(dest))
    name = _check_name(os.fsencode(base), dest)
    fd = _open_parent(parent)
    try:
        _make_symlink(node, fd, name, replace)
    except FileExistsError as e:
        raise StorageError(f"destination {dest} exists (use --force to replace it)") from e
    except OSError as e:
        raise StorageError(f"unable to create symlink {dest}: {e.strerror or e}") from e
    finally:
        os.close(fd)


async def export_node(
    blob: BlobService,
    dirs: DirectoryService,
    node: Node,
    dest: str | os.PathLike[str],
    *,
    merge: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> ExportStats:
    """Materialize any node at ``dest`` (the inverse of :func:`~castore_di.importer.ingest_path`)."""
    if type(node) is DirectoryNode:
        return await export_directory(blob, dirs, node.digest, dest, merge=merge, concurrency=concurrency)
    if type(node) is FileNode:
        await export_file(blob, node, dest, replace=merge)
        return ExportStats(files=1, bytes=node.size)
    if type(node) is SymlinkNode:
        export_symlink(node, dest, replace=merge)
        return ExportStats(symlinks=1)
    raise ValidationError(f"not a node: {node!r}")
