"""Materializing castore nodes on the local filesystem.

Writing is defensive whatever the stored data says:

* every name is re-validated (no ``/``, ``..``, ``.``, NUL, empty) even though
  :class:`~castore_di.nodes.Directory` validates on decode, so a hostile or buggy backend
  cannot address anything outside the destination;
* the whole directory closure is fetched (and validated) before anything is written;
* everything below the destination is created relative to directory descriptors opened
  with ``O_NOFOLLOW`` (reopened ones are checked to be the directory created), so no link
  is followed and any depth works; only the destination's own parent path is the user's
  and may pass through symlinks;
* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` straight under its final name
  (one metadata operation; nothing existing is ever replaced) and removed again if its
  blob fails the check, so a failed export leaves no half-written file; with ``merge``
  (``--force``) a file is written under a temporary name and renamed over the old one;
* every file's size and BLAKE3 digest are checked before the export reports success (small
  files before they are created; a large one as it is written, removed if the check fails);
  small files are read with ``read_many(verify=False)``, so each of their bytes is hashed once.

Speed: the directories are made in a thread first; file contents are read from the blob
service on the event loop while two writer threads write them (small files in batches),
so decompression and writes overlap. ``benches/import_bench.py`` compares it with
``cp -a`` and ``restic restore``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from typing import Any, Final

import attrs
import blake3

from castore_di._dirfds import O_DIR, DirFds, Handle
from castore_di.blobservice.base import BlobReader, BlobService
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import leaves_first
from castore_di.errors import IntegrityError, StorageError, ValidationError
from castore_di.expansion import check_export_fits
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
_WRITE_THREADS: Final = 2
_SMALL: Final = 1 << 20  # files up to this size are read whole and written in batches
_BATCH_FILES: Final = 64
_BATCH_BYTES: Final = 4 << 20
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


class _OutDir:
    __slots__ = ("parent", "name", "dev", "ino")

    def __init__(self, parent: int, name: bytes, dev: int = 0, ino: int = 0) -> None:
        self.parent = parent
        self.name = name
        self.dev = dev
        self.ino = ino


class _Plan:
    """Directories made so far (index 0 is DEST) and the files still to write."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.dirs: list[_OutDir] = []
        self.files: list[tuple[int, bytes, FileNode]] = []
        self.symlinks = 0

    def dir_path(self, index: int) -> str:
        parts: list[bytes] = []
        while index > 0:
            d = self.dirs[index]
            parts.append(d.name)
            index = d.parent
        return os.path.join(self.dest, *(os.fsdecode(p) for p in reversed(parts)))

    def file_path(self, index: int, name: bytes) -> str:
        return _display(self.dir_path(index), name)


def _make_tree(plan: _Plan, closure: dict[B3Digest, Directory], root: B3Digest, dest_fd: int, merge: bool) -> None:
    """Create every directory and symlink below DEST (open at ``dest_fd``, closed here); list the files."""
    st = os.fstat(dest_fd)
    plan.dirs.append(_OutDir(-1, b"", st.st_dev, st.st_ino))
    stack: list[tuple[int, Directory, Handle | None]] = [(0, closure[root], None)]
    top = Handle(dest_fd)
    try:
        while stack:
            index, directory, parent = stack.pop()
            if parent is None:
                handle = top
            else:
                try:
                    handle = Handle(_make_subdir(plan, index, parent.fd, merge))
                finally:
                    parent.release()
            try:
                where = plan.dir_path(index)
                for raw, node in directory.items():
                    name = _check_name(raw, f"an entry of {where}")
                    try:
                        if type(node) is FileNode:
                            plan.files.append((index, name, node))
                        elif type(node) is SymlinkNode:
                            _make_symlink(node, handle.fd, name, merge)
                            plan.symlinks += 1
                        elif type(node) is DirectoryNode:
                            child = closure.get(node.digest)
                            if child is None:
                                raise StorageError(f"directory {node.digest} is not in the closure")
                            handle.refs += 1
                            stack.append((len(plan.dirs), child, handle))
                            plan.dirs.append(_OutDir(index, name))
                        else:
                            raise ValidationError(f"not a node: {node!r}")
                    except Exception as e:
                        raise _storage_error(e, _display(where, name)) from e
            finally:
                handle.release()
    except BaseException:
        for _i, _d, parent in stack:
            if parent is not None:
                parent.release()
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


