"""Import and export the interpreter's standard library tree: castore against restic, b3sum, cp and git.

Usage: ``python benches/import_bench.py [--quick] [--tree DIR] [--runs N] [--git] [--tmpfs DIR]``

Each run measures every row once, peers in the same run, with a warm page cache (one
untimed pass reads the files first); stores are fresh, in a temporary directory:

* import: ``castore import`` (the CLI end to end, start-up included) into the embedded
  default, then the same tree again (everything present; its import cache, fresh in each
  run, lets it skip unchanged files), and again with ``--rehash`` (every file read, all
  present), then into fresh stores with ``compression: fast`` and ``none`` (stored sizes beside them);
  ``restic backup`` into a fresh
  repository; ``b3sum`` over the same files (hashing only: a floor, not a peer); with
  ``--git``, ``git add -A && git write-tree``.
* export, written to tmpfs (``--tmpfs``, default ``/dev/shm``, which takes the disk's noise
  out): ``castore export`` of the imported tree, ``cp -a`` of the original tree and
  ``restic restore`` of the snapshot.
* start-up: ``python -c pass``, ``castore ls`` and ``castore cat`` of a two-file tree
  (bytecode caching on, as in a normal installation; the config's parse cached, as after
  any earlier command), and ``castore ls`` right after each edit of the config (parsed anew).

The targets of issue 14 are printed under each table: import at least 2x faster than
restic and at least 30% of b3sum's throughput, the second import at least 60% of b3sum's,
export within 2x of ``cp -a`` and faster than ``restic restore``, ``ls``/``cat`` within 150 ms.
``--quick`` uses the ``email`` package instead of the whole tree.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _du(path: str) -> int:
    """Bytes the files below ``path`` occupy on disk."""
    return sum(os.lstat(os.path.join(top, n)).st_blocks * 512 for top, _d, names in os.walk(path) for n in names)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CASTORE_CONFIG", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], **kw: object) -> bytes:
    kw.setdefault("env", _env())
    out: bytes = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, **kw).stdout  # type: ignore[call-overload]
    return out


def _castore(cfg: str) -> list[str]:
    return [sys.executable, "-m", "castore_di.cli", "--config", cfg]


def _edit_config(cfg: str) -> None:
    """A new text for the config (a comment added): its parse is not cached yet."""
    with open(cfg, "a") as config_file:
        config_file.write(f"# edited {time.time_ns()}\n")


def _median_startup(cmd: list[str], n: int = 7, before_each: Callable[[], None] | None = None) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system) of ``n`` runs."""
    _run(cmd)  # writes the bytecode caches
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(n):
        if before_each is not None:
            before_each()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(_timed(lambda: _run(cmd)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return sorted(walls)[n // 2], sorted(cpus)[n // 2]


Row = tuple[str, "float | None", str]


def one_run(tree: str, files: list[str], tmp: str, shm: str, git: bool) -> tuple[list[Row], list[Row], list[Row]]:
    data = os.path.join(tmp, "castore-data")
    cfg = os.path.join(tmp, "castore.yaml")
    with open(cfg, "w") as f:
        f.write(f"blobservices:\n  default: {{type: embedded, path: '{data}'}}\n"
                f"directoryservices:\n  default: {{type: embedded, path: '{data}'}}\n")
    castore = _castore(cfg)
    # A fresh import cache per run: the first import reads everything, the second uses it.
    os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "xdg-cache")
    imports: list[Row] = []
    out: list[bytes] = []
    imports.append(("castore import (embedded)", _timed(lambda: out.append(
        _run([*castore, "import", "--json", "--no-progress", tree]))), ""))
    digest = json.loads(out[0])["digest"]
    imports.append(("castore import again (all present)", _timed(lambda: _run(
        [*castore, "import", "--no-progress", tree])), ""))
    imports.append(("castore import again --rehash (reads all)", _timed(lambda: _run(
        [*castore, "import", "--no-progress", "--rehash", tree])), ""))

    restic_env = {**_env(), "RESTIC_REPOSITORY": os.path.join(tmp, "restic"), "RESTIC_PASSWORD": "bench",
                  "RESTIC_CACHE_DIR": os.path.join(tmp, "restic-cache")}
    have_restic = shutil.which("restic") is not None
    if have_restic:
        _run(["restic", "init", "-q"], env=restic_env)
        imports.append(("restic backup", _timed(lambda: _run(["restic", "backup", "-q", tree], env=restic_env)), ""))
    else:
        imports.append(("restic backup", None, "restic not installed (apt-get install restic)"))
    for level in ("fast", "none"):  # the stored-size price of less compression work
        other_cfg = os.path.join(tmp, f"castore-{level}.yaml")
        other_data = os.path.join(tmp, f"castore-{level}")
        with open(other_cfg, "w") as f:
            f.write(f"blobservices:\n  default: {{type: embedded, path: '{other_data}', compression: {level}}}\n"
                    f"directoryservices:\n  default: {{type: embedded, path: '{other_data}'}}\n")
        other_env = {**_env(), "XDG_CACHE_HOME": os.path.join(tmp, f"xdg-cache-{level}")}  # a first import too
        other_secs = _timed(lambda: _run([*_castore(other_cfg), "import", "--no-progress", tree], env=other_env))
        imports.append((f"castore import (compression: {level})", other_secs,
                        f"stores {_du(other_data) / 1e6:.1f} MB against {_du(data) / 1e6:.1f} MB"))
        shutil.rmtree(other_data, ignore_errors=True)
    if shutil.which("b3sum"):
        lst = os.path.join(tmp, "files.txt")
        with open(lst, "wb") as f:
            f.write(b"\0".join(os.fsencode(p) for p in files))
        # xargs splits the list into a few b3sum invocations, as a user would.
        imports.append(("b3sum (hash only)", _timed(lambda: _run(["xargs", "-0", "-a", lst, "b3sum"])), ""))
    else:
        imports.append(("b3sum (hash only)", None, "b3sum not installed (apt-get install b3sum)"))
    if git:
        env = {**_env(), "GIT_DIR": os.path.join(tmp, "git"), "GIT_WORK_TREE": tree,
               "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
        _run(["git", "init", "-q"], env=env)
        imports.append(("git add -A && git write-tree", _timed(lambda: (
            _run(["git", "add", "-A", "--force"], env=env, cwd=tree), _run(["git", "write-tree"], env=env, cwd=tree))), ""))

    exports: list[Row] = []
    out_dir = tempfile.mkdtemp(prefix="export-bench-", dir=shm)
    try:
        exports.append(("castore export (to tmpfs)", _timed(lambda: _run(
            [*castore, "export", "--no-progress", digest, os.path.join(out_dir, "castore")])), ""))
        exports.append(("cp -a (to tmpfs)", _timed(lambda: _run(["cp", "-a", tree, os.path.join(out_dir, "cp")])), ""))
        if have_restic:
            exports.append(("restic restore (to tmpfs)", _timed(lambda: _run(
                ["restic", "restore", "-q", "latest", "--target", os.path.join(out_dir, "restic")], env=restic_env)), ""))
        else:
            exports.append(("restic restore (to tmpfs)", None, "restic not installed"))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    small = os.path.join(tmp, "small")
    os.makedirs(small)
    for name in ("a.txt", "b.txt"):
        with open(os.path.join(small, name), "w") as f:
            f.write(name * 10)
    root = json.loads(_run([*castore, "import", "--json", small]))["digest"]
    blob = json.loads(_run([*castore, "import", "--json", os.path.join(small, "a.txt")]))["digest"]
    startup: list[Row] = []
    for name, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                      ("castore ls (two-file tree)", [*castore, "ls", root]),
                      ("castore cat (small blob)", [*castore, "cat", blob])):
        wall, cpu = _median_startup(cmd)
        startup.append((name, wall, f"{cpu * 1000:.0f}"))
    wall, cpu = _median_startup([*castore, "ls", root], before_each=functools.partial(_edit_config, cfg))
    startup.append(("castore ls (config just edited)", wall, f"{cpu * 1000:.0f}"))
    return imports, exports, startup


def _print(title: str, rows: list[Row], base_name: str, nfiles: int, nbytes: int) -> dict[str, float]:
    times = {name: secs for name, secs, _ in rows if secs is not None}
    base = times.get(base_name, 1.0)
    print(f"\n{title:<44} {'seconds':>8} {'files/s':>9} {'MB/s':>7} {'vs castore':>10}")
    for name, secs, note in rows:
        if secs is None:
            print(f"{name:<44} {'-':>8} {'':>9} {'':>7} {'':>10}  {note}")
        else:
            print(f"{name:<44} {secs:>8.2f} {nfiles / secs:>9.0f} {nbytes / 1e6 / secs:>7.0f} {secs / base:>9.2f}x"
                  + (f"  {note}" if note else ""))
    return times


def _check(label: str, value: float | None, target: str, ok: bool | None) -> None:
    shown = "-" if value is None else f"{value:.2f}"
    verdict = "n/a" if ok is None else ("met" if ok else "NOT met")
    print(f"  {label:<52} {shown:>6}  (target {target}): {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="a small tree (the email package)")
    ap.add_argument("--tree", help="import this directory instead")
    ap.add_argument("--runs", type=int, default=1, help="measure everything this many times (default 1)")
    ap.add_argument("--git", action="store_true", help="add the git row (slow)")
    ap.add_argument("--tmpfs", default="/dev/shm", help="where exports are written (default /dev/shm)")
    args = ap.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    tree = os.path.abspath(args.tree or (os.path.join(stdlib, "email") if args.quick else stdlib))
    files, nbytes, ndirs = _tree_stats(tree)
    print(f"tree: {tree}\n  {len(files)} files, {ndirs} directories, {nbytes / 1e6:.1f} MB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    _warm(files)
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="import-bench-") as tmp:
            imports, exports, startup = one_run(tree, files, tmp, args.tmpfs, args.git)
        print(f"\n=== run {run} of {args.runs} (load average {os.getloadavg()[0]:.1f}) ===")
        t = _print("import", imports, "castore import (embedded)", len(files), nbytes)
        e = _print("export", exports, "castore export (to tmpfs)", len(files), nbytes)
        s = {name: secs for name, secs, _ in startup if secs is not None}
        print(f"\n{'start-up (median of 7)':<44} {'wall ms':>8} {'CPU ms':>8}")
        for name, secs, cpu in startup:
            print(f"{name:<44} {(secs or 0) * 1000:>8.0f} {cpu:>8}")
        imp, again = t.get("castore import (embedded)"), t.get("castore import again (all present)")
        restic, b3 = t.get("restic backup"), t.get("b3sum (hash only)")
        print("targets:")
        _check("import speed-up over restic backup", restic / imp if restic and imp else None, ">= 2",
               restic / imp >= 2 if restic and imp else None)
        _check("import throughput / b3sum's", b3 / imp if b3 and imp else None, ">= 0.30",
               b3 / imp >= 0.30 if b3 and imp else None)
        for level in ("fast", "none"):  # not the default: what less compression work would give
            other = t.get(f"castore import (compression: {level})")
            _check(f"import (compression: {level}) throughput / b3sum's", b3 / other if b3 and other else None,
                   ">= 0.30", b3 / other >= 0.30 if b3 and other else None)
        _check("import again throughput / b3sum's", b3 / again if b3 and again else None, ">= 0.60",
               b3 / again >= 0.60 if b3 and again else None)
        exp, cp, rr = e.get("castore export (to tmpfs)"), e.get("cp -a (to tmpfs)"), e.get("restic restore (to tmpfs)")
        _check("export time / cp -a time", exp / cp if exp and cp else None, "<= 2", exp / cp <= 2 if exp and cp else None)
        _check("export time / restic restore time", exp / rr if exp and rr else None, "< 1",
               exp / rr < 1 if exp and rr else None)
        for name in ("castore ls (two-file tree)", "castore cat (small blob)", "castore ls (config just edited)"):
            ms = s.get(name)
            _check(f"{name} ms", ms * 1000 if ms else None, "<= 150", ms * 1000 <= 150 if ms else None)


if __name__ == "__main__":
    main()
