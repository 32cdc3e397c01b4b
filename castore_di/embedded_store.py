"""The engine of the embedded on-disk default: one LMDB environment per data directory.

Both ``embedded`` services (blobs and directories) keep their data in one LMDB environment
under ``<path>/`` (``data.mdb`` + ``lock.mdb``), in five sub-databases:

* ``chunks``: chunk digest -> one tag byte (``0`` raw, ``1`` zstd) + the chunk's bytes. A blob
  no longer than one chunk *is* its chunk (its digest is the chunk digest).
* ``blobs``: blob digest -> its chunk list (``<Q`` size + 32-byte digest per chunk), written
  only for blobs cut into two or more chunks, and written last.
* ``dirs``: directory digest -> tag byte + the directory's canonical encoding.
* ``loose``: chunk digest -> empty, for a chunk stored before any index named it (by a
  writer that commits a large blob's chunks in several transactions). Such a chunk is not a
  blob (``has`` is false for it) and is garbage once no writer in progress needs it.
* ``inflight``: writer token (16 bytes) + chunk digest -> empty: the loose chunks a writer in
  progress will name in its index.

Garbage collection (``castore gc``, :meth:`EmbeddedStore.gc`). A chunk's digest alone cannot
tell a one-chunk blob (which *is* its chunk, with no index) from a chunk left by an aborted
large write, so writers record the difference as it arises: a chunk written before its
blob's index is marked ``loose``; the transaction that commits an index, and the one that
stores a one-chunk blob, clear the marks of the chunks they name. Blobs are never deleted,
so a chunk once unmarked stays needed forever, and ``gc`` only ever removes loose chunks.
A writer in progress keeps its loose chunks with ``inflight`` entries, written in the same
transaction that stores (or, for a chunk already there, finds) them, and holds an exclusive
``flock`` on ``<path>/writers/<token>`` for its whole life (created under a temporary name
and renamed, so it is never visible unlocked). ``gc`` runs in write transactions, so no
writer commits in between: it drops the entries of writers whose lock it can take (the
process died or the writer was abandoned) and removes every loose chunk no live writer
holds. A writer that finds a loose chunk after ``gc`` removed it simply stores it again; the
transaction that commits an index also checks that the earlier-stored chunks still exist.
We chose liveness by lock over a grace period because a slow writer (a large blob streamed
over the network) may take any time between its first chunks and its index. Chunks left by
versions without ``loose`` marks are never collected.

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
0.2 ms here) and SQLite's commit path alone is slower than the target. zstd (level 3) gains
0.1% on incompressible data at about 5 µs per 8 KiB value (56k vs 85k raw puts/s) and
shrinks source code 3x, so chunks are tried and kept compressed only when that saves at
least 1/8 (``compression="auto"``). Level 1, not 3: on 3,000 stdlib sources level 1 ran at
291 MB/s for a 4.08x ratio against 171 MB/s for 4.28x, and compression was ~40% of a
stdlib import's time at level 3. Compression stays on the event loop: moving chunks of at
least 64 KiB (or 16 KiB) to ``asyncio.to_thread`` changed a stdlib import (50,724 files,
823 MB, 4 rounds interleaved) from a 4.96 s median to 4.81 s (5.34 s) on this loaded 2-CPU
machine, within the noise, for 7% (12%) more CPU time.

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

Several processes may use one data directory at once: readers never block, and write
transactions are serialized by LMDB's lock, each short (a blob's chunks are committed in
batches of at most ``BATCH_BYTES``; no transaction spans an ``await``), so a second writer
waits for one transaction at most. (A writer process stopped inside a transaction, e.g. by
SIGSTOP, blocks the others until it resumes or dies; LMDB's lock is released by death.)
Within a process the environment is shared per path (LMDB must not be opened twice in one
process) and reference counted. An environment must not be used across ``fork()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import attrs

from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.errors import ConfigError, IntegrityError, MissingDependencyError, StorageError
from castore_di.maintenance import FsckReport, GcReport

if TYPE_CHECKING:
    import lmdb

__all__ = [
    "Durability",
    "Compression",
    "EmbeddedStore",
    "StoreOptions",
    "FsckReport",
    "GcReport",
    "WriterLease",
    "acquire",
    "release",
    "default_data_dir",
    "parse_embedded_url",
    "fsck",
    "encode_index",
    "decode_index",
    "BATCH_BYTES",
]

Durability = Literal["process", "full"]
Compression = Literal["auto", "none"]

BATCH_BYTES = 8 << 20  # chunks of a large blob are committed in transactions of about this size
DEFAULT_MAP_SIZE = 1 << 40  # address space reserved for the map; the file grows as needed
_TAG_RAW = 0
_TAG_ZSTD = 1
_INDEX_ENTRY = struct.Struct("<Q32s")
_TOKEN_LEN = 16
_GC_BATCH = 4096  # loose chunks examined per gc write transaction (keeps each one short)
_COMPRESS_MIN = 512  # smaller values are never worth a zstd frame


def default_data_dir() -> str:
    """``platformdirs.user_data_dir("castore")``: ``$XDG_DATA_HOME/castore`` on Linux."""
    import platformdirs

    return str(platformdirs.user_data_dir("castore", appauthor=False))


def parse_embedded_url(url: str) -> tuple[str | None, dict[str, str]]:
    """``embedded://`` -> ``(None, {})``; ``embedded:///abs/path?k=v`` -> ``("/abs/path", {"k": "v"})``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "embedded":
        raise ConfigError(f"invalid url {url!r}: expected embedded:// or embedded:///absolute/path")
    if parts.netloc:
        raise ConfigError(
            f"invalid url {url!r}: embedded URLs take no host (use embedded:///absolute/path, three slashes)"
        )
    if parts.fragment:
        raise ConfigError(f"invalid url {url!r}: no fragment allowed")
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in query:
            raise ConfigError(f"invalid url {url!r}: query parameter {key!r} given twice")
        query[key] = value
    path = urllib.parse.unquote(parts.path)
    if path in ("", "/"):
        return None, query
    return path, query


