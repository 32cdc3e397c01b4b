"""The floor of a first import's work in plain Python on this machine, beside b3sum and castore.

A minimal pipeline that does only what any import into an embedded (LMDB) store must do, and
nothing of castore's safety or bookkeeping (no descriptor-relative opens, no identity checks,
no chunking, no directory records, no import cache, no leases, no presence checks):

1. walk the tree (``os.walk`` + ``lstat``) in the parent;
2. in ``--processes`` worker processes (``concurrent.futures``, spawned), per batch of files
   (up to 256 files or 8 MiB): read each file whole, hash it with BLAKE3 and compress it
   (the store's rule: zstd level 1, kept when it saves at least 1/8);
3. the parent writes each batch's ``(digest, value)`` pairs to LMDB in one write transaction
   (no sync per commit) and syncs once at the end (``parent commits``); or each worker
   commits its own batches to the same environment (``workers commit``); or the same work
   runs in ``--processes`` + 1 threads of one process (``threads``: reading, BLAKE3 and zstd
   release the GIL).

Rows: ``b3sum`` (hash only, as ``benches/import_bench.py`` runs it), the pipeline with each
codec (``zstd-1``, the embedded store's default; ``lz4`` when the ``lz4`` package is
installed; ``none``) and ``castore import`` of the same tree (first import, the CLI end to
end), each ``--runs`` times, alternately. It answers one question: how close can any Python
implementation of this import get to issue 14's target of 30% of b3sum's throughput, on this
machine? Usage: ``python benches/import_floor.py [--runs 3] [--tree DIR] [--processes 2]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from typing import Any

import blake3
import lmdb
import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BATCH_FILES = 256
_BATCH_BYTES = 8 << 20

_compress: Callable[[bytes], bytes] | None = None
_env: Any = None


def _codec(name: str) -> Callable[[bytes], bytes] | None:
    if name == "zstd-1":
        return zstandard.ZstdCompressor(level=1).compress
    if name == "lz4":
        import lz4.block  # type: ignore[import-not-found]

        return lambda data: bytes(lz4.block.compress(data))
    return None


def _init(codec: str, db: str | None) -> None:
    global _compress, _env
    _compress = _codec(codec)
    _env = lmdb.open(db, map_size=1 << 36, sync=False, metasync=False) if db else None


def _encode(paths: list[str], compress: Callable[[bytes], bytes] | None) -> list[tuple[bytes, bytes]]:
    """Each file read whole, hashed, and compressed by the store's rule: ``(digest, value)``."""
    out: list[tuple[bytes, bytes]] = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            data = os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)
        value = b"\0" + data
        if compress is not None and len(data) >= 512:
            packed = compress(data)
            if len(packed) <= len(data) - (len(data) >> 3):
                value = b"\1" + packed
        out.append((blake3.blake3(data).digest(), value))
    return out


def _work(paths: list[str]) -> list[tuple[bytes, bytes]] | int:
    out = _encode(paths, _compress)
    if _env is not None:  # direct: commit here, answer with a count
        with _env.begin(write=True) as txn:
            txn.cursor().putmulti(out)
        return len(out)
    return out


