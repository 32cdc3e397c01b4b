"""Import the interpreter's standard library tree: ``castore import`` versus git, restic, b3sum.

Usage: ``python benches/import_bench.py [--quick] [--tree DIR]``

Every tool reads the same files with a warm page cache (one untimed pass reads them
first) and writes into a fresh store in a temporary directory:

* ``castore import`` (the CLI, end to end: interpreter start-up included) into the
  embedded default (``type: embedded`` in a fresh data dir), falling back to
  ``objectstore`` on ``file://`` when ``embedded`` is not registered (said in the output);
* ``git add -A && git write-tree`` in a fresh repository (``GIT_DIR`` outside the tree);
* ``restic backup`` into a fresh local repository;
* ``b3sum`` over the same files (hashing only: a floor, not a peer).

``--quick`` uses the ``email`` package instead of the whole tree. One run; the table gives
seconds, files/s, MB/s and each tool's time relative to castore.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable


def _tree_stats(root: str) -> tuple[list[str], int, int]:
    files: list[str] = []
    total = 0
    dirs = 0
    for top, dirnames, names in os.walk(root):
        dirs += len(dirnames)
        for n in names:
            p = os.path.join(top, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
                total += os.path.getsize(p)
    return files, total, dirs


def _warm(files: list[str]) -> None:
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="a small tree (the email package)")
    ap.add_argument("--tree", help="import this directory instead")
    args = ap.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    tree = args.tree or (os.path.join(stdlib, "email") if args.quick else stdlib)
    files, nbytes, ndirs = _tree_stats(tree)
    print(f"tree: {tree}\n  {len(files)} files, {ndirs} directories, {nbytes / 1e6:.1f} MB")
    _warm(files)

    from castore_di.composition import default_registry

    registry = default_registry()
    embedded = "embedded" in registry.tags("blobservices") and "embedded" in registry.tags("directoryservices")
    results: list[tuple[str, float | None, str]] = []
    with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
        data = os.path.join(tmp, "castore-data")
        cfg = os.path.join(tmp, "castore.yaml")
        if embedded:
            backend = "embedded default"
            text = (f"blobservices:\n  default: {{type: embedded, path: '{data}'}}\n"
                    f"directoryservices:\n  default: {{type: embedded, path: '{data}'}}\n")
        else:
            backend = "objectstore file:// (embedded not registered)"
            text = (f"blobservices:\n  default: 'objectstore+file://{data}/blobs'\n"
                    f"directoryservices:\n  default: 'objectstore+file://{data}/dirs'\n")
        with open(cfg, "w") as f:
            f.write(text)
        castore = [sys.executable, "-m", "castore_di.cli", "--config", cfg, "import", "--no-progress", tree]
        t = _timed(lambda: _run(castore))
        results.append((f"castore import ({backend})", t, ""))
        t2 = _timed(lambda: _run(castore))
        results.append(("castore import again (all present)", t2, ""))

        if shutil.which("git"):
            env = {**os.environ, "GIT_DIR": os.path.join(tmp, "git"), "GIT_WORK_TREE": tree,
                   "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
            _run(["git", "init", "-q"], env=env)
            t = _timed(lambda: (_run(["git", "add", "-A", "--force"], env=env, cwd=tree),
                                _run(["git", "write-tree"], env=env, cwd=tree)) and None)
            results.append(("git add -A && git write-tree", t, ""))
        else:
            results.append(("git add -A && git write-tree", None, "git not installed"))

        if shutil.which("restic"):
            env = {**os.environ, "RESTIC_REPOSITORY": os.path.join(tmp, "restic"), "RESTIC_PASSWORD": "bench",
                   "RESTIC_CACHE_DIR": os.path.join(tmp, "restic-cache")}
            _run(["restic", "init", "-q"], env=env)
            t = _timed(lambda: _run(["restic", "backup", "-q", tree], env=env))
            results.append(("restic backup", t, ""))
        else:
            results.append(("restic backup", None, "restic not installed (apt-get install restic)"))

        if shutil.which("b3sum"):
            lst = os.path.join(tmp, "files.txt")

            def b3() -> None:
                # xargs splits the list into a few b3sum invocations, as a user would.
                with open(lst, "wb") as f:
                    f.write(b"\0".join(os.fsencode(p) for p in files))
                _run(["xargs", "-0", "-a", lst, "b3sum"])

            results.append(("b3sum (hash only)", _timed(b3), ""))
        else:
            results.append(("b3sum (hash only)", None, "b3sum not installed (apt-get install b3sum)"))

    base = results[0][1] or 1.0
    print(f"\n{'tool':<58} {'seconds':>8} {'files/s':>9} {'MB/s':>7} {'vs castore':>10}")
    for name, secs, note in results:
        if secs is None:
            print(f"{name:<58} {'-':>8} {'':>9} {'':>7} {'':>10}  {note}")
            continue
        print(f"{name:<58} {secs:>8.2f} {len(files) / secs:>9.0f} {nbytes / 1e6 / secs:>7.0f} {secs / base:>9.2f}x")


if __name__ == "__main__":
    main()
