"""Dead writers and disk space in the embedded store: fsck names them, gc collects them,
``gc --compact`` makes the file shrink (and refuses while another process has it open)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.digests import B3Digest
from tests.test_maintenance import AVG, _data, _readline, castore, embedded_args, spawn

WAIT = 120


def _disk(path: Path) -> int:
    return (path / "data.mdb").stat().st_blocks * 512


async def test_dead_writer_is_named_and_collected_then_compacted(tmp_path: Path) -> None:
    path = tmp_path / "store"
    service = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    keep = await service.put(_data(300_000, 1))
    await service.close()
    child = spawn(path, "hold", 5)
    try:
        assert _readline(child) == "flushed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(WAIT)
    out = castore(*embedded_args(path), "fsck", "--no-refs", expect=0).stdout
    assert "0 are claimed by writers in progress" in out and "by 1 writers that died" in out, out
    before_gc = _disk(path)
    gc = castore(*embedded_args(path), "gc", expect=0).stdout
    assert "1 dead writers" in gc and "removed 0 " not in gc, gc
    assert _disk(path) >= before_gc * 0.9  # gc frees pages inside the file, not on disk
    compacted = castore(*embedded_args(path), "gc", "--compact", expect=0).stdout
    assert "compacted" in compacted, compacted
    after = _disk(path)
    assert after < before_gc / 3, (before_gc, after)
    out = castore(*embedded_args(path), "fsck", expect=0).stdout
    assert "note:" not in out, out
    service = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    assert await service.read_bytes(keep) == _data(300_000, 1)
    assert await service.put(b"after compaction") is not None
    await service.close()


async def test_compact_is_refused_while_another_process_has_the_store_open(tmp_path: Path) -> None:
    path = tmp_path / "store"
    child = spawn(path, "hold", 7)
    try:
        assert _readline(child) == "flushed"
        size = (path / "data.mdb").stat().st_size
        proc = castore(*embedded_args(path), "gc", "--compact", expect=1)
        assert "another process has it open" in proc.stderr, proc.stderr
        assert (path / "data.mdb").stat().st_size == size
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        digest = _readline(child)
    finally:
        child.wait(WAIT)
    assert child.returncode == 0
    castore(*embedded_args(path), "gc", "--compact", expect=0)
    service = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    assert await service.has(B3Digest.from_hex(digest))
    await service.close()


def test_gc_compact_on_a_backend_without_it() -> None:
    proc = castore("--blob-service-addr=memory://", "gc", "--compact", expect=3)
    assert "nothing checked" in proc.stderr