def _make_subdir(plan: _Plan, index: int, parent_fd: int, merge: bool) -> int:
    record = plan.dirs[index]
    try:
        os.mkdir(record.name, 0o777, dir_fd=parent_fd)
    except FileExistsError:
        if not merge:
            raise StorageError(f"{plan.dir_path(index)} appeared while it was exported") from None
    except OSError as e:
        raise _storage_error(e, plan.dir_path(index)) from e
    # O_NOFOLLOW | O_DIRECTORY: an existing symlink or file here is refused, not followed.
    try:
        fd = os.open(record.name, O_DIR, dir_fd=parent_fd)
        st = os.fstat(fd)
    except OSError as e:
        raise _storage_error(e, plan.dir_path(index)) from e
    record.dev, record.ino = st.st_dev, st.st_ino
    return fd


def _create(dir_fd: int, name: bytes, executable: bool, replace: bool) -> tuple[int, bytes | None]:
    """A new file: under ``name`` itself (``O_EXCL``), or a temporary name when ``replace``."""
    mode = 0o777 if executable else 0o666
    if not replace:
        return os.open(name, _O_NEW, mode, dir_fd=dir_fd), None
    tmp = (_TMP_PREFIX + secrets.token_hex(8)).encode()
    return os.open(tmp, _O_NEW, mode, dir_fd=dir_fd), tmp


def _finish(dir_fd: int, fd: int, name: bytes, tmp: bytes | None, executable: bool, ok: bool) -> None:
    """Close a file from :func:`_create`: keep it under ``name`` when ``ok``, else remove it."""
    try:
        if ok and executable:
            # The owner-execute bit is what the importer reads; keep it even under a strict umask.
            os.fchmod(fd, os.fstat(fd).st_mode & 0o7777 | 0o100)
    except BaseException:
        ok = False
        raise
    finally:
        os.close(fd)
        if ok and tmp is not None:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        elif not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp if tmp is not None else name, dir_fd=dir_fd)


def _write_all(fd: int, blocks: list[bytes]) -> None:
    for block in blocks:
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view) :]


def _hash_and_write(hasher: Any, fd: int, blocks: list[bytes]) -> None:
    for block in blocks:
        hasher.update(block)
    _write_all(fd, blocks)


def _write_file(dir_fd: int, name: bytes, data: bytes, executable: bool, replace: bool) -> None:
    fd, tmp = _create(dir_fd, name, executable, replace)
    ok = False
    try:
        _write_all(fd, [data])
        ok = True
    finally:
        _finish(dir_fd, fd, name, tmp, executable, ok)


