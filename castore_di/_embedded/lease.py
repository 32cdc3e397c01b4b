"""Writer leases: a writer in progress holds an exclusive ``flock`` on
``<path>/writers/<token hex>`` for its whole life, so another process can tell a live writer
from a dead one (the lock ends with the process). The lock file is created under a temporary
name and renamed, so it is never visible unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any

from castore_di.errors import StorageError, map_errors

__all__ = ["TOKEN_LEN", "WriterLease", "lease_alive", "lease_file", "remove_dead_lease_files"]

TOKEN_LEN = 16


def lease_file(path: str, token: bytes) -> str:
    return os.path.join(path, "writers", token.hex())


def lease_alive(path: str, token: bytes) -> bool:
    """Whether the writer holding ``token`` still exists: its lock file is locked."""
    try:
        fd = os.open(lease_file(path, token), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may have taken
    return False


def remove_dead_lease_files(path: str) -> None:
    """Remove lock files of writers that are gone (temporary names are left: a live writer's
    may not be locked yet)."""
    directory = os.path.join(path, "writers")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".") or len(name) != 2 * TOKEN_LEN:
            continue
        try:
            token = bytes.fromhex(name)
        except ValueError:
            continue
        if not lease_alive(path, token):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


class WriterLease:
    """A writer's registration; ends when :meth:`release` is called, the object is garbage
    collected, or the process dies."""

    def __init__(self, path: str) -> None:
        self.token = os.urandom(TOKEN_LEN)
        directory = os.path.join(path, "writers")
        final = lease_file(path, self.token)
        temp = os.path.join(directory, f".{self.token.hex()}.tmp")
        with map_errors({OSError: StorageError}, f"embedded store {path}: cannot register a writer"):
            os.makedirs(directory, exist_ok=True)
            self._file: Any = open(temp, "wb")  # noqa: SIM115 - held for the lease's life
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temp, final)  # visible only once locked
        self._name: str | None = final

    def release(self) -> None:
        """End the lease (idempotent): remove the file, then drop the lock."""
        if self._name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name)
            self._name = None
            self._file.close()
