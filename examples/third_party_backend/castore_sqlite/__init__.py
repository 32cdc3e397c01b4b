"""Blobs in a SQLite database (``type: sqlite``, URL ``sqlite:///path/to/file``).

A third-party castore_di backend: a service, its config class, and an entry point in
``pyproject.toml``. Blobs are stored whole, one row each, written only once their digest is
known, so an interrupted write leaves nothing behind; reads are verified against the digest.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import urllib.parse
from typing import ClassVar

import attrs

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, BytesReader, HashingWriter
from castore_di.composition import BlobServiceConfig
from castore_di.digests import B3Digest, blake3_digest
from castore_di.errors import ClosedError, ConfigError, IntegrityError, StorageError

__all__ = ["SqliteBlobService", "SqliteBlobServiceConfig"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS blobs (digest BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID"


class SqliteBlobService(BlobService):
    """Blobs as rows of one table; SQLite calls run in worker threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._closed = False

    def _run(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            if self._closed:
                raise ClosedError("sqlite blob service is closed")
            try:
                if self._conn is None:  # connect on first use: construction does no I/O
                    self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                    self._conn.execute(_SCHEMA)
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StorageError(f"sqlite {self.path}: {e}") from e

    async def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self._run, sql, params)

    async def has(self, digest: B3Digest) -> bool:
        return bool(await self._query("SELECT 1 FROM blobs WHERE digest = ?", (bytes(digest),)))

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        rows = await self._query("SELECT data FROM blobs WHERE digest = ?", (bytes(digest),))
        if not rows:
            return None
        data = rows[0][0]
        assert isinstance(data, bytes)
        if blake3_digest(data) != digest:
            raise IntegrityError(f"blob {digest}: stored bytes do not match the digest")
        return BytesReader(data)

    def open_write(self) -> BlobWriter:
        return _SqliteWriter(self)

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                self._closed = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)


class _SqliteWriter(HashingWriter):
    def __init__(self, service: SqliteBlobService) -> None:
        super().__init__()
        self._service = service
        self._parts: list[bytes] = []

    async def _write(self, data: bytes) -> None:
        self._hash(data)
        self._parts.append(data)

    async def _finish(self) -> B3Digest:
        digest = self._hashed_digest()
        data, self._parts = b"".join(self._parts), []
        await self._service._query("INSERT OR IGNORE INTO blobs (digest, data) VALUES (?, ?)", (bytes(digest), data))
        return digest

    async def _abort(self) -> None:
        self._parts = []


def _path(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError("path must be a non-empty string (':memory:' for an in-memory database)")


@attrs.frozen(kw_only=True)
class SqliteBlobServiceConfig(BlobServiceConfig):
    """Blobs in one SQLite database file (standard library only)."""

    type_tag: ClassVar[str] = "sqlite"
    path: str = attrs.field(
        default=":memory:",
        validator=_path,
        metadata={"doc": "database file, created if missing; ':memory:' keeps blobs in process memory"},
    )

    def build(self) -> SqliteBlobService:
        return SqliteBlobService(self.path)

    @classmethod
    def from_url(cls, url: str) -> "SqliteBlobServiceConfig":
        """``sqlite:///abs/path.sqlite3``, or ``sqlite://`` for an in-memory database."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc or parts.query:
            raise ConfigError(f"invalid url {url!r}: use sqlite:///absolute/path or sqlite://")
        return cls(path=urllib.parse.unquote(parts.path) or ":memory:")
