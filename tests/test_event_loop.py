"""Nothing that can block on disk or locks runs on the event loop: the embedded store's writes
wait for LMDB's write lock in the writer thread, so ``castore serve`` keeps answering.

Another process holds the data directory's LMDB write lock (a real, blocking lock: it began a
write transaction and waits for us). A Put into ``castore serve`` then cannot commit; Stat and
Get calls must still be answered while it waits, and the Put must complete once the lock is
released. With the old code (commits on the event loop) the first RPC after the Put arrived
hung until the client's deadline.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.nodes import Directory, FileNode
from tests.servers_grpc import GrpcServerProcess

HOLDER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=8, subdir=True)
txn = env.begin(write=True)  # holds LMDB's write lock until we are told to let go
print("held", flush=True)
sys.stdin.readline()
txn.abort()
env.close()
print("released", flush=True)
"""


async def test_stat_and_get_answer_while_a_put_waits_for_another_process_write_lock(tmp_path: Path) -> None:
    server = GrpcServerProcess(tmp_path, "embedded").start()
    blobs = GRPCBlobService(server.url, timeout=20.0, retries=0)
    dirs = GRPCDirectoryService(server.url, timeout=20.0, retries=0)
    holder: subprocess.Popen[str] | None = None
    try:
        stored = await blobs.put(b"stored before the lock was taken")
        directory = Directory({b"f": FileNode(stored, 32)})
        root = await dirs.put(directory)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(server.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        data = b"waits for the lock " * 1000
        put = asyncio.create_task(blobs.put(data))
        # Keep calling while the Put arrives and waits: each call must be answered (a stalled
        # event loop would leave it hanging until its deadline and raise).
        for _ in range(40):
            assert await blobs.has(stored)
            assert await dirs.get(root) == directory
            assert not await blobs.has(blake3_digest(data))
            assert not put.done(), put
            await asyncio.sleep(0.05)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert await put == blake3_digest(data)
        assert await blobs.read_bytes(blake3_digest(data)) == data
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        await blobs.close()
        await dirs.close()
        server.stop()
