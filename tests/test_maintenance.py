"""``castore fsck`` / ``castore gc`` and the backends' checks and garbage collection.

The CLI runs as a real process; damage is made behind the API with the conformance
backdoors; concurrent writers are separate processes (:func:`child_main`) that store a
large blob over several transactions and stop halfway until told to go on.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import obstore
import pytest

from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.blobservice.objectstore import ObjectStoreBlobService
from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di.blobservice.embedded import BATCH_BYTES
from tests.cases_embedded import fsck
from castore_di.maintenance import Checkable, Collectable
from castore_di.nodes import Directory, FileNode
from castore_di._objectstore.store import object_key
from tests.cases_embedded import EmbeddedBlobBackdoor, EmbeddedDirectoryBackdoor
from tests.cases_objectstore import ObjectStoreBlobBackdoor

REPO = Path(__file__).resolve().parent.parent
AVG = 16384
BIG = BATCH_BYTES + 2_000_000  # flushed in more than one transaction
WAIT = 120


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def castore(*args: str, expect: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "castore_di.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == expect, f"castore {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def embedded_args(path: Path) -> list[str]:
    return [f"--blob-service-addr=embedded://{path}", f"--directory-service-addr=embedded://{path}"]


# --- the roles ---------------------------------------------------------------------------


def test_roles() -> None:
    blobs = EmbeddedBlobService("/nonexistent/never-opened")
    assert isinstance(blobs, Checkable) and isinstance(blobs, Collectable)
    assert isinstance(EmbeddedDirectoryService("/nonexistent/never-opened"), Checkable)
    objects = ObjectStoreBlobService("memory:///")
    assert isinstance(objects, Checkable) and not isinstance(objects, Collectable)


# --- castore fsck ----------------------------------------------------------------------------


async def test_fsck_cli_embedded_clean_then_damaged(tmp_path: Path) -> None:
    path = tmp_path / "store"
    blobs = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    dirs = EmbeddedDirectoryService(str(path))
    big = await blobs.put(_data(300_000, 1))
    small = await blobs.put(b"a small blob")
    leaf = Directory({b"f": FileNode(small, 12), b"big": FileNode(big, 300_000)})
    root = await dirs.put_closure([leaf, Directory({b"d": leaf.as_node()})])
    await blobs.close()
    await dirs.close()

    out = castore(*embedded_args(path), "fsck", expect=0).stdout
    assert out.count(": ok") == 3, out  # each service, then the references between them
    assert "blob service" in out and "directory service" in out and "references: 2 directories" in out

    blobs = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    dirs = EmbeddedDirectoryService(str(path))
    await EmbeddedBlobBackdoor(blobs).corrupt(big)
    await EmbeddedDirectoryBackdoor(dirs).corrupt(root)
    await blobs.close()
    await dirs.close()
    proc = castore(*embedded_args(path), "fsck", "--no-refs", expect=1)
    assert str(big) in proc.stdout and root.hex() in proc.stdout, proc.stdout
    assert "fsck found 3 problems" in proc.stderr  # the chunk, its blob, the directory
    problems = [line for line in proc.stdout.splitlines() if line.startswith("  ") and "note:" not in line]
    assert len(problems) == 3, proc.stdout
    # Only the directories: the blob damage is not looked at.
    proc = castore(*embedded_args(path), "fsck", "--no-blobs", expect=1)
    assert "blob service" not in proc.stdout and root.hex() in proc.stdout


async def test_fsck_cli_objectstore_and_a_backend_without_a_check(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/objects"
    service = ObjectStoreBlobService(url, avg_chunk_size=4096)
    big = await service.put(_data(100_000, 2))
    await service.put(b"small")
    args = [f"--blob-service-addr=objectstore+{url}", "--directory-service-addr=memory://"]
    out = castore(*args, "fsck", expect=0).stdout
    assert "ObjectStoreBlobService" in out and ": ok" in out
    assert "no consistency check for this backend" in out  # the memory directory service
    backdoor = ObjectStoreBlobBackdoor(service)
    chunk = await backdoor.chunk_of(big)
    await backdoor.corrupt(big)
    proc = castore(*args, "fsck", expect=1)
    assert str(big) in proc.stdout and str(chunk) in proc.stdout, proc.stdout


@pytest.mark.parametrize("where", ["file", "memory", "s3"])
async def test_objectstore_fsck_finds_each_kind_of_damage(where: str, tmp_path: Path, request: Any) -> None:
    options: dict[str, str] = {}
    if where == "file":
        url = f"file://{tmp_path}/objects/prefix"
    elif where == "memory":
        url = "memory:///"
    else:
        bucket = request.getfixturevalue("s3_bucket")
        url, options = bucket.url, bucket.options
    service = ObjectStoreBlobService(url, options, avg_chunk_size=4096)
    big = await service.put(_data(60_000, 3))
    other = await service.put(_data(50_000, 4))
    small = await service.put(b"one chunk")
    empty = await service.put(b"")
    chunks = await service.chunks(big)
    assert chunks and len(chunks) > 3
    report = await service.fsck()
    assert report.ok, str(report)
    assert report.blobs == 4  # big, other, small, empty: every blob has an index
    assert report.chunks == len(chunks) + len(await service.chunks(other) or []) + 1
    assert report.bytes_checked == 60_000 + 50_000 + 9

    backdoor = ObjectStoreBlobBackdoor(service)
    await backdoor.corrupt(big)  # its middle chunk
    await service.access.put(object_key("chunks", small), b"not zstd")
    lost = (await service.chunks(other) or [])[0].digest
    await obstore.delete_async(service.access.store, object_key("chunks", lost))
    await service.access.put("chunks/b3/zzzz/stray", b"x")
    report = await service.fsck()
    text = str(report)
    assert not report.ok
    middle = chunks[len(chunks) // 2].digest
    assert any(str(middle) in p and "do not match" in p for p in report.problems), text
    assert any(str(big) in p and str(middle) in p for p in report.problems), text
    assert any(str(small) in p and "decompress" in p for p in report.problems), text
    assert any(str(other) in p and str(lost) in p and "missing" in p for p in report.problems), text
    assert any("chunks/b3/zzzz/stray" in p for p in report.problems), text
    assert not any(str(empty) in p for p in report.problems), text


# --- gc: the invariants ---------------------------------------------------------------------


async def _abort_large_write(service: EmbeddedBlobService, data: bytes) -> None:
    writer = service.open_write()
    for k in range(0, len(data), 1 << 20):
        await writer.write(data[k : k + (1 << 20)])
    await writer.abort()


def _chunk_digests(data: bytes, service: EmbeddedBlobService) -> list[B3Digest]:
    return [blake3_digest(data[c.offset : c.offset + c.length]) for c in service._chunker().cut_buf(data)]


async def test_gc_removes_chunks_of_an_aborted_write_and_keeps_every_blob(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=AVG)
    aborted = _data(BIG, 10)
    # Committed blobs of every shape; one shares a chunk-sized piece with the aborted data
    # (stored as a one-chunk blob, so it *is* one of the aborted write's chunks).
    cut = list(service._chunker().cut_buf(aborted))[3]
    piece = aborted[cut.offset : cut.offset + cut.length]
    shared = blake3_digest(piece)
    kept = {
        "empty": b"",
        "small": b"small",
        "chunked": _data(200_000, 11),
        "large": _data(BIG, 12),
    }
    digests = {name: await service.put(data) for name, data in kept.items()}
    await _abort_large_write(service, aborted)
    digests["shared"] = await service.put(piece)  # after the abort: it claims a loose chunk
    kept["shared"] = piece
    loose = [d for d in _chunk_digests(aborted, service)[: BATCH_BYTES // AVG // 4] if d != shared]
    for d in loose:
        assert not await service.has(d), "a loose chunk is not a blob"
        assert await service.open_read(d) is None and await service.chunks(d) is None
    before = await service.fsck()
    assert before.ok and before.notes and "gc removes" in before.notes[0], str(before)

    dry = await service.gc(dry_run=True)
    assert dry.dry_run and len(dry.removed) >= len(loose) and dry.removed_bytes > BATCH_BYTES // 2
    assert {d.hex() for d in loose} <= set(dry.removed) and shared.hex() not in dry.removed
    assert (await service.fsck()).chunks == before.chunks  # nothing removed

    report = await service.gc()
    assert sorted(report.removed) == sorted(dry.removed) and report.dead_writers == 0
    after = await service.fsck()
    assert after.ok and not after.notes, str(after)
    assert after.chunks == before.chunks - len(report.removed)
    for name, data in kept.items():
        assert await service.read_bytes(digests[name]) == data, name
    assert (await service.gc()).removed == []  # nothing left
    # The aborted data can be written again in full.
    assert await service.put(aborted) == blake3_digest(aborted)
    assert await service.read_bytes(blake3_digest(aborted)) == aborted
    assert (await service.gc()).removed == [] and (await service.fsck()).ok
    await service.close()


async def test_gc_keeps_chunks_of_a_writer_in_progress(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=AVG)
    data = _data(2 * BATCH_BYTES + 1_000_000, 20)
    # An aborted write left the first half of ``data`` as loose chunks.
    await _abort_large_write(service, data[: BATCH_BYTES + 500_000])
    writer = service.open_write()
    await writer.write(data[: BATCH_BYTES + 2_000_000])  # re-finds the loose chunks, claims them
    report = await service.gc()
    assert report.removed == [] and report.kept_in_flight > 0, report.summary()
    await writer.write(data[BATCH_BYTES + 2_000_000 :])
    digest = await writer.close()
    assert (await service.gc()).removed == []
    assert await service.read_bytes(digest) == data
    check = await service.fsck()
    assert check.ok and not check.notes, str(check)
    await service.close()


async def test_a_writer_whose_chunks_were_collected_refuses_to_commit(tmp_path: Path) -> None:
    """Defence in depth: if a flushed chunk vanished, close() fails instead of a broken index."""
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=AVG)
    data = _data(BIG, 21)
    writer = service.open_write()
    await writer.write(data[: BATCH_BYTES + 1_000_000])
    store = service._store()
    first = _chunk_digests(data, service)[0]
    with store.env.write() as txn:
        txn.delete(first, db=store.chunks_db)
    await writer.write(data[BATCH_BYTES + 1_000_000 :])
    with pytest.raises(Exception, match="gone"):
        await writer.close()
    assert not await service.has(blake3_digest(data))
    assert (await service.fsck()).ok
    await service.close()


async def test_gc_removes_the_lock_files_of_dead_writers_only(tmp_path: Path) -> None:
    service = EmbeddedBlobService(str(tmp_path), avg_chunk_size=AVG)
    store = service._store()
    live, dead = store.env.new_lease(), store.env.new_lease()
    dead._file.close()  # as if its process died before storing anything
    assert sorted(p.name for p in (tmp_path / "writers").iterdir()) == sorted([live.token.hex(), dead.token.hex()])
    assert (await service.gc(dry_run=True)).removed == []
    assert len(list((tmp_path / "writers").iterdir())) == 2  # a dry run changes nothing
    await service.gc()
    assert [p.name for p in (tmp_path / "writers").iterdir()] == [live.token.hex()]
    live.release()
    assert not list((tmp_path / "writers").iterdir())
    await service.close()


# --- gc against writer processes ---------------------------------------------------------------


def child_main() -> None:
    """``python -c ...`` with argv: path, mode (``hold`` or ``loop``), seed, count.

    ``hold``: write the first BATCH_BYTES + 1 MB of a large blob (flushed), print ``flushed``,
    wait for a line on stdin, finish and print the digest. ``loop``: write ``count`` large
    blobs, printing each digest after its close returned.
    """
    path, mode, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def run() -> None:
        service = EmbeddedBlobService(path, avg_chunk_size=AVG)
        for i in range(count):
            data = _data(BIG, seed + i)
            writer = service.open_write()
            half = BATCH_BYTES + 1_000_000
            for k in range(0, half, 1 << 20):
                await writer.write(data[k : min(k + (1 << 20), half)])
            if mode == "hold":
                print("flushed", flush=True)
                sys.stdin.readline()
            await writer.write(data[half:])
            print((await writer.close()).hex(), flush=True)
        await service.close()

    asyncio.run(run())


def spawn(path: Path, mode: str, seed: int, count: int = 1) -> subprocess.Popen[str]:
    code = "from tests.test_maintenance import child_main; child_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path), mode, str(seed), str(count)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _readline(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"child ended early: {proc.stderr.read() if proc.stderr else ''}"
    return line


async def test_gc_while_another_process_is_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "store"
    child = spawn(path, "hold", 30)
    try:
        assert await asyncio.to_thread(_readline, child) == "flushed"
        out = castore(*embedded_args(path), "gc", "--dry-run", expect=0).stdout
        assert "would remove 0 unreferenced chunks" in out, out
        report = fsck(str(path))
        assert report.ok and "claimed by writers in progress" in report.notes[0], str(report)
        gc = castore(*embedded_args(path), "gc", expect=0).stdout
        assert "removed 0 unreferenced chunks" in gc and "0 dead writers" in gc, gc
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        digest = B3Digest.from_hex(await asyncio.to_thread(_readline, child))
        assert child.wait(WAIT) == 0
    finally:
        child.kill()
        child.wait(WAIT)
    service = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    assert await service.read_bytes(digest) == _data(BIG, 30)
    assert (await service.fsck()).ok and not (await service.fsck()).notes
    await service.close()


async def test_gc_collects_the_chunks_of_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "store"
    child = spawn(path, "hold", 40)
    try:
        assert await asyncio.to_thread(_readline, child) == "flushed"
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
    finally:
        child.kill()
        child.wait(WAIT)
    dry = castore(*embedded_args(path), "gc", "--dry-run", expect=0).stdout.splitlines()
    assert len(dry) > BATCH_BYTES // AVG // 4 and all(len(line) == 64 for line in dry[:-1]), dry[-5:]
    assert "1 dead writers" in dry[-1]
    out = castore(*embedded_args(path), "gc", expect=0).stdout
    assert f"removed {len(dry) - 1} unreferenced chunks" in out and "1 dead writers" in out, out
    assert not list((path / "writers").iterdir())
    report = fsck(str(path))
    assert report.ok and not report.notes and report.chunks == 0, str(report)


async def test_gc_in_a_loop_against_writer_processes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    children = [spawn(path, "loop", 100 * k, 3) for k in range(2)]
    removed = 0
    try:
        while any(c.poll() is None for c in children):
            out = castore(*embedded_args(path), "gc", expect=0).stdout
            removed += int(out.split("removed ")[1].split()[0])
        outputs = [c.communicate(timeout=WAIT) for c in children]
    finally:
        for c in children:
            c.kill()
            c.wait(WAIT)
    assert all(c.returncode == 0 for c in children), [err for _, err in outputs]
    assert removed == 0  # nothing was ever garbage: every write committed
    service = EmbeddedBlobService(str(path), avg_chunk_size=AVG)
    for k, (out, _) in enumerate(outputs):
        digests = out.split()
        assert len(digests) == 3
        for i, hexd in enumerate(digests):
            assert await service.read_bytes(B3Digest.from_hex(hexd)) == _data(BIG, 100 * k + i)
    report = await service.fsck()
    assert report.ok and not report.notes, str(report)
    await service.close()


def test_gc_on_a_backend_without_one(tmp_path: Path) -> None:
    proc = castore("--blob-service-addr=memory://", "gc", expect=3)
    assert "no garbage collection for this backend" in proc.stdout
    assert "nothing checked for blob service memory://" in proc.stderr
