"""Disk usage of the embedded store after an interrupted 1 GiB import, after gc, after gc --compact.

``castore import`` of one 1 GiB file of random bytes into a fresh embedded store is killed
(SIGKILL) once about 60% of the file is stored; then ``castore fsck --no-refs``, ``castore
gc`` and (this tree only) ``castore gc --compact`` run. Disk usage is the data file's
allocated blocks. With ``--base DIR`` the same steps run with that source tree first.

Usage: ``python benches/embedded_gc_bench.py [--base /tmp/base12] [--size-mib 1024]``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def disk(store: Path) -> int:
    try:
        return (store / "data.mdb").stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def castore(src: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
    env["PYTHONPATH"] = str(src)
    addr = f"embedded://{store}"
    return subprocess.run(
        [sys.executable, "-m", "castore_di.cli", "--blob-service-addr", addr, "--directory-service-addr", addr, *args],
        capture_output=True, text=True, env=env, cwd=src, timeout=1800,
    )


def run(src: Path, source_file: Path, size: int, compact: bool) -> list[tuple[str, int, str]]:
    rows: list[tuple[str, int, str]] = []
    with tempfile.TemporaryDirectory(dir=source_file.parent) as tmp:
        store = Path(tmp) / "store"
        env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
        env["PYTHONPATH"] = str(src)
        addr = f"embedded://{store}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "castore_di.cli", "--blob-service-addr", addr, "--directory-service-addr", addr,
             "import", "--no-progress", str(source_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=src,
        )
        while disk(store) < size * 0.6 and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows.append(("after the killed import", disk(store), ""))
        fsck = castore(src, store, "fsck", "--no-refs")
        note = next((line.strip() for line in fsck.stdout.splitlines() if "note:" in line), "")
        rows.append(("fsck", disk(store), note))
        gc = castore(src, store, "gc")
        rows.append(("after gc", disk(store), gc.stdout.strip().splitlines()[-1] if gc.stdout.strip() else gc.stderr))
        if compact:
            c = castore(src, store, "gc", "--compact")
            rows.append(("after gc --compact", disk(store), (c.stdout.strip().splitlines() or [c.stderr])[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="source tree of the 'before' code")
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        source = Path(tmp) / "big.bin"
        with open(source, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        print("(2 shared vCPUs, other jobs running)\n")
        print(f"embedded store, {args.size_mib} MiB import killed at ~60%: data.mdb on disk")
        print("| tree | step | MiB on disk | output |")
        print("|---|---|---|---|")
        trees = ([("before", args.base)] if args.base else []) + [("after", HERE)]
        for name, src in trees:
            for step, used, text in run(src, source, size, compact=name == "after"):
                print(f"| {name} | {step} | {used / MIB:.0f} | {text[:120]} |")


if __name__ == "__main__":
    main()
