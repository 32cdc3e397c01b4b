"""The embedded engine: one LMDB environment per data directory, knowing no service kind.

It offers named databases, read and write transactions, syncs, writer leases
(:mod:`.lease`), the value codec (:mod:`.codec`), the config fields both ``embedded`` kinds
share and their URLs (:mod:`.config`), and per-process sharing (:mod:`.env`). The record
formats, checks and garbage collection belong to the kinds:
:mod:`castore_di.blobservice.embedded` (chunks, chunk indexes, loose chunks, gc) and
:mod:`castore_di.directoryservice.embedded` (directories, named roots). The environment lives
under ``<path>/`` (``data.mdb`` + ``lock.mdb``; writer lock files under ``writers/``;
``users.lock`` and ``prune.lock``, through which ``castore prune`` takes the store for itself).

Why LMDB (measured on this machine, 10,000 random 1-16 KiB values, one transaction per value
holding a chunk existence check, a chunk put and an index put, as a blob close does):

=======================================  ===============
engine and mode                          blobs/s
=======================================  ===============
LMDB, fsync per commit (sync+metasync)   2,700
LMDB, one fsync per commit (nometasync)  4,000
LMDB, no fsync per commit                65,000
SQLite WAL, synchronous=FULL             3,800
SQLite WAL, synchronous=NORMAL           8,400
SQLite WAL, synchronous=OFF              14,400
=======================================  ===============

Gets: LMDB 560-680k/s, SQLite 49k/s. ``restic backup`` of 20,000 such files took 2.15 s
(9,300 files/s) here, so a store that must beat it cannot fsync per blob (a bare fsync costs
0.2 ms here) and SQLite's commit path alone is slower than the target.

Durability, exactly:

* Every writer ``close()`` and every directory put commits one LMDB transaction before it
  returns. A commit writes its pages into the kernel (LMDB's copy-on-write B-tree plus a meta
  page written last), so a process killed at any point (``kill -9``) loses nothing a completed
  ``close()`` reported and never leaves a partial blob, index or directory: readers see the
  last committed meta page.
* ``durability="process"`` (default): the environment is fsynced every ``sync_interval``
  seconds (by the next commit after the interval) and when the last service on the path
  closes. An OS crash or power loss may lose what was committed since the last fsync and,
  as LMDB documents for ``MDB_NOSYNC``, may damage the database (the kernel's writeback
  flushes within about 30 s on its own). Choose ``durability="full"`` where power loss
  matters more than speed.
* ``durability="full"``: LMDB fsyncs data and meta on every commit; survives power loss;
  1,300-2,700 blobs/s here.

``benches/small_files.py`` (20,000 files of 1-16 KiB, read and stored as blobs, best of 3 on
a loaded 2-CPU machine): 15,600 files/s with the defaults against 11,400 for ``restic
backup`` and 4,200 for ``git hash-object -w``; ``durability="full"`` 1,300 files/s. Values
occupy whole LMDB pages, so the store takes about 1.22x the data's size (git 1.23x).

Writes go through one writer thread per environment (:mod:`.writer`: group commit; waiting
for LMDB's write lock, committing and fsyncing never happen on an event loop). Several
processes may use one data directory at once: readers never block, and write transactions
are serialized by LMDB's lock, each short (no transaction spans an ``await``), so a second
writer waits for one transaction at most. (A writer process stopped inside a
transaction, e.g. by SIGSTOP, blocks the others until it resumes or dies; LMDB's lock is
released by death.) Within a process the environment is shared per path (LMDB must not be
opened twice in one process) and reference counted. An environment must not be used across
``fork()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The codec is light (and ``codec`` names both a submodule and this function: importing it
# here binds the function).
from castore_di._embedded.codec import Codec, Compression, codec

if TYPE_CHECKING:
    from castore_di._embedded.config import (
        DEFAULT_MAP_SIZE,
        Durability,
        EmbeddedStoreFields,
        StoreOptions,
        config_from_url,
        default_data_dir,
        parse_embedded_url,
    )
    from castore_di._embedded.env import (
        Environment,
        Handle,
        acquire,
        acquire_async,
        compact,
        open_environments,
        release,
        release_async,
    )
    from castore_di._embedded.lease import WriterLease

# Names are imported on first use (PEP 562), so a module of the package that needs neither
# LMDB nor attrs (the codec and :mod:`.prepare`, which the importer's worker processes load)
# is importable alone.
_WHERE = {
    **dict.fromkeys(
        ("DEFAULT_MAP_SIZE", "Durability", "EmbeddedStoreFields", "StoreOptions", "config_from_url",
         "default_data_dir", "parse_embedded_url"),
        "config",
    ),
    **dict.fromkeys(
        ("Environment", "Handle", "acquire", "acquire_async", "compact", "open_environments", "release",
         "release_async"),
        "env",
    ),
    "WriterLease": "lease",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAP_SIZE",
    "Codec",
    "Compression",
    "Durability",
    "EmbeddedStoreFields",
    "Environment",
    "Handle",
    "StoreOptions",
    "WriterLease",
    "acquire",
    "acquire_async",
    "codec",
    "compact",
    "config_from_url",
    "default_data_dir",
    "parse_embedded_url",
    "open_environments",
    "release",
    "release_async",
]
