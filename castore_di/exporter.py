"""Materializing castore nodes on the local filesystem.

Writing is defensive whatever the stored data says:

* every name is re-validated (no ``/``, ``..``, ``.``, NUL, empty) even though
  :class:`~castore_di.nodes.Directory` validates on decode, so a hostile or buggy backend
  cannot address anything outside the destination;
* the whole directory closure is fetched (and validated) before anything is written;
* everything below the destination is created relative to directory descriptors opened
  with ``O_NOFOLLOW`` right after ``mkdir`` and held until the directory's files are
  written, so no link is followed and any depth works; only the destination's own parent path is the user's
  and may pass through symlinks;
* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` straight under its final name
  (one metadata operation; nothing existing is ever replaced) and removed again if its
  blob fails the check, so a failed export leaves no half-written file; with ``merge``
  (``--force``) a file is written under a temporary name and renamed over the old one;
* every file's size and BLAKE3 digest are checked before the export reports success (a
  blob read whole before its file is created; a large or chunked one as it is written,
  the file removed if the check fails); blobs are read unverified, so each byte is hashed
  once.

Speed (``benches/import_bench.py`` compares it with ``cp -a`` and ``restic restore``): after
the closure is fetched, one thread creates the directories and symlinks and hands each
directory's files, with the directory's open descriptor, to three worker threads in batches;
a worker reads a batch of blobs, checks and writes each file with one ``open``, one
``write`` and one ``close`` (the mode is set at open; ``fchmod`` only when the umask takes
the owner's execute bit). With a backend that offers
:meth:`~castore_di.blobservice.base.BlobService.blocking_reads` (the embedded store) the
workers read it themselves, so zstd decompression, BLAKE3 and the writes (which release
the GIL) run on every core and the event loop only waits; other backends are read on the
event loop, from up to eight workers. The first failure stops the export (each worker
finishes or removes its current file) and is raised; so is a cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import secrets
import stat
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Final, TypeVar

import attrs
import blake3

from castore_di._dirfds import O_DIR
from castore_di.blobservice.base import READ_BLOCK, BlobService, BlockingReads, ChunkMeta
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.directoryservice.closure import leaves_first
from castore_di.errors import CastoreError, IntegrityError, StorageError, ValidationError
from castore_di.expansion import check_export_fits
from castore_di.importer import ImportProgress
from castore_di.nodes import MAX_NAME_LEN, Directory, DirectoryNode, FileNode, Node, SymlinkNode, validate_name

__all__ = [
    "ExportStats",
    "export_node",
    "export_directory",
    "export_file",
    "export_symlink",
    "fetch_closure",
    "DEFAULT_CONCURRENCY",
]

T = TypeVar("T")

DEFAULT_CONCURRENCY: Final = 32
_TMP_PREFIX: Final = ".castore-tmp-"
_THREADS: Final = 3  # worker threads with a backend read in threads (two cores: one more hides the syscalls)
_LOOP_THREADS: Final = 8  # with a backend read on the event loop (requests in flight)
_QUEUED_JOBS: Final = 16  # jobs waiting for a worker (each holds its directories' descriptors)
_BATCH_DIRS: Final = 8  # directories a job of small files may span
_SMALL: Final = 1 << 20  # files up to this size are read whole, together with their neighbours
_BATCH_FILES: Final = 64
_BATCH_BYTES: Final = 4 << 20
_NODE_TYPES: Final = (FileNode, DirectoryNode, SymlinkNode)
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


def _check_closure(closure: dict[B3Digest, Directory], root: B3Digest, dest: str, max_size: int | None) -> None:
    """Before anything is written: every name and node (again), and the size the tree expands to."""
    for digest, directory in closure.items():
        for name, node in directory.items():
            if type(name) is not bytes or not 2 < len(name) <= MAX_NAME_LEN or b"/" in name or b"\0" in name:
                _check_name(name, f"an entry of directory {digest}")
            if type(node) not in _NODE_TYPES:
                raise ValidationError(f"refusing to export {_display(str(digest), name)}: not a node: {node!r}")
    check_export_fits(closure, root, dest, max_size)


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
    __slots__ = ("parent", "name")

    def __init__(self, parent: int, name: bytes) -> None:
        self.parent = parent
        self.name = name


class _Fd:
    """A directory descriptor shared by the jobs of its files; closed by the last release."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1


