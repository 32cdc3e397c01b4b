"""The conformance suite every BlobService must pass.

Use it from a test module by subclassing and providing two fixtures::

    from castore_di.testing.blob_conformance import BlobServiceConformance

    class TestMyBlobService(BlobServiceConformance):
        @pytest.fixture
        async def blob_service(self):
            svc = MyBlobService(...)
            yield svc
            await svc.close()

        @pytest.fixture
        def backdoor(self, blob_service):
            return MyBackdoor(blob_service)   # or None when storage cannot be reached

A backdoor reaches storage behind the API (:class:`BlobBackdoor`), so corruption detection is
tested the same way for every backend. Tests are async (pytest-asyncio, ``asyncio_mode=auto``).
"""

from __future__ import annotations

import asyncio
import io
import os
from typing import Protocol

import pytest

from castore_di.blobservice.base import BlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.errors import ClosedError, IntegrityError

__all__ = ["BlobServiceConformance", "BlobBackdoor"]


class BlobBackdoor(Protocol):
    """Reaches storage behind the API.

    A backend that verifies at write time and serves stored bytes without hashing them
    again (memory) names the service whose ``fsck`` finds the damage in an attribute
    ``detected_by``; reads must raise :class:`IntegrityError` for the others.
    """

    async def corrupt(self, digest: B3Digest) -> None:
        """Change stored bytes of ``digest`` (or of one of its chunks) behind the API."""


