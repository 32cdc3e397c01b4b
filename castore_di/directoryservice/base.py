"""The DirectoryService interface and the generic putter and traversal.

Contract every backend keeps:

* Directories are addressed by the BLAKE3 digest of their canonical encoding. Everything
  returned is a validated :class:`~castore_di.nodes.Directory`, checked against the digest
  it was asked for; stored bytes that do not match raise
  :class:`~castore_di.errors.IntegrityError`.
* ``get`` returns ``None`` for an absent directory. A backend that stores closures in
  batches may serve only the roots of closures it was given (``get`` of an inner
  directory then returns ``None``).
* ``put`` stores one directory. Backends may refuse directories with children through
  ``put`` (raising :class:`~castore_di.errors.UnsupportedOperationError`); closures go
  through ``put_multiple_start``.
* ``get_recursive(root)`` yields the closure root first, breadth-first, each directory
  once and only after a directory that refers to it, validated as it streams. An unknown
  root yields nothing. A closure with a missing inner directory raises
  :class:`~castore_di.errors.StorageError` when the walk reaches it.
* ``put_multiple_start()`` returns a putter that takes a closure leaves first. It refuses
  (:class:`~castore_di.errors.ClosureError`) references to directories not sent before and
  child sizes that do not match, at the latest on ``close()``; then nothing of the closure
  is stored. ``close()`` returns the root digest; closing twice returns it again.
* Construction does no I/O; ``close()`` on the service releases what it opened.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import ClassVar

from castore_di.digests import B3Digest
from castore_di.directoryservice.closure import LeavesToRoot, RootToLeaves
from castore_di.errors import ClosedError, StorageError
from castore_di.nodes import Directory

__all__ = ["DirectoryService", "DirectoryPutter", "SimplePutter", "traverse"]


class DirectoryPutter(abc.ABC):
    """Receives a closure leaves first; ``close()`` validates, stores, returns the root."""

    @abc.abstractmethod
    async def put(self, directory: Directory) -> None: ...

    @abc.abstractmethod
    async def close(self) -> B3Digest: ...

    async def __aenter__(self) -> "DirectoryPutter":
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            await self.close()


class SimplePutter(DirectoryPutter):
    """Validates the closure as it arrives and hands it to ``service._store_closure``."""

    def __init__(self, service: "DirectoryService") -> None:
        self._service = service
        self._validator = LeavesToRoot()
        self._root: B3Digest | None = None
        self._closed = False

    async def put(self, directory: Directory) -> None:
        if self._closed:
            raise ClosedError("directory putter is already closed")
        self._validator.add(directory)

    async def close(self) -> B3Digest:
        if self._root is not None:
            return self._root
        if self._closed:
            raise ClosedError("directory putter failed earlier")
        self._closed = True
        root, dirs = self._validator.finish()
        await self._service._store_closure(root, dirs)
        self._root = root
        return root


class DirectoryService(abc.ABC):
    """A store of Directory messages (see the module docstring for the contract)."""

    loopless: ClassVar[bool] = False
    """Whether its reads and ``close`` complete inside :func:`castore_di._loopless.run_loopless`
    (no event loop: nothing they await suspends). Writes may still need a loop."""

    @abc.abstractmethod
    async def get(self, digest: B3Digest) -> Directory | None:
        """The directory, validated and digest-checked, or ``None`` when absent."""

    @abc.abstractmethod
    async def put(self, directory: Directory) -> B3Digest:
        """Store one directory and return its digest."""

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The closure of ``root``: root first, breadth-first, each directory once."""
        return traverse(self, root)

    def put_multiple_start(self) -> DirectoryPutter:
        """A putter for a closure sent leaves first."""
        return SimplePutter(self)

    async def _store_closure(self, root: B3Digest, directories: list[Directory]) -> None:
        """Store a validated closure (leaves first). Backends override this to batch."""
        for d in directories:
            await self.put(d)

    async def close(self) -> None:
        """Release connections and files this service opened. Idempotent."""

    async def put_closure(self, directories: Iterable[Directory]) -> B3Digest:
        """Convenience: put a whole closure (leaves first) and return its root."""
        putter = self.put_multiple_start()
        for d in directories:
            await putter.put(d)
        return await putter.close()


async def traverse(service: DirectoryService, root: B3Digest) -> AsyncIterator[Directory]:
    """Breadth-first walk over ``service.get``, validating the closure as it goes."""
    first = await service.get(root)
    if first is None:
        return
    validator = RootToLeaves(root)
    queue: deque[tuple[B3Digest, Directory | None]] = deque([(root, first)])
    queued = {root}
    while queue:
        digest, directory = queue.popleft()
        if directory is None:
            directory = await service.get(digest)
            if directory is None:
                raise StorageError(f"directory {digest} is referenced in the closure of {root} but does not exist")
        validator.add(directory, digest)
        for _name, node in directory.directories():
            if node.digest not in queued:
                queued.add(node.digest)
                queue.append((node.digest, None))
        yield directory
