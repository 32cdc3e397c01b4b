"""The embedded store across processes: kill -9 mid-import, concurrent writers and readers.

Child processes run :func:`child_main` (``python -c``): they import blobs (small ones, and
every fifth one chunked over several transactions) and directory closures in a loop into
one data directory, printing ``B|D <prefix> <i> <hex digest>`` after each ``close()``
returned. Data is derived from ``(prefix, i)``, so the parent can check every reported
digest reads back exactly.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.digests import B3Digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di._embedded import StoreOptions
from tests.cases_embedded import fsck
from castore_di.nodes import Directory, FileNode, SymlinkNode

REPO = Path(__file__).resolve().parent.parent
AVG_CHUNK = 16384
WAIT = 120  # seconds: an upper bound for any child, so a hang fails instead of blocking


def make_blob(prefix: str, i: int) -> bytes:
    rng = random.Random(f"{prefix}-{i}")
    size = rng.randint(200_000, 2_500_000) if i % 5 == 0 else rng.randint(0, 20_000)
    return rng.randbytes(size)


def make_closure(prefix: str, i: int, blob: B3Digest, size: int) -> list[Directory]:
    """Leaves first; the last one is the root."""
    leaf = Directory({f"{prefix}-{i}".encode(): FileNode(blob, size), b"link": SymlinkNode(b"target")})
    mid = Directory({b"leaf": leaf.as_node(), b"other": FileNode(blob, size, True)})
    root = Directory({b"mid": mid.as_node(), f"n{i}".encode(): leaf.as_node()})
    return [leaf, mid, root]


def child_main() -> None:
    """``python -c ... child_main()`` with argv: path prefix count durability."""
    path, prefix, count, durability = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    async def run() -> None:
        options = StoreOptions(durability=durability)  # type: ignore[arg-type]
        blobs = EmbeddedBlobService(path, options, avg_chunk_size=AVG_CHUNK)
        dirs = EmbeddedDirectoryService(path, options)
        i = 0
        while count < 0 or i < count:
            data = make_blob(prefix, i)
            writer = blobs.open_write()
            for k in range(0, len(data), 65536):
                await writer.write(data[k : k + 65536])
            digest = await writer.close()
            print(f"B {prefix} {i} {digest.hex()}", flush=True)
            if i % 3 == 0:
                root = await dirs.put_closure(make_closure(prefix, i, digest, len(data)))
                print(f"D {prefix} {i} {root.hex()}", flush=True)
            i += 1
        await blobs.close()
        await dirs.close()

    asyncio.run(run())


def spawn(path: Path, prefix: str, count: int, durability: str = "process") -> subprocess.Popen[str]:
    code = "from tests.test_embedded_processes import child_main; child_main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path), prefix, str(count), durability],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def parse(line: str) -> tuple[str, str, int, B3Digest] | None:
    parts = line.split()
    if len(parts) != 4 or parts[0] not in ("B", "D") or len(parts[3]) != 64:
        return None  # a line cut short by the kill
    return parts[0], parts[1], int(parts[2]), B3Digest.from_hex(parts[3])


async def verify(path: Path, reported: list[tuple[str, str, int, B3Digest]]) -> None:
    report = fsck(str(path))
    assert report.ok, str(report)
    blobs = EmbeddedBlobService(str(path), avg_chunk_size=AVG_CHUNK)
    dirs = EmbeddedDirectoryService(str(path))
    sizes: dict[tuple[str, int], tuple[B3Digest, int]] = {}
    try:
        for kind, prefix, i, digest in reported:
            if kind == "B":
                data = make_blob(prefix, i)
                assert await blobs.read_bytes(digest) == data, f"blob {prefix} {i} lost or wrong"
                sizes[(prefix, i)] = (digest, len(data))
        for kind, prefix, i, digest in reported:
            if kind == "D":
                blob, size = sizes[(prefix, i)]
                closure = make_closure(prefix, i, blob, size)
                got = [d async for d in dirs.get_recursive(digest)]
                assert got and got[0] == closure[-1], f"closure {prefix} {i} lost or wrong"
                assert {d.digest for d in got} == {d.digest for d in closure}
    finally:
        await blobs.close()
        await dirs.close()


async def test_kill_9_mid_import_loses_nothing_reported(tmp_path: Path) -> None:
    store = tmp_path / "store"
    rng = random.Random(7)
    reported: list[tuple[str, str, int, B3Digest]] = []
    for round_ in range(4):
        child = spawn(store, f"r{round_}", -1)
        assert child.stdout is not None
        target = rng.randint(10, 60)
        seen = 0
        deadline = time.monotonic() + WAIT
        lines: list[str] = []
        while seen < target:
            assert time.monotonic() < deadline, "child made no progress"
            line = child.stdout.readline()
            assert line, f"child ended early: {child.wait()} {child.stderr.read() if child.stderr else ''}"
            lines.append(line)
            seen += line.startswith("B ")
        time.sleep(rng.random() * 0.05)  # land anywhere: in a chunk batch, an index, a closure
        child.send_signal(signal.SIGKILL)
        rest, _err = child.communicate(timeout=WAIT)
        assert child.returncode == -signal.SIGKILL
        lines.extend(rest.splitlines(keepends=True))
        # Only newline-terminated lines were printed completely (after close() returned).
        reported.extend(p for p in (parse(x) for x in lines if x.endswith("\n")) if p is not None)
        await verify(store, reported)
    assert sum(r[0] == "B" for r in reported) >= 40


async def test_concurrent_writer_processes_and_a_reader(tmp_path: Path) -> None:
    store = tmp_path / "store"
    count = 40
    writers = [spawn(store, "w1", count), spawn(store, "w2", count, durability="process")]
    lines: queue.Queue[str | None] = queue.Queue()

    def pump(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threads = [threading.Thread(target=pump, args=(w,), daemon=True) for w in writers]
    for t in threads:
        t.start()
    # This process reads each blob as soon as a writer reports it, while both keep writing.
    blobs = EmbeddedBlobService(str(store), avg_chunk_size=AVG_CHUNK)
    reported: list[tuple[str, str, int, B3Digest]] = []
    finished = 0
    deadline = time.monotonic() + WAIT
    try:
        while finished < len(writers):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                finished += 1
                continue
            parsed = parse(line)
            assert parsed is not None, line
            reported.append(parsed)
            if parsed[0] == "B":
                assert await blobs.read_bytes(parsed[3]) == make_blob(parsed[1], parsed[2])
    finally:
        await blobs.close()
        for w in writers:
            if w.poll() is None:
                w.kill()
    for w in writers:
        _out, err = w.communicate(timeout=WAIT)
        assert w.returncode == 0, err
    assert sum(r[0] == "B" for r in reported) == 2 * count
    await verify(store, reported)
