"""Opening and reading walked files for the importer, in its threads or in worker processes.

The importer (:mod:`castore_di.importer`) reads small files in batches. It does so in threads
of its own, or, for a large import into a blob service that offers a
:meth:`~castore_di.blobservice.base.BlobService.preparer`, in worker processes that run
:func:`run` on each batch: open, read, hash and encode (the preparer), then return the digests
and payloads to the importer, which checks presence and commits (a digest is used only after
its commit). A worker is a fresh interpreter (``python -I -c``, the parent's ``sys.path``)
running :func:`main`: it imports only this module, blake3 and the preparer's (no LMDB, no
asyncio, not the parent's main module, so no ``__main__`` guard is needed), reads jobs from
one pipe and writes results to another (each message a length and a pickle), ignores
``SIGINT`` (the importer stops it by closing its job pipe) and exits when that pipe ends, so
it also goes when the importer's process dies.

Safety is the importer's: a worker opens the root by its path and every directory below it
relative to its parent (``O_NOFOLLOW | O_DIRECTORY``), checking each is the device and inode
the walk recorded (:func:`castore_di._dirfds.open_dir`), and files with ``O_NOFOLLOW |
O_NONBLOCK``, regular files only (:func:`open_file`). Errors are the thread path's, pickled.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import stat
import struct
from collections.abc import Callable
from typing import Any, Final

import blake3

from castore_di._dirfds import O_DIR, DirFds, Handle
from castore_di.errors import StorageError, UnsupportedFileTypeError

__all__ = [
    "SMALL_FILE",
    "O_READ",
    "file_type",
    "os_error",
    "open_file",
    "read_small",
    "init",
    "run",
    "main",
    "read_message",
    "MAX_MESSAGE",
    "write_message",
]

SMALL_FILE: Final = 1 << 20  # files up to this size are read whole and stored in batches
O_READ: Final = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
)


def file_type(mode: int) -> str:
    """A special file's kind, as error messages name it."""
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return f"unknown (mode {mode:o})"


def os_error(what: str, path: str, e: OSError) -> StorageError:
    return StorageError(f"unable to {what} {path}: {e.strerror or e}")


def open_file(name: str | bytes, dir_fd: int | None, shown: Callable[[], str]) -> tuple[int, os.stat_result]:
    """Open a walked file for reading: no link followed, never blocks, regular files only."""
    try:
        fd = os.open(name, O_READ, dir_fd=dir_fd)
    except OSError as e:
        raise os_error("open", shown(), e) from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise os_error("stat", shown(), e) from e
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsupportedFileTypeError(shown(), file_type(st.st_mode))
    return fd, st


def read_small(
    fd: int, st: os.stat_result, walked_size: int, shown: Callable[[], str], limit: int = SMALL_FILE
) -> bytes:
    """A file's bytes; longer than ``limit`` when it grew past it (read no further)."""
    try:
        data = os.read(fd, max(st.st_size, walked_size) + 1)
        if len(data) > st.st_size:
            while len(data) <= limit and (more := os.read(fd, SMALL_FILE)):
                data += more
    except OSError as e:
        raise os_error("read", shown(), e) from e
    return data


class _Record:
    __slots__ = ("parent", "name", "dev", "ino")

    def __init__(self, parent: int, name: bytes, dev: int, ino: int) -> None:
        self.parent = parent
        self.name = name
        self.dev = dev
        self.ino = ino


class _Worker:
    """A worker process's state: the import's root and the directories it was told about."""

    def __init__(self, root: str, dev: int, ino: int, preparer: Any) -> None:
        self.root = root
        self.records: dict[int, _Record] = {0: _Record(-1, b"", dev, ino)}
        self.preparer = preparer
        self._fds: DirFds | None = None

    def dir_path(self, index: int) -> str:
        parts: list[bytes] = []
        while index > 0:
            record = self.records[index]
            parts.append(record.name)
            index = record.parent
        return os.path.join(self.root, *(os.fsdecode(p) for p in reversed(parts)))

    def fds(self) -> DirFds:
        if self._fds is None:
            try:
                fd = os.open(self.root, O_DIR)
                opened = os.fstat(fd)
            except OSError as e:
                raise os_error("open directory", self.root, e) from e
            root = self.records[0]
            if (opened.st_dev, opened.st_ino) != (root.dev, root.ino):
                os.close(fd)
                raise StorageError(f"{self.root} was replaced while it was imported")
            self._fds = DirFds(self.records, fd, self.dir_path)
        return self._fds


_worker: _Worker | None = None