def _data(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


class BlobServiceConformance:
    """Behaviour shared by every blob service. Subclasses provide ``blob_service`` and ``backdoor``."""

    large_size = 3 * 1024 * 1024 + 17

    async def test_put_and_read(self, blob_service: BlobService) -> None:
        digest = await blob_service.put(b"Hello World")
        assert digest == blake3_digest(b"Hello World")
        assert await blob_service.has(digest)
        assert await blob_service.read_bytes(digest) == b"Hello World"

    async def test_empty_blob(self, blob_service: BlobService) -> None:
        digest = await blob_service.put(b"")
        assert digest == blake3_digest(b"")
        assert await blob_service.has(digest)
        assert await blob_service.read_bytes(digest) == b""

    async def test_absent(self, blob_service: BlobService) -> None:
        missing = blake3_digest(b"never stored " + os.urandom(8))
        assert not await blob_service.has(missing)
        assert await blob_service.open_read(missing) is None
        assert await blob_service.chunks(missing) is None

    async def test_close_twice_returns_same_digest(self, blob_service: BlobService) -> None:
        writer = blob_service.open_write()
        await writer.write(b"abc")
        first = await writer.close()
        assert await writer.close() == first == blake3_digest(b"abc")

    async def test_write_after_close_fails(self, blob_service: BlobService) -> None:
        writer = blob_service.open_write()
        await writer.write(b"abc")
        await writer.close()
        with pytest.raises(ClosedError):
            await writer.write(b"more")

    async def test_abort_stores_nothing(self, blob_service: BlobService) -> None:
        data = _data(100_000, 1)
        writer = blob_service.open_write()
        await writer.write(data)
        await writer.abort()
        assert not await blob_service.has(blake3_digest(data))

    async def test_exception_in_context_stores_nothing(self, blob_service: BlobService) -> None:
        data = _data(50_000, 2)
        with pytest.raises(RuntimeError):
            async with blob_service.open_write() as writer:
                await writer.write(data)
                raise RuntimeError("interrupted")
        assert not await blob_service.has(blake3_digest(data))

    async def test_large_blob_in_pieces(self, blob_service: BlobService) -> None:
        data = _data(self.large_size, 3)
        writer = blob_service.open_write()
        view = memoryview(data)
        for i in range(0, len(data), 100_003):
            await writer.write(view[i : i + 100_003])
        digest = await writer.close()
        assert digest == blake3_digest(data)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            assert reader.size == len(data)
            parts = [block async for block in reader.iter_blocks(65_536)]
        assert b"".join(parts) == data

    async def test_seek(self, blob_service: BlobService) -> None:
        data = _data(self.large_size, 4)
        digest = await blob_service.put(data)
        reader = await blob_service.open_read(digest)
        assert reader is not None
        async with reader:
            assert await reader.seek(1_000_000) == 1_000_000
            assert await reader.read(10) == data[1_000_000:1_000_010]
            assert reader.tell() == 1_000_010
            assert await reader.seek(-5, io.SEEK_CUR) == 1_000_005
            assert await reader.read(5) == data[1_000_005:1_000_010]
            assert await reader.seek(-3, io.SEEK_END) == len(data) - 3
            assert await reader.read() == data[-3:]
            assert await reader.seek(0, io.SEEK_END) == len(data)
            assert await reader.read(10) == b""
            await reader.seek(0)
            assert await reader.read(7) == data[:7]
            with pytest.raises(ValueError):
                await reader.seek(len(data) + 1)
            with pytest.raises(ValueError):
                await reader.seek(-1)

    async def test_chunks_describe_the_blob(self, blob_service: BlobService) -> None:
        data = _data(self.large_size, 5)
        digest = await blob_service.put(data)
        chunks = await blob_service.chunks(digest)
        assert chunks is not None
        if chunks:
            assert sum(c.size for c in chunks) == len(data)
            offset = 0
            for c in chunks:
                assert c.digest == blake3_digest(data[offset : offset + c.size])
                assert await blob_service.has(c.digest)
                assert await blob_service.read_bytes(c.digest) == data[offset : offset + c.size]
                offset += c.size

    async def test_same_data_twice(self, blob_service: BlobService) -> None:
        data = _data(200_000, 6)
        assert await blob_service.put(data) == await blob_service.put(data)
        assert await blob_service.read_bytes(blake3_digest(data)) == data

    async def test_concurrent_writers(self, blob_service: BlobService) -> None:
        blobs = [_data(20_000 + i, 100 + i) for i in range(8)]
        digests = await asyncio.gather(*(blob_service.put(b) for b in blobs))
        assert list(digests) == [blake3_digest(b) for b in blobs]
        for b, d in zip(blobs, digests):
            assert await blob_service.read_bytes(d) == b

    async def test_batches(self, blob_service: BlobService) -> None:
        """``put_many``/``has_many``/``read_many`` keep order, store each blob, report absence."""
        blobs = [_data(n, 200 + n % 7) for n in (0, 1, 700, 5000, 70_000, 300_000)] + [b"same", b"same"]
        digests = await blob_service.put_many(blobs)
        assert digests == [blake3_digest(b) for b in blobs]
        absent = blake3_digest(b"never stored in the batch test")
        assert await blob_service.has_many([absent, *digests]) == [False] + [True] * len(blobs)
        assert await blob_service.read_many([*digests, absent]) == [*blobs, None]
        assert await blob_service.read_many([*digests, absent], verify=False) == [*blobs, None]
        assert await blob_service.put_many(blobs) == digests

    async def test_prepared_batches(self, blob_service: BlobService) -> None:
        """``prepare_many`` (in a thread) stores nothing and hashes as BLAKE3 does;
        ``put_prepared`` stores the blobs, and only blobs already there are skipped."""
        blobs = [_data(n, 300 + n % 5) for n in (0, 900, 6000, 90_000, 400_000)] + [b"twice", b"twice"]
        prepared = await asyncio.to_thread(blob_service.prepare_many, blobs)
        assert [p.digest for p in prepared] == [blake3_digest(b) for b in blobs]
        assert [p.size for p in prepared] == [len(b) for b in blobs]
        assert not any(await blob_service.has_many([blake3_digest(b) for b in blobs[1:]]))  # nothing stored yet
        await blob_service.put_prepared(prepared)
        assert await blob_service.read_many([p.digest for p in prepared]) == blobs
        again = await asyncio.to_thread(blob_service.prepare_many, blobs)
        assert all(p.present in (True, None) for p in again)  # found present, or not checked
        await blob_service.put_prepared(again)
        assert await blob_service.read_many([p.digest for p in again]) == blobs

    async def test_corruption_is_detected(self, blob_service: BlobService, backdoor: BlobBackdoor | None) -> None:
        if backdoor is None:
            pytest.skip("this backend offers no way to reach storage behind the API")
        data = _data(self.large_size, 7)
        digest = await blob_service.put(data)
        await backdoor.corrupt(digest)
        checker = getattr(backdoor, "detected_by", None)
        if checker is not None:
            report = await checker.fsck()
            assert any(str(digest) in p for p in report.problems), report
            return
        with pytest.raises(IntegrityError):
            await blob_service.read_bytes(digest)
        with pytest.raises(IntegrityError):
            await blob_service.read_many([digest])
