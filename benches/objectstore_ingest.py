"""One large file into the objectstore blob service on the local filesystem.

Measures, in one run over the same (page-cache warm) file of random data:

* ``b3sum``: the hashing limit (the BLAKE3 CLI, multi-threaded);
* ``blake3`` (Python, one thread, 1 MiB reads): the hash the writer computes;
* ``pyfastcdc`` alone: the chunking limit (FastCDC 2020 with the service's sizes);
* ``zstd -3`` alone over the chunks (what storing a chunk costs on random data);
* plain file writes of the same chunks (write + rename, Python): the disk's floor;
* ``objectstore`` ingest (cut, hash, compress, write chunk files and the index);
* ``objectstore`` again into the same store (every chunk deduplicated);
* ``objectstore`` ingest into ``memory://`` (no disk: the service's own work, which the
  issue's target compares with pyfastcdc + zstd alone: at least 0.7 of its throughput).

Usage: ``python benches/objectstore_ingest.py [--size 1G] [--quick] [--avg 262144]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from castore_di.blobservice.objectstore import ObjectStoreBlobService  # noqa: E402

READ = 1 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_b3sum(path: Path) -> None:
    subprocess.run(["b3sum", "--no-names", str(path)], check=True, stdout=subprocess.DEVNULL)


def run_blake3(path: Path) -> None:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(READ):
            h.update(block)


def run_fastcdc(path: Path, avg: int) -> None:
    from pyfastcdc import FastCDC

    for _chunk in FastCDC(avg, min_size=avg // 2, max_size=avg * 2).cut_file(str(path)):
        pass


def run_zstd(path: Path, avg: int) -> None:
    import zstandard
    from pyfastcdc import FastCDC

    cctx = zstandard.ZstdCompressor(level=3)
    for chunk in FastCDC(avg, min_size=avg // 2, max_size=avg * 2).cut_file(str(path)):
        cctx.compress(chunk.data)


def run_plain_writes(path: Path, out: Path, avg: int) -> None:
    from pyfastcdc import FastCDC

    for i, chunk in enumerate(FastCDC(avg, min_size=avg // 2, max_size=avg * 2).cut_file(str(path))):
        shard = out / f"{i % 256:02x}"
        shard.mkdir(parents=True, exist_ok=True)
        tmp = shard / f"{i}.tmp"
        with open(tmp, "wb") as f:
            f.write(chunk.data)
        os.rename(tmp, shard / str(i))


async def ingest(path: Path, store: Path | str, avg: int) -> str:
    url = store if isinstance(store, str) else f"file://{store}"
    service = ObjectStoreBlobService(url, avg_chunk_size=avg)
    writer = service.open_write()
    with open(path, "rb") as f:
        while block := f.read(READ):
            await writer.write(block)
    digest = await writer.close()
    return digest.hex()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="file size (e.g. 1G, 64M); default 1G")
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of --size")
    parser.add_argument("--avg", type=int, default=262144, help="avg_chunk_size (default 262144)")
    parser.add_argument("--dir", default=None, help="where to put the file and the store (default: a temp dir)")
    args = parser.parse_args()
    size = 64 << 20 if args.quick else parse_size(args.size)

    if shutil.which("b3sum") is None:
        sys.exit("b3sum is needed (apt-get install b3sum)")
    work = Path(tempfile.mkdtemp(prefix="castore-bench-", dir=args.dir))
    try:
        data = work / "data.bin"
        print(f"generating {size / 2**20:.0f} MiB of random data in {work} ...", flush=True)
        make_file(data, size)
        warm(data)
        rows: list[tuple[str, float]] = []
        rows.append(("b3sum (CLI, all threads)", timed(lambda: run_b3sum(data))))
        rows.append(("blake3 (Python, 1 thread)", timed(lambda: run_blake3(data))))
        rows.append(("pyfastcdc alone", timed(lambda: run_fastcdc(data, args.avg))))
        rows.append(("pyfastcdc + zstd -3 alone", timed(lambda: run_zstd(data, args.avg))))
        rows.append(("plain file writes (floor)", timed(lambda: run_plain_writes(data, work / "plain", args.avg))))
        shutil.rmtree(work / "plain")
        store = work / "store"
        digests: list[str] = []
        rows.append(("objectstore ingest (file://)", timed(lambda: digests.append(asyncio.run(ingest(data, store, args.avg))))))
        rows.append(("objectstore re-ingest (dedup)", timed(lambda: digests.append(asyncio.run(ingest(data, store, args.avg))))))
        rows.append(("objectstore ingest (memory://)",
                     timed(lambda: digests.append(asyncio.run(ingest(data, "memory:///", args.avg))))))
        assert digests[0] == digests[1] == digests[2]
        stored = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        objects = sum(1 for p in store.rglob("*") if p.is_file())

        ours = rows[5][1]
        b3 = rows[0][1]
        print()
        print(f"{size / 2**20:.0f} MiB random data, avg_chunk_size {args.avg}; store: {objects} objects, "
              f"{stored / 2**20:.1f} MiB on disk")
        print(f"{'what':32} {'seconds':>8} {'MB/s':>9} {'vs b3sum':>9} {'vs ingest':>10}")
        for name, secs in rows:
            print(f"{name:32} {secs:8.2f} {size / secs / 1e6:9.0f} {secs / b3:8.1f}x {ours / secs:9.2f}x")
        print("\n'vs b3sum' = time / b3sum time; 'vs ingest' = how many times faster than objectstore ingest.")
        cdc_zstd, memory = rows[3][1], rows[-1][1]
        print(f"memory:// ingest at {cdc_zstd / memory:.2f}x the throughput of pyfastcdc + zstd alone (target >= 0.70)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