Done = tuple[int, bytes, int, bool, Any]  # position in the job, digest, size, executable, payload


def init(root: str, dev: int, ino: int, preparer: Any) -> None:
    """Remember the import (``dev``, ``ino``: the root's identity)."""
    global _worker
    _worker = _Worker(root, dev, ino, preparer)


def run(
    kind: str,
    dirs: list[tuple[int, int, bytes, int, int]],
    files: list[tuple[int, bytes, int]],
    expected: list[bytes] | None = None,
    limit: int = SMALL_FILE,
) -> tuple[list[Done], list[int]]:
    """Read a batch of files (``(dir index, name, walked size)``, each up to ``limit``
    bytes) and prepare them.

    ``dirs``: ``(index, parent, name, dev, ino)`` of the files' directories and their parents.
    ``kind``: ``"hash"`` (digests only), ``"full"`` (digests and the preparer's payloads) or
    ``"encode"`` (as full, each digest checked against ``expected``: the file was read
    before). Returns what was read, and the positions of files that grew past ``limit``.
    """
    worker = _worker
    assert worker is not None, "init() was not called"
    records = worker.records
    for index, parent, name, dev, ino in dirs:
        if index not in records:
            records[index] = _Record(parent, name, dev, ino)
    fds = worker.fds()
    read: list[bytes] = []
    hasher = blake3.blake3
    done: list[Done] = []
    grown: list[int] = []
    handle: Handle | None = None
    current = -1
    try:
        for pos, (index, name, size) in enumerate(files):
            if handle is None or index != current:
                if handle is not None:
                    fds.release(handle)
                    handle = None
                handle = fds.acquire(index)
                current = index

            def shown(index: int = index, name: bytes = name) -> str:
                return os.path.join(worker.dir_path(index), os.fsdecode(name))

            fd, st = open_file(name, handle.fd, shown)
            try:
                data = read_small(fd, st, size, shown, limit)
            finally:
                os.close(fd)
            if len(data) > limit:
                grown.append(pos)
                continue
            digest = hasher(data).digest()
            if expected is not None and digest != expected[pos]:
                raise StorageError(f"{shown()} changed while it was imported")
            done.append((pos, digest, len(data), bool(st.st_mode & 0o100), None))
            read.append(data)
    finally:
        if handle is not None:
            fds.release(handle)
    if kind != "hash" and done:
        payloads = worker.preparer.encode_many([(data, d[1]) for data, d in zip(read, done)])
        done = [(pos, digest, size, x, payload) for (pos, digest, size, x, _), payload in zip(done, payloads)]
    return done, grown


_LENGTH: Final = struct.Struct("<Q")
# Far above any message: a job names files; an answer holds one batch (a few MiB) or one
# whole file (at most the importer's ``WHOLE_IN_WORKER``, 64 MiB), encoded.
MAX_MESSAGE: Final = 256 << 20


def read_message(f: io.FileIO, limit: int = MAX_MESSAGE) -> bytearray | None:
    """One message from a pipe (``None`` at its end, also inside a message).

    Raises:
        StorageError: the message announces more than ``limit`` bytes (nothing is allocated).
    """
    header = bytearray(_LENGTH.size)
    body: bytearray | None = None
    for buf in (header, None):
        if buf is None:
            (length,) = _LENGTH.unpack(header)
            if length > limit:
                raise StorageError(f"an import worker message of {length} bytes exceeds {limit}")
            body = buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                return None
            done += n
    return body


def write_message(fd: int, data: bytes) -> None:
    """One message into a pipe (blocks while the pipe is full)."""
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def main(jobs_fd: int, results_fd: int) -> None:
    """A worker's loop: ``("init", args)`` once, then ``("run", args)`` per job, each answered
    in order with ``(True, result)`` or ``(False, exception)``; returns when the jobs end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    jobs = io.FileIO(jobs_fd, "rb", closefd=True)
    while (message := read_message(jobs)) is not None:
        what, args = pickle.loads(message)
        answer: tuple[bool, Any]
        try:
            if what == "init":
                init(*args)
                answer = (True, None)
            else:
                answer = (True, run(*args))
        except Exception as e:
            answer = (False, e)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # an exception that does not pickle: its text
            data = pickle.dumps((False, StorageError(f"{answer[1]} ({type(answer[1]).__name__}; {e})")))
        try:
            write_message(results_fd, data)
        except BrokenPipeError:  # the importer is gone
            return
        if what == "init" and not answer[0]:
            return  # no job can run: the importer reports the error