def floor_import(tree: str, db: str, codec: str, processes: int, direct: bool, threads: bool = False) -> float:
    """Walk, then read/hash/compress in worker processes (or threads) and store in LMDB; wall
    seconds."""
    t0 = time.perf_counter()
    batches: list[list[str]] = []
    batch: list[str] = []
    nbytes = 0
    for top, _dirs, names in os.walk(tree):
        for n in names:
            p = os.path.join(top, n)
            st = os.lstat(p)
            if (st.st_mode & 0o170000) != 0o100000:
                continue
            batch.append(p)
            nbytes += st.st_size
            if len(batch) >= _BATCH_FILES or nbytes >= _BATCH_BYTES:
                batches.append(batch)
                batch, nbytes = [], 0
    if batch:
        batches.append(batch)
    env = lmdb.open(db, map_size=1 << 36, sync=False, metasync=False)
    if threads:  # os.read, blake3 and zstd release the GIL; one compressor per thread
        import threading

        local = threading.local()

        def work(paths: list[str]) -> list[tuple[bytes, bytes]]:
            if not hasattr(local, "codec"):
                local.codec = _codec(codec)
            return _encode(paths, local.codec)

        with concurrent.futures.ThreadPoolExecutor(processes + 1) as ex:
            for pairs in ex.map(work, batches):
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(pairs)
        env.sync(True)
        env.close()
        return time.perf_counter() - t0
    ctx = multiprocessing.get_context("spawn")  # our children: their CPU is counted
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init, initargs=(codec, db if direct else None)
    ) as pool:
        for result in pool.map(_work, batches):
            if not direct:
                assert isinstance(result, list)
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(result)
    env.sync(True)
    env.close()
    return time.perf_counter() - t0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def _castore_import(tree: str, tmp: str) -> float:
    data = os.path.join(tmp, "castore-data")
    cfg = os.path.join(tmp, "castore.yaml")
    with open(cfg, "w") as f:
        f.write(f"blobservices:\n  default: {{type: embedded, path: '{data}'}}\n"
                f"directoryservices:\n  default: {{type: embedded, path: '{data}'}}\n")
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "xdg"), "PYTHONPATH": ROOT}
    env.pop("CASTORE_CONFIG", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", cfg, "import", "--no-progress", tree],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    secs = time.perf_counter() - t0
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(os.path.join(tmp, "xdg"), ignore_errors=True)
    return secs


def _b3sum(files: list[str], tmp: str) -> float:
    lst = os.path.join(tmp, "files.txt")
    with open(lst, "wb") as f:
        f.write(b"\0".join(os.fsencode(p) for p in files))
    t0 = time.perf_counter()
    subprocess.run(["xargs", "-0", "-a", lst, "b3sum"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tree", help="directory to import (default: the interpreter's stdlib)")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    tree = os.path.abspath(args.tree or sysconfig.get_paths()["stdlib"])
    files = [os.path.join(top, n) for top, _d, names in os.walk(tree) for n in names
             if os.path.isfile(os.path.join(top, n)) and not os.path.islink(os.path.join(top, n))]
    total = sum(os.path.getsize(p) for p in files)
    for p in files:  # page cache warm
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    codecs = ["zstd-1", "none"]
    try:
        import lz4.block  # noqa: F401

        codecs.insert(1, "lz4")
    except ImportError:
        pass
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="castore-floor-") as tmp:
        plan: list[tuple[str, Callable[[], float]]] = []
        if shutil.which("b3sum"):
            plan.append(("b3sum (hash only)", lambda: _b3sum(files, tmp)))
        for codec in codecs:
            for mode in ("parent commits", "workers commit", "threads") if codec == "zstd-1" else ("parent commits",):
                name = f"floor: {codec}, {mode}"

                def one(codec: str = codec, mode: str = mode) -> float:
                    db = os.path.join(tmp, "floor-db")
                    os.makedirs(db)
                    try:
                        return floor_import(tree, db, codec, args.processes, mode == "workers commit",
                                            mode == "threads")
                    finally:
                        shutil.rmtree(db, ignore_errors=True)

                plan.append((name, one))
        plan.append(("castore import (CLI, first import)", lambda: _castore_import(tree, tmp)))
        for run in range(args.runs):
            for name, fn in plan:
                c0 = _children_cpu()
                secs = fn()
                rows.setdefault(name, []).append((secs, _children_cpu() - c0))
            print(f"run {run + 1}: " + ", ".join(f"{n.split(':')[0] if n.startswith('b3') else n} {v[-1][0]:.2f} s"
                                                  for n, v in rows.items()), flush=True)
    b3 = statistics.median(s for s, _c in rows["b3sum (hash only)"]) if "b3sum (hash only)" in rows else None
    print(f"\ntree: {tree}: {len(files)} files, {total / 1e6:.0f} MB; {args.processes} worker processes; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'what':44s} {'runs (wall s)':>22s} {'median':>7s} {'CPU s':>6s} {'b3sum/it':>9s}")
    for name, values in rows.items():
        med = statistics.median(s for s, _c in values)
        cpu = statistics.median(c for _s, c in values)
        ratio = f"{b3 / med:.2f}" if b3 else "-"
        print(f"{name:44s} {' '.join(f'{s:.2f}' for s, _c in values):>22s} {med:7.2f} {cpu:6.2f} {ratio:>9s}")
    if b3:
        print(f"\nissue 14's target: an import at >= 0.30 of b3sum's throughput, i.e. <= {b3 / 0.30:.2f} s here")


if __name__ == "__main__":
    main()
