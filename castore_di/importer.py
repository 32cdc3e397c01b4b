"""Importing a filesystem tree into a blob service and a directory service.

Semantics follow the reference's filesystem import: symlinks are never followed (a root
symlink becomes a :class:`~castore_di.nodes.SymlinkNode`, a root file a
:class:`~castore_di.nodes.FileNode` without any directory upload), a file is executable
when its owner-execute bit (``0o100``) is set, and special files (fifos, sockets, devices)
are refused with :class:`~castore_di.errors.UnsupportedFileTypeError` naming the path, or
skipped with a warning when ``skip_special`` is set. ``exclude`` takes gitignore-style
patterns (``pathspec``'s ``gitwildmatch``), matched against paths relative to the root.

Safety: below the root everything is opened relative to a directory descriptor with
``O_NOFOLLOW`` (directories also ``O_DIRECTORY``, and checked to be the device and inode
the walk saw), so no link is followed and paths never grow past ``PATH_MAX`` (any depth
works: nothing recurses). Files are opened ``O_NONBLOCK`` and checked with ``fstat``
before reading, so a fifo swapped in after the walk is refused, not waited on.

Pipeline: the walk runs in a thread; then files are stored in two lanes. Small files go in
batches to reader threads (``READ_THREADS``: one more than the cores) that open, read and
prepare them (:meth:`BlobService.prepare_many`: each blob hashed once, and for the embedded
store looked up, cut and compressed right there, as blake3, FastCDC and zstd release the GIL);
each batch is then stored with one ``put_prepared`` (one writer operation for the embedded
store), and its digests are used only once that returned, i.e. after the commit. Large files,
largest first, stream through writers several at once, read in threads of their own; the
embedded writer hashes, cuts and compresses in worker threads too. Directories go last
through one ``put_multiple_start`` putter, leaves first, their bytes encoded by hand in a
thread (no protobuf objects: the tests compare the bytes with protobuf's). With a stat cache
(:mod:`castore_di.importcache`), only files whose metadata changed since the last import of
the root are read, and an unchanged tree reuses its root directory.

Worker processes (``workers``; :mod:`castore_di._importworker`): instead of the reader
threads, processes open, read, hash and encode the batches (and large files up to
``WHOLE_IN_WORKER``, one at a time) with the blob service's picklable
:meth:`~castore_di.blobservice.base.BlobService.preparer`, and send back digests and encoded
bytes; this process keeps the presence check and the commit, so a digest is still used only
after its commit. While many files turn out present (a re-import) a batch is only hashed
first and just the absent files are read again and encoded. A worker opens the root by path
and each directory below it with ``O_NOFOLLOW | O_DIRECTORY``, checking the device and inode
the walk recorded; errors are the threads' own. Started during the walk of a first import
once it is large enough, stopped (and waited for) when the import ends, fails or is
cancelled. At most ``_BATCHES_IN_FLIGHT`` batches and one whole large file are in flight.
``benches/import_bench.py`` measures it against restic and b3sum.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import io
import os
import pickle
import queue
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal, Protocol

import attrs
import blake3

from castore_di import _importworker
from castore_di._dirfds import O_DIR, DirFds, Handle, open_dir
from castore_di._importworker import SMALL_FILE, open_file, read_small
from castore_di._importworker import file_type as _file_type
from castore_di._importworker import os_error as _os_error
from castore_di.blobservice.base import BlobService, PreparedBlob
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import (
    CastoreError,
    SizeOverflowError,
    StorageError,
    UnsupportedFileTypeError,
    ValidationError,
)
from castore_di.importcache import KEY, CacheState, ImportCache
from castore_di.nodes import (
    MAX_NAME_LEN,
    U64_MAX,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    validate_name,
)

__all__ = [
    "ingest_path",
    "ImportProgress",
    "ImportStats",
    "SMALL_FILE",
    "DEFAULT_CONCURRENCY",
    "READ_THREADS",
    "Workers",
]

DEFAULT_CONCURRENCY: Final = 32
READ_THREADS: Final = min(8, (os.cpu_count() or 1) + 1)  # reader threads compress too (GIL released)
_BLOCK: Final = 1 << 20
_BATCH_FILES: Final = 128
_BATCH_BYTES: Final = 4 << 20
_BATCHES_IN_FLIGHT: Final = 4  # batches of small files being read or stored at once
_STREAM_BLOCK: Final = 4 << 20  # read size while a large file streams into a writer
_U32: Final = struct.Struct("<I")
# Worker processes (see _Workers) pay for their start-up (about 0.1 s of CPU each) from this
# many small files or bytes on.
PROCESS_MIN_FILES: Final = 4096
PROCESS_MIN_BYTES: Final = 128 << 20
_CPUS: Final = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKER_PROCESSES: Final = min(8, _CPUS)
# ``workers="auto"`` uses processes for a large first import (the import cache has no entry
# for the root) from this many CPUs on. Measured on 2 shared CPUs (stdlib tree, 50,756 files,
# same-moment pairs while other work loaded the machine): processes were faster in 13 of 21
# pairs, by 10-20% when the load was lowest (4.03-6.58 s against 4.95-7.12 s), slower under
# heavy load; CPU alike (6.5-7.5 s either way): the threads hold the GIL about 85% of the
# time (py-spy --gil), the processes pay for start-up and for pickling the encoded bytes
# through pipes. A re-import (files mostly present) stays with threads: there processes cost
# about 0.3 s more (2.7-2.8 s against 2.4-2.7 s for --rehash).
AUTO_PROCESSES_MIN_CPUS: Final = 2
# With worker processes, a large file up to this size is read whole and encoded by a worker
# (one at a time); a larger one streams through a writer in this process.
WHOLE_IN_WORKER: Final = 64 << 20
Workers = Literal["auto", "threads", "processes"]
S_IFREG: Final = stat.S_IFREG
S_IFDIR: Final = stat.S_IFDIR
S_IFLNK: Final = stat.S_IFLNK


class ImportProgress(Protocol):
    """Receives progress: the totals once the walk is done, then each finished file.

    A progress object may also have ``partial(key, nbytes)``: the importer then reports the
    bytes done inside a large file while it is read (``key`` names the file; ``0`` before
    its ``advance``). A file read twice (hashed, then uploaded) counts each pass as half.
    """

    def start(self, files: int, nbytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


@attrs.define
class ImportStats:
    """What an import did; filled in as it runs."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    skipped: int = 0
    cached_files: int = 0  # files whose digest came from the import cache (not read)


