"""Small files into the embedded default: files/s beside ``git hash-object`` and ``restic backup``.

Generates N random files of 1-16 KiB (100 per directory) in a temp dir, then stores each as a
blob in a fresh embedded store (built through the config path, as the CLI default), and runs
the peers on the same files:

* ``git hash-object -w --stdin-paths`` into a fresh repository (one loose object per file),
* ``restic backup`` into a fresh local repository (``RESTIC_PASSWORD`` is set here).

Every castore row includes opening and reading the files. Rows: the default (durability
``process``: a commit per blob, fsync every second and at close), ``durability: full`` (fsync
per blob; run on a tenth of the files), ``compression: none``, and blobs plus a directory per
folder (one closure, as an import does). Page cache is warm for every row (files are read once
before timing). Install the peers with ``apt-get install -y git restic``.

    python benches/small_files.py [--files N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any

from castore_di import load_container
from castore_di.nodes import Directory, DirectoryNode, FileNode


def make_files(root: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        d = os.path.join(root, f"d{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"f{i:06d}")
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.randint(1024, 16384)))
        paths.append(p)
    return paths


async def castore_blobs(paths: list[str], store: str, extra: dict[str, Any], with_dirs: bool = False) -> float:
    config = {
        "blobservices": {"default": {"type": "embedded", "path": store, **extra}},
        "directoryservices": {"default": {"type": "embedded", "path": store, **extra}},
    }
    container = load_container(config)
    blobs = container.blob_service("default")
    dirs = container.directory_service("default")
    t0 = time.perf_counter()
    entries: dict[str, dict[bytes, Any]] = {}
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        digest = await blobs.put(data)
        if with_dirs:
            parent, name = os.path.split(p)
            entries.setdefault(parent, {})[name.encode()] = FileNode(digest, len(data), False)
    if with_dirs:
        leaves = [Directory(e) for e in entries.values()]
        root = Directory({os.path.basename(k).encode(): d.as_node() for k, d in zip(entries, leaves)})
        assert all(isinstance(n, DirectoryNode) for _, n in root.items())
        await dirs.put_closure([*leaves, root])
    await container.aclose()  # includes the final fsync
    return time.perf_counter() - t0


def run_git(paths: list[str], tmp: str) -> float | None:
    if shutil.which("git") is None:
        return None
    repo = os.path.join(tmp, "git")
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["git", "init", "-q", repo], check=True)
    t0 = time.perf_counter()
    subprocess.run(
        ["git", "hash-object", "-w", "--stdin-paths"],
        input="\n".join(paths).encode(),
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def run_restic(files: str, tmp: str) -> float | None:
    if shutil.which("restic") is None:
        return None
    repo = os.path.join(tmp, "restic")
    shutil.rmtree(repo, ignore_errors=True)
    env = {**os.environ, "RESTIC_PASSWORD": "bench"}
    subprocess.run(["restic", "init", "-q", "-r", repo], env=env, check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    subprocess.run(["restic", "backup", "-q", "-r", repo, files], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def du(path: str) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            total += os.stat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true", help="2,000 files, one repetition")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the best is kept (shared machines are noisy)")
    args = ap.parse_args()
    repeat = 1 if args.quick else max(1, args.repeat)
    n = 2_000 if args.quick else args.files
    with tempfile.TemporaryDirectory(prefix="castore-bench-") as tmp:
        files = os.path.join(tmp, "files")
        paths = make_files(files, n)
        data_bytes = sum(os.path.getsize(p) for p in paths)
        for p in paths:  # warm the page cache for every contender alike
            with open(p, "rb") as f:
                f.read()
        rows: list[tuple[str, int, float | None, int | None]] = []

        def best(run: Any) -> float | None:
            times = [run(k) for k in range(repeat)]
            return None if None in times else min(times)

        def castore(label: str, extra: dict[str, Any], count: int = n, with_dirs: bool = False) -> None:
            stores = [os.path.join(tmp, f"store-{len(rows)}-{k}") for k in range(repeat)]
            secs = best(lambda k: asyncio.run(castore_blobs(paths[:count], stores[k], extra, with_dirs)))
            rows.append((label, count, secs, du(stores[0])))
            for store in stores:
                shutil.rmtree(store)

        asyncio.run(castore_blobs(paths[:200], os.path.join(tmp, "warmup"), {}))  # imports, first open
        castore("castore embedded (default)", {})
        castore("castore embedded, blobs + directories", {}, with_dirs=True)
        castore("castore embedded, compression: none", {"compression": "none"})
        castore("castore embedded, durability: full", {"durability": "full"}, count=max(1, n // 10))
        secs = best(lambda _k: run_git(paths, tmp))
        rows.append(("git hash-object -w --stdin-paths", n, secs, du(os.path.join(tmp, "git", ".git")) if secs else None))
        secs = best(lambda _k: run_restic(files, tmp))
        rows.append(("restic backup", n, secs, du(os.path.join(tmp, "restic")) if secs else None))

    base = n / rows[0][2]  # type: ignore[operator]
    restic = rows[-1][2]
    print(f"{n} files of 1-16 KiB, {data_bytes / 1e6:.1f} MB of data, {os.cpu_count()} CPUs, best of {repeat}")
    print(f"{'contender':42} {'files':>6} {'seconds':>8} {'files/s':>9} {'vs default':>10} {'vs restic':>9} {'disk/data':>9}")
    for label, count, secs, disk in rows:
        if secs is None:
            print(f"{label:42} {'(not installed)':>26}")
            continue
        rate = count / secs
        vs_restic = f"{rate / (n / restic):.2f}x" if restic else "-"
        space = f"{disk / (data_bytes * count / n):.2f}" if disk else "-"
        print(f"{label:42} {count:>6} {secs:>8.2f} {rate:>9.0f} {rate / base:>9.2f}x {vs_restic:>9} {space:>9}")


if __name__ == "__main__":
    main()
