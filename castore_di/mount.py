"""``castore mount``: a stored tree as a read-only FUSE filesystem (pyfuse3 on asyncio).

Directories are fetched on first lookup and cached; reads go through the blob service's
chunk list, so a random read fetches only the chunks it touches, each verified (a corrupted
chunk is ``EIO``, never wrong bytes); executable bits and symlinks are as stored. Works over
any configured services, a remote ``castore serve`` included. Runs in the foreground until
unmounted; SIGINT/SIGTERM unmount cleanly. Throughput against ``castore cat`` and the
original files: ``benches/mount_bench.py``.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from castore_di.blobservice.base import BlobService
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import CastoreError, StorageError
from castore_di.treeview import TreeView

if TYPE_CHECKING:
    from castore_di._fuse import CastoreOperations

__all__ = ["mount_tree", "require_fuse", "FuseUnavailableError", "INSTALL_HINT"]

INSTALL_HINT = "apt-get install fuse3 libfuse3-dev pkg-config, then pip install 'castore_di[mount]'"


class FuseUnavailableError(CastoreError, OSError):
    """FUSE cannot be used here: no ``/dev/fuse``, or libfuse3/pyfuse3 missing."""


def require_fuse() -> Any:
    """The ``pyfuse3`` module, switched to asyncio; :class:`FuseUnavailableError` when it cannot work."""
    try:
        import pyfuse3
        import pyfuse3.asyncio
    except ImportError as e:
        missing = "libfuse3" if "libfuse3" in str(e) else "pyfuse3"
        raise FuseUnavailableError(f"castore mount needs FUSE: {missing} is not installed ({INSTALL_HINT})") from e
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError(
            "castore mount needs FUSE: /dev/fuse does not exist (load the fuse kernel module, "
            "or give the container the device: --device /dev/fuse --cap-add SYS_ADMIN)"
        )
    pyfuse3.asyncio.enable()
    pyfuse3.asyncio.wait_readable = _wait_readable
    pyfuse3.asyncio.notify_closing = _notify_closing
    return pyfuse3


def _notify_closing(fd: int) -> None:
    import pyfuse3.asyncio as compat

    _forget(fd)
    for future in compat._read_futures.get(fd, ()):
        if not future.done():
            future.set_exception(compat.ClosedResourceError())


# Descriptors with a reader registered: their loop, a poll object for checking readiness, and
# how many readiness events in a row found no task waiting (see _wait_readable).
_watched: dict[int, tuple[asyncio.AbstractEventLoop, "select.poll", list[int]]] = {}
_IDLE_EVENTS = 2


def _readable(fd: int) -> None:
    import pyfuse3.asyncio as compat

    _loop, poll, idle = _watched[fd]
    waiting = [f for f in compat._read_futures.get(fd, ()) if not f.done()]
    if waiting:
        # An event selected before a task read the request may run after that task began
        # waiting again: wake it only if a request is there now, or its blocking read would
        # stop the loop (and with it the reply the kernel waits for).
        if poll.poll(0):
            waiting[0].set_result(None)
            idle[0] = 0
        return
    # Nobody waits: the woken task has not read its request yet, or every task is busy. The
    # reader stays for an event or two, then goes (level-triggered readiness would otherwise
    # wake the loop for nothing until a task reads).
    idle[0] += 1
    if idle[0] > _IDLE_EVENTS:
        _forget(fd)


async def _wait_readable(fd: int) -> None:
    """pyfuse3.asyncio's ``wait_readable``, without its race and with fewer system calls.

    The stock version removes the reader in a done-callback, which runs a loop iteration
    later: a second readiness event in between calls ``set_result`` twice and logs
    ``InvalidStateError`` (``notify_closing`` has the same race). It also adds and removes
    the reader around every request: two ``epoll_ctl`` calls per FUSE request. Here the
    reader wakes a waiting task when a request is there (finished futures are ignored) and
    stays registered while requests keep coming; it goes after a few readiness events that
    find no task waiting (:func:`_readable`), when pyfuse3 is told the descriptor closes,
    and when the mount ends.
    """
    import pyfuse3.asyncio as compat

    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    compat._read_futures[fd].add(future)
    try:
        if fd not in _watched:
            poll = select.poll()
            poll.register(fd, select.POLLIN)
            loop.add_reader(fd, _readable, fd)
            _watched[fd] = (loop, poll, [0])
        await future
    finally:
        compat._read_futures[fd].discard(future)
        if not compat._read_futures[fd]:
            del compat._read_futures[fd]


def _forget(fd: int) -> None:
    """Stop watching ``fd`` (on its loop's thread)."""
    entry = _watched.pop(fd, None)
    if entry is not None and not entry[0].is_closed():
        entry[0].remove_reader(fd)


def _forget_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Stop watching every descriptor ``loop`` watches (before the session closes them)."""
    for fd, (owner, _poll, _idle) in list(_watched.items()):
        if owner is loop:
            _forget(fd)


async def mount_tree(
    blob: BlobService,
    dirs: DirectoryService,
    root: B3Digest,
    mountpoint: str | os.PathLike[str],
    *,
    ready: Callable[["CastoreOperations"], None] | None = None,
    handle_signals: bool = True,
    debug: bool = False,
) -> None:
    """Serve the tree ``root`` at ``mountpoint`` until it is unmounted (or a signal arrives).

    Args:
        ready: called once the filesystem is mounted, with the operations object (its
            ``fetched`` list records every chunk that reads fetched).
        handle_signals: unmount on SIGINT/SIGTERM (only from the main thread).
        debug: libfuse's debug output on stderr.

    Raises:
        FuseUnavailableError: no FUSE here (the message names what to install).
        StorageError: ``root`` is not a stored directory, or the mountpoint is unusable.
    """
    pyfuse3 = require_fuse()
    from castore_di._fuse import CastoreOperations

    target = os.fspath(mountpoint)
    if not os.path.isdir(target):
        raise StorageError(f"mountpoint {target} is not a directory")
    if await dirs.get(root) is None:
        raise StorageError(f"directory {root} not found")
    ops = CastoreOperations(TreeView(blob, dirs), root)
    options = set(pyfuse3.default_options) | {"ro", "fsname=castore", "subtype=castore"}
    if debug:
        options.add("debug")
    try:
        pyfuse3.init(ops, target, options)
    except RuntimeError as e:
        raise StorageError(f"cannot mount at {target}: {e}") from e
    loop = asyncio.get_running_loop()
    watched: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, pyfuse3.terminate)
                watched.append(sig)
            except (RuntimeError, ValueError):  # not the main thread
                break
    try:
        if ready is not None:
            ready(ops)
        await pyfuse3.main()
    finally:
        for sig in watched:
            loop.remove_signal_handler(sig)
        await ops.close_all()
        _forget_loop(loop)  # before the session's descriptor closes
        pyfuse3.close(unmount=True)


def terminate_from_thread(loop: asyncio.AbstractEventLoop) -> None:
    """Ask a mount running on ``loop`` (in another thread) to unmount and return."""
    import pyfuse3

    loop.call_soon_threadsafe(pyfuse3.terminate)
