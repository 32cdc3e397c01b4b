"""The embedded on-disk blob service (``type: embedded``, URL ``embedded://`` or ``embedded:///abs/path``).

Blobs are cut with FastCDC 2020 (``pyfastcdc``; min = avg/2, max = 2*avg, as the object store
and the reference) so equal chunks are stored once. The environment, durability and the
measurements behind the choice of LMDB: :mod:`castore_di._embedded`. This module owns the
blob records in it, their check and their garbage collection, in four databases:

* ``chunks``: chunk digest -> a stored value (:mod:`castore_di._embedded.codec`). A blob no
  longer than one chunk *is* its chunk (its digest is the chunk digest).
* ``blobs``: blob digest -> its chunk list (``<Q`` size + 32-byte digest per chunk), written
  only for blobs cut into two or more chunks, and written last.
* ``loose``: chunk digest -> empty, for a chunk stored before any index named it (by a
  writer that commits a large blob's chunks in several transactions). Such a chunk is not a
  blob (``has`` is false for it) and is garbage once no writer in progress needs it.
* ``inflight``: writer token (16 bytes) + chunk digest -> empty: the loose chunks a writer in
  progress will name in its index.

Garbage collection (``castore gc``). A chunk's digest alone cannot tell a one-chunk blob
(which *is* its chunk, with no index) from a chunk left by an aborted large write, so
writers record the difference as it arises: a chunk written before its blob's index is
marked ``loose``; the transaction that commits an index, and the one that stores a
one-chunk blob, clear the marks of the chunks they name. Blobs are never deleted, so a chunk
once unmarked stays needed forever, and ``gc`` only ever removes loose chunks. A writer in
progress keeps its loose chunks with ``inflight`` entries, written in the same transaction
that stores (or, for a chunk already there, finds) them, and holds a writer lease
(:mod:`castore_di._embedded.lease`) for its whole life. ``gc`` runs in write transactions, so
no writer commits in between: it drops the entries of writers whose lease is gone (the
process died or the writer was abandoned) and removes every loose chunk no live writer
holds. A writer that finds a loose chunk after ``gc`` removed it simply stores it again; the
transaction that commits an index also checks that the earlier-stored chunks still exist.
We chose liveness by lock over a grace period because a slow writer (a large blob streamed
over the network) may take any time between its first chunks and its index. Chunks left by
versions without ``loose`` marks are never collected.

Bounded stores (``max_bytes``): an approximate LRU cache, as bazel-remote's and bb's
``local``. Two more databases: ``lru`` (``d`` + blob digest -> access time + blob size;
``t`` + access time + blob digest, the same records ordered by time; ``m:total``, the sum of
the sizes) and ``refs`` (chunk digest -> how many tracked blobs use it). The transaction
that commits a blob records it and then evicts the least recently accessed blobs until the
total fits; an evicted blob loses its index and every chunk no other tracked blob uses.
Reads refresh a blob's time in memory, written with the next commit (so "recent" is
approximate, and a read costs no write transaction). Sizes are blob sizes (before
compression and deduplication). Only blobs written or read while the store is bounded
are tracked: blobs stored by an unbounded use of the same directory are never evicted.
A bounded store is a cache, not a primary copy.

Chunks of a large blob are committed in batches of at most ``BATCH_BYTES`` so no write
transaction is long. Every write runs as an operation on the environment's writer thread
(:meth:`Environment.transact`), group-committed with the writes of other writers;
``close()`` returns the digest only after the commit. The writer thread only stores: a
writer hashes, cuts and compresses in worker threads before it queues a commit, and
``prepare_many`` does the same for a batch of blobs in its caller's thread (the importer's
readers), so ``put_prepared``/``put_many`` queue one short operation per batch.
``has_many`` and ``read_many`` answer from one read transaction in a thread
(``benches/import_bench.py``).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, cast

import attrs

from castore_di._embedded import (
    Compression,
    EmbeddedStoreFields,
    Environment,
    Handle,
    StoreOptions,
    WriterLease,
    codec,
    compact,
    config_from_url,
)
from castore_di._embedded.codec import Codec
from castore_di._embedded.lease import TOKEN_LEN
from castore_di._loopless import to_thread
from castore_di.blobservice.base import (
    DEFAULT_AVG_CHUNK_SIZE,
    BlobReader,
    BlobService,
    BlobWriter,
    BlockingReads,
    BytesReader,
    ChunkedReader,
    ChunkingFields,
    ChunkListCheck,
    ChunkMeta,
    HashingWriter,
    PreparedBlob,
)
from castore_di.composition.config import BlobServiceConfig
from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.errors import CastoreError, ClosedError, IntegrityError, MissingDependencyError, StorageError

if TYPE_CHECKING:
    import lmdb

    from castore_di.maintenance import FsckReport, GcReport

__all__ = ["EmbeddedBlobService", "EmbeddedBlobServiceConfig", "BATCH_BYTES", "encode_index", "decode_index"]

_ABSENT = B3Digest(bytes(32))  # a digest no store holds: a read that finds nothing
BATCH_BYTES = 8 << 20  # chunks of a large blob are committed in transactions of about this size
_PREPARED_MAX = 4 << 20  # put_many commits blobs up to this size in its one operation
_INDEX_ENTRY = struct.Struct("<Q32s")
_GC_BATCH = 4096  # loose chunks examined per gc write transaction (keeps each one short)
_LRU_RECORD = struct.Struct(">QQ")  # access time (ns), blob size
_COUNT = struct.Struct("<Q")
_LRU_TOTAL = b"m:total"


def encode_index(chunks: list[tuple[B3Digest, int]]) -> bytes:
    """A chunk list as stored in ``blobs``."""
    return b"".join(_INDEX_ENTRY.pack(size, bytes(digest)) for digest, size in chunks)


def decode_index(raw: bytes | memoryview, blob: B3Digest) -> list[tuple[B3Digest, int]]:
    """The chunk list of ``blob``; a malformed value is an :class:`IntegrityError`."""
    if len(raw) % _INDEX_ENTRY.size or not raw:
        raise IntegrityError(f"blob {blob}: stored chunk index is malformed ({len(raw)} bytes)")
    return [(B3Digest(d), size) for size, d in _INDEX_ENTRY.iter_unpack(raw)]


class _Encoded:
    """A blob as :meth:`EmbeddedBlobService.prepare_many` readied it: its chunks' stored
    values and its chunk index (``None`` when the blob is its one chunk)."""

    __slots__ = ("values", "index")

    def __init__(self, values: list[tuple[B3Digest, bytes]], index: list[tuple[B3Digest, int]] | None) -> None:
        self.values = values
        self.index = index


def _chunk_name(digest: B3Digest, blob: B3Digest | None) -> str:
    return f"chunk {digest}" if blob is None or blob == digest else f"blob {blob}: chunk {digest}"


class _BlobRecords:
    """The blob databases of one environment; methods are synchronous and short."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.chunks_db = env.db(b"chunks")
        self.blobs_db = env.db(b"blobs")
        self.loose_db = env.db(b"loose")
        self.inflight_db = env.db(b"inflight")
        self._lru_db: Any = None
        self._refs_db: Any = None

    # -- the LRU bound (only used by bounded stores) ---------------------------------

    def open_lru(self) -> None:
        """Open the LRU databases (outside any transaction)."""
        self._lru_db, self._refs_db = self.env.db(b"lru"), self.env.db(b"refs")

    def _lru(self) -> tuple[Any, Any]:
        if self._lru_db is None:
            raise StorageError("the LRU databases of a bounded store were not opened")
        return self._lru_db, self._refs_db

    def _total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_LRU_TOTAL, db=self._lru()[0])
        return 0 if raw is None else int(_COUNT.unpack(raw)[0])

    def touch(self, txn: lmdb.Transaction, blob: B3Digest, when: int) -> bool:
        """Move a tracked blob's access time to ``when``; ``False`` if it is not tracked."""
        lru, _ = self._lru()
        raw = txn.get(b"d" + blob, db=lru)
        if raw is None:
            return False
        old, size = _LRU_RECORD.unpack(raw)
        if when > old:
            txn.delete(b"t" + struct.pack(">Q", old) + blob, db=lru)
            txn.put(b"t" + struct.pack(">Q", when) + blob, b"", db=lru)
            txn.put(b"d" + blob, _LRU_RECORD.pack(when, size), db=lru)
        return True

    def track(self, txn: lmdb.Transaction, blob: B3Digest, chunks: list[B3Digest], size: int, when: int) -> None:
        """Record a blob committed (or found) by a bounded store, with its chunks' reference counts."""
        if self.touch(txn, blob, when):
            return
        lru, refs = self._lru()
        txn.put(b"d" + blob, _LRU_RECORD.pack(when, size), db=lru)
        txn.put(b"t" + struct.pack(">Q", when) + blob, b"", db=lru)
        txn.put(_LRU_TOTAL, _COUNT.pack(self._total(txn) + size), db=lru)
        for chunk in set(chunks):
            raw = txn.get(chunk, db=refs)
            txn.put(chunk, _COUNT.pack((0 if raw is None else _COUNT.unpack(raw)[0]) + 1), db=refs)

    def evict(self, txn: lmdb.Transaction, max_bytes: int, keep: B3Digest | None = None) -> int:
        """Evict least recently used tracked blobs until their total fits; how many went."""
        lru, refs = self._lru()
        total = self._total(txn)
        evicted = 0
        while total > max_bytes:
            cursor = txn.cursor(db=lru)
            if not cursor.set_range(b"t") or not bytes(cursor.key()).startswith(b"t"):
                break
            key = bytes(cursor.key())
            blob = B3Digest(key[9:])
            if blob == keep:  # the blob being committed stays, even alone past the bound
                break
            record = txn.get(b"d" + blob, db=lru)
            size = 0 if record is None else _LRU_RECORD.unpack(record)[1]
            txn.delete(key, db=lru)
            txn.delete(b"d" + blob, db=lru)
            total -= size
            index = txn.get(blob, db=self.blobs_db)
            chunks = [blob] if index is None else [d for d, _ in decode_index(index, blob)]
            if index is not None:
                txn.delete(blob, db=self.blobs_db)
            for chunk in set(chunks):
                raw = txn.get(chunk, db=refs)
                left = 0 if raw is None else _COUNT.unpack(raw)[0] - 1
                if left > 0:
                    txn.put(chunk, _COUNT.pack(left), db=refs)
                    continue
                txn.delete(chunk, db=refs)
                if raw is not None and txn.get(chunk, db=self.loose_db) is None:
                    txn.delete(chunk, db=self.chunks_db)
            evicted += 1
        txn.put(_LRU_TOTAL, _COUNT.pack(max(total, 0)), db=lru)
        return evicted

    # -- writing (inside a write transaction) ----------------------------------------

    def put_chunks(
        self,
        txn: lmdb.Transaction,
        chunks: list[tuple[B3Digest, bytes]],
        lease: WriterLease | None = None,
    ) -> None:
        """Store encoded chunks (:func:`encode_chunks`) not yet present.

        With ``lease`` (chunks stored ahead of their blob's index) new chunks are marked
        loose and every loose chunk among them is claimed for the lease's writer.
        """
        if lease is None:  # one call for all: stores each value whose key is absent
            txn.cursor(db=self.chunks_db).putmulti(chunks, dupdata=False, overwrite=False)
            return
        for digest, value in chunks:
            if txn.get(digest, db=self.chunks_db) is None:
                txn.put(digest, value, db=self.chunks_db, dupdata=False)
                if lease is not None:
                    txn.put(digest, b"", db=self.loose_db)
                    txn.put(lease.token + digest, b"", db=self.inflight_db)
            elif lease is not None and txn.get(digest, db=self.loose_db) is not None:
                txn.put(lease.token + digest, b"", db=self.inflight_db)

    def put_encoded(self, txn: lmdb.Transaction, values: list[tuple[B3Digest, bytes]]) -> None:
        """Store already encoded one-chunk blobs not yet present."""
        for digest, value in values:
            if txn.get(digest, db=self.chunks_db) is None:
                txn.put(digest, value, db=self.chunks_db, dupdata=False)

    def claim_chunks(self, txn: lmdb.Transaction, digests: list[B3Digest]) -> None:
        """Mark chunks as needed for good: a committed index or a one-chunk blob names them."""
        if not txn.stat(self.loose_db)["entries"]:  # the usual case: nothing is loose
            return
        for digest in digests:
            txn.delete(digest, db=self.loose_db)

    def check_chunks_exist(self, txn: lmdb.Transaction, digests: list[B3Digest], blob: B3Digest) -> None:
        """Refuse to commit an index whose earlier-stored chunks are gone."""
        for digest in digests:
            if txn.get(digest, db=self.chunks_db) is None:
                raise StorageError(f"blob {blob}: chunk {digest} stored earlier by this writer is gone")

    def put_index(self, txn: lmdb.Transaction, blob: B3Digest, chunks: list[tuple[B3Digest, int]]) -> None:
        if txn.get(blob, db=self.blobs_db) is None:
            txn.put(blob, encode_index(chunks), db=self.blobs_db)

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

    # -- reading ---------------------------------------------------------------------

    def _is_blob_chunk(self, txn: lmdb.Transaction, digest: B3Digest) -> bool:
        return txn.get(digest, db=self.chunks_db) is not None and txn.get(digest, db=self.loose_db) is None

    def has_blob(self, digest: B3Digest) -> bool:
        """Whether ``digest`` is a stored blob (a chunk that is not loose, or an index)."""
        with self.env.read() as txn:
            return self._is_blob_chunk(txn, digest) or txn.get(digest, db=self.blobs_db) is not None

    def has_blobs(self, digests: Sequence[B3Digest]) -> list[bool]:
        """``has_blob`` for each digest, in one read transaction."""
        with self.env.read() as txn:
            return [
                self._is_blob_chunk(txn, d) or txn.get(d, db=self.blobs_db) is not None for d in digests
            ]

    def get_chunk_unverified(self, digest: B3Digest, blob: B3Digest) -> bytes | None:
        """A chunk's decoded bytes; the caller verifies (``ChunkedReader`` does)."""
        with self.env.read() as txn:
            raw = txn.get(digest, db=self.chunks_db)
            if raw is None:
                return None
            return codec().decode(raw, lambda: _chunk_name(digest, blob))

    def read_blob(self, digest: B3Digest) -> tuple[bytes | None, list[tuple[B3Digest, int]] | None]:
        """``(verified bytes, None)`` for a one-chunk blob, ``(None, chunk list)`` for a chunked one,
        ``(None, None)`` when absent; one read transaction."""
        with self.env.read() as txn:
            raw = txn.get(digest, db=self.chunks_db)
            if raw is None or txn.get(digest, db=self.loose_db) is not None:
                index = txn.get(digest, db=self.blobs_db)
                return None, None if index is None else decode_index(index, digest)
            data = codec().decode(raw, _chunk_name(digest, None))
        if blake3_digest(data) != digest:
            raise IntegrityError(f"blob {digest}: chunk {digest} is corrupted")
        return data, None

    def read_blobs(
        self, digests: Sequence[B3Digest], verify: bool = True
    ) -> list[tuple[bytes | None, list[tuple[B3Digest, int]] | None]]:
        """:meth:`read_blob` for each digest, in one read transaction (``verify=False``: the
        caller checks one-chunk blobs itself)."""
        dec = codec()
        out: list[tuple[bytes | None, list[tuple[B3Digest, int]] | None]] = []
        with self.env.read() as txn:
            # Loose chunks are rare (a large write in progress or aborted): when there are
            # none, one lookup per blob (each lookup lets go of the GIL and takes it back)
            any_loose = txn.stat(self.loose_db)["entries"] > 0
            for digest in digests:
                raw = txn.get(digest, db=self.chunks_db)
                if raw is None or (any_loose and txn.get(digest, db=self.loose_db) is not None):
                    index = txn.get(digest, db=self.blobs_db)
                    out.append((None, None if index is None else decode_index(index, digest)))
                    continue
                data = dec.decode(raw, lambda d=digest: _chunk_name(d, None))  # type: ignore[misc]
                if verify and blake3_digest(data) != digest:
                    raise IntegrityError(f"blob {digest}: chunk {digest} is corrupted")
                out.append((data, None))
        return out

    def lookup_blob(self, digest: B3Digest) -> tuple[bool, list[tuple[B3Digest, int]] | None]:
        """``(is_a_chunk, chunk_list_or_None)`` in one read transaction."""
        with self.env.read() as txn:
            if self._is_blob_chunk(txn, digest):
                return True, None
            raw = txn.get(digest, db=self.blobs_db)
            if raw is None:
                return False, None
            return False, decode_index(raw, digest)

    # -- consistency check -----------------------------------------------------------

    def fsck(self) -> FsckReport:
        """Verify every chunk and chunk index in one read snapshot."""
        from castore_di.maintenance import FsckReport  # not loaded by reading commands

        report = FsckReport()
        dec = codec()
        bad_chunks: set[bytes] = set()
        with self.env.read() as txn:
            for key, raw in txn.cursor(db=self.chunks_db):
                report.chunks += 1
                digest = bytes(key)
                try:
                    data = dec.decode(raw, f"chunk {digest.hex()}")
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
                check = ChunkListCheck(blob)
                try:
                    for i, (chunk, size) in enumerate(entries):
                        stored = txn.get(chunk, db=self.chunks_db)
                        if chunk in bad_chunks:
                            raise IntegrityError(f"blob {blob}: chunk #{i} {chunk} is corrupted")
                        if stored is not None and txn.get(chunk, db=self.loose_db) is not None:
                            report.problems.append(f"blob {blob}: chunk #{i} {chunk} is marked loose (gc would remove it)")
                        found = None if stored is None else dec.decode(stored, f"chunk {chunk}")
                        check.add(ChunkMeta(chunk, size), found, verified=True)  # verified in the pass above
                    check.finish()
                except CastoreError as e:
                    report.problems.append(str(e))
            loose = loose_bytes = 0
            for key, _ in txn.cursor(db=self.loose_db):
                stored = txn.get(key, db=self.chunks_db)
                loose += 1
                loose_bytes += 0 if stored is None else len(stored)
            live_claims = dead_claims = 0
            alive: dict[bytes, bool] = {}
            for key, _ in txn.cursor(db=self.inflight_db):
                token = bytes(key[:TOKEN_LEN])
                if token not in alive:
                    alive[token] = self.env.lease_alive(token)
                if alive[token]:
                    live_claims += 1
                else:
                    dead_claims += 1
            if loose:
                dead = sum(not live for live in alive.values())
                report.notes.append(
                    f"{loose} chunks ({loose_bytes} bytes stored) are not part of any blob yet: "
                    f"{live_claims} are claimed by writers in progress"
                    + (f", {dead_claims} by {dead} writers that died" if dead_claims else "")
                    + "; gc removes all but the claims of writers in progress"
                )
        return report

    # -- garbage collection ----------------------------------------------------------

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove loose chunks no live writer claims (see the module docstring). Blocking: run
        it in a worker thread.

        Works in write transactions (on the writer thread) of at most ``_GC_BATCH`` chunks,
        each re-reading which writers are alive, so concurrent writers wait for one short
        transaction at most. ``dry_run`` only reads and reports what would go.
        """
        from castore_di.maintenance import GcReport

        report = GcReport(dry_run=dry_run)
        after: bytes | None = None
        dead_seen: set[bytes] = set()

        def step(txn: lmdb.Transaction) -> tuple[list[bytes], list[bytes]]:
            """One batch: the loose keys examined and the dead writers whose claims went."""
            dead_files: list[bytes] = []
            protected, dead = self._claims(txn)
            for token in dead:
                if token not in dead_seen:
                    dead_seen.add(token)
                    report.dead_writers += 1
                if not dry_run:
                    self.drop_claims(txn, token)
                    dead_files.append(token)
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
            return batch, dead_files

        while True:
            if dry_run:
                with self.env.read() as txn:
                    batch, dead_files = step(txn)
            else:
                batch, dead_files = self.env.transact_blocking(step)
            for token in dead_files:
                self.env.remove_lease_file(token)
            if not batch:
                if not dry_run:
                    self.env.remove_dead_lease_files()
                return report
            after = batch[-1]

    def _claims(self, txn: lmdb.Transaction) -> tuple[set[bytes], list[bytes]]:
        """Chunks claimed by live writers, and the tokens of dead writers that claim some."""
        protected: set[bytes] = set()
        alive: dict[bytes, bool] = {}
        for key, _ in txn.cursor(db=self.inflight_db):
            token, chunk = bytes(key[:TOKEN_LEN]), bytes(key[TOKEN_LEN:])
            if token not in alive:
                alive[token] = self.env.lease_alive(token)
            if alive[token]:
                protected.add(chunk)
        return protected, [t for t, live in alive.items() if not live]


class EmbeddedBlobService(BlobService):
    """Blobs as deduplicated chunks in the data directory's LMDB environment.

    A blob of one chunk is stored as that chunk; a longer blob also gets a chunk index,
    committed after its chunks, so it becomes visible only when its writer's ``close()``
    has committed. Every chunk read is verified against its digest.
    """

    loopless = True  # reads are short LMDB lookups; opening and closing go through to_thread

    def __init__(
        self,
        path: str,
        options: StoreOptions | None = None,
        *,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        compression: Compression = "auto",
        max_bytes: int | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._touched: dict[B3Digest, int] = {}  # reads not yet written to the LRU records
        self._touch_lock = threading.Lock()
        self.options = options or StoreOptions()
        self.avg_chunk_size = avg_chunk_size
        self.min_chunk_size = avg_chunk_size // 2
        self.max_chunk_size = avg_chunk_size * 2
        self.compression: Compression = compression
        self._handle = Handle(path, self.options, self._open_records, "embedded blob service")
        self._closed = False
        self._cdc: Any = None

    def _open_records(self, env: Environment) -> _BlobRecords:
        records = _BlobRecords(env)
        if self.max_bytes is not None:
            records.open_lru()  # opening a database needs its own transaction
        return records

    def _store(self) -> _BlobRecords:
        """The blob records, opening the environment if needed (blocks; tests and threads)."""
        return self._handle.get_blocking()

    async def check_connectivity(self) -> str:
        """Open the store's environment (in a thread) and read from it once."""

        def open_and_read() -> None:
            store = self._store()
            store.has_blob(_ABSENT)

        await to_thread(open_and_read)
        return f"embedded store {self.path}: open"

    def _chunker(self) -> Any:
        if self._cdc is None:
            try:
                import pyfastcdc
            except ImportError as e:  # pragma: no cover - a core dependency
                raise MissingDependencyError(
                    "the embedded blob service needs 'pyfastcdc' (pip install castore_di)"
                ) from e
            self._cdc = pyfastcdc.FastCDC(
                self.avg_chunk_size, min_size=self.min_chunk_size, max_size=self.max_chunk_size
            )
        return self._cdc

    def _take_touches(self) -> dict[B3Digest, int]:
        """The read touches not yet written (taken on the event loop, written by the next commit)."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        return touched

    def _bounded_commit(self, txn: lmdb.Transaction, store: _BlobRecords, blob: B3Digest,
                        chunks: list[B3Digest], size: int, touched: dict[B3Digest, int]) -> None:
        """In a blob's commit: track it, apply pending read touches, evict past ``max_bytes``."""
        if self.max_bytes is None:
            return
        if size > self.max_bytes:
            raise StorageError(f"blob {blob} of {size} bytes exceeds this store's max_bytes {self.max_bytes}")
        for digest, when in touched.items():
            store.touch(txn, digest, when)
        store.track(txn, blob, chunks, size, time.time_ns())
        store.evict(txn, self.max_bytes, keep=blob)

    def _touch(self, digest: B3Digest) -> None:
        if self.max_bytes is not None:
            with self._touch_lock:  # blocking reads touch from worker threads
                self._touched[digest] = time.time_ns()
                if len(self._touched) >= 4096:  # bound the memory; the oldest touch is dropped
                    self._touched.pop(next(iter(self._touched)))

    async def has(self, digest: B3Digest) -> bool:
        return (await self._handle.get()).has_blob(digest)

    async def has_many(self, digests: Sequence[B3Digest]) -> list[bool]:
        store = await self._handle.get()
        return await to_thread(store.has_blobs, digests)

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Blobs up to ``_PREPARED_MAX`` are hashed, cut and compressed in a thread
        (:meth:`prepare_many`), then committed as one writer operation; longer ones (and
        every blob of a bounded store) go through writers."""
        if self.max_bytes is not None:  # each blob's commit tracks and evicts on its own
            return await super().put_many(blobs)
        small = [i for i, b in enumerate(blobs) if len(b) <= _PREPARED_MAX]
        out: list[B3Digest | None] = [None] * len(blobs)
        if small:
            prepared = await to_thread(self.prepare_many, [blobs[i] for i in small])
            await self.put_prepared(prepared)
            for i, p in zip(small, prepared):
                out[i] = p.digest
        rest = [i for i, d in enumerate(out) if d is None]
        if rest:
            import asyncio

            for i, d in zip(rest, await asyncio.gather(*(self.put(blobs[i]) for i in rest))):
                out[i] = d
        return [d for d in out if d is not None]

    def prepare_many(self, blobs: Sequence[bytes]) -> list[PreparedBlob]:
        """Hash each blob once, look them up in one read transaction, and cut and compress
        those not stored yet: everything but the commit, so callers' threads share the work
        (blake3, FastCDC and zstd release the GIL). A bounded store only hashes."""
        if self.max_bytes is not None:
            return super().prepare_many(blobs)
        store = self._store()
        digests = [blake3_digest(b) for b in blobs]
        present = store.has_blobs(digests)
        enc = codec()
        return [
            PreparedBlob(d, len(b), True, None) if p else PreparedBlob(d, len(b), False, self._encode(b, d, enc))
            for b, d, p in zip(blobs, digests, present)
        ]

    def _encode(self, data: bytes, digest: B3Digest, enc: Codec) -> _Encoded:
        """``data``'s chunks as stored values, and its index (``None``: one chunk, the blob itself)."""
        compression = self.compression
        if len(data) <= self.min_chunk_size:
            return _Encoded([(digest, enc.encode(data, compression))], None)
        values: list[tuple[B3Digest, bytes]] = []
        index: list[tuple[B3Digest, int]] = []
        for chunk in self._chunker().cut_buf(data):
            piece = data[chunk.offset : chunk.offset + chunk.length]
            d = blake3_digest(piece)
            index.append((d, len(piece)))
            values.append((d, enc.encode(piece, compression)))
        return _Encoded(values, None if len(index) == 1 else index)

    async def put_prepared(self, blobs: Sequence[PreparedBlob]) -> None:
        """Commit the blobs :meth:`prepare_many` found absent, in one writer operation."""
        todo = [p for p in blobs if not p.present]
        if not todo:
            return
        if self.max_bytes is not None or not all(isinstance(p.payload, _Encoded) for p in todo):
            await super().put_prepared(todo)
            return
        store = await self._handle.get()

        def commit(txn: lmdb.Transaction) -> None:
            claims: list[B3Digest] = []
            values: list[tuple[B3Digest, bytes]] = []
            for p in todo:
                encoded: _Encoded = p.payload
                values += encoded.values
                if encoded.index is None:
                    claims.append(p.digest)
                else:
                    claims.extend(d for d, _ in encoded.index)
            store.put_chunks(txn, values)
            for p in todo:  # indexes after their chunks
                if p.payload.index is not None:
                    store.put_index(txn, p.digest, p.payload.index)
            # A chunk stored ahead of a large blob's index may already hold these bytes:
            # as (part of) a blob of its own it is needed for good.
            store.claim_chunks(txn, claims)

        await store.env.transact(commit)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        store = await self._handle.get()
        data, index = store.read_blob(digest)
        if data is not None or index is not None:
            self._touch(digest)
        if data is not None:
            return BytesReader(data)
        if index is None:
            return None

        async def fetch(chunk: B3Digest) -> bytes | None:
            return store.get_chunk_unverified(chunk, digest)

        return ChunkedReader(digest, [ChunkMeta(d, size) for d, size in index], fetch)

    async def read_many(self, digests: Sequence[B3Digest], *, verify: bool = True) -> list[bytes | None]:
        """One-chunk blobs are read, decompressed (and verified) in a thread; others one by one."""
        store = await self._handle.get()
        found = await to_thread(store.read_blobs, digests, verify)
        out: list[bytes | None] = []
        for digest, (data, index) in zip(digests, found):
            if data is None and index is not None:
                data = await self.read_bytes(digest)
            elif data is not None:
                self._touch(digest)
            out.append(data)
        return out

    async def blocking_reads(self) -> BlockingReads:
        """Reads from one LMDB read transaction per call in the calling thread, decompressed
        but not verified (the exporter's worker threads verify what they write)."""
        return _BlockingReads(self, await self._handle.get())

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        is_chunk, index = (await self._handle.get()).lookup_blob(digest)
        if is_chunk:
            return []
        if index is None:
            return None
        return [ChunkMeta(d, size) for d, size in index]

    def open_write(self) -> BlobWriter:
        if self._closed:
            raise ClosedError("embedded blob service is closed")
        return _EmbeddedWriter(self)

    def exclusive_use(self, wait: float | None = None) -> AbstractAsyncContextManager[None]:
        from castore_di.directoryservice.embedded import exclusive_use

        return exclusive_use(self._store().env, wait)

    async def prune(self, keep: set[B3Digest], *, dry_run: bool) -> tuple[int, int]:
        """Delete every blob (index and chunks) not in ``keep`` and every chunk no kept blob uses."""
        store = self._store()

        def sweep() -> tuple[int, int]:
            chunks: set[bytes] = set()
            for digest in keep:
                is_chunk, index = store.lookup_blob(digest)
                if is_chunk:
                    chunks.add(digest)
                elif index is not None:
                    chunks.update(d for d, _size in index)
            env = store.env
            indexes, index_bytes = env.sweep(store.blobs_db, cast(set[bytes], keep), dry_run=dry_run)
            dropped, chunk_bytes = env.sweep(store.chunks_db, chunks, dry_run=dry_run, also=(store.loose_db,))
            return indexes + dropped, index_bytes + chunk_bytes

        return await to_thread(sweep)

    async def fsck(self) -> FsckReport:
        """Verify every chunk and chunk index (directories: the directory service's ``fsck``)."""
        store = await self._handle.get()
        return await to_thread(store.fsck)

    async def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove chunks of writes that never committed (safe with concurrent writers)."""
        store = await self._handle.get()
        return await to_thread(store.gc, dry_run=dry_run)

    async def compact(self) -> tuple[int, int]:
        """Rewrite the store compactly (:func:`castore_di._embedded.compact`); ``(before, after)`` bytes.

        The service lets go of the store first and opens it again on next use; refused
        while another service or process has the store open.
        """
        await self._handle.let_go()
        return await to_thread(compact, self.path, self.options)

    async def close(self) -> None:
        self._closed = True
        await self._handle.close()


class _BlockingReads:
    """:class:`BlockingReads` of one embedded store (safe in any thread: LMDB reads need no lock)."""

    def __init__(self, service: EmbeddedBlobService, store: _BlobRecords) -> None:
        self._svc = service
        self._store = store

    def blobs(self, digests: Sequence[B3Digest]) -> list[bytes | list[ChunkMeta] | None]:
        out: list[bytes | list[ChunkMeta] | None] = []
        touch = self._svc._touch if self._svc.max_bytes is not None else None
        for digest, (data, index) in zip(digests, self._store.read_blobs(digests, verify=False)):
            if data is not None:
                out.append(data)
            elif index is not None:
                out.append([ChunkMeta(d, size) for d, size in index])
            else:
                out.append(None)
                continue
            if touch is not None:
                touch(digest)
        return out

    def chunk(self, blob: B3Digest, chunk: B3Digest) -> bytes | None:
        return self._store.get_chunk_unverified(chunk, blob)


class _EmbeddedWriter(HashingWriter):
    """Buffers at most a few chunks, cuts them as soon as their cut point is final.

    Hashing, cutting and compressing run in a worker thread (once ``_cut_at`` bytes are
    buffered, and at the end), so a large blob costs the event loop and the writer thread
    almost nothing but the hand-offs. Chunks of a large blob are committed in batches of
    ``BATCH_BYTES`` (they are complete chunks under their own digests); the blob's index is
    committed last, in ``close()``. The first such batch registers the writer (a
    :class:`WriterLease`) so that ``gc`` keeps the chunks it stored or found loose until the
    index is committed.
    """

    def __init__(self, service: EmbeddedBlobService) -> None:
        super().__init__()
        self._svc = service
        self._new: list[bytes] = []  # written, not hashed yet
        self._rest = b""  # hashed, not cut yet
        self._buffered = 0
        self._cut_at = 4 * service.max_chunk_size
        self._chunks: list[tuple[B3Digest, int]] = []
        self._pending: list[tuple[B3Digest, bytes]] = []  # encoded, not committed yet
        self._pending_bytes = 0
        self._lease: WriterLease | None = None
        self._flushed = 0  # self._chunks[:self._flushed] were stored ahead of the index

    async def _write(self, data: bytes) -> None:
        self._new.append(data)
        self._buffered += len(data)
        if self._buffered >= self._cut_at:
            await to_thread(self._cut, False)
            if self._pending_bytes >= BATCH_BYTES:
                await self._flush()

    def _take(self) -> bytes:
        """Hash the new bytes; everything not cut yet, as one buffer (in a thread)."""
        for part in self._new:
            self._hash(part)
        parts = [self._rest, *self._new] if self._rest else self._new
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._new = []
        self._rest = b""
        return buf

    def _cut(self, final: bool) -> None:
        """Cut the final chunks of what is buffered, hash and encode them (in a thread)."""
        buf = self._take()
        svc = self._svc
        max_size = svc.max_chunk_size
        enc = codec()
        consumed = 0
        for chunk in svc._chunker().cut_buf(buf):
            # A cut point depends on at most max_size bytes after the chunk's start, so it
            # is final once that many bytes are buffered (or the stream ended).
            if not final and len(buf) - chunk.offset < max_size:
                break
            end = chunk.offset + chunk.length
            data = buf[chunk.offset : end]
            digest = blake3_digest(data)
            self._chunks.append((digest, len(data)))
            value = enc.encode(data, svc.compression)
            self._pending.append((digest, value))
            self._pending_bytes += len(data)
            consumed = end
        self._rest = buf[consumed:]
        self._buffered = len(self._rest)

    async def _flush(self) -> None:
        store = await self._svc._handle.get()
        if self._lease is None:
            self._lease = await to_thread(store.env.new_lease)
        pending, lease = self._pending, self._lease
        await store.env.transact(lambda txn: store.put_chunks(txn, pending, lease))
        self._pending = []
        self._pending_bytes = 0
        self._flushed = len(self._chunks)

    async def _end_lease(self, store: _BlobRecords, drop_claims: bool) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            if drop_claims:
                await store.env.transact(lambda txn: store.drop_claims(txn, lease.token))
        finally:
            await to_thread(lease.release)

    def _one_chunk(self) -> tuple[B3Digest, bytes, int]:
        """The whole blob as its one chunk: digest, encoded value, size (in a thread)."""
        data = self._take()
        return self._hashed_digest(), codec().encode(data, self._svc.compression), len(data)

    async def _finish(self) -> B3Digest:
        svc = self._svc
        store = await svc._handle.get()
        touched = svc._take_touches()
        if not self._chunks and self._buffered <= svc.min_chunk_size:
            # One chunk (or the empty blob): the blob is its own chunk, no index.
            digest, value, size = await to_thread(self._one_chunk)

            def put_one(txn: lmdb.Transaction) -> None:
                store.put_chunks(txn, [(digest, value)])
                store.claim_chunks(txn, [digest])
                svc._bounded_commit(txn, store, digest, [digest], size, touched)

            await store.env.transact(put_one)
            return digest
        await to_thread(self._cut, True)
        digest = self._hashed_digest()
        length = self._length
        pending, chunks, lease = self._pending, self._chunks, self._lease
        earlier = [d for d, _ in chunks[: self._flushed]]
        if len(chunks) == 1 and chunks[0][0] != digest:  # pragma: no cover - would be a hashing bug
            raise IntegrityError(f"blob {digest}: its single chunk hashes differently")

        def commit(txn: lmdb.Transaction) -> None:
            if len(chunks) == 1:
                store.put_chunks(txn, pending)
                store.claim_chunks(txn, [digest])
                svc._bounded_commit(txn, store, digest, [digest], length, touched)
                return
            store.check_chunks_exist(txn, earlier, digest)
            store.put_chunks(txn, pending)
            store.claim_chunks(txn, [d for d, _ in chunks])
            store.put_index(txn, digest, chunks)
            if lease is not None:
                store.drop_claims(txn, lease.token)
            svc._bounded_commit(txn, store, digest, [d for d, _ in chunks], length, touched)

        await store.env.transact(commit)
        await self._end_lease(store, drop_claims=False)
        self._pending = []
        self._pending_bytes = 0
        return digest

    async def _abort(self) -> None:
        # Chunks flushed before the abort stay, marked loose, until ``gc`` removes them.
        self._new = []
        self._rest = b""
        self._pending = []
        self._chunks = []
        if self._lease is not None:
            try:
                store = await self._svc._handle.get()
            except ClosedError:  # gc finds the released lease's claims stale
                lease, self._lease = self._lease, None
                await to_thread(lease.release)
                return
            await self._end_lease(store, drop_claims=True)


@attrs.frozen(kw_only=True)
class EmbeddedBlobServiceConfig(ChunkingFields, EmbeddedStoreFields, BlobServiceConfig):
    """Blobs in the embedded on-disk store (the default). See :class:`EmbeddedStoreFields`."""

    type_tag: ClassVar[str] = "embedded"

    max_bytes: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    """Bound on the blob bytes kept: least recently used blobs are evicted past it (approximate LRU; a cache, not a primary copy). null: unbounded."""

    def build(self) -> EmbeddedBlobService:
        return EmbeddedBlobService(
            self.resolved_path(),
            self.store_options(),
            avg_chunk_size=self.avg_chunk_size,
            compression=self.compression,
            max_bytes=self.max_bytes,
        )

    @classmethod
    def from_url(cls, url: str) -> "EmbeddedBlobServiceConfig":
        """``embedded://`` (the default path) or ``embedded:///abs/path``, with optional query
        parameters ``map_size``, ``durability``, ``sync_interval``, ``max_readers``,
        ``compression``, ``avg_chunk_size`` and ``max_bytes``.
        """
        return config_from_url(cls, url)
