"""Reading through ``castore mount`` versus ``castore cat`` and the original files.

Usage: ``python benches/mount_bench.py [--size-mib 1024] [--tree DIR]``

Into a fresh embedded store (a temporary data directory) it imports a directory holding one
random file of ``--size-mib`` MiB and the ``--tree`` directory (default: the interpreter's
standard library), then measures, each once:

* sequential read of the large file (1 MiB reads): the original file (warm page cache),
  ``castore cat`` (the CLI, start-up included, to /dev/null), and a fresh ``castore mount``
  (cold: the mount's first read of every chunk);
* walking the tree (``os.walk``, the work of ``find``) and reading every file: the original
  (warm) and a fresh mount (cold: every directory and blob is fetched on first use).

The table gives seconds, MB/s and each time relative to the original. Needs FUSE.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

BLOCK = 1 << 20


def _read_file(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                return n
            n += len(block)


def _walk_and_read(root: str) -> tuple[int, int]:
    files = total = 0
    for top, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                total += _read_file(path)
                files += 1
    return files, total


def _castore(env: dict[str, str], *args: str, stdout: int | None = subprocess.PIPE) -> str:
    out = subprocess.run([sys.executable, "-m", "castore_di.cli", *args], env=env, check=True, stdout=stdout, text=True)
    return out.stdout or ""


def _mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class _Mount:
    def __init__(self, env: dict[str, str], digest: str, mountpoint: str) -> None:
        os.makedirs(mountpoint, exist_ok=True)
        self.path = mountpoint
        self.proc = subprocess.Popen([sys.executable, "-m", "castore_di.cli", "mount", digest, mountpoint], env=env)
        while not _mounted(mountpoint):
            if self.proc.poll() is not None:
                raise SystemExit(f"castore mount exited with {self.proc.returncode}")
            time.sleep(0.05)

    def __enter__(self) -> "_Mount":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--tree", default=sysconfig.get_paths()["stdlib"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="castore-mount-bench-") as tmp:
        env = dict(os.environ, XDG_DATA_HOME=os.path.join(tmp, "data"), HOME=tmp)
        env.pop("CASTORE_CONFIG", None)
        big_dir = os.path.join(tmp, "big")
        os.makedirs(big_dir)
        big = os.path.join(big_dir, "big.bin")
        with open(big, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(BLOCK))
        size = os.path.getsize(big)
        big_digest = _castore(env, "import", big_dir).split()[2]
        tree_digest = _castore(env, "import", args.tree).split()[2]

        rows: list[tuple[str, str, float, int]] = []
        _read_file(big)  # warm the page cache for the original
        rows.append(("sequential read", "original file", _timed(lambda: _read_file(big)), size))
        rows.append(("sequential read", "castore cat",
                     _timed(lambda: _castore(env, "cat", big_digest, "big.bin", stdout=subprocess.DEVNULL)), size))
        with _Mount(env, big_digest, os.path.join(tmp, "mnt-big")) as m:
            path = os.path.join(m.path, "big.bin")
            rows.append(("sequential read", "castore mount", _timed(lambda: _read_file(path)), size))

        files, total = _walk_and_read(args.tree)  # warm
        rows.append(("walk + read tree", "original tree", _timed(lambda: _walk_and_read(args.tree)), total))
        with _Mount(env, tree_digest, os.path.join(tmp, "mnt-tree")) as m:
            got: list[tuple[int, int]] = []
            rows.append(("walk + read tree", "castore mount", _timed(lambda: got.append(_walk_and_read(m.path))), total))
            assert got[0] == (files, total), (got, files, total)

    print(f"large file: {size / 2**20:.0f} MiB; tree: {args.tree} ({files} files, {total / 2**20:.1f} MiB)")
    print(f"{'case':18} {'reader':15} {'seconds':>8} {'MB/s':>8} {'x original':>10}")
    base: dict[str, float] = {}
    for case, who, secs, nbytes in rows:
        base.setdefault(case, secs)
        print(f"{case:18} {who:15} {secs:8.2f} {nbytes / secs / 1e6:8.1f} {secs / base[case]:10.1f}")


if __name__ == "__main__":
    main()
