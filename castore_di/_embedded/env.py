"""One open LMDB environment per data directory, shared in the process by reference count."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from castore_di._embedded.config import StoreOptions
from castore_di._embedded.lease import WriterLease, lease_alive, lease_file, remove_dead_lease_files
from castore_di.errors import ClosedError, ConfigError, LockedError, MissingDependencyError, StorageError

if TYPE_CHECKING:
    import lmdb

__all__ = ["Environment", "acquire", "compact", "release"]

_MAX_DBS = 8
_LOW_SPACE = 64 << 20  # an I/O error with less free space than this is taken for a full disk
_USERS_LOCK = "users.lock"  # every process with the environment open holds a shared flock


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
        self._dbs: dict[bytes, Any] = {}
        self._dbs_lock = threading.Lock()
        full = options.durability == "full"
        self._users = _hold_users_lock(path)
        try:
            os.makedirs(path, exist_ok=True)
            self.env: lmdb.Environment = self._lmdb.open(
                path,
                map_size=options.map_size,
                max_dbs=_MAX_DBS,
                max_readers=options.max_readers,
                subdir=True,
                sync=full,
                metasync=full,
                readahead=False,
                lock=True,
            )
        except (self._lmdb.Error, OSError) as e:
            self._users.close()
            raise StorageError(f"cannot open embedded store at {path}: {e}") from e

    def db(self, name: bytes) -> Any:
        """The named database (``lmdb._Database``), created on first use."""
        self._check_open()
        with self._dbs_lock:
            found = self._dbs.get(name)
            if found is None:
                try:
                    found = self._dbs[name] = self.env.open_db(name)
                except self._lmdb.Error as e:
                    raise StorageError(f"embedded store {self.path}: cannot open database {name!r}: {e}") from e
            return found

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction whose ``get`` returns zero-copy buffers (copy before it ends)."""
        self._check_open()
        try:
            with self.env.begin(buffers=True) as txn:
                yield txn
        except self._lmdb.Error as e:
            raise StorageError(f"embedded store {self.path}: {e}") from e

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction; commits on success, then syncs as ``durability`` asks."""
        self._check_open()
        try:
            with self.env.begin(write=True, buffers=True) as txn:
                yield txn
        except self._lmdb.MapFullError as e:
            raise StorageError(
                f"embedded store {self.path} is full (map_size={self.options.map_size}); raise map_size"
            ) from e
        except self._lmdb.Error as e:
            raise self._write_error(e) from e
        self._after_commit()

    def _write_error(self, e: Exception) -> StorageError:
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
        if time.monotonic() - self._last_sync >= self.options.sync_interval:
            self.sync()

    def sync(self) -> None:
        """Flush committed transactions to disk (fsync)."""
        with self._sync_lock:
            self._last_sync = time.monotonic()
            self._dirty = False
            if not self._closed:
                try:
                    self.env.sync(True)
                except self._lmdb.Error as e:
                    raise self._write_error(e) from e

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"embedded store {self.path} is closed")

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._dirty:  # a read-only session (castore ls, cat) does not wait for an fsync
                self.sync()
        finally:
            self._closed = True
            self.env.close()
            self._users.close()

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

    :func:`compact` takes it exclusively, so it knows no other process has the store open,
    and an opener meanwhile is refused instead of reading a file being swapped.
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
            f"embedded store {path} is being compacted by another process (castore gc --compact); try again"
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
        if key in _open:
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

_registry_lock = threading.Lock()
_open: dict[str, tuple[Environment, int]] = {}


def _key(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return os.path.realpath(path)


def acquire(path: str, options: StoreOptions | None = None) -> Environment:
    """The process's environment for ``path``, opened on first use; pair with :func:`release`.

    ``options=None`` takes the environment as already open (or the defaults).
    """
    try:
        key = _key(os.path.abspath(os.path.expanduser(path)))
    except OSError as e:
        raise StorageError(f"cannot create embedded store directory {path}: {e}") from e
    with _registry_lock:
        entry = _open.get(key)
        if entry is not None:
            env, refs = entry
            if options is not None and env.options != options:
                raise ConfigError(
                    f"embedded store {key} is already open in this process with {env.options}; "
                    f"every service on one path must use the same map_size/durability/sync_interval/max_readers "
                    f"(got {options})"
                )
            _open[key] = (env, refs + 1)
            return env
        env = Environment(key, options or StoreOptions())
        _open[key] = (env, 1)
        return env


def release(env: Environment) -> None:
    """Give back an environment from :func:`acquire`; the last release syncs and closes it."""
    with _registry_lock:
        entry = _open.get(env.path)
        if entry is None or entry[0] is not env:
            return
        refs = entry[1] - 1
        if refs > 0:
            _open[env.path] = (env, refs)
            return
        del _open[env.path]
    env.close()