class _Writer:
    """Writes the planned files: contents read on the loop, written by two threads."""

    def __init__(self, blob: BlobService, plan: _Plan, fds: DirFds, merge: bool, stats: ExportStats,
                 progress: ImportProgress | None) -> None:
        self._blob = blob
        self._plan = plan
        self._fds = fds
        self._merge = merge
        self._stats = stats
        self._progress = progress
        self._pool = concurrent.futures.ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="castore-export")

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _advance(self, nbytes: int) -> None:
        """One file of ``nbytes`` is done."""
        if self._progress is not None:
            self._progress.advance(nbytes)

    def _partial(self, key: object, nbytes: int) -> None:
        """``nbytes`` of the large file ``key`` are written (``0``: forget it)."""
        partial = getattr(self._progress, "partial", None)
        if partial is not None:
            partial(key, nbytes)

    async def run(self, concurrency: int) -> None:
        jobs: list[list[int]] = []
        batch: list[int] = []
        nbytes = 0
        for i, (_d, _name, node) in enumerate(self._plan.files):
            if node.size > _SMALL:
                jobs.append([i])
                continue
            batch.append(i)
            nbytes += node.size
            if len(batch) >= _BATCH_FILES or nbytes >= _BATCH_BYTES:
                jobs.append(batch)
                batch, nbytes = [], 0
        if batch:
            jobs.append(batch)
        it = iter(jobs)

        async def worker() -> None:
            for job in it:
                if len(job) == 1 and self._plan.files[job[0]][2].size > _SMALL:
                    await self._large(job[0])
                else:
                    await self._small(job)

        workers = [asyncio.ensure_future(worker()) for _ in range(min(max(1, concurrency), len(jobs)))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            # Writer threads may still hold directory descriptors: let them finish first.
            await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

    async def _open(self, i: int) -> BlobReader:
        d, name, node = self._plan.files[i]
        reader = await self._blob.open_read(node.digest)
        if reader is None:
            raise StorageError(f"{self._plan.file_path(d, name)}: blob {node.digest} not found")
        if reader.size != node.size:
            await reader.close()
            raise IntegrityError(
                f"{self._plan.file_path(d, name)}: blob {node.digest} has {reader.size} bytes, the node says {node.size}"
            )
        return reader

    async def _small(self, job: list[int]) -> None:
        files = [self._plan.files[i] for i in job]
        try:
            # Checked against their digests in the writer thread, before a file is created.
            found = await self._blob.read_many([node.digest for _d, _name, node in files], verify=False)
        except Exception as e:
            d, name, _node = files[0]
            raise _storage_error(e, f"{self._plan.file_path(d, name)} (or one of {len(files) - 1} more)") from e
        contents: list[bytes] = []
        for (d, name, node), data in zip(files, found):
            if data is None:
                raise StorageError(f"{self._plan.file_path(d, name)}: blob {node.digest} not found")
            if len(data) != node.size:
                raise IntegrityError(
                    f"{self._plan.file_path(d, name)}: blob {node.digest} has {len(data)} bytes, the node says {node.size}"
                )
            contents.append(data)
        await self._thread(self._write_batch, job, contents)
        total = sum(len(c) for c in contents)
        self._stats.files += len(job)
        self._stats.bytes += total
        for data in contents:
            self._advance(len(data))

    def _write_batch(self, job: list[int], contents: list[bytes]) -> None:
        handle: Handle | None = None
        current = -1
        try:
            for i, data in zip(job, contents):
                d, name, node = self._plan.files[i]
                if handle is None or d != current:
                    if handle is not None:
                        self._fds.release(handle)
                        handle = None
                    handle = self._fds.acquire(d)
                    current = d
                if blake3.blake3(data).digest() != node.digest:
                    raise IntegrityError(f"{self._plan.file_path(d, name)}: blob {node.digest} does not match its digest")
                try:
                    _write_file(handle.fd, name, data, node.executable, self._merge)
                except FileExistsError as e:
                    raise StorageError(f"{self._plan.file_path(d, name)} appeared while it was exported") from e
                except OSError as e:
                    raise _storage_error(e, self._plan.file_path(d, name)) from e
        finally:
            if handle is not None:
                self._fds.release(handle)

    async def _large(self, i: int) -> None:
        d, name, node = self._plan.files[i]
        shown = self._plan.file_path(d, name)
        handle: Handle = await self._thread(self._fds.acquire, d)
        try:
            try:
                fd, tmp = await self._thread(_create, handle.fd, name, node.executable, self._merge)
            except OSError as e:
                raise _storage_error(e, shown) from e
            ok = False
            written = 0
            hasher = blake3.blake3()
            try:
                async with await self._open(i) as reader:
                    pending: list[bytes] = []
                    size = 0
                    async for block in reader.iter_blocks():
                        pending.append(block)
                        size += len(block)
                        if size >= _BATCH_BYTES:
                            await self._thread(_hash_and_write, hasher, fd, pending)
                            written += size
                            self._partial(i, written)
                            pending, size = [], 0
                    await self._thread(_hash_and_write, hasher, fd, pending)
                    written += size
                if written != node.size or hasher.digest() != node.digest:
                    raise IntegrityError(f"{shown}: blob {node.digest} does not match its digest or size")
                ok = True
            except Exception as e:
                raise _storage_error(e, shown) from e
            finally:
                await self._thread(_finish, handle.fd, fd, name, tmp, node.executable, ok)
        finally:
            self._fds.release(handle)
        self._stats.files += 1
        self._stats.bytes += written
        self._partial(i, 0)
        self._advance(written)


async def export_directory(
    blob: BlobService,
    dirs: DirectoryService,
    root: B3Digest,
    dest: str | os.PathLike[str],
    *,
    merge: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: ImportProgress | None = None,
    max_size: int | None = None,
) -> ExportStats:
    """Materialize the directory ``root`` at ``dest``.

    Before anything is written, the size the closure expands to is checked against
    ``max_size`` and the free space at ``dest`` (:func:`~castore_di.expansion.check_export_fits`).

    ``dest`` must not exist or be an empty directory; with ``merge`` an existing directory
    is written into (existing files of the same names are replaced, existing directories
    reused; a symlink in the way is refused). ``progress`` is told the totals once the
    closure is fetched, then bytes and finished files.
    """
    dest = os.fspath(dest)
    closure = await fetch_closure(dirs, root)
    await asyncio.to_thread(check_export_fits, closure, root, dest, max_size)

    def prepare() -> int:
        existed = _prepare_dest(dest, merge)
        if not existed:
            try:
                os.mkdir(dest, 0o777)
            except OSError as e:
                raise StorageError(f"unable to create {dest}: {e.strerror or e}") from e
        try:
            return os.open(dest, O_DIR)
        except OSError as e:
            raise StorageError(f"unable to open {dest}: {e.strerror or e}") from e

    dest_fd = await asyncio.to_thread(prepare)
    if progress is not None:
        progress.start(*_totals(closure, root))
    plan = _Plan(dest)
    fds = DirFds(plan.dirs, os.dup(dest_fd), plan.dir_path)
    try:
        await asyncio.to_thread(_make_tree, plan, closure, root, dest_fd, merge)
        stats = ExportStats(directories=len(plan.dirs), symlinks=plan.symlinks)
        await _Writer(blob, plan, fds, merge, stats, progress).run(concurrency)
    finally:
        fds.close()
    return stats


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
    dir_fd = await asyncio.to_thread(_open_parent, parent)
    try:
        try:
            fd, tmp = await asyncio.to_thread(_create, dir_fd, name, node.executable, replace)
        except FileExistsError as e:
            raise StorageError(f"destination {dest} exists (use --force to replace it)") from e
        ok = False
        try:
            reader = await blob.open_read(node.digest)
            if reader is None:
                raise StorageError(f"{dest}: blob {node.digest} not found")
            async with reader:
                if reader.size != node.size:
                    raise IntegrityError(f"{dest}: blob {node.digest} has {reader.size} bytes, the node says {node.size}")
                written = 0
                hasher = blake3.blake3()
                async for block in reader.iter_blocks():
                    await asyncio.to_thread(_hash_and_write, hasher, fd, [block])
                    written += len(block)
            if written != node.size or hasher.digest() != node.digest:
                raise IntegrityError(f"{dest}: blob {node.digest} does not match its digest or size")
            ok = True
        finally:
            await asyncio.to_thread(_finish, dir_fd, fd, name, tmp, node.executable, ok)
    except OSError as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"unable to write {dest}: {e.strerror or e}") from e
    finally:
        os.close(dir_fd)


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