def _rewrap(e: StorageError | ValidationError, context: str) -> CastoreError:
    """The same category of error with ``context`` in front of its message."""
    cls = StorageError if isinstance(e, StorageError) else ValidationError
    return cls(f"{context}: {e}")


class _Dir:
    __slots__ = ("parent", "name", "dev", "ino", "entries")

    def __init__(self, parent: int, name: bytes, dev: int, ino: int) -> None:
        self.parent = parent
        self.name = name
        self.dev = dev
        self.ino = ino
        # (name, kind, payload): kind "f" -> index into files, "d" -> index into dirs,
        # "l" -> the SymlinkNode.
        self.entries: list[tuple[bytes, str, Any]] = []


class _File:
    __slots__ = ("dir", "name", "size", "key")

    def __init__(self, dir_index: int, name: bytes, size: int, key: bytes | None = None) -> None:
        self.dir = dir_index
        self.name = name
        self.size = size
        # The import cache's key (identity and metadata, see importcache.KEY); None when the
        # cache is off or the file's timestamps are too recent to be trusted ("racy").
        self.key = key


class _Tree:
    """The walk's result: directories in pre-order (a parent before its children) and files.

    Display paths are built on demand (a deep tree would otherwise hold O(depth²) text).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.dirs: list[_Dir] = []
        self.files: list[_File] = []
        self.bytes = 0
        self.skipped = 0
        self.symlinks = 0
        self.racy = 0  # files not keyed for the cache: timestamps too recent
        # With the cache on: one record per walked entry, the walk's fingerprint (see _walk).
        self.sig: list[bytes] | None = None
        self.safe_ns = 0  # files with mtime or ctime at or after this are racy

    def dir_path(self, index: int) -> str:
        parts: list[bytes] = []
        while index > 0:
            d = self.dirs[index]
            parts.append(d.name)
            index = d.parent
        return os.path.join(self.root, *(os.fsdecode(p) for p in reversed(parts)))

    def file_path(self, f: _File) -> str:
        if f.dir < 0:
            return self.root
        return os.path.join(self.dir_path(f.dir), os.fsdecode(f.name))

    def open_dir(self, index: int, parent_fd: int) -> int:
        """Open directory ``index`` below ``parent_fd``: no link followed, identity checked."""
        return open_dir(self.dirs[index], parent_fd, lambda: self.dir_path(index))


class _Matcher:
    """gitignore-style exclusion (``pathspec``'s ``gitignore`` patterns), paths relative to the root.

    As in git the last matching pattern wins, a pattern must match the path itself (a
    directory is tested with a trailing ``/``), and a directory that is excluded is not
    entered, so nothing below it can be re-included. ``tests/test_import_trees.py``
    compares the result with ``git ls-files --others --exclude-from``.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        try:
            import pathspec
        except ImportError as e:  # pragma: no cover - a core dependency
            from castore_di.errors import MissingDependencyError

            raise MissingDependencyError("--exclude needs 'pathspec' (pip install castore_di)") from e
        try:
            spec = pathspec.PathSpec.from_lines("gitignore", patterns)
        except Exception as e:  # pathspec raises its own ValueError subclasses
            raise ValidationError(f"invalid exclude pattern: {e}") from e
        self._rules: list[tuple[bool, Any]] = [
            (bool(p.include), p.regex) for p in spec.patterns if p.include is not None and p.regex is not None
        ]

    def excluded(self, rel: str, is_dir: bool) -> bool:
        path = rel + "/" if is_dir else rel
        verdict = False
        for include, regex in self._rules:
            # pathspec's regexes also match a path below a matching directory; only a match
            # of the path itself counts here (the walk already judged every parent).
            if regex.pattern == "." or any(m.end() == len(path) for m in regex.finditer(path)):
                verdict = include
        return verdict


def _walk(
    tree: _Tree,
    root_fd: int,
    matcher: _Matcher | None,
    skip_special: bool,
    warn: Callable[[str], None] | None,
    warnings: list[str],
    on_big: Callable[[], None] | None = None,
) -> None:
    """Fill ``tree`` from the directory open at ``root_fd`` (which this closes).

    ``on_big`` is called (once, from this thread) as soon as the tree holds enough files
    for worker processes to pay (``PROCESS_MIN_FILES`` or ``PROCESS_MIN_BYTES``).

    With ``tree.sig`` set (the import cache is on), each file gets its cache key and every
    entry adds a record to ``tree.sig``: ``D`` + the directory's index when a directory is
    listed, then ``f`` name NUL key, ``d`` name NUL child index, or ``l`` name NUL target
    NUL per entry (names and targets hold no NUL, keys and indexes have fixed sizes, so the
    records describe the walk unambiguously).
    """
    # Stack of (dir index, the parent's handle or None for the root, relative path).
    stack: list[tuple[int, Handle | None, str]] = [(0, None, "")]
    root = Handle(root_fd)
    sig = tree.sig
    safe_ns = tree.safe_ns
    pack_key = KEY.pack
    pack_index = _U32.pack
    files = tree.files
    add_file = files.append
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    nbytes = 0
    try:
        while stack:
            index, parent, rel = stack.pop()
            if parent is None:
                handle = root
            else:
                try:
                    handle = Handle(tree.open_dir(index, parent.fd))
                finally:
                    parent.release()
            try:
                try:
                    with os.scandir(handle.fd) as it:
                        found = list(it)
                except OSError as e:
                    raise _os_error("read directory", tree.dir_path(index), e) from e
                entries = tree.dirs[index].entries
                add = entries.append
                if sig is not None:
                    sig.append(b"D" + pack_index(index))
                for entry in found:
                    name = entry.name.encode(fs_encoding, fs_errors)  # os.fsencode, inlined
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError as e:
                        raise _os_error("stat", os.path.join(tree.dir_path(index), entry.name), e) from e
                    mode = st.st_mode
                    fmt = mode & 0o170000  # stat.S_IFMT, inlined
                    if matcher is not None:
                        child_rel = f"{rel}/{entry.name}" if rel else entry.name
                        if matcher.excluded(child_rel, fmt == S_IFDIR):
                            continue
                    else:
                        child_rel = ""
                    if fmt == S_IFREG:
                        size = st.st_size
                        add((name, "f", len(files)))
                        key: bytes | None = None
                        if sig is not None:
                            mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
                            if mtime < safe_ns and ctime < safe_ns:
                                key = pack_key(st.st_dev, st.st_ino, size, mtime, ctime, (mode >> 6) & 1)
                                sig.append(b"f%s\0%s" % (name, key))
                            else:
                                tree.racy += 1
                        add_file(_File(index, name, size, key))
                        nbytes += size
                    elif fmt == S_IFDIR:
                        child = len(tree.dirs)
                        if sig is not None:
                            sig.append(b"d%s\0%s" % (name, pack_index(child)))
                        add((name, "d", child))
                        handle.refs += 1
                        stack.append((child, handle, child_rel))
                        tree.dirs.append(_Dir(index, name, st.st_dev, st.st_ino))
                    elif fmt == S_IFLNK:
                        try:
                            target = os.readlink(name, dir_fd=handle.fd)
                        except OSError as e:
                            shown = os.path.join(tree.dir_path(index), entry.name)
                            raise _os_error("read symlink", shown, e) from e
                        try:
                            add((name, "l", SymlinkNode(target)))
                        except ValidationError as e:
                            raise ValidationError(f"{os.path.join(tree.dir_path(index), entry.name)}: {e}") from e
                        tree.symlinks += 1
                        if sig is not None:
                            sig.append(b"l%s\0%s\0" % (name, target))
                    else:
                        path_shown = os.path.join(tree.dir_path(index), entry.name)
                        if not skip_special:
                            raise UnsupportedFileTypeError(path_shown, _file_type(mode))
                        tree.skipped += 1
                        message = f"skipping {path_shown}: {_file_type(mode)}"
                        warnings.append(message)
                        if warn is not None:
                            warn(message)
            finally:
                handle.release()
            if on_big is not None and (len(files) >= PROCESS_MIN_FILES or nbytes >= PROCESS_MIN_BYTES):
                on_big()
                on_big = None
    except BaseException:
        for _index, parent, _rel in stack:
            if parent is not None:
                parent.release()
        raise
    finally:
        tree.bytes += nbytes


class _Worker:
    """One worker process (:func:`castore_di._importworker.main`) and the threads that feed it
    jobs and collect its answers, which come in the order the jobs went."""

    def __init__(self, loop: asyncio.AbstractEventLoop, init_args: tuple[Any, ...]) -> None:
        import json
        import subprocess

        self._loop = loop
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        jobs_r, jobs_w = os.pipe()
        results_r, results_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _WORKER_BOOT, json.dumps(sys.path), str(jobs_r), str(results_w)],
                pass_fds=(jobs_r, results_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (jobs_w, results_r):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(results_w)
        self._jobs_fd = jobs_w
        self._results = io.FileIO(results_r, "rb", closefd=True)
        self._threads = [
            threading.Thread(target=self._send, name="castore-import-send", daemon=True),
            threading.Thread(target=self._receive, name="castore-import-receive", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._error: BaseException | None = None  # why the worker could not start
        self._ended: BaseException | None = None  # set once the worker has exited
        self.call("init", init_args).add_done_callback(self._started)  # answered first

    @property
    def load(self) -> int:
        return len(self._pending)

    def call(self, what: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue a job (on the event loop's thread); its future gets the answer."""
        future = self._loop.create_future()
        if self._ended is not None:  # the worker is gone
            future.set_exception(self._ended)
            return future
        self._pending.append(future)
        self._outbox.put(pickle.dumps((what, args), protocol=pickle.HIGHEST_PROTOCOL))
        return future

    def _send(self) -> None:
        try:
            while (data := self._outbox.get()) is not None:
                _importworker.write_message(self._jobs_fd, data)
        except OSError:  # the worker is gone: _receive reports it
            pass
        finally:
            os.close(self._jobs_fd)  # the worker's end of its jobs: it exits

    def _receive(self) -> None:
        try:
            while (message := _importworker.read_message(self._results)) is not None:
                answer = pickle.loads(message)
                self._loop.call_soon_threadsafe(self._deliver, answer)
        except Exception as e:  # pragma: no cover - a broken pipe or pickle
            failure: BaseException | None = StorageError(f"an import worker process failed: {e}")
        else:
            failure = None
        finally:
            self._results.close()
        status = self.process.wait()
        try:
            self._loop.call_soon_threadsafe(self._fail_all, failure or StorageError(
                f"an import worker process ended (exit status {status})"))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _deliver(self, answer: tuple[bool, Any]) -> None:
        future = self._pending.popleft()
        if future.done():  # cancelled meanwhile
            return
        ok, value = answer
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _started(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._error = future.exception()  # the worker exits: jobs fail with this

    def _fail_all(self, error: BaseException) -> None:
        error = self._ended = self._error or error
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    def stop(self) -> None:
        """Close the jobs pipe (the worker finishes its job and exits) and wait for it (blocks)."""
        self._outbox.put(None)
        for t in self._threads:
            t.join()
        try:
            self.process.wait(timeout=_WORKER_EXIT_WAIT)
        except Exception:  # pragma: no cover - a worker stuck in a system call
            self.process.kill()
            self.process.wait()


_WORKER_BOOT: Final = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from castore_di._importworker import main; main(int(sys.argv[2]), int(sys.argv[3]))"
)
_WORKER_EXIT_WAIT: Final = 30.0


class _Workers:
    """Worker processes that read, hash and encode batches of files
    (:func:`castore_di._importworker.run`); started per import, stopped at its end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        root: str,
        dev: int,
        ino: int,
        preparer: Any,
        processes: int = WORKER_PROCESSES,
    ) -> None:
        self._workers: list[_Worker] = []
        try:
            for _ in range(processes):
                self._workers.append(_Worker(loop, (root, dev, ino, preparer)))
        except BaseException:
            self.shutdown()
            raise

    async def run(self, *args: Any) -> tuple[list[_importworker.Done], list[int]]:
        """A job for the least busy worker."""
        worker = min(self._workers, key=lambda w: w.load)
        result: tuple[list[_importworker.Done], list[int]] = await worker.call("run", args)
        return result

    def shutdown(self) -> None:
        """Stop the processes (blocks until they have exited)."""
        for w in self._workers:
            w.stop()
        self._workers = []

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)


class _Pool:
    """Whether and when an import uses worker processes (``workers``: ``"auto"``: for a large
    import on a machine of several cores, when the blob service offers a preparer)."""

    def __init__(self, blob: BlobService, workers: Workers, root: str, dev: int, ino: int) -> None:
        self.mode = workers
        usable = bool(sys.executable) and (
            workers == "processes" or (workers == "auto" and _CPUS >= AUTO_PROCESSES_MIN_CPUS)
        )
        self._preparer = blob.preparer() if usable else None
        self._args = (root, dev, ino)
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # start and close: one at a time, close last
        self.workers: _Workers | None = None
        self._closed = False
        # The import cache knows this root: most files are likely present (a re-import,
        # ``--rehash``), and hashing them costs little next to what processes add (start-up,
        # pipes): "auto" stays with threads.
        self.imported_before = False

    def start(self) -> None:
        """Start the processes unless done or unusable; blocks on ``fork``/``exec`` (the walk's
        thread or a worker thread calls it, never the event loop; not two at once)."""
        with self._lock:
            if self.workers is None and self._preparer is not None and not self._closed:
                try:
                    self.workers = _Workers(self._loop, *self._args, self._preparer)
                except OSError:  # no processes to be had (a process limit): threads do it all
                    self._preparer = None

    async def for_files(self, files: int, nbytes: int) -> _Workers | None:
        """The processes for reading ``files`` small files (started now, in a thread, if they pay)."""
        if self.workers is None and (self.mode == "processes" or (
            not self.imported_before and (files >= PROCESS_MIN_FILES or nbytes >= PROCESS_MIN_BYTES)
        )):
            await asyncio.to_thread(self.start)
        return self.workers

    async def aclose(self) -> None:
        """Stop the processes, if any (waits for them, also when cancelled meanwhile, and
        for a start still under way in another thread: none begins after this)."""

        def close() -> None:
            with self._lock:
                self._closed = True
                workers, self.workers = self.workers, None
            if workers is not None:
                workers.shutdown()

        await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, close))


class _Importer:
    """Reads the walked files and stores them (see the module docstring)."""

    def __init__(
        self,
        blob: BlobService,
        tree: _Tree,
        fds: DirFds | None,
        concurrency: int,
        stats: ImportStats,
        progress: ImportProgress | None,
        workers: _Workers | None = None,
    ) -> None:
        self._blob = blob
        self._tree = tree
        self._workers = workers
        self._preparer = blob.preparer() if workers is not None else None
        self._present_rate = 0.5  # recent share of files found present (processes only)
        self._process_batches = 0
        self._fds = fds
        self._concurrency = max(1, concurrency)
        self._stats = stats
        self._progress = progress
        self._nodes: list[FileNode | None] = [None] * len(tree.files)
        self._pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="castore-import")
        # Large files are opened and read here, not behind the batches in the readers' queue.
        self._large_pool = concurrent.futures.ThreadPoolExecutor(
            max(2, min(8, self._concurrency // 4)), thread_name_prefix="castore-import-large"
        )
        self._misses = 0  # consecutive batches with nothing present
        self._batches = 0

    # -- threads -------------------------------------------------------------------

    def _open(self, f: _File, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
        """Open a walked file for reading (:func:`~castore_di._importworker.open_file`).

        ``dir_fd``: the file's directory when the caller holds it open.
        """
        def shown() -> str:
            return self._tree.file_path(f)

        if f.dir < 0:
            return open_file(self._tree.root, None, shown)
        if dir_fd is not None:
            return open_file(f.name, dir_fd, shown)
        assert self._fds is not None
        handle = self._fds.acquire(f.dir)
        try:
            return open_file(f.name, handle.fd, shown)
        finally:
            self._fds.release(handle)

    def _read_batch(self, indexes: list[int]) -> tuple[list[tuple[int, PreparedBlob, bool]], list[int]]:
        """Read small files and prepare them for storing (:meth:`BlobService.prepare_many`:
        hashed, and for the embedded store compressed, here in the reader thread); also the
        files that grew past ``SMALL_FILE``."""
        read: list[tuple[int, bytes, bool]] = []
        grown: list[int] = []
        handle: Handle | None = None
        current = -1
        try:
            for i in indexes:
                f = self._tree.files[i]
                if self._fds is not None and f.dir >= 0 and (handle is None or f.dir != current):
                    if handle is not None:
                        self._fds.release(handle)
                        handle = None
                    handle = self._fds.acquire(f.dir)
                    current = f.dir
                fd, st = self._open(f, None if handle is None else handle.fd)
                try:
                    executable = bool(st.st_mode & 0o100)
                    data = read_small(fd, st, f.size, lambda f=f: self._tree.file_path(f))  # type: ignore[misc]
                finally:
                    os.close(fd)
                if len(data) > SMALL_FILE:
                    grown.append(i)
                else:
                    read.append((i, data, executable))
        finally:
            if handle is not None and self._fds is not None:
                self._fds.release(handle)
        prepared = self._blob.prepare_many([d for _i, d, _x in read]) if read else []
        return [(i, p, x) for (i, _d, x), p in zip(read, prepared)], grown

    def _hash_file(self, f: _File, key: object) -> tuple[B3Digest, int, bool]:
        fd, st = self._open(f)
        try:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            size = 0
            try:
                while block := os.read(fd, 4 * _BLOCK):
                    hasher.update(block)
                    size += len(block)
                    self._partial(key, size // 2)
            except OSError as e:
                raise _os_error("read", self._tree.file_path(f), e) from e
        finally:
            os.close(fd)
        return B3Digest(hasher.digest()), size, bool(st.st_mode & 0o100)

    def _read_block(self, fd: int, f: _File) -> bytes:
        try:
            return os.read(fd, _STREAM_BLOCK)
        except OSError as e:
            raise _os_error("read", self._tree.file_path(f), e) from e

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _large_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._large_pool, fn, *args)

    # -- the loop ------------------------------------------------------------------

    def _advance(self, nbytes: int) -> None:
        """One file of ``nbytes`` is done."""
        if self._progress is not None:
            self._progress.advance(nbytes)

    def _partial(self, key: object, nbytes: int) -> None:
        """``nbytes`` of the large file ``key`` are done (``0``: forget it; any thread)."""
        partial = getattr(self._progress, "partial", None)
        if partial is not None:
            partial(key, nbytes)

    def _done(self, i: int, digest: B3Digest, size: int, executable: bool) -> None:
        self._nodes[i] = _file_node(digest, size, executable)
        self._stats.files += 1
        self._stats.bytes += size

    async def run(self, indexes: Sequence[int] | None = None) -> list[FileNode | None]:
        """Read and store the files (only ``indexes`` when given: the others stay ``None``)."""
        files = self._tree.files
        todo: Sequence[int] = range(len(files)) if indexes is None else indexes
        large = sorted((i for i in todo if files[i].size > SMALL_FILE), key=lambda i: -files[i].size)
        batches: list[list[int]] = []
        batch: list[int] = []
        nbytes = 0
        for i in todo:
            size = files[i].size
            if size > SMALL_FILE:
                continue
            batch.append(i)
            nbytes += size
            if len(batch) >= _BATCH_FILES or nbytes >= _BATCH_BYTES:
                batches.append(batch)
                batch, nbytes = [], 0
        if batch:
            batches.append(batch)
        # Two lanes: large files (largest first, so none is left alone at the end) stream
        # through writers; batches of small files go through the reader threads. Neither
        # waits behind the other.
        whole: list[int] = []
        if self._workers is not None:
            whole = [i for i in large if files[i].size <= WHOLE_IN_WORKER]
            large = [i for i in large if files[i].size > WHOLE_IN_WORKER]
        large_it, small_it, whole_it = iter(large), iter(batches), iter(whole)

        async def whole_lane() -> None:
            for i in whole_it:
                await self._small_batch([i], WHOLE_IN_WORKER)

        async def large_lane() -> None:
            for i in large_it:
                await self._large(i)

        async def small_lane() -> None:
            for b in small_it:
                await self._small_batch(b)

        n_large = min(len(large), max(1, self._concurrency // 4))
        n_small = min(len(batches), _BATCHES_IN_FLIGHT)
        workers = [asyncio.ensure_future(large_lane()) for _ in range(n_large)]
        workers += [asyncio.ensure_future(small_lane()) for _ in range(n_small)]
        if whole:
            workers.append(asyncio.ensure_future(whole_lane()))
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            # Reader threads may still hold directory descriptors: let them finish first.
            def shutdown() -> None:
                self._pool.shutdown(True)
                self._large_pool.shutdown(True)

            await asyncio.get_running_loop().run_in_executor(None, shutdown)
        assert all(self._nodes[i] is not None for i in todo)
        return self._nodes

    def _should_check(self) -> bool:
        # Asking ``has_many`` first costs a lookup per batch; uploading a present blob costs
        # the store's write path. While lookups keep finding nothing (a fresh store) only
        # every 8th batch is checked; one hit resumes checking every batch.
        self._batches += 1
        return self._misses < 4 or self._batches % 8 == 0

    def _job(self, indexes: Sequence[int]) -> tuple[list[tuple[int, int, bytes, int, int]], list[tuple[int, bytes, int]]]:
        """A worker's view of some files: their directories (and those directories' parents)
        and the files as ``(dir index, name, walked size)``."""
        files = self._tree.files
        records = self._tree.dirs
        dirs: list[tuple[int, int, bytes, int, int]] = []
        seen: set[int] = {0}
        job: list[tuple[int, bytes, int]] = []
        for i in indexes:
            f = files[i]
            job.append((f.dir, f.name, f.size))
            d = f.dir
            while d not in seen:
                seen.add(d)
                r = records[d]
                dirs.append((d, r.parent, r.name, r.dev, r.ino))
                d = r.parent
        return dirs, job

    async def _process_batch(
        self, workers: _Workers, indexes: list[int], limit: int
    ) -> tuple[list[tuple[int, PreparedBlob, bool]], list[int]]:
        """:meth:`_read_batch` in a worker process. The presence check stays here: while
        many files turn out present (a re-import), a batch is hashed first and only the absent
        files are read again and encoded; otherwise all are encoded at once."""
        hash_first = self._present_rate >= 0.3
        dirs, job = self._job(indexes)
        done, grown_at = await workers.run("hash" if hash_first else "full", dirs, job, None, limit)
        new = bytes.__new__
        ready = [
            (indexes[pos], PreparedBlob(new(B3Digest, digest), size, None, payload), executable)
            for pos, digest, size, executable, payload in done
        ]
        grown = [indexes[pos] for pos in grown_at]
        if not ready:
            return ready, grown
        self._process_batches += 1
        if not hash_first and self._process_batches % 8:
            for _i, p, _x in ready:  # mostly absent lately: the commit skips what is present
                p.present = False
            return ready, grown
        try:
            present = await self._blob.has_many([p.digest for _i, p, _x in ready])
        except StorageError as e:
            raise StorageError(f"unable to check blobs below {self._tree.root}: {e}") from e
        self._present_rate = 0.75 * self._present_rate + 0.25 * (sum(present) / len(present))
        absent: list[int] = []
        for k, ((_i, p, _x), found) in enumerate(zip(ready, present, strict=True)):
            p.present = found
            if not found and hash_first:
                absent.append(k)
        if absent:
            dirs, job = self._job([ready[k][0] for k in absent])
            expected = [ready[k][1].digest for k in absent]
            again, grown_at = await workers.run("encode", dirs, job, expected, limit)
            if grown_at:
                raise StorageError(f"{self._tree.file_path(self._tree.files[ready[absent[grown_at[0]]][0]])} changed while it was imported")
            for pos, _digest, _size, _x, payload in again:
                ready[absent[pos]][1].payload = payload
        return ready, grown

    async def _small_batch(self, indexes: list[int], limit: int = SMALL_FILE) -> None:
        if self._workers is not None:
            ready, grown = await self._process_batch(self._workers, indexes, limit)
        else:
            ready, grown = await self._thread(self._read_batch, indexes)
        unknown = [p for _i, p, _x in ready if p.present is None]
        if unknown and self._should_check():
            try:
                present = await self._blob.has_many([p.digest for p in unknown])
            except StorageError as e:
                raise StorageError(f"unable to check blobs below {self._tree.root}: {e}") from e
            self._misses = 0 if any(present) else self._misses + 1
            for p, found in zip(unknown, present):
                p.present = found
        todo = [(i, p) for i, p, _x in ready if not p.present]
        if todo:
            try:
                # Returns once committed: only then are the digests used.
                await self._blob.put_prepared([p for _i, p in todo])
            except StorageError as e:
                first = self._tree.file_path(self._tree.files[todo[0][0]])
                raise StorageError(f"unable to upload {first} (and {len(todo) - 1} more): {e}") from e
            self._stats.uploaded_files += len(todo)
            self._stats.uploaded_bytes += sum(p.size for _i, p in todo)
        for i, p, x in ready:
            self._done(i, p.digest, p.size, x)
        for _i, p, _x in ready:
            self._advance(p.size)
        for i in grown:
            await self._large(i)

    async def _large(self, i: int) -> None:
        f = self._tree.files[i]
        # Hashing first (in a thread) is far cheaper than an upload, so a large file
        # already present costs one read and no write.
        digest, size, executable = await self._large_thread(self._hash_file, f, i)
        try:
            present = await self._blob.has(digest)
        except StorageError as e:
            raise StorageError(f"unable to upload {self._tree.file_path(f)}: {e}") from e
        if not present:
            stored, size, executable = await self._stream(f, i)
            if stored != digest:
                raise StorageError(f"{self._tree.file_path(f)} changed while it was imported")
        self._partial(i, 0)
        self._advance(size)
        self._done(i, digest, size, executable)

    async def _stream(self, f: _File, key: object) -> tuple[B3Digest, int, bool]:
        fd, st = await self._large_thread(self._open, f)
        try:
            writer = self._blob.open_write()
            size = 0
            try:
                while block := await self._large_thread(self._read_block, fd, f):
                    size += len(block)
                    await writer.write(block)
                    self._partial(key, f.size // 2 + size // 2)
            except BaseException:
                await writer.abort()
                raise
            try:
                digest = await writer.close()
            except StorageError as e:
                raise StorageError(f"unable to finalize blob {self._tree.file_path(f)}: {e}") from e
        finally:
            os.close(fd)
        self._stats.uploaded_files += 1
        self._stats.uploaded_bytes += size
        return digest, size, bool(st.st_mode & 0o100)


async def ingest_path(
    blob: BlobService,
    dirs: DirectoryService,
    path: str | os.PathLike[str],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: ImportProgress | None = None,
    stats: ImportStats | None = None,
    exclude: Sequence[str] = (),
    skip_special: bool = False,
    warn: Callable[[str], None] | None = None,
    cache: ImportCache | None = None,
    workers: Workers = "threads",
) -> tuple[bytes, Node]:
    """Import ``path`` and return its name (the basename, as bytes) and its root node.

    Args:
        blob: where file contents go.
        dirs: where directories go (one closure, leaves first).
        path: a directory, a regular file or a symlink (not followed; the path's own
            parent directories may be symlinks).
        concurrency: the most blob writes in flight (a batch of small files counts once).
        progress: told the totals after the walk, then bytes and finished files.
        stats: filled in with counts as the import runs.
        exclude: gitignore-style patterns of paths (relative to ``path``) to leave out.
        skip_special: skip fifos, sockets and devices (each reported to ``warn``)
            instead of failing.
        warn: receives one message per skipped file (and about an unusable cache).
        cache: a stat cache (:mod:`castore_di.importcache`; off by default): files whose
            identity and metadata match the last import of this root, and whose blobs
            the blob service confirms it has, are not read; an unchanged tree whose
            root directory the directory service has is not rebuilt. Recorded again
            after a successful import.
        workers: who reads small files: ``"threads"`` of this process (the default: a
            library starts no processes unless asked), ``"processes"`` (worker processes,
            :mod:`castore_di._importworker`, fresh ``sys.executable -I`` interpreters,
            when the blob service offers a
            :meth:`~castore_di.blobservice.base.BlobService.preparer`; else threads), or
            ``"auto"`` (the ``castore`` command's default): processes for a large first import
            (``PROCESS_MIN_FILES`` small files or ``PROCESS_MIN_BYTES``; with a ``cache``,
            none for a root it knows) on a machine with at least
            ``AUTO_PROCESSES_MIN_CPUS`` CPUs, else threads.

    Raises:
        UnsupportedFileTypeError: a fifo, socket or device in the tree (without ``skip_special``).
        StorageError: a file cannot be read or a service fails.
    """
    # The walk creates objects by the hundred thousand, all alive until the end: each full
    # collection of the cyclic garbage collector would traverse them all again (a fifth of
    # the CPU time of a re-import with changed files went there), so it is paused while an
    # import runs.
    with _gc_paused():
        return await _ingest(
            blob, dirs, path, concurrency, progress, stats, exclude, skip_special, warn, cache, workers
        )


_gc_lock = threading.Lock()
_gc_users = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while at least one import runs (any thread)."""
    global _gc_users, _gc_was_enabled
    with _gc_lock:
        if _gc_users == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_was_enabled:
                gc.enable()


async def _ingest(
    blob: BlobService,
    dirs: DirectoryService,
    path: str | os.PathLike[str],
    concurrency: int,
    progress: ImportProgress | None,
    stats: ImportStats | None,
    exclude: Sequence[str],
    skip_special: bool,
    warn: Callable[[str], None] | None,
    cache: ImportCache | None,
    workers: Workers,
) -> tuple[bytes, Node]:
    root = os.fspath(path)
    if workers not in ("auto", "threads", "processes"):
        raise ValidationError(f"workers must be auto, threads or processes, not {workers!r}")
    stats = stats if stats is not None else ImportStats()
    name = os.fsencode(os.path.basename(os.path.normpath(root)))
    matcher = _Matcher(exclude) if exclude else None
    started = time.time_ns()  # before any file is looked at: see importcache's "racy" rule
    try:
        st = os.lstat(root)
    except OSError as e:
        raise _os_error("stat", root, e) from e
    tree = _Tree(root)
    if cache is not None:
        tree.sig = []
        tree.safe_ns = started - cache.racy_ns

    if stat.S_ISLNK(st.st_mode):
        stats.symlinks += 1
        try:
            target = os.readlink(os.fsencode(root))
        except OSError as e:
            raise _os_error("read symlink", root, e) from e
        try:
            return name, SymlinkNode(target)
        except ValidationError as e:
            raise ValidationError(f"{root}: {e}") from e
    if stat.S_ISREG(st.st_mode):
        key = None
        if cache is not None and st.st_mtime_ns < tree.safe_ns and st.st_ctime_ns < tree.safe_ns:
            key = KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, (st.st_mode >> 6) & 1)
        tree.files.append(_File(-1, name, st.st_size, key))
        if progress is not None:
            progress.start(1, st.st_size)
        state = await asyncio.to_thread(cache.load, root, warn) if cache is not None and key is not None else None
        nodes = await _import_files(blob, tree, None, concurrency, stats, progress, state)
        if cache is not None:
            await _save_cache(cache, root, tree, b"", nodes[0], nodes, warn)
        return name, nodes[0]
    if not stat.S_ISDIR(st.st_mode):
        raise UnsupportedFileTypeError(root, _file_type(st.st_mode))

    def open_root() -> int:
        try:
            fd = os.open(root, O_DIR)
            opened = os.fstat(fd)
        except OSError as e:
            raise _os_error("open directory", root, e) from e
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise StorageError(f"{root} was replaced while it was imported")
        return fd

    pool = _Pool(blob, workers, root, st.st_dev, st.st_ino)

    def walk() -> tuple[bytes, CacheState | None]:
        # Worker processes start during the walk, for a first import only (see _Pool).
        state = cache.load(root, warn) if cache is not None else None

        pool.imported_before = cache is not None and os.path.exists(cache.path_for(root))
        # Started from this thread: creating processes (fork, exec) stays off the event loop.
        _walk(tree, open_root(), matcher, skip_special, warn, warnings, None if pool.imported_before else pool.start)
        if cache is None or tree.sig is None:
            return b"", None
        # The walk's fingerprint; none when a file was too recent to be keyed.
        fingerprint = b"" if tree.racy else blake3.blake3(b"".join(tree.sig)).digest()
        tree.sig = None
        return fingerprint, state

    tree.dirs.append(_Dir(-1, b"", st.st_dev, st.st_ino))
    warnings: list[str] = []
    try:
        fingerprint, state = await asyncio.to_thread(walk)
        stats.skipped = tree.skipped
        if progress is not None:
            progress.start(len(tree.files), tree.bytes)
        if state is not None and fingerprint and fingerprint == state.tree:
            reused = await _reuse_tree(blob, dirs, tree, state, stats, progress)
            if reused is not None:
                if cache is not None:
                    await asyncio.to_thread(cache.touch, root)
                return name, reused
        fds = DirFds(tree.dirs, await asyncio.to_thread(open_root), tree.dir_path)
        try:
            file_nodes = await _import_files(blob, tree, fds, concurrency, stats, progress, state, pool)
        finally:
            fds.close()
    finally:
        await pool.aclose()
    root_node = await _put_directories(dirs, tree, file_nodes, stats)
    if cache is not None:
        await _save_cache(cache, root, tree, fingerprint, root_node, file_nodes, warn)
    return name, root_node


def _b3(raw: bytes) -> B3Digest:
    """A 32-byte digest from the cache (its checksum vouches for the length) as a B3Digest."""
    return bytes.__new__(B3Digest, raw)


async def _import_files(
    blob: BlobService,
    tree: _Tree,
    fds: DirFds | None,
    concurrency: int,
    stats: ImportStats,
    progress: ImportProgress | None,
    state: CacheState | None,
    pool: _Pool | None = None,
) -> list[FileNode]:
    """Every walked file's node: from the cache where it vouches for the file, else read."""
    files = tree.files
    nodes: list[FileNode | None] = [None] * len(files)
    if state is not None:
        known = state.files
        hits: list[tuple[int, bytes]] = []
        for i, f in enumerate(files):
            if f.key is not None and (d := known.get(f.key)) is not None:
                hits.append((i, d))
        if hits:
            unique = {d: _b3(d) for _i, d in hits}
            try:
                present = await blob.has_many(list(unique.values()))
            except StorageError as e:
                raise StorageError(f"unable to check blobs below {tree.root}: {e}") from e
            have = {raw: d for (raw, d), p in zip(unique.items(), present) if p}
            count = nbytes = 0
            for i, raw in hits:
                digest = have.get(raw)
                if digest is not None:
                    f = files[i]
                    nodes[i] = _file_node(digest, f.size, f.key[-1] == 1)  # type: ignore[index]
                    count += 1
                    nbytes += f.size
                    if progress is not None:
                        progress.advance(f.size)
            stats.files += count
            stats.cached_files += count
            stats.bytes += nbytes
    rest = [i for i, n in enumerate(nodes) if n is None]
    if rest:
        workers = None
        if pool is not None:
            small = [files[i].size for i in rest if files[i].size <= SMALL_FILE]
            workers = await pool.for_files(len(small), sum(small))
        read = await _Importer(blob, tree, fds, concurrency, stats, progress, workers).run(
            None if len(rest) == len(files) else rest
        )
        for i in rest:
            nodes[i] = read[i]
    return nodes  # type: ignore[return-value]  # every index is filled


async def _reuse_tree(
    blob: BlobService,
    dirs: DirectoryService,
    tree: _Tree,
    state: CacheState,
    stats: ImportStats,
    progress: ImportProgress | None,
) -> DirectoryNode | None:
    """The last import's root when the walk matched it and both services still hold it all."""
    raw = state.digests
    try:
        root = B3Digest(state.root_digest)
        # Directory services store a closure whole, so holding the root vouches for it.
        if await dirs.get(root) is None:
            return None
        new = bytes.__new__  # _b3, inlined: tens of thousands of digests
        digests = [new(B3Digest, raw[i : i + 32]) for i in range(0, len(raw), 32)]
        if digests and not all(await blob.has_many(digests)):
            return None
    except (StorageError, ValidationError) as e:
        raise _rewrap(e, f"unable to check the last import of {tree.root}") from e
    stats.files += len(tree.files)
    stats.cached_files += len(tree.files)
    stats.bytes += tree.bytes
    stats.directories += len(tree.dirs)
    stats.symlinks += tree.symlinks
    if progress is not None:
        for f in tree.files:
            progress.advance(f.size)
    return DirectoryNode(root, state.root_size)


async def _save_cache(
    cache: ImportCache,
    root: str,
    tree: _Tree,
    fingerprint: bytes,
    root_node: Node,
    file_nodes: list[FileNode],
    warn: Callable[[str], None] | None,
) -> None:
    """Record a successful import; a failure to write the cache is only a warning."""
    entries = [(f.key, n.digest) for f, n in zip(tree.files, file_nodes) if f.key is not None]
    root_digest = root_node.digest if isinstance(root_node, DirectoryNode) else b""
    root_size = root_node.size if isinstance(root_node, DirectoryNode) else 0
    try:
        await asyncio.to_thread(cache.save, root, fingerprint if root_digest else b"", root_digest, root_size, entries)
    except OSError as e:
        message = f"unable to write the import cache in {cache.directory}: {e.strerror or e}"
        if warn is not None:
            warn(message)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS: Final = [bytes([i]) for i in range(0x80)]
_new = object.__new__
_set = object.__setattr__


def _file_node(digest: B3Digest, size: int, executable: bool) -> FileNode:
    """A FileNode of trusted parts (a 32-byte digest, a size from ``stat``), without attrs' checks."""
    node: FileNode = _new(FileNode)
    _set(node, "digest", digest)
    _set(node, "size", size)
    _set(node, "executable", executable)
    return node


def _dir_node(digest: B3Digest, size: int) -> DirectoryNode:
    node: DirectoryNode = _new(DirectoryNode)
    _set(node, "digest", digest)
    _set(node, "size", size)
    return node


def _build_directory(
    tree: _Tree, index: int, file_nodes: list[FileNode], built: list[DirectoryNode | None]
) -> Directory:
    """Directory ``index`` from its walked entries, encoded canonically by hand.

    Names come from the filesystem (never empty, ``.``, ``..``, nor holding ``/`` or NUL;
    only their length is checked), so the encoding of ``tvix.castore.v1.Directory`` is
    written directly: directories (field 1), files (2), symlinks (3), each list in name
    order, fields with default values left out, as protobuf's deterministic serialization
    does (tests/test_import_cache.py compares the bytes with it).
    """
    items = tree.dirs[index].entries
    items.sort()  # names are unique: tuples compare on the name alone
    entries: list[tuple[bytes, Node]] = []
    dparts: list[bytes] = []
    fparts: list[bytes] = []
    lparts: list[bytes] = []
    size = len(items)
    varint = _varint
    for name, kind, payload in items:
        if len(name) > MAX_NAME_LEN:
            validate_name(name)  # raises the usual error
        if kind == "f":
            fnode = file_nodes[payload]
            inner = b"\n" + varint(len(name)) + name + b"\x12\x20" + fnode.digest
            if fnode.size:
                inner += b"\x18" + varint(fnode.size)
            if fnode.executable:
                inner += b"\x20\x01"
            fparts.append(b"\x12" + varint(len(inner)) + inner)
            entries.append((name, fnode))
        elif kind == "d":
            dnode = built[payload]
            assert dnode is not None
            size += dnode.size
            inner = b"\n" + varint(len(name)) + name + b"\x12\x20" + dnode.digest
            if dnode.size:
                inner += b"\x18" + varint(dnode.size)
            dparts.append(b"\n" + varint(len(inner)) + inner)
            entries.append((name, dnode))
        else:
            target = payload.target
            inner = b"\n" + varint(len(name)) + name + b"\x12" + varint(len(target)) + target
            lparts.append(b"\x1a" + varint(len(inner)) + inner)
            entries.append((name, payload))
    if size > U64_MAX:
        raise SizeOverflowError()
    dparts += fparts
    dparts += lparts
    encoded = b"".join(dparts)
    return Directory._prebuilt(tuple(entries), size, encoded, B3Digest(blake3.blake3(encoded).digest()))


def _build_directories(tree: _Tree, file_nodes: list[FileNode]) -> list[Directory]:
    """Every directory, leaves first (reversed pre-order puts each after its descendants)."""
    built: list[DirectoryNode | None] = [None] * len(tree.dirs)
    out: list[Directory] = []
    for index in range(len(tree.dirs) - 1, -1, -1):
        try:
            directory = _build_directory(tree, index, file_nodes, built)
        except ValidationError as e:
            raise ValidationError(f"cannot import directory {tree.dir_path(index)}: {e}") from e
        tree.dirs[index].entries = []  # free as we go
        built[index] = _dir_node(directory.digest, directory.size)
        out.append(directory)
    return out


async def _put_directories(
    dirs: DirectoryService, tree: _Tree, file_nodes: list[FileNode], stats: ImportStats
) -> DirectoryNode:
    """Build every directory (in a thread), put them as one closure, return the root's node."""
    stats.symlinks += tree.symlinks
    built = await asyncio.to_thread(_build_directories, tree, file_nodes)
    putter = dirs.put_multiple_start()
    # Reversed pre-order: index len - 1 - k for the k-th directory built.
    last = len(built) - 1
    for k, directory in enumerate(built):
        try:
            await putter.put(directory)
        except (StorageError, ValidationError) as e:
            raise _rewrap(e, f"failed to upload directory at {tree.dir_path(last - k)}") from e
        stats.directories += 1
    try:
        root_digest = await putter.close()
    except (StorageError, ValidationError) as e:
        raise _rewrap(e, "failed to finalize directory upload") from e
    root = built[-1]
    assert root.digest == root_digest
    return _dir_node(root.digest, root.size)
