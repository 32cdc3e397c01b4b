"""The writer thread of an environment: every write transaction and sync of the services.

Callers hand an operation (a function of a write transaction) to :meth:`Writer.submit`
(from the event loop) or :meth:`Writer.run` (from any other thread). The thread takes every
operation queued so far and applies them in one LMDB transaction, each inside its own nested
transaction (a failing operation is rolled back alone), then commits once: group commit.
Each caller's result is delivered only after that commit (and, with ``durability="full"``,
its fsync), so a digest is never reported before it is durable as promised. LMDB serialises
writers anyway; one thread per environment keeps the waiting for LMDB's write lock (held by
another process), the commit and the fsync off the event loop. The periodic fsync of
``durability="process"`` runs on a sync thread of its own (:meth:`Environment._sync_soon`), so
commits go on while the disk flushes. Operations should be short: callers hash and compress
before they submit (the importer's reader threads, the blob writer's worker threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import concurrent.futures

    import lmdb

    from castore_di._embedded.env import Environment

__all__ = ["Writer", "MAX_GROUP"]

T = TypeVar("T")
Operation = Callable[["lmdb.Transaction"], Any]

MAX_GROUP = 256  # operations per group commit (bounds one transaction's length)


class Writer:
    """One daemon thread applying queued write operations to ``env`` in group commits."""

    def __init__(self, env: Environment) -> None:
        self._env = env
        self._cond = threading.Condition()
        self._queue: list[tuple[Operation, concurrent.futures.Future[Any]]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.commits = 0  # group commits made (for tests and benchmarks)

    async def submit(self, op: Callable[[lmdb.Transaction], T]) -> T:
        """Apply ``op`` in a write transaction; returns its result once committed."""
        import asyncio

        result: T = await asyncio.wrap_future(self._enqueue(op))
        return result

    def run(self, op: Callable[[lmdb.Transaction], T]) -> T:
        """:meth:`submit` for a caller that is not on an event loop (blocks until committed)."""
        result: T = self._enqueue(op).result()
        return result

    def _enqueue(self, op: Operation) -> concurrent.futures.Future[Any]:
        import concurrent.futures  # not at import: a reading command never writes

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("writer thread is stopped")  # the environment is closing
            self._queue.append((op, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"castore-writer {self._env.path}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def stop(self) -> None:
        """Apply what is queued, then end the thread (idempotent)."""
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
            # A caller that gave up (its task was cancelled) before we started is skipped.
            group = [(op, f) for op, f in group if f.set_running_or_notify_cancel()]
            if group:
                self._commit(group)

    def _commit(self, group: list[tuple[Operation, concurrent.futures.Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        env = self._env
        try:
            with env.write() as txn:
                if len(group) == 1:
                    outcomes.append((True, group[0][0](txn)))  # a failure aborts the whole (single) txn
                else:
                    for op, _ in group:
                        try:
                            with env.lmdb_errors(), env.env.begin(write=True, parent=txn, buffers=True) as child:
                                outcomes.append((True, op(child)))
                        except Exception as e:  # rolled back alone; the others still commit
                            outcomes.append((False, e))
            self.commits += 1
        except BaseException as e:
            outcomes = [(False, e)] * len(group)
        for (_, future), (ok, value) in zip(group, outcomes):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