class _Plan:
    """Directories made so far (index 0 is DEST), for the paths shown in errors."""

    def __init__(self, dest: str) -> None:
        self.dest = dest
        self.dirs: list[_OutDir] = [_OutDir(-1, b"")]

    def dir_path(self, index: int) -> str:
        parts: list[bytes] = []
        while index > 0:
            d = self.dirs[index]
            parts.append(d.name)
            index = d.parent
        return os.path.join(self.dest, *(os.fsdecode(p) for p in reversed(parts)))

    def file_path(self, index: int, name: bytes) -> str:
        return _display(self.dir_path(index), name)


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


def _umask() -> int | None:
    """The process's umask read without changing it (Linux), or ``None``."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_and_write(hasher: Any, fd: int, blocks: list[bytes]) -> None:
    for block in blocks:
        hasher.update(block)
        _write_all(fd, block)


class _Source:
    """How worker threads read blobs: straight from the backend (:meth:`BlobService.blocking_reads`)
    or through the event loop."""

    def __init__(self, blob: BlobService, direct: BlockingReads | None, loop: asyncio.AbstractEventLoop) -> None:
        self._blob = blob
        self._direct = direct
        self._loop = loop
        self._lock = threading.Lock()
        self._waiting: set[concurrent.futures.Future[Any]] = set()
        self._cancelled = False

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._lock:
            if self._cancelled:
                future.cancel()
            self._waiting.add(future)
        try:
            return future.result()
        finally:
            with self._lock:
                self._waiting.discard(future)

    def cancel(self) -> None:
        """Cancel the reads threads are waiting for on the loop (and any they start later)."""
        with self._lock:
            self._cancelled = True
            for future in self._waiting:
                future.cancel()

    def blobs(self, digests: list[B3Digest]) -> list[bytes | list[ChunkMeta] | None]:
        """Whole blobs (or, from a direct source, the chunk lists of chunked ones); unverified."""
        if self._direct is not None:
            return self._direct.blobs(digests)
        found: list[bytes | list[ChunkMeta] | None] = []
        found += self._on_loop(self._blob.read_many(digests, verify=False))
        return found

    def blocks(self, digest: B3Digest, chunks: list[ChunkMeta] | None) -> Iterator[bytes]:
        """A blob's bytes in blocks, read as the caller goes; unverified (the caller hashes them)."""
        if self._direct is not None:
            if chunks is None:
                found = self._direct.blobs([digest])[0]
                if found is None:
                    raise StorageError(f"blob {digest} not found")
                if not isinstance(found, list):
                    yield found
                    return
                chunks = found
            for i, meta in enumerate(chunks):
                data = self._direct.chunk(digest, meta.digest)
                if data is None:
                    raise StorageError(f"blob {digest}: chunk #{i} {meta.digest} is missing")
                yield data
            return
        reader = self._on_loop(self._blob.open_read(digest))
        if reader is None:
            raise StorageError(f"blob {digest} not found")
        try:
            while block := self._on_loop(reader.read(READ_BLOCK)):
                yield block
        finally:
            self._on_loop(reader.close())


class _Job:
    """Files for one worker: small ones of up to ``_BATCH_DIRS`` directories read together, or one large one."""

    __slots__ = ("files", "dirs", "nbytes", "large")

    def __init__(self, large: bool = False) -> None:
        self.files: list[tuple[_Fd, int, bytes, FileNode]] = []  # directory, its index, name, node
        self.dirs: list[_Fd] = []  # each holds one reference for this job
        self.nbytes = 0
        self.large = large


