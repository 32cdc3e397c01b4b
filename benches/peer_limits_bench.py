"""What a hostile client or a lying server can make castore hold: before/after tables.

Each measurement runs the same client against two source trees -- ``--base`` (e.g. a
worktree of main before the change: ``git worktree add --detach /tmp/base12 main``) and
this tree -- in the same run, servers as real ``castore serve`` processes on loopback:

* ``rss``: RSS of a memory server over 10 rounds of 24 Puts of 9 MiB cancelled before
  their end (raw grpcio, so the client is the same for both trees);
* ``idle``: 24 Put streams that send one 4 MiB message and stall: server RSS and the streams
  still open, sampled for 20 s (this tree with ``--idle-timeout 10``);
* ``lying``: peak RSS of ``castore export`` of a directory whose 5-byte file the server
  answers with 768 MiB (the lying server is this tree's servicer over a lying backend);
* ``stat``: Stat(send_chunks) latency of a 1 GiB blob on the memory server.

Usage: ``python benches/peer_limits_bench.py --base /tmp/base12 [--only rss,idle,lying,stat]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
MIB = 1 << 20
PUT = "/tvix.castore.v1.BlobService/Put"
STAT = "/tvix.castore.v1.BlobService/Stat"


def _ident(b: bytes) -> bytes:
    return b


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    """``castore serve`` with memory services from the source tree ``src``."""

    def __init__(self, src: Path, extra: tuple[str, ...] = (), argv: list[str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        config = Path(self.tmp.name) / "castore.json"
        config.write_text(json.dumps({"blobservices": {"default": {"type": "memory"}},
                                      "directoryservices": {"default": {"type": "memory"}}}))
        env = dict(os.environ, PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
        cmd = argv or [sys.executable, "-m", "castore_di.cli", "--config", str(config), "serve",
                       "--listen", "127.0.0.1:0", *extra]
        # cwd=src: ``python -m`` puts the working directory first on sys.path
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=src)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("castore serve: listening on "):
                self.address = line.split()[-1]
                break
        else:
            raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.tmp.cleanup()


class Feed:
    def __init__(self, channel: object, method: str = PUT) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        multi = channel.stream_unary(method, request_serializer=_ident, response_deserializer=_ident)  # type: ignore[attr-defined]
        self.call = multi(self._gen())

    async def _gen(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item


def chunk_msg(data: bytes) -> bytes:
    n, out = len(data), bytearray(b"\x0a")
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


async def _cancelled_round(address: str, round_no: int) -> None:
    import grpc.aio

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        feeds = [Feed(ch) for _ in range(24)]
        for i, feed in enumerate(feeds):
            for k in range(9):
                await feed.queue.put(chunk_msg(os.urandom(16) + bytes(MIB - 16 - 8) + (round_no * 1000 + i * 10 + k).to_bytes(8, "big")))
        await asyncio.sleep(1.0)  # let them arrive
        for feed in feeds:
            feed.call.cancel()
        await asyncio.sleep(0.2)


def bench_rss(src: Path) -> list[int]:
    server = Server(src)
    out = [rss(server.proc.pid)]
    try:
        for r in range(10):
            asyncio.run(_cancelled_round(server.address, r))
            time.sleep(0.5)
            out.append(rss(server.proc.pid))
    finally:
        server.stop()
    return out


async def _stall(address: str, pid: int, seconds: float) -> list[tuple[float, int, int]]:
    import grpc.aio

    samples: list[tuple[float, int, int]] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        feeds = [Feed(ch) for _ in range(24)]
        for i, feed in enumerate(feeds):
            await feed.queue.put(chunk_msg(os.urandom(4 * MIB - 1024 - 8) + i.to_bytes(8, "big")))
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            await asyncio.sleep(2.0)
            open_ = sum(not f.call.done() for f in feeds)
            samples.append((time.monotonic() - start, rss(pid), open_))
        codes = {}
        for f in feeds:
            if f.call.done():
                try:
                    await f.call
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1
        for f in feeds:
            f.call.cancel()
        print(f"    stream outcomes after {seconds:g} s: {codes or 'all still open'}")
    return samples


def bench_idle(src: Path, extra: tuple[str, ...]) -> list[tuple[float, int, int]]:
    server = Server(src, extra)
    try:
        return asyncio.run(_stall(server.address, server.proc.pid, 20.0))
    finally:
        server.stop()


LIE_SERVER = r'''
import asyncio, sys
from castore_di.blobservice.base import ChunkMeta, PositionedReader
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.nodes import Directory, FileNode
from castore_di.server import CastoreServer

LIE = 768 << 20

class Zeros(PositionedReader):
    async def read(self, n=-1):
        want = self._wanted(n); self._pos += want; return bytes(want)

class Lying(MemoryBlobService):
    async def chunks(self, digest):
        data = self._blobs.get(digest)
        return None if data is None else [ChunkMeta(digest, len(data))]
    async def open_read(self, digest):
        return Zeros(LIE) if digest in self._blobs else None

async def main():
    blobs, dirs = Lying(), MemoryDirectoryService()
    d = await blobs.put(b"12345")
    root = await dirs.put(Directory({b"f": FileNode(d, 5)}))
    server = CastoreServer(blobs, dirs)
    [addr] = await server.start(["127.0.0.1:0"])
    print(f"castore serve: listening on {addr} {root}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="source tree of the 'before' code")
    ap.add_argument("--only", default="rss,idle,lying,stat")
    args = ap.parse_args()
    only = set(args.only.split(","))
    trees = [("before", args.base), ("after", HERE)]
    print("(2 shared vCPUs, other jobs running: absolute numbers are noisy)\n")
    if "rss" in only:
        results = {name: bench_rss(src) for name, src in trees}
        print("RSS of the memory server (MiB), 10 rounds of 24 Puts of 9 MiB cancelled before the end")
        print("| round | " + " | ".join(n for n, _ in trees) + " |")
        print("|---|" + "---|" * len(trees))
        for r in range(11):
            print(f"| {r if r else 'start'} | " + " | ".join(f"{results[n][r] / MIB:.0f}" for n, _ in trees) + " |")
        print()
    if "idle" in only:
        print("24 Put streams, one 4 MiB message each, then stalled: (seconds, server RSS MiB, streams open)")
        for name, src in trees:
            extra = ("--idle-timeout", "10") if name == "after" else ()
            print(f"  {name} {' '.join(extra)}:")
            samples = bench_idle(src, extra)
            print("    " + "  ".join(f"{t:.0f}s:{r / MIB:.0f}MiB/{o}" for t, r, o in samples))
        print()
    if "lying" in only:
        print("peak RSS of castore export, server announces 5 bytes and sends 768 MiB")
        print("| tree | peak RSS MiB | exit | message |")
        print("|---|---|---|---|")
        for name, src in trees:
            peak, rc, msg = export_against_liar(src)
            print(f"| {name} | {peak / MIB:.0f} | {rc} | {msg[:110]} |")
        print()
    if "stat" in only:
        print("Stat(send_chunks) of a 1 GiB blob on the memory server, ms (20 calls)")
        print("| tree | median | min | max |")
        print("|---|---|---|---|")
        for name, src in trees:
            lat = stat_latency(src)
            print(f"| {name} | {statistics.median(lat):.2f} | {min(lat):.2f} | {max(lat):.2f} |")
        print()


def export_against_liar(src: Path) -> tuple[int, int, str]:
    """Peak RSS (ru_maxrss), exit code and last stderr line of one export."""
    env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1")
    liar = subprocess.Popen([sys.executable, "-c", LIE_SERVER], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=HERE)
    try:
        assert liar.stdout is not None
        words = liar.stdout.readline().split()
        address, root = words[-2], words[-1]
        url = "grpc+http://" + address
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "castore_di.cli", "--blob-service-addr", url,
                   "--directory-service-addr", url, "export", root, str(Path(tmp) / "out")]
            err = Path(tmp) / "stderr"
            with open(err, "w") as errf:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                                        env=dict(os.environ, PYTHONPATH=str(src)), cwd=src)
                _pid, status, usage = os.wait4(proc.pid, 0)
            lines = err.read_text().strip().splitlines()
            return usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), lines[-1] if lines else ""
    finally:
        liar.terminate()
        liar.wait()


def stat_latency(src: Path) -> list[float]:
    server = Server(src)
    try:
        return asyncio.run(_stat(server.address))
    finally:
        server.stop()


async def _stat(address: str) -> list[float]:
    import grpc.aio

    sys.path.insert(0, str(HERE))
    from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as pb

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        feed = Feed(ch)
        import blake3

        hasher = blake3.blake3()
        block = os.urandom(MIB)
        for i in range(1024):
            piece = block[:-8] + i.to_bytes(8, "big")
            hasher.update(piece)
            await feed.queue.put(chunk_msg(piece))
        await feed.queue.put(None)
        digest = pb.PutBlobResponse.FromString(await feed.call).digest
        assert digest == hasher.digest()
        stat = ch.unary_unary(STAT, request_serializer=_ident, response_deserializer=_ident)
        request = pb.StatBlobRequest(digest=digest, send_chunks=True).SerializeToString()
        out = []
        for _ in range(20):
            t = time.perf_counter()
            await stat(request)
            out.append((time.perf_counter() - t) * 1000)
        return out


if __name__ == "__main__":
    main()