# --- value encoding -------------------------------------------------------------------


class _Codec:
    """zstd compression that is kept only when it pays; one instance per thread."""

    def __init__(self) -> None:
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - a core dependency
            raise MissingDependencyError("the embedded store needs 'zstandard' (pip install castore_di)") from e
        self._c = zstandard.ZstdCompressor(level=1)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, data: bytes, compression: Compression) -> bytes:
        if compression == "auto" and len(data) >= _COMPRESS_MIN:
            packed = self._c.compress(data)
            if len(packed) <= len(data) - (len(data) >> 3):
                return b"\x01" + packed
        return b"\x00" + data

    def decode(self, value: bytes | memoryview, what: str) -> bytes:
        if len(value) == 0:
            raise IntegrityError(f"{what}: stored value is empty")
        tag = value[0]
        if tag == _TAG_RAW:
            return bytes(value[1:])
        if tag == _TAG_ZSTD:
            try:
                out: bytes = self._d.decompress(value[1:])
                return out
            except Exception as e:  # zstandard.ZstdError
                raise IntegrityError(f"{what}: stored bytes do not decompress: {e}") from e
        raise IntegrityError(f"{what}: unknown storage tag {tag}")


_codecs = threading.local()


def _codec() -> _Codec:
    codec: _Codec | None = getattr(_codecs, "codec", None)
    if codec is None:
        codec = _codecs.codec = _Codec()
    return codec


def encode_index(chunks: list[tuple[B3Digest, int]]) -> bytes:
    """A chunk list as stored in ``blobs``."""
    return b"".join(_INDEX_ENTRY.pack(size, bytes(digest)) for digest, size in chunks)