class _Export:
    """Writes a fetched closure below DEST: one thread makes the directories and symlinks and
    hands each directory's files (with its open descriptor) to worker threads, which read,
    verify and write them. Nothing runs on the event loop except reads of a backend without
    blocking reads."""

    def __init__(self, source: _Source, closure: dict[B3Digest, Directory], root: B3Digest, dest: str,
                 dest_fd: int, merge: bool, workers: int, progress: ImportProgress | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self._closure = closure
        self._root = root
        self._plan = _Plan(dest)
        self._dest_fd = dest_fd
        self._merge = merge
        self._workers = workers
        self._progress = progress
        self._loop = loop
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Tokens bounding the queued jobs (and the descriptors they hold); a SimpleQueue is
        # much cheaper than a Semaphore (written in Python) for one hand-off per job.
        self._room: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(_QUEUED_JOBS):
            self._room.put(None)
        self._batch = _Job()
        self.stop = threading.Event()
        self._error: BaseException | None = None
        self.stats = ExportStats()
        umask = _umask()
        # The mode an executable file needs after open when the umask takes its owner-execute bit.
        self._exec_mode = None if umask is None or umask & 0o100 == 0 else (0o777 & ~umask) | 0o100
        self._chmod_exec = umask is None or umask & 0o100 != 0
        self._partial = getattr(progress, "partial", None)

    # -- running ---------------------------------------------------------------------

    def run(self) -> ExportStats:
        """Make the tree and write every file (blocking); the first failure is raised."""
        threads: list[threading.Thread] = []
        try:
            for i in range(self._workers):
                t = threading.Thread(target=self._work, name=f"castore-export-{i}", daemon=True)
                t.start()
                threads.append(t)
        except BaseException as e:
            os.close(self._dest_fd)  # _make_tree never took it
            self._fail(e)
        try:
            if self._error is None:
                self._make_tree()
        except BaseException as e:
            self._fail(e)
        finally:
            for _ in threads:
                self._jobs.put(None)
            for t in threads:
                t.join()
        if self._error is not None:
            raise self._error
        return self.stats

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = e
        self.stop.set()

    def _release(self, d: _Fd) -> None:
        with self._lock:
            d.refs -= 1
            last = d.refs == 0
        if last:
            os.close(d.fd)

    def _advance(self, sizes: list[int]) -> None:
        progress = self._progress
        if progress is not None:
            for n in sizes:
                progress.advance(n)

    # -- the directory thread ------------------------------------------------------------

    def _make_tree(self) -> None:
        """Create every directory and symlink, queueing each directory's files as it is made."""
        plan, closure, merge = self._plan, self._closure, self._merge
        # Each entry holds a reference to its parent's descriptor (DEST's own for the root).
        stack: list[tuple[int, Directory, _Fd]] = [(0, closure[self._root], _Fd(self._dest_fd))]
        try:
            while stack and not self.stop.is_set():
                index, directory, parent = stack.pop()
                if index == 0:
                    here = parent
                else:
                    try:
                        here = _Fd(self._make_subdir(index, parent.fd))
                    finally:
                        self._release(parent)
                try:
                    for name, node in directory.items():  # names checked by _check_closure
                        kind = type(node)
                        if kind is FileNode:
                            assert isinstance(node, FileNode)
                            self._add(here, index, name, node)
                        elif kind is DirectoryNode:
                            assert isinstance(node, DirectoryNode)
                            child = closure.get(node.digest)
                            if child is None:
                                raise StorageError(f"{plan.file_path(index, name)}: directory {node.digest} "
                                                   "is not in the closure")
                            with self._lock:
                                here.refs += 1
                            stack.append((len(plan.dirs), child, here))
                            plan.dirs.append(_OutDir(index, name))
                        elif kind is SymlinkNode:
                            assert isinstance(node, SymlinkNode)
                            try:
                                _make_symlink(node, here.fd, name, merge)
                            except OSError as e:
                                raise _storage_error(e, plan.file_path(index, name)) from e
                            self.stats.symlinks += 1
                        else:
                            raise ValidationError(f"refusing to export {plan.file_path(index, name)}: "
                                                  f"not a node: {node!r}")
                finally:
                    self._release(here)
            if not self.stop.is_set():
                self._flush()
        finally:
            for _i, _d, parent in stack:
                self._release(parent)
            for d in self._batch.dirs:  # not queued (a failure)
                self._release(d)
            self._batch = _Job()
        self.stats.directories = len(plan.dirs)

    def _add(self, here: _Fd, index: int, name: bytes, node: FileNode) -> None:
        """Add a file to the batch being filled (a large one gets a job of its own)."""
        if node.size > _SMALL:
            job = _Job(large=True)
            self._hold(job, here)
            job.files.append((here, index, name, node))
            self._put(job)
            return
        batch = self._batch
        if not batch.dirs or batch.dirs[-1] is not here:
            if len(batch.dirs) >= _BATCH_DIRS:
                self._flush()
                batch = self._batch
            self._hold(batch, here)
        batch.files.append((here, index, name, node))
        batch.nbytes += node.size
        if len(batch.files) >= _BATCH_FILES or batch.nbytes >= _BATCH_BYTES:
            self._flush()

    def _hold(self, job: _Job, here: _Fd) -> None:
        with self._lock:
            here.refs += 1
        job.dirs.append(here)

    def _flush(self) -> None:
        batch = self._batch
        if batch.files:
            self._batch = _Job()
            self._put(batch)

    def _put(self, job: _Job) -> None:
        self._room.get()
        self._jobs.put(job)

    def _make_subdir(self, index: int, parent_fd: int) -> int:
        record = self._plan.dirs[index]
        try:
            os.mkdir(record.name, 0o777, dir_fd=parent_fd)
        except FileExistsError:
            if not self._merge:
                raise StorageError(f"{self._plan.dir_path(index)} appeared while it was exported") from None
        except OSError as e:
            raise _storage_error(e, self._plan.dir_path(index)) from e
        # O_NOFOLLOW | O_DIRECTORY: an existing symlink or file here is refused, not followed.
        try:
            return os.open(record.name, O_DIR, dir_fd=parent_fd)
        except OSError as e:
            raise _storage_error(e, self._plan.dir_path(index)) from e

    # -- the worker threads --------------------------------------------------------------

    def _work(self) -> None:
        files = nbytes = 0
        try:
            while (job := self._jobs.get()) is not None:
                self._room.put(None)
                try:
                    if not self.stop.is_set():
                        if job.large:
                            here, index, name, node = job.files[0]
                            self._write_large(here.fd, index, name, node, None)
                            sizes = [node.size]
                        else:
                            sizes = self._write_small(job)
                        files += len(sizes)
                        nbytes += sum(sizes)
                        if self._progress is not None:
                            self._loop.call_soon_threadsafe(self._advance, sizes)
                except BaseException as e:
                    self._fail(e)
                finally:
                    for d in job.dirs:
                        self._release(d)
        finally:
            with self._lock:
                self.stats.files += files
                self.stats.bytes += nbytes

    def _write_small(self, job: _Job) -> list[int]:
        """Read the job's blobs together, check each before its file is created, write it."""
        files = job.files
        try:
            found = self.source.blobs([node.digest for _d, _i, _name, node in files])
        except Exception as e:
            _d, index, name, _node = files[0]
            raise _storage_error(e, f"{self._plan.file_path(index, name)} (or one of {len(files) - 1} more)") from e
        merge, chmod_exec, stop = self._merge, self._chmod_exec, self.stop
        sizes: list[int] = []
        for (here, index, name, node), data in zip(files, found):
            if stop.is_set():
                break
            if type(data) is not bytes:
                if data is None:
                    raise StorageError(f"{self._plan.file_path(index, name)}: blob {node.digest} not found")
                assert isinstance(data, list)
                self._write_large(here.fd, index, name, node, data)
                sizes.append(node.size)
                continue
            if len(data) != node.size:
                raise IntegrityError(f"{self._plan.file_path(index, name)}: blob {node.digest} has "
                                     f"{len(data)} bytes, the node says {node.size}")
            if blake3.blake3(data).digest() != node.digest:
                raise IntegrityError(f"{self._plan.file_path(index, name)}: blob {node.digest} "
                                     "does not match its digest")
            dir_fd = here.fd
            executable = node.executable
            if merge:
                try:
                    fd, tmp = _create(dir_fd, name, executable, True)
                    ok = False
                    try:
                        _write_all(fd, data)
                        ok = True
                    finally:
                        _finish(dir_fd, fd, name, tmp, executable and chmod_exec, ok)
                except OSError as e:
                    raise _storage_error(e, self._plan.file_path(index, name)) from e
                sizes.append(node.size)
                continue
            # The common case in as few calls as possible: open (straight under the final
            # name, O_EXCL, the mode set by open), one write, close.
            try:
                fd = os.open(name, _O_NEW, 0o777 if executable else 0o666, dir_fd=dir_fd)
            except FileExistsError as e:
                raise StorageError(f"{self._plan.file_path(index, name)} appeared while it was exported") from e
            except OSError as e:
                raise _storage_error(e, self._plan.file_path(index, name)) from e
            try:
                if data:
                    n = os.write(fd, data)
                    if n < len(data):  # a short write (not on local file systems)
                        _write_all(fd, memoryview(data)[n:])
                if executable and chmod_exec:
                    self._make_executable(fd)
            except BaseException as e:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                raise _storage_error(e, self._plan.file_path(index, name)) from e
            try:
                os.close(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                raise _storage_error(e, self._plan.file_path(index, name)) from e
            sizes.append(node.size)
        return sizes

    def _make_executable(self, fd: int) -> None:
        # The owner-execute bit is what the importer reads; keep it even under a strict umask.
        mode = self._exec_mode
        os.fchmod(fd, mode if mode is not None else os.fstat(fd).st_mode & 0o7777 | 0o100)

    def _write_large(self, dir_fd: int, index: int, name: bytes, node: FileNode, chunks: list[ChunkMeta] | None) -> None:
        """Stream one blob into its file, hashing as it goes; the file is removed if it fails the check."""
        shown = self._plan.file_path(index, name)
        try:
            fd, tmp = _create(dir_fd, name, node.executable, self._merge)
        except FileExistsError as e:
            raise StorageError(f"{shown} appeared while it was exported") from e
        except OSError as e:
            raise _storage_error(e, shown) from e
        ok = False
        key = (index, name)
        try:
            hasher = blake3.blake3()
            written = reported = 0
            for block in self.source.blocks(node.digest, chunks):
                if self.stop.is_set():
                    raise _Stopped()
                written += len(block)
                if written > node.size:
                    break
                hasher.update(block)
                _write_all(fd, block)
                if self._partial is not None and written - reported >= _BATCH_BYTES:
                    reported = written
                    self._loop.call_soon_threadsafe(self._partial, key, written)
            if written != node.size or hasher.digest() != node.digest:
                raise IntegrityError(f"{shown}: blob {node.digest} does not match its digest or size")
            ok = True
        except _Stopped:
            raise
        except CastoreError as e:
            if shown not in str(e):
                e.add_note(shown)  # a chunk's error names the blob; the note names the file
            raise
        except Exception as e:
            raise _storage_error(e, shown) from e
        finally:
            if self._partial is not None and reported:
                self._loop.call_soon_threadsafe(self._partial, key, 0)
            try:
                _finish(dir_fd, fd, name, tmp, node.executable and self._chmod_exec, ok)
            except OSError as e:
                raise _storage_error(e, shown) from e


class _Stopped(Exception):
    """Another thread failed: this one gives up its file (the first failure is what is raised)."""


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
    closure is fetched, then bytes and finished files. ``concurrency`` bounds the worker
    threads (3 with a backend read in threads, 8 with one read on the event loop).
    """
    dest = os.fspath(dest)
    closure = await fetch_closure(dirs, root)
    await asyncio.to_thread(_check_closure, closure, root, dest, max_size)

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
    try:
        if progress is not None:
            progress.start(*_totals(closure, root))
        direct = await blob.blocking_reads()
        loop = asyncio.get_running_loop()
        workers = max(1, min(concurrency, _THREADS if direct is not None else _LOOP_THREADS))
        export = _Export(_Source(blob, direct, loop), closure, root, dest, dest_fd, merge, workers, progress, loop)
    except BaseException:
        os.close(dest_fd)
        raise
    running = loop.run_in_executor(None, export.run)  # owns dest_fd from here
    try:
        return await asyncio.shield(running)
    except BaseException:
        export.stop.set()  # cancelled: the threads stop after their current file
        export.source.cancel()
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # retrieved: the cancellation is what propagates
        raise


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
