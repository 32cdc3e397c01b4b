"""How the embedded blob service readies a blob for storing, without the store.

:class:`EmbeddedPreparer` cuts a blob with FastCDC, hashes each chunk and encodes it with the
store's codec (:mod:`castore_di._embedded.codec`): everything but the commit. The embedded
blob service's ``prepare_many`` uses it, and so do the importer's worker processes
(:mod:`castore_di._importworker`), which receive it pickled: it holds only its settings and
imports neither LMDB nor attrs, so a worker starts quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import blake3

from castore_di._embedded.codec import Codec, Compression, codec
from castore_di.errors import MissingDependencyError

__all__ = ["Encoded", "EmbeddedPreparer"]


class Encoded:
    """A blob readied for the embedded store: its chunks' stored values (digest, value) and its
    chunk index (digest, size) per chunk (``None`` when the blob is its one chunk)."""

    __slots__ = ("values", "index")

    def __init__(self, values: list[tuple[bytes, bytes]], index: list[tuple[bytes, int]] | None) -> None:
        self.values = values
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return Encoded, (self.values, self.index)


class EmbeddedPreparer:
    """Cuts, hashes and encodes blobs as the embedded blob service stores them (picklable)."""

    def __init__(self, avg_chunk_size: int, compression: Compression) -> None:
        self.avg_chunk_size = avg_chunk_size
        self.min_chunk_size = avg_chunk_size // 2
        self.max_chunk_size = avg_chunk_size * 2
        self.compression: Compression = compression
        self._cdc: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        return EmbeddedPreparer, (self.avg_chunk_size, self.compression)

    def chunker(self) -> Any:
        """The FastCDC cutter (min = avg/2, max = 2*avg), made on first use."""
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

    def encode(self, data: bytes, digest: bytes, enc: Codec | None = None) -> Encoded:
        """``data`` (whose blake3 digest is ``digest``) as stored values and chunk index.

        Blocking and CPU-bound (blake3, FastCDC and zstd release the GIL); ``enc``: the
        calling thread's codec (:func:`codec`, looked up when not given).
        """
        enc = enc or codec()
        compression = self.compression
        if len(data) <= self.min_chunk_size:
            return Encoded([(digest, enc.encode(data, compression))], None)
        values: list[tuple[bytes, bytes]] = []
        index: list[tuple[bytes, int]] = []
        hasher = blake3.blake3
        for chunk in self.chunker().cut_buf(data):
            if chunk.length == len(data):  # one chunk: the blob itself, hashed already
                return Encoded([(digest, enc.encode(data, compression))], None)
            piece = data[chunk.offset : chunk.offset + chunk.length]
            d = hasher(piece).digest()
            index.append((d, len(piece)))
            values.append((d, enc.encode(piece, compression)))
        return Encoded(values, None if len(index) == 1 else index)

    def encode_many(self, blobs: Sequence[tuple[bytes, bytes]], enc: Codec | None = None) -> list[Encoded]:
        """:meth:`encode` of each ``(data, digest)``, compressing all their chunks in one call
        (:meth:`Codec.encode_many`)."""
        enc = enc or codec()
        pieces: list[bytes] = []
        # Per blob: its chunks as (digest, index into pieces, size), and whether it is one chunk.
        plans: list[tuple[list[tuple[bytes, int, int]], bool]] = []
        hasher = blake3.blake3
        for data, digest in blobs:
            if len(data) <= self.min_chunk_size:
                plans.append(([(digest, len(pieces), len(data))], True))
                pieces.append(data)
                continue
            chunks: list[tuple[bytes, int, int]] = []
            for chunk in self.chunker().cut_buf(data):
                if chunk.length == len(data):  # one chunk: the blob itself, hashed already
                    chunks.append((digest, len(pieces), len(data)))
                    pieces.append(data)
                    break
                piece = data[chunk.offset : chunk.offset + chunk.length]
                chunks.append((hasher(piece).digest(), len(pieces), len(piece)))
                pieces.append(piece)
            plans.append((chunks, len(chunks) == 1))
        values = enc.encode_many(pieces, self.compression)
        return [
            Encoded(
                [(d, values[k]) for d, k, _size in chunks],
                None if whole else [(d, size) for d, _k, size in chunks],
            )
            for chunks, whole in plans
        ]