def decode_index(raw: bytes | memoryview, blob: B3Digest) -> list[tuple[B3Digest, int]]:
    """The chunk list of ``blob``; a malformed value is an :class:`IntegrityError`."""
    if len(raw) % _INDEX_ENTRY.size or not raw:
        raise IntegrityError(f"blob {blob}: stored chunk index is malformed ({len(raw)} bytes)")
    return [(B3Digest(d), size) for size, d in _INDEX_ENTRY.iter_unpack(raw)]


# --- the engine -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StoreOptions:
    """Settings of one environment; every service sharing a path must agree on them."""

    map_size: int = DEFAULT_MAP_SIZE
    durability: Durability = "process"
    sync_interval: float = 1.0
    max_readers: int = 126


def _import_lmdb() -> Any:
    try:
        import lmdb
    except ImportError as e:  # pragma: no cover - a core dependency
        raise MissingDependencyError("the embedded store needs 'lmdb' (pip install castore_di)") from e
    return lmdb


class EmbeddedStore:
    """One open LMDB environment. Obtain it with :func:`acquire`, give it back with :func:`release`.

    Methods are synchronous and short; the services call them inline (a blob close costs
    about 15 µs here, far less than a thread hop).
    """

    def __init__(self, path: str, options: StoreOptions) -> None:
        self._lmdb = _import_lmdb()
        self.path = path
        self.options = options
        self._closed = False
        self._last_sync = time.monotonic()
        self._sync_lock = threading.Lock()
        full = options.durability == "full"
        try:
            os.makedirs(path, exist_ok=True)
            self.env: lmdb.Environment = self._lmdb.open(
                path,
                map_size=options.map_size,
                max_dbs=8,
                max_readers=options.max_readers,
                subdir=True,
                sync=full,
                metasync=full,
                readahead=False,
                lock=True,
            )
            self.chunks_db = self.env.open_db(b"chunks")
            self.blobs_db = self.env.open_db(b"blobs")
            self.dirs_db = self.env.open_db(b"dirs")
            self.loose_db = self.env.open_db(b"loose")
            self.inflight_db = self.env.open_db(b"inflight")
            self.roots_db = self.env.open_db(b"roots")
        except self._lmdb.Error as e:
            raise StorageError(f"cannot open embedded store at {path}: {e}") from e
        except OSError as e:
            raise StorageError(f"cannot open embedded store at {path}: {e}") from e
        self._users = _UsersLock(path)

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
            raise StorageError(f"embedded store {self.path}: {e}") from e
        self._after_commit()

    def _after_commit(self) -> None:
        if self.options.durability == "full":
            return  # LMDB synced the commit itself
        if time.monotonic() - self._last_sync >= self.options.sync_interval:
            self.sync()

    def sync(self) -> None:
        """Flush committed transactions to disk (fsync)."""
        with self._sync_lock:
            self._last_sync = time.monotonic()
            if not self._closed:
                try:
                    self.env.sync(True)
                except self._lmdb.Error as e:
                    raise StorageError(f"embedded store {self.path}: sync failed: {e}") from e

    def _check_open(self) -> None:
        if self._closed:
            from castore_di.errors import ClosedError

            raise ClosedError(f"embedded store {self.path} is closed")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._closed = True
            self.env.close()
            self._users.close()

    # -- chunks and blobs ------------------------------------------------------------

    def put_chunks(
        self,
        txn: lmdb.Transaction,
        chunks: list[tuple[B3Digest, bytes]],
        compression: Compression,
        lease: WriterLease | None = None,
    ) -> None:
        """Store chunks not yet present (inside ``txn``).

        With ``lease`` (chunks stored ahead of their blob's index) new chunks are marked
        loose and every loose chunk among them is claimed for the lease's writer.
        """
        codec = _codec()
        for digest, data in chunks:
            if txn.get(digest, db=self.chunks_db) is None:
                txn.put(digest, codec.encode(data, compression), db=self.chunks_db, dupdata=False)
                if lease is not None:
                    txn.put(digest, b"", db=self.loose_db)
                    txn.put(lease.token + digest, b"", db=self.inflight_db)
            elif lease is not None and txn.get(digest, db=self.loose_db) is not None:
                txn.put(lease.token + digest, b"", db=self.inflight_db)

    def claim_chunks(self, txn: lmdb.Transaction, digests: list[B3Digest]) -> None:
        """Mark chunks as needed for good: a committed index or a one-chunk blob names them."""
        for digest in digests:
            txn.delete(digest, db=self.loose_db)

    def check_chunks_exist(self, txn: lmdb.Transaction, digests: list[B3Digest], blob: B3Digest) -> None:
        """Refuse to commit an index whose earlier-stored chunks are gone."""
        for digest in digests:
            if txn.get(digest, db=self.chunks_db) is None:
                raise StorageError(f"blob {blob}: chunk {digest} stored earlier by this writer is gone")

    def drop_claims(self, txn: lmdb.Transaction, token: bytes) -> int:
        """Delete a writer's ``inflight`` entries; how many there were."""
        cursor = txn.cursor(db=self.inflight_db)
        found = cursor.set_range(token)
        keys: list[bytes] = []
        while found:
            key = bytes(cursor.key())
            if not key.startswith(token):
                break
            keys.append(key)
            found = cursor.next()
        for key in keys:
            txn.delete(key, db=self.inflight_db)
        return len(keys)

    def new_lease(self) -> WriterLease:
        """Register a writer that stores chunks ahead of its index (see the module docstring)."""
        self._check_open()
        return WriterLease(self.path)

    def _is_blob_chunk(self, txn: lmdb.Transaction, digest: B3Digest) -> bool:
        return txn.get(digest, db=self.chunks_db) is not None and txn.get(digest, db=self.loose_db) is None

    def has_blob(self, digest: B3Digest) -> bool:
        """Whether ``digest`` is a stored blob (a chunk that is not loose, or an index)."""
        with self.read() as txn:
            return self._is_blob_chunk(txn, digest) or txn.get(digest, db=self.blobs_db) is not None

    def get_chunk(self, digest: B3Digest, blob: B3Digest | None = None) -> bytes | None:
        """A chunk's bytes, verified; ``None`` when absent."""
        with self.read() as txn:
            raw = txn.get(digest, db=self.chunks_db)
            if raw is None:
                return None
            data = _codec().decode(raw, self._chunk_name(digest, blob))
        if blake3_digest(data) != digest:
            raise IntegrityError(f"{self._chunk_name(digest, blob)} is corrupted")
        return data

    def get_chunk_unverified(self, digest: B3Digest, blob: B3Digest) -> bytes | None:
        """A chunk's decoded bytes; the caller verifies (``ChunkedReader`` does)."""
        with self.read() as txn:
            raw = txn.get(digest, db=self.chunks_db)
            if raw is None:
                return None
            return _codec().decode(raw, self._chunk_name(digest, blob))

    @staticmethod
    def _chunk_name(digest: B3Digest, blob: B3Digest | None) -> str:
        return f"chunk {digest}" if blob is None or blob == digest else f"blob {blob}: chunk {digest}"

    def read_blob(self, digest: B3Digest) -> tuple[bytes | None, list[tuple[B3Digest, int]] | None]:
        """``(verified bytes, None)`` for a one-chunk blob, ``(None, chunk list)`` for a chunked one,
        ``(None, None)`` when absent; one read transaction."""
        with self.read() as txn:
            raw = txn.get(digest, db=self.chunks_db)
            if raw is None or txn.get(digest, db=self.loose_db) is not None:
                index = txn.get(digest, db=self.blobs_db)
                return None, None if index is None else decode_index(index, digest)
            data = _codec().decode(raw, self._chunk_name(digest, None))
        if blake3_digest(data) != digest:
            raise IntegrityError(f"blob {digest}: chunk {digest} is corrupted")
        return data, None

    def lookup_blob(self, digest: B3Digest) -> tuple[bool, list[tuple[B3Digest, int]] | None]:
        """``(is_a_chunk, chunk_list_or_None)`` in one read transaction."""
        with self.read() as txn:
            if self._is_blob_chunk(txn, digest):
                return True, None
            raw = txn.get(digest, db=self.blobs_db)
            if raw is None:
                return False, None
            return False, decode_index(raw, digest)

    # -- directories -----------------------------------------------------------------

    def put_directories(self, items: list[tuple[B3Digest, bytes]], compression: Compression) -> None:
        """Store encoded directories not yet present, all in one transaction."""
        codec = _codec()
        with self.write() as txn:
            for digest, encoded in items:
                if txn.get(digest, db=self.dirs_db) is None:
                    txn.put(digest, codec.encode(encoded, compression), db=self.dirs_db)

    def get_directory_bytes(self, digest: B3Digest) -> bytes | None:
        """A directory's verified encoding; ``None`` when absent."""
        with self.read() as txn:
            raw = txn.get(digest, db=self.dirs_db)
            if raw is None:
                return None
            data = _codec().decode(raw, f"directory {digest}")
        if blake3_digest(data) != digest:
            raise IntegrityError(f"directory {digest}: stored bytes do not match the digest")
        return data

    # -- consistency check -----------------------------------------------------------

    def fsck(self, *, blobs: bool = True, directories: bool = True) -> FsckReport:
        """Verify every chunk, chunk index and directory in one read snapshot."""
        import blake3

        from castore_di.nodes import Directory

        report = FsckReport()
        codec = _codec()
        bad_chunks: set[bytes] = set()
        with self.read() as txn:
            if blobs:
                for key, raw in txn.cursor(db=self.chunks_db):
                    report.chunks += 1
                    digest = bytes(key)
                    try:
                        data = codec.decode(raw, f"chunk {digest.hex()}")
                    except IntegrityError as e:
                        report.problems.append(str(e))
                        bad_chunks.add(digest)
                        continue
                    report.bytes_checked += len(data)
                    if len(digest) != B3_LEN or blake3_digest(data) != digest:
                        report.problems.append(f"chunk {digest.hex()}: stored bytes do not match the digest")
                        bad_chunks.add(digest)
                for key, raw in txn.cursor(db=self.blobs_db):
                    report.blobs += 1
                    blob = B3Digest(bytes(key)) if len(key) == B3_LEN else None
                    if blob is None:
                        report.problems.append(f"blob index under a malformed key {bytes(key).hex()}")
                        continue
                    try:
                        entries = decode_index(raw, blob)
                    except IntegrityError as e:
                        report.problems.append(str(e))
                        continue
                    hasher = blake3.blake3()
                    whole = True
                    for i, (chunk, size) in enumerate(entries):
                        stored = txn.get(chunk, db=self.chunks_db)
                        if stored is None:
                            report.problems.append(f"blob {blob}: chunk #{i} {chunk} is missing")
                            whole = False
                            break
                        if chunk in bad_chunks:
                            report.problems.append(f"blob {blob}: chunk #{i} {chunk} is corrupted")
                            whole = False
                            break
                        if txn.get(chunk, db=self.loose_db) is not None:
                            report.problems.append(f"blob {blob}: chunk #{i} {chunk} is marked loose (gc would remove it)")
                        data = codec.decode(stored, f"chunk {chunk}")
                        if len(data) != size:
                            report.problems.append(
                                f"blob {blob}: chunk #{i} {chunk} has {len(data)} bytes, index says {size}"
                            )
                            whole = False
                            break
                        hasher.update(data)
                    if whole and hasher.digest() != blob:
                        report.problems.append(f"blob {blob}: its chunks do not hash to the blob digest")
                loose = loose_bytes = 0
                for key, _ in txn.cursor(db=self.loose_db):
                    stored = txn.get(key, db=self.chunks_db)
                    loose += 1
                    loose_bytes += 0 if stored is None else len(stored)
                claims = txn.stat(self.inflight_db)["entries"]
                if loose:
                    report.notes.append(
                        f"{loose} chunks ({loose_bytes} bytes stored) are not part of any blob yet: "
                        f"{claims} are claimed by writers in progress; gc removes the others"
                    )
            if directories:
                for key, raw in txn.cursor(db=self.dirs_db):
                    report.directories += 1
                    name = f"directory {bytes(key).hex()}"
                    try:
                        data = codec.decode(raw, name)
                    except IntegrityError as e:
                        report.problems.append(str(e))
                        continue
                    report.bytes_checked += len(data)
                    if blake3_digest(data) != bytes(key):
                        report.problems.append(f"{name}: stored bytes do not match the digest")
                        continue
                    try:
                        Directory.decode(data)
                    except ValueError as e:
                        report.problems.append(f"{name}: invalid directory: {e}")
        return report


    # -- garbage collection ----------------------------------------------------------

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove loose chunks no live writer claims (see the module docstring).

        Works in write transactions of at most ``_GC_BATCH`` chunks, each re-reading which
        writers are alive, so concurrent writers wait for one short transaction at most.
        ``dry_run`` only reads and reports what would go.
        """
        report = GcReport(dry_run=dry_run)
        after: bytes | None = None
        dead_seen: set[bytes] = set()
        while True:
            dead_files: list[str] = []
            with self.read() if dry_run else self.write() as txn:
                protected, dead = self._claims(txn)
                for token in dead:
                    if token not in dead_seen:
                        dead_seen.add(token)
                        report.dead_writers += 1
                    if not dry_run:
                        self.drop_claims(txn, token)
                        dead_files.append(_lease_file(self.path, token))
                batch: list[bytes] = []
                cursor = txn.cursor(db=self.loose_db)
                found = cursor.first() if after is None else cursor.set_range(after)
                while found and len(batch) < _GC_BATCH:
                    key = bytes(cursor.key())
                    if key != after:
                        batch.append(key)
                    found = cursor.next()
                for key in batch:
                    if key in protected:
                        report.kept_in_flight += 1
                        continue
                    stored = txn.get(key, db=self.chunks_db)
                    if stored is not None:
                        report.removed.append(key.hex())
                        report.removed_bytes += len(stored)
                    if not dry_run:
                        txn.delete(key, db=self.chunks_db)
                        txn.delete(key, db=self.loose_db)
            for name in dead_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            if not batch:
                if not dry_run:
                    self._remove_dead_lease_files()
                return report
            after = batch[-1]

    def _remove_dead_lease_files(self) -> None:
        """Lock files of writers that died before claiming anything (temporary names are left:
        a live writer's may not be locked yet)."""
        directory = os.path.join(self.path, "writers")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".") or len(name) != 2 * _TOKEN_LEN:
                continue
            try:
                token = bytes.fromhex(name)
            except ValueError:
                continue
            if not _lease_alive(self.path, token):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))

    def _claims(self, txn: lmdb.Transaction) -> tuple[set[bytes], list[bytes]]:
        """Chunks claimed by live writers, and the tokens of dead writers that claim some."""
        protected: set[bytes] = set()
        alive: dict[bytes, bool] = {}
        for key, _ in txn.cursor(db=self.inflight_db):
            token, chunk = bytes(key[:_TOKEN_LEN]), bytes(key[_TOKEN_LEN:])
            if token not in alive:
                alive[token] = _lease_alive(self.path, token)
            if alive[token]:
                protected.add(chunk)
        return protected, [t for t, live in alive.items() if not live]


    # -- named roots and prune ------------------------------------------------------

    def put_root(self, name: bytes, value: bytes) -> bytes | None:
        """Record a named root; the value it replaced."""
        with self.write() as txn:
            old = txn.get(name, db=self.roots_db)
            old = None if old is None else bytes(old)
            txn.put(name, value, db=self.roots_db)
        return old

    def delete_root(self, name: bytes) -> bytes | None:
        """Drop a named root; its value, or ``None`` when there was none."""
        with self.write() as txn:
            old = txn.get(name, db=self.roots_db)
            old = None if old is None else bytes(old)
            if old is not None:
                txn.delete(name, db=self.roots_db)
        return old

    def roots(self) -> list[tuple[bytes, bytes]]:
        """Every named root (name, value), sorted by name."""
        with self.read() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.roots_db)]

    def enter_exclusive(self, wait: float | None = None) -> None:
        """Take exclusive use of the store (blocking: call it in a thread); see :class:`_UsersLock`."""
        self._check_open()
        self._users.exclusive(wait)

    def leave_exclusive(self) -> None:
        self._users.shared()

    def sweep(self, db: Any, keep: set[bytes], *, dry_run: bool, also: tuple[Any, ...] = ()) -> tuple[int, int]:
        """Delete every key of ``db`` not in ``keep`` (and the same keys of ``also``); ``(keys, stored bytes)``.

        Works in write transactions of at most ``_GC_BATCH`` keys. Only for use under
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
                while found and len(batch) < _GC_BATCH:
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


class _UsersLock:
    """Who uses the store, for ``castore prune``: ``<path>/users.lock``.

    Every process holds a shared ``flock`` on it while it has the store open; a prune
    converts its own to exclusive (polling, so it never queues behind itself) after taking
    ``<path>/prune.lock`` (one prune at a time). A process opening the store while a prune
    holds it waits in ``flock`` until the prune ends.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._prune_fd: int | None = None
        self._depth = 0  # exclusive() is re-entrant: both services of one path take it
        try:
            self._fd: int | None = os.open(os.path.join(path, "users.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError as e:
            raise StorageError(f"embedded store {path}: cannot take the users lock: {e}") from e

    def exclusive(self, wait: float | None) -> None:
        assert self._fd is not None
        if self._depth:
            self._depth += 1
            return
        fd = os.open(os.path.join(self._path, "prune.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"embedded store {self._path}: another prune is running") from None
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    fcntl.flock(self._fd, fcntl.LOCK_SH)
                    os.close(fd)
                    raise StorageError(
                        f"embedded store {self._path} is in use by other processes (an import or a server); "
                        "prune needs it alone"
                    ) from None
                time.sleep(0.05)
        self._prune_fd = fd
        self._depth = 1

    def shared(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        self._depth = 0
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        if self._prune_fd is not None:
            os.close(self._prune_fd)
            self._prune_fd = None

    def close(self) -> None:
        self.shared()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- writer leases ---------------------------------------------------------------------


def _lease_file(path: str, token: bytes) -> str:
    return os.path.join(path, "writers", token.hex())


def _lease_alive(path: str, token: bytes) -> bool:
    """Whether the writer holding ``token`` still exists: its lock file is locked."""
    try:
        fd = os.open(_lease_file(path, token), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may have taken
    return False


class WriterLease:
    """A writer's registration while it stores chunks ahead of its blob's index.

    Holds an exclusive ``flock`` on ``<path>/writers/<token hex>``; the lock (and so the
    lease) ends when :meth:`release` is called, the object is garbage collected, or the
    process dies.
    """

    def __init__(self, path: str) -> None:
        self.token = os.urandom(_TOKEN_LEN)
        directory = os.path.join(path, "writers")
        final = _lease_file(path, self.token)
        temp = os.path.join(directory, f".{self.token.hex()}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            self._file: Any = open(temp, "wb")  # noqa: SIM115 - held for the lease's life
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temp, final)  # visible only once locked
        except OSError as e:
            raise StorageError(f"embedded store {path}: cannot register a writer: {e}") from e
        self._name: str | None = final

    def release(self) -> None:
        """End the lease (idempotent): remove the file, then drop the lock."""
        if self._name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name)
            self._name = None
            self._file.close()


# --- per-process sharing ----------------------------------------------------------------

_registry_lock = threading.Lock()
_open: dict[str, tuple[EmbeddedStore, int]] = {}


def _key(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return os.path.realpath(path)


def acquire(path: str, options: StoreOptions | None = None) -> EmbeddedStore:
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
            store, refs = entry
            if options is not None and store.options != options:
                raise ConfigError(
                    f"embedded store {key} is already open in this process with {store.options}; "
                    f"every service on one path must use the same map_size/durability/sync_interval/max_readers "
                    f"(got {options})"
                )
            _open[key] = (store, refs + 1)
            return store
        store = EmbeddedStore(key, options or StoreOptions())
        _open[key] = (store, 1)
        return store


def release(store: EmbeddedStore) -> None:
    """Give back a store from :func:`acquire`; the last release syncs and closes it."""
    with _registry_lock:
        entry = _open.get(store.path)
        if entry is None or entry[0] is not store:
            return
        refs = entry[1] - 1
        if refs > 0:
            _open[store.path] = (store, refs)
            return
        del _open[store.path]
    store.close()


def fsck(path: str, options: StoreOptions | None = None) -> FsckReport:
    """Check the whole store at ``path`` (chunks, chunk indexes, directories)."""
    store = acquire(path, options)
    try:
        return store.fsck()
    finally:
        release(store)


# --- config fields shared by both embedded service kinds --------------------------------


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _one_of(*choices: str) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}")

    return check


def _path_field(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError("path must not be empty (omit it for the default data directory)")


@attrs.frozen(kw_only=True)
class EmbeddedStoreFields:
    """Config fields of both ``embedded`` kinds (they may share one data directory)."""

    path: str | None = attrs.field(default=None, validator=_path_field)
    """Data directory; default ``$XDG_DATA_HOME/castore`` (platformdirs ``user_data_dir``)."""
    map_size: int = attrs.field(default=DEFAULT_MAP_SIZE, validator=_positive)
    """Largest size the LMDB map may grow to, in bytes (reserved address space, not disk)."""
    durability: Durability = attrs.field(default="process", validator=_one_of("process", "full"))
    """``process``: commit per close, fsync every ``sync_interval`` s; ``full``: fsync per commit."""
    sync_interval: float = attrs.field(default=1.0, validator=_non_negative)
    """Seconds between fsyncs with ``durability: process``."""
    max_readers: int = attrs.field(default=126, validator=_positive)
    """Concurrent read transactions across all processes (LMDB's reader table)."""
    compression: Compression = attrs.field(default="auto", validator=_one_of("auto", "none"))
    """``auto``: zstd when it saves at least 1/8; ``none``: store raw."""

    def store_options(self) -> StoreOptions:
        return StoreOptions(
            map_size=self.map_size,
            durability=self.durability,
            sync_interval=self.sync_interval,
            max_readers=self.max_readers,
        )

    def resolved_path(self) -> str:
        """The data directory, absolute (no I/O)."""
        return os.path.abspath(os.path.expanduser(self.path if self.path is not None else default_data_dir()))


_QUERY_TYPES: dict[str, type] = {
    "map_size": int,
    "durability": str,
    "sync_interval": float,
    "max_readers": int,
    "compression": str,
    "avg_chunk_size": int,
}


def url_fields(url: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """Config fields from an ``embedded://`` URL (path plus query parameters in ``allowed``)."""
    path, query = parse_embedded_url(url)
    fields: dict[str, Any] = {}
    if path is not None:
        fields["path"] = path
    for key, text in query.items():
        if key not in allowed:
            raise ConfigError(f"invalid url {url!r}: unknown query parameter {key!r} (known: {', '.join(allowed)})")
        kind = _QUERY_TYPES[key]
        try:
            fields[key] = kind(text)
        except ValueError as e:
            raise ConfigError(f"invalid url {url!r}: {key}={text!r} is not a valid {kind.__name__}") from e
    return fields
