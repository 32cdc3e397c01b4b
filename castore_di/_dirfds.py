"""Directory descriptors for the importer and the exporter: any depth, no link followed.

Both walk trees through descriptors (``openat`` with ``O_NOFOLLOW | O_DIRECTORY``), so paths
never grow past ``PATH_MAX`` and no symlink is followed. Keeping a descriptor per directory
would exhaust the descriptor limit on large trees, so :class:`DirFds` reopens a directory
below its parent on demand (checking it is the device and inode recorded when it was first
seen) and keeps only the most recently used few open.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Callable
from typing import Final, Protocol

from castore_di.errors import StorageError

__all__ = ["O_DIR", "DirRecord", "Handle", "DirFds", "open_dir"]

O_DIR: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_KEPT: Final = 64


class DirRecord(Protocol):
    """A directory seen before: its parent's index (-1 for the root), name and identity."""

    parent: int
    name: bytes
    dev: int
    ino: int


class DirRecords(Protocol):
    """Recorded directories by index (a list of them, or a mapping)."""

    def __getitem__(self, index: int, /) -> DirRecord: ...


class Handle:
    """A directory descriptor with a reference count; closed when the count reaches zero."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)


def open_dir(record: DirRecord, parent_fd: int, shown: Callable[[], str]) -> int:
    """Open ``record`` below ``parent_fd``: no link followed, identity checked."""
    try:
        fd = os.open(record.name, O_DIR, dir_fd=parent_fd)
    except OSError as e:
        raise StorageError(f"unable to open directory {shown()}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise StorageError(f"unable to stat {shown()}: {e.strerror or e}") from e
    if (st.st_dev, st.st_ino) != (record.dev, record.ino):
        os.close(fd)
        raise StorageError(f"{shown()} was replaced by another directory meanwhile")
    return fd


class DirFds:
    """Descriptors of recorded directories (index 0 is the root, open at ``root_fd``); thread-safe."""

    def __init__(self, records: DirRecords, root_fd: int, path_of: Callable[[int], str]) -> None:
        self._records = records
        self._path_of = path_of
        self._lock = threading.Lock()
        self._root = Handle(root_fd)
        self._open: collections.OrderedDict[int, Handle] = collections.OrderedDict()

    def acquire(self, index: int) -> Handle:
        """The directory's handle, with a reference for the caller (give it back with :meth:`release`)."""
        with self._lock:
            chain: list[int] = []
            i = index
            while i != 0 and i not in self._open:
                chain.append(i)
                i = self._records[i].parent
            handle = self._root if i == 0 else self._open[i]
            if i != 0:
                self._open.move_to_end(i)
            for j in reversed(chain):
                handle = Handle(open_dir(self._records[j], handle.fd, functools.partial(self._path_of, j)))
                self._open[j] = handle
            handle.refs += 1
            while len(self._open) > _KEPT:
                _, old = self._open.popitem(last=False)
                old.release()
            return handle

    def release(self, handle: Handle) -> None:
        with self._lock:
            handle.release()

    def close(self) -> None:
        """Drop the cache's references (handles still acquired close when released)."""
        with self._lock:
            for handle in self._open.values():
                handle.release()
            self._open.clear()
            self._root.release()
