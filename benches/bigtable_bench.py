"""Bigtable directory service on the emulator: put and get_recursive of a 10,000-directory closure.

Peers in the same run: the memory directory service (the ceiling: no I/O), and on bigtable
the unbatched paths: one check-and-mutate ``put`` per directory and a breadth-first walk with
one ``get`` (one ReadRows) per directory. The emulator's speed is not Bigtable's; the ratios
show the client's overhead and what batching saves.

    python benches/bigtable_bench.py [--quick] [--dirs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from castore_di.digests import blake3_digest  # noqa: E402
from castore_di.directoryservice.base import DirectoryService, traverse  # noqa: E402
from castore_di.directoryservice.bigtable import BigtableDirectoryServiceConfig  # noqa: E402
from castore_di.directoryservice.memory import MemoryDirectoryService  # noqa: E402
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node  # noqa: E402
from tests.servers_bigtable import FAMILY, INSTANCE, PROJECT, start_emulator  # noqa: E402


def make_closure(n: int, fanout: int = 8, files: int = 5) -> list[Directory]:
    """A tree of ``n`` directories (parent of i is (i-1)//fanout), each with a few files; leaves first."""
    built: list[Directory | None] = [None] * n
    for i in reversed(range(n)):
        entries: dict[bytes, Node] = {
            f"file{j}.txt".encode(): FileNode(blake3_digest(f"{i}/{j}".encode()), 100 + j) for j in range(files)
        }
        for c in range(i * fanout + 1, min(n, i * fanout + fanout + 1)):
            child = built[c]
            assert child is not None
            entries[f"dir{c}".encode()] = DirectoryNode(child.digest, child.size)
        built[i] = Directory(entries)
    return [d for d in reversed(built) if d is not None]


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await fn()
    return time.perf_counter() - t0, result


async def collect(stream: Any) -> list[Directory]:
    return [d async for d in stream]


async def put_one_by_one(service: DirectoryService, closure: list[Directory]) -> None:
    sem = asyncio.Semaphore(32)

    async def one(d: Directory) -> None:
        async with sem:
            await service.put(d)

    await asyncio.gather(*(one(d) for d in closure))


async def run(n: int, with_unbatched: bool) -> list[tuple[str, str, float]]:
    closure = make_closure(n)
    root = closure[-1].digest
    rows: list[tuple[str, str, float]] = []

    memory = MemoryDirectoryService()
    t, _ = await timed(lambda: memory.put_closure(closure))
    rows.append(("put (put_multiple closure)", "memory", t))
    t, got = await timed(lambda: collect(memory.get_recursive(root)))
    assert len(got) == n
    rows.append(("get_recursive", "memory", t))

    emulator = start_emulator()
    os.environ["BIGTABLE_EMULATOR_HOST"] = emulator.host
    try:

        def service() -> Any:
            table = emulator.create_table()
            return BigtableDirectoryServiceConfig(
                project_id=PROJECT, instance_name=INSTANCE, table_name=table, family_name=FAMILY, timeout=30.0
            ).build()

        bt = service()
        t, _ = await timed(lambda: bt.put_closure(closure))
        rows.append(
            ("put (put_multiple closure)", f"bigtable ({bt.read_requests} ReadRows + {bt.write_requests} MutateRows)", t)
        )
        reads = bt.read_requests
        t, got = await timed(lambda: collect(bt.get_recursive(root)))
        assert len(got) == n
        rows.append(("get_recursive", f"bigtable ({bt.read_requests - reads} ReadRows)", t))
        if with_unbatched:
            t, got = await timed(lambda: collect(traverse(bt, root)))
            assert len(got) == n
            rows.append(("get_recursive", "bigtable, one get per dir", t))
            bt2 = service()
            t, _ = await timed(lambda: put_one_by_one(bt2, closure))
            rows.append(("put (put_multiple closure)", "bigtable, one put per dir (32 in flight)", t))
            await bt2.close()
        await bt.close()
    finally:
        emulator.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1,000 directories, batched paths only")
    ap.add_argument("--dirs", type=int, default=None)
    args = ap.parse_args()
    n = args.dirs or (1_000 if args.quick else 10_000)
    rows = asyncio.run(run(n, with_unbatched=not args.quick))
    memory = {op: s for op, svc, s in rows if svc == "memory"}
    print(f"{n:,} directories (fan-out 8, 5 files each), emulator on loopback")
    print(f"{'operation':<28} {'service':<42} {'seconds':>8} {'dirs/s':>10} {'vs memory':>10}")
    for op, svc, s in rows:
        ratio = "1.0x" if svc == "memory" else f"{s / memory[op]:.1f}x slower"
        print(f"{op:<28} {svc:<42} {s:>8.3f} {n / s:>10,.0f} {ratio:>10}")


if __name__ == "__main__":
    main()
