"""One open LMDB environment per data directory, shared in the process by reference count.

The async rule (also in the README's Development section): nothing that can block on disk,
locks or the network runs on the event loop. Here that means: write transactions and syncs
go through the environment's writer thread (:meth:`Environment.transact`, group commit), and
the periodic sync of ``durability: process`` through a sync thread;
opening and closing (which syncs) run in a worker thread (:func:`open_async`,
:func:`release_async`); read transactions stay inline, as an LMDB read never waits for a
writer or a lock and takes microseconds.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from castore_di._embedded.config import StoreOptions
from castore_di._embedded.lease import WriterLease, lease_alive, lease_file, remove_dead_lease_files
from castore_di._embedded.writer import Writer
from castore_di._loopless import in_loopless, to_thread
from castore_di.errors import (
    ClosedError,
    ConfigError,
    ErrorTable,
    LockedError,
    MissingDependencyError,
    StorageError,
    map_errors,
)

if TYPE_CHECKING:
    import lmdb

__all__ = [
    "Environment",
    "Handle",
    "acquire",
    "acquire_async",
    "compact",
    "open_environments",
    "release",
    "release_async",
]

T = TypeVar("T")

_MAX_DBS = 8
_LOW_SPACE = 64 << 20  # an I/O error with less free space than this is taken for a full disk
_USERS_LOCK = "users.lock"  # every process with the environment open holds a shared flock
_SWEEP_BATCH = 4096  # keys examined per sweep write transaction (keeps each one short)


def _import_lmdb() -> Any:
    try:
        import lmdb
    except ImportError as e:  # pragma: no cover - a core dependency
        raise MissingDependencyError("the embedded store needs 'lmdb' (pip install castore_di)") from e
    return lmdb


class Environment:
    """One open LMDB environment: named databases, transactions, syncs, writer leases.

    Obtain it with :func:`acquire`, give it back with :func:`release`. It knows no record
    format: each service kind opens its own databases with :meth:`db`.
    """

    def __init__(self, path: str, options: StoreOptions) -> None:
        self._lmdb = _import_lmdb()
        self.path = path
        self.options = options
        self._closed = False
        self._last_sync = time.monotonic()
        self._dirty = False  # commits since the last sync
        self._sync_lock = threading.Lock()
        # Syncs due by sync_interval run on their own thread, so commits go on meanwhile.
        self._sync_cond = threading.Condition()
        self._sync_wanted = False
        self._sync_stop = False
        self._syncer: threading.Thread | None = None
        self._sync_error: StorageError | None = None
        self._dbs: dict[bytes, Any] = {}
        self._dbs_lock = threading.Lock()
        self._table: ErrorTable = {self._lmdb.MapFullError: self._full, self._lmdb.Error: StorageError}
        # Commits and syncs: a full disk is named as such (see _write_error).
        self._write_table: ErrorTable = {self._lmdb.MapFullError: self._full, self._lmdb.Error: self._write_error}
        self.writer = Writer(self)
        full = options.durability == "full"
        self._users = _hold_users_lock(path)
        self._exclusive_lock = threading.Lock()
        self._exclusive_depth = 0
        self._prune_fd: int | None = None
        try:
            self._open_env(path, full)
        except BaseException:
            self._users.close()
            raise

    def _open_env(self, path: str, full: bool) -> None:
        with map_errors({(self._lmdb.Error, OSError): StorageError}, f"cannot open embedded store at {path}"):
            os.makedirs(path, exist_ok=True)
            self.env: lmdb.Environment = self._lmdb.open(
                path,
                map_size=self.options.map_size,
                max_dbs=_MAX_DBS,
                max_readers=self.options.max_readers,
                subdir=True,
                sync=full,
                metasync=full,
                readahead=False,
                lock=True,
            )

    def db(self, name: bytes) -> Any:
        """The named database (``lmdb._Database``), created on first use."""
        self._check_open()
        with self._dbs_lock:
            found = self._dbs.get(name)
            if found is None:
                # open_db without a transaction waits for LMDB's writer lock holding the GIL,
                # which freezes the process while the writer thread has a transaction open;
                # beginning the write transaction ourselves waits with the GIL released
                with self.lmdb_errors(f"cannot open database {name!r}"), self.env.begin(write=True) as txn:
                    found = self.env.open_db(name, txn=txn)
                self._dbs[name] = found
            return found

    def lmdb_errors(self, doing: str = "") -> Any:
        """``map_errors`` for LMDB calls on this environment."""
        return map_errors(self._table, f"embedded store {self.path}" + (f": {doing}" if doing else ""))

    def _full(self, _e: BaseException) -> StorageError:
        return StorageError(f"embedded store {self.path} is full (map_size={self.options.map_size}); raise map_size")

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose ``get`` returns zero-copy buffers (copy before it ends)."""
        self._check_open()
        with self.lmdb_errors(), self.env.begin(buffers=True) as txn:
            yield txn

    async def transact(self, op: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``op`` in a write transaction on the writer thread; its result once committed."""
        self._check_open()
        return await self.writer.submit(op)

    def transact_blocking(self, op: Callable[[lmdb.Transaction], T]) -> T:
        """:meth:`transact` from a thread that is not an event loop's (e.g. ``gc`` in a worker)."""
        self._check_open()
        return self.writer.run(op)

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction in the calling thread; commits on success, then syncs as
        ``durability`` asks. Blocks: the writer thread and tests use it, services use
        :meth:`transact`."""
        self._check_open()
        with map_errors(self._write_table), self.env.begin(write=True, buffers=True) as txn:
            yield txn
        self._after_commit()

    def _write_error(self, e: BaseException) -> StorageError:
        """A failed commit or sync; a full disk says so (LMDB reports a short write as EIO)."""
        text = str(e)
        full = "No space left" in text
        if not full and ("Input/output error" in text or isinstance(e, self._lmdb.DiskError)):
            try:
                st = os.statvfs(self.path)
                full = st.f_bavail * st.f_frsize < _LOW_SPACE
            except OSError:
                pass
        if full:
            return StorageError(f"embedded store {self.path}: no space left on device ({text}); "
                                "the failed transaction was not applied")
        return StorageError(f"embedded store {self.path}: {text}")

    def _after_commit(self) -> None:
        if self.options.durability == "full":
            return  # LMDB synced the commit itself
        self._dirty = True
        error, self._sync_error = self._sync_error, None
        if error is not None:  # a background sync failed: the next writer hears of it
            raise error
        if time.monotonic() - self._last_sync >= self.options.sync_interval:
            self._sync_soon()

    def _sync_soon(self) -> None:
        """Have the sync thread flush to disk (started on first use)."""
        with self._sync_cond:
            if self._sync_wanted or self._sync_stop:
                return
            self._sync_wanted = True
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_loop, name=f"castore-sync {self.path}", daemon=True)
                self._syncer.start()
            self._sync_cond.notify()

    def _sync_loop(self) -> None:
        while True:
            with self._sync_cond:
                while not self._sync_wanted and not self._sync_stop:
                    self._sync_cond.wait()
                if self._sync_stop:
                    return
            try:
                self.sync()
            except StorageError as e:
                self._sync_error = e
            with self._sync_cond:
                self._sync_wanted = False

    def _stop_syncer(self) -> None:
        with self._sync_cond:
            self._sync_stop = True
            thread = self._syncer
            self._sync_cond.notify()
        if thread is not None:
            thread.join()

    def sync(self) -> None:
        """Flush committed transactions to disk (fsync)."""
        with self._sync_lock:
            self._last_sync = time.monotonic()
            self._dirty = False
            if not self._closed:
                with map_errors(self._write_table, "sync failed"):
                    self.env.sync(True)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"embedded store {self.path} is closed")

    def close(self) -> None:
        """Apply queued writes, sync, close (blocking; :func:`release_async` runs it in a thread)."""
        if self._closed:
            return
        try:
            self.writer.stop()
            self._stop_syncer()
            if self._dirty:  # a read-only session (castore ls, cat) does not wait for an fsync
                self.sync()
        finally:
            self._closed = True
            self.env.close()
            self._users.close()

    # -- exclusive use (castore prune) -----------------------------------------------

    def enter_exclusive(self, wait: float | None = None) -> None:
        """Take the store for this process alone (blocking: call it in a thread).

        Takes ``<path>/prune.lock`` (one prune at a time), then converts this process's shared
        ``users.lock`` to exclusive, polling (so it never queues behind itself) until the
        other processes have closed the store, for ``wait`` seconds at most
        (:class:`LockedError` then). Re-entrant: both services of one path take it.
        """
        self._check_open()
        with self._exclusive_lock:
            if self._exclusive_depth:
                self._exclusive_depth += 1
                return
            fd = os.open(os.path.join(self.path, "prune.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StorageError(f"embedded store {self.path}: another prune is running") from None
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(self._users.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        fcntl.flock(self._users.fileno(), fcntl.LOCK_SH)
                        os.close(fd)
                        raise LockedError(
                            f"embedded store {self.path} is in use by other processes (an import, a server, "
                            "a mount); prune needs it alone"
                        ) from None
                    time.sleep(0.05)
            self._prune_fd = fd
            self._exclusive_depth = 1

    def leave_exclusive(self) -> None:
        """Give the store back to the other processes (the shared ``users.lock`` again)."""
        with self._exclusive_lock:
            if self._exclusive_depth > 1:
                self._exclusive_depth -= 1
                return
            self._exclusive_depth = 0
            if not self._users.closed:
                fcntl.flock(self._users.fileno(), fcntl.LOCK_SH)
            if self._prune_fd is not None:
                os.close(self._prune_fd)
                self._prune_fd = None

    def sweep(self, db: Any, keep: set[bytes], *, dry_run: bool, also: tuple[Any, ...] = ()) -> tuple[int, int]:
        """Delete every key of ``db`` not in ``keep`` (and the same keys of ``also``); ``(keys, stored bytes)``.

        Works in write transactions of at most ``_SWEEP_BATCH`` keys. Only for use under
        :meth:`enter_exclusive`.
        """
        count = size = 0
        after: bytes | None = None
        while True:
            with self.read() if dry_run else self.write() as txn:
                cursor = txn.cursor(db=db)
                found = cursor.first() if after is None else cursor.set_range(after)
                batch: list[tuple[bytes, int]] = []
                scanned: bytes | None = None
                while found and len(batch) < _SWEEP_BATCH:
                    key = bytes(cursor.key())
                    scanned = key
                    if key != after and key not in keep:
                        batch.append((key, len(cursor.value())))
                    found = cursor.next()
                for key, stored in batch:
                    count += 1
                    size += stored
                    if not dry_run:
                        txn.delete(key, db=db)
                        for other in also:
                            txn.delete(key, db=other)
            if not found or scanned is None:
                return count, size
            after = scanned

    # -- writer leases ---------------------------------------------------------------

    def new_lease(self) -> WriterLease:
        """Register a writer in progress (see :mod:`castore_di._embedded.lease`)."""
        self._check_open()
        return WriterLease(self.path)

    def lease_alive(self, token: bytes) -> bool:
        return lease_alive(self.path, token)

    def remove_lease_file(self, token: bytes) -> None:
        """Remove a dead writer's lock file (no error when it is gone)."""
        try:
            os.unlink(lease_file(self.path, token))
        except FileNotFoundError:
            pass

    def remove_dead_lease_files(self) -> None:
        remove_dead_lease_files(self.path)


def _hold_users_lock(path: str) -> Any:
    """A shared ``flock`` on ``<path>/users.lock`` for as long as the environment is open.

    :func:`compact` and a prune (:meth:`Environment.enter_exclusive`) take it exclusively, so
    they know no other process has the store open, and an opener meanwhile is refused
    instead of reading a file being swapped or records being deleted.
    """
    try:
        os.makedirs(path, exist_ok=True)
        users = open(os.path.join(path, _USERS_LOCK), "a+b")  # noqa: SIM115 - held while open
    except OSError as e:
        raise StorageError(f"cannot open embedded store at {path}: {e}") from e
    try:
        fcntl.flock(users.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        users.close()
        raise LockedError(
            f"embedded store {path} is held exclusively by another process "
            "(castore gc --compact or castore prune); try again when it is done"
        ) from None
    return users


def _disk_usage(path: str) -> int:
    """Bytes the store's data file occupies on disk (allocated blocks, not its length)."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512


def compact(path: str, options: StoreOptions | None = None) -> tuple[int, int]:
    """Rewrite the store at ``path`` compactly and swap it in atomically; ``(before, after)`` bytes.

    LMDB never gives freed pages back to the file system: it reuses them, so the data file
    keeps its high-water mark. A compacting copy (``mdb_env_copy2`` with ``MDB_CP_COMPACT``)
    writes only the pages in use; it is fsynced and renamed over ``data.mdb``. Refused
    (:class:`LockedError`) while the store is open anywhere else, in this process or
    another, since their maps would keep pointing at the old file.
    """
    lmdb = _import_lmdb()
    key = _key(os.path.abspath(os.path.expanduser(path)))
    with _registry_lock:
        entry = _entries.setdefault(key, _Entry())
    with entry.lock:  # nothing in this process opens the path meanwhile
        if entry.env is not None:
            raise LockedError(f"embedded store {key} is open in this process; close its services first")
        try:
            users = open(os.path.join(key, _USERS_LOCK), "a+b")  # noqa: SIM115
        except OSError as e:
            raise StorageError(f"cannot open embedded store at {key}: {e}") from e
        with users:
            try:
                fcntl.flock(users.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(
                    f"refusing to compact embedded store {key}: another process has it open"
                ) from None
            import shutil  # only here: its archive modules cost every command's start-up

            before = _disk_usage(key)
            work = os.path.join(key, ".compact")
            shutil.rmtree(work, ignore_errors=True)
            os.mkdir(work)
            opts = options or StoreOptions()
            try:
                env = lmdb.open(key, map_size=opts.map_size, max_dbs=_MAX_DBS, subdir=True, lock=True,
                                readahead=False)
                try:
                    env.copy(work, compact=True)
                finally:
                    env.close()
                copied = os.path.join(work, "data.mdb")
                fd = os.open(copied, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(copied, os.path.join(key, "data.mdb"))
                dir_fd = os.open(key, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except (lmdb.Error, OSError) as e:
                raise StorageError(f"compacting embedded store {key} failed: {e}") from e
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return before, _disk_usage(key)


# --- per-process sharing ----------------------------------------------------------------
#
# LMDB must not open one environment twice in a process, so every service on a path shares one
# Environment, counted by references. Each path has its own lock, held while the environment
# opens or closes, so a thread that acquires a path while its last user closes it waits for the
# close to finish and then opens it afresh (never "already open"); other paths are not held up.


class _Entry:
    __slots__ = ("lock", "env", "refs")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.env: Environment | None = None
        self.refs = 0


_registry_lock = threading.Lock()
_entries: dict[str, _Entry] = {}


def _key(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return os.path.realpath(path)


def open_environments() -> dict[str, int]:
    """``{path: references}`` of the environments open in this process (for tests)."""
    with _registry_lock:
        entries = list(_entries.items())
    return {key: entry.refs for key, entry in entries if entry.env is not None}


def acquire(path: str, options: StoreOptions | None = None) -> Environment:
    """The process's environment for ``path``, opened on first use; pair with :func:`release`.

    ``options=None`` takes the environment as already open (or the defaults). Blocks (it may
    create the directory, open files, wait for a concurrent close): from async code use
    :func:`acquire_async`.
    """
    with map_errors({OSError: StorageError}, f"cannot create embedded store directory {path}"):
        key = _key(os.path.abspath(os.path.expanduser(path)))
    with _registry_lock:
        entry = _entries.setdefault(key, _Entry())
    with entry.lock:
        env = entry.env
        if env is not None:
            if options is not None and env.options != options:
                raise ConfigError(
                    f"embedded store {key} is already open in this process with {env.options}; "
                    f"every service on one path must use the same map_size/durability/sync_interval/max_readers "
                    f"(got {options})"
                )
        else:
            env = entry.env = Environment(key, options or StoreOptions())
        entry.refs += 1
        return env


def release(env: Environment) -> None:
    """Give back an environment from :func:`acquire`; the last release syncs and closes it.

    Blocks (the close syncs): from async code use :func:`release_async`.
    """
    with _registry_lock:
        entry = _entries.get(env.path)
    if entry is None:
        return
    with entry.lock:
        if entry.env is not env:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        entry.env = None
        env.close()


async def acquire_async(path: str, options: StoreOptions | None = None) -> Environment:
    """:func:`acquire` in a worker thread."""
    return await to_thread(acquire, path, options)


async def release_async(env: Environment) -> None:
    """:func:`release` in a worker thread. Shielded: a cancelled caller still gives it back."""
    if in_loopless():
        release(env)
        return
    import asyncio

    await asyncio.shield(asyncio.to_thread(release, env))


R = TypeVar("R")


class Handle(Generic[R]):
    """A service's share of its path's environment, with the service's records ``make(env)``.

    Opened on first use (in a worker thread from :meth:`get`), given back by :meth:`close`.
    Safe to use from several threads and tasks at once.
    """

    def __init__(self, path: str, options: StoreOptions, make: Callable[[Environment], R], what: str) -> None:
        self.path = path
        self.options = options
        self._make = make
        self._what = what
        self._lock = threading.Lock()
        self._records: R | None = None
        self._env: Environment | None = None
        self._closed = False

    def get_blocking(self) -> R:
        """The records, opening the environment if needed (blocks)."""
        records = self._records
        if records is not None:
            return records
        with self._lock:
            if self._closed:
                raise ClosedError(f"{self._what} is closed")
            if self._records is None:
                env = acquire(self.path, self.options)
                try:
                    self._records = self._make(env)
                except BaseException:
                    release(env)
                    raise
                self._env = env
            return self._records

    async def get(self) -> R:
        """The records; the first call opens the environment in a worker thread."""
        records = self._records
        if records is not None:
            return records
        return await to_thread(self.get_blocking)

    async def let_go(self) -> None:
        """Give the environment back now; the next use opens it again."""
        with self._lock:
            env, self._env, self._records = self._env, None, None
        if env is not None:
            await release_async(env)

    async def close(self) -> None:
        """Give the environment back (the last user's close syncs, in a worker thread). Idempotent."""
        with self._lock:
            self._closed = True
            env, self._env, self._records = self._env, None, None
        if env is not None:
            await release_async(env)
