"""Stat latency of one client while another Puts 1 GiB into ``castore serve`` (embedded store).

``castore serve`` runs on a fresh embedded data directory with ``durability: full`` (an fsync
per commit). Client A (its own process) Puts SIZE bytes of random data in one blob; client B
(its own process) calls Stat on a stored blob in a loop for as long as the Put runs, then
reports the latency percentiles. The same client B also runs against the idle server, so the
table shows what the Put adds; a third row repeats the Put while another process also writes
to the data directory, holding LMDB's write lock for ``--hold`` ms per transaction (every
commit of the server then waits for that lock). Target: p99 during the Put below 50 ms.

The rule this measures (README, Development): nothing that can block on disk, locks or the
network runs on the event loop; LMDB commits and fsyncs go through the environment's writer
thread, so a Stat (an LMDB read, µs) never waits for another client's commit.

Usage: ``python benches/stat_latency.py [--size MiB] [--idle-seconds S]``. The server and
the clients import ``castore_di`` from ``PYTHONPATH``, so the same script measures any
checkout (``PYTHONPATH=/path/to/other/checkout python benches/stat_latency.py``).
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
from pathlib import Path

MIB = 1 << 20


# -- client processes ------------------------------------------------------------------------


async def _put(url: str, size: int) -> None:
    from castore_di import blob_service_from_addr

    service = blob_service_from_addr(url)
    block = os.urandom(MIB)
    start = time.perf_counter()
    writer = service.open_write()
    for i in range(size // MIB):
        await writer.write(block[i % 7 :] + block[: i % 7])  # distinct chunks, no dedup
    digest = await writer.close()
    elapsed = time.perf_counter() - start
    await service.close()
    print(json.dumps({"put_seconds": elapsed, "digest": digest.hex()}), flush=True)


async def _stat_loop(url: str, digest_hex: str, stop_file: str, seconds: float) -> None:
    from castore_di import B3Digest, blob_service_from_addr

    service = blob_service_from_addr(url)
    digest = B3Digest.from_hex(digest_hex)
    latencies: list[float] = []
    start = time.perf_counter()
    print("ready", flush=True)
    while True:
        t0 = time.perf_counter()
        assert await service.has(digest)
        latencies.append(time.perf_counter() - t0)
        if os.path.exists(stop_file) or (seconds and time.perf_counter() - start > seconds):
            break
    await service.close()
    print(json.dumps({"latencies": latencies}), flush=True)


def _other_writer(path: str, hold: float, stop_file: str) -> None:
    """Another process writing to the same environment: each transaction holds the lock ``hold`` s."""
    import lmdb

    env = lmdb.open(path, map_size=1 << 40, max_dbs=8, subdir=True)
    db = env.open_db(b"bench-other-writer")
    print("ready", flush=True)
    while not os.path.exists(stop_file):
        with env.begin(write=True, db=db) as txn:
            txn.put(os.urandom(16), os.urandom(4096))
            time.sleep(hold)
        time.sleep(hold / 4)
    env.close()


# -- orchestration --------------------------------------------------------------------------


def _start_server(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    config = workdir / "castore.yaml"
    data = workdir / "data"
    config.write_text(
        f"blobservices:\n  default: {{type: embedded, path: '{data}', durability: full}}\n"
        f"directoryservices:\n  default: {{type: embedded, path: '{data}', durability: full}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "castore_di.cli", "--config", str(config), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,  # not the caller's directory: ``-m`` would import castore_di from there first
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on " in line:
            return proc, "grpc+http://" + line.split("listening on ", 1)[1].strip()
    raise RuntimeError("castore serve did not start")


def _client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=3600)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"client failed ({proc.returncode}): {out[-2000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def _stats(latencies: list[float]) -> tuple[int, float, float, float]:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return len(ms), statistics.median(ms), p99, ms[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MiB to Put (default 1024)")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--hold", type=float, default=50.0, help="ms the other writer holds the lock")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stat-latency-") as tmp:
        workdir = Path(tmp)
        server, url = _start_server(workdir)
        try:
            seed = _client("put", url, str(MIB))  # a 1 MiB blob to Stat
            target = str(_result(seed)["digest"])
            rows = []
            idle = _client("stat", url, target, str(workdir / "never"), str(args.idle_seconds))
            rows.append(("idle server (no Put)", _stats(_result(idle)["latencies"]), None))  # type: ignore[arg-type]
            for other in (False, True):
                stop = workdir / f"stop-{other}"
                writer = None
                if other:
                    writer = _client("other", str(workdir / "data"), str(args.hold / 1000), str(stop))
                    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
                stat = _client("stat", url, target, str(stop), "0")
                assert stat.stdout is not None and stat.stdout.readline().strip() == "ready"
                put = _client("put", url, str(args.size * MIB))
                put_result = _result(put)
                stop.touch()
                name = f"{args.size} MiB Put" + (f" + {args.hold:g} ms txns" if other else "")
                rows.append((name, _stats(_result(stat)["latencies"]), put_result))  # type: ignore[arg-type]
                if writer is not None:
                    writer.wait(timeout=60)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"castore_di from {__import__('castore_di').__file__} (server and clients)")
    print(f"{'Stat latency during':<30} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  Put")
    for name, (n, p50, p99, worst), put_info in rows:
        extra = ""
        if put_info is not None:
            seconds = float(put_info["put_seconds"])  # type: ignore[arg-type]
            extra = f"{seconds:.1f} s ({args.size / seconds:.0f} MiB/s)"
        print(f"{name:<30} {n:>7} {p50:>8.2f} {p99:>8.2f} {worst:>8.1f}  {extra}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "put":
        asyncio.run(_put(sys.argv[2], int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "other":
        _other_writer(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "stat":
        asyncio.run(_stat_loop(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
    else:
        main()
