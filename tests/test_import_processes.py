"""The importer's worker processes (``workers="processes"``): the same result, errors and
safety as its reader threads, nothing left running, bounded work in flight."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from castore_di import _importworker
from castore_di._prepare import EmbeddedPreparer
from castore_di.blobservice.embedded import EmbeddedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.embedded import EmbeddedDirectoryService
from castore_di.errors import StorageError, UnsupportedFileTypeError
from castore_di.exporter import export_node
from castore_di.importer import SMALL_FILE, ImportStats, ingest_path
from castore_di.nodes import DirectoryNode
from tests.cases_embedded import fsck
from tests.slow_preparer import SlowPreparer


def _children() -> set[int]:
    """Process ids whose parent is this process."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                found.add(int(entry))
    return found


def _tree(root: Path, n: int = 300, seed: int = 1) -> dict[str, bytes]:
    """Small files in a few directories (some empty, some executable, some cut into chunks),
    two large ones (one read whole by a worker) and a symlink."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(n):
        rel = f"d{i % 4}/e{i % 3}/f{i}"
        size = rng.choice([0, 1, 100, 3000, 40_000, 300_001]) + i
        files[rel] = rng.randbytes(size // 2) + bytes(size - size // 2)
    files["big/whole"] = rng.randbytes(SMALL_FILE + 5)
    files["big/larger"] = rng.randbytes(3 * SMALL_FILE)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.chmod(root / "d1/e1/f1", 0o755)
    (root / "d0" / "link").symlink_to("e0")
    return files


class _Stores:
    def __init__(self, path: Path, blob_type: type[EmbeddedBlobService] = EmbeddedBlobService) -> None:
        self.path = str(path)
        self.blob = blob_type(self.path)
        self.dirs = EmbeddedDirectoryService(self.path)

    async def close(self) -> None:
        await self.blob.close()
        await self.dirs.close()


class _SlowBlobService(EmbeddedBlobService):
    def preparer(self) -> SlowPreparer:
        return SlowPreparer(self.avg_chunk_size, self.compression)


class _Committed:
    """Progress that checks each file reported done is committed; ``hook`` runs after the walk."""

    def __init__(self, blob: EmbeddedBlobService, hook: Callable[[], None] | None = None) -> None:
        self._blob = blob
        self._hook = hook
        self.sizes: list[int] = []

    def start(self, files: int, nbytes: int) -> None:
        if self._hook is not None:
            self._hook()

    def advance(self, nbytes: int) -> None:
        self.sizes.append(nbytes)


async def test_processes_store_what_threads_store(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src")
    results: dict[str, tuple[Any, ImportStats]] = {}
    before = _children()
    for workers in ("threads", "processes"):
        stores = _Stores(tmp_path / workers)
        stats = ImportStats()
        _name, node = await ingest_path(stores.blob, stores.dirs, tmp_path / "src", stats=stats, workers=workers)
        results[workers] = (node, stats)
        assert _children() <= before  # the workers are gone
        assert fsck(stores.path).problems == []
        await export_node(stores.blob, stores.dirs, node, tmp_path / f"out-{workers}")
        for rel, data in files.items():
            assert (tmp_path / f"out-{workers}" / rel).read_bytes() == data
        assert os.access(tmp_path / f"out-{workers}" / "d1/e1/f1", os.X_OK)
        await stores.close()
    assert results["threads"][0] == results["processes"][0]
    assert results["threads"][1] == results["processes"][1]
    assert results["processes"][1].uploaded_files == len(files)  # all absent at first (present ones: none)


async def test_a_file_is_reported_only_once_committed(tmp_path: Path) -> None:
    files = _tree(tmp_path / "src", n=200)
    stores = _Stores(tmp_path / "store")
    by_size: dict[int, list[bytes]] = {}
    for data in files.values():
        by_size.setdefault(len(data), []).append(data)
    missing: list[int] = []

    class Check:
        def start(self, files: int, nbytes: int) -> None:
            pass

        def advance(self, nbytes: int) -> None:
            store = stores.blob._store()
            if not any(store.has_blob(blake3_digest(d)) for d in by_size[nbytes]):
                missing.append(nbytes)

    await ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=Check(), workers="processes")
    assert missing == []
    await stores.close()


async def test_a_reimport_encodes_only_what_is_absent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    stores = _Stores(tmp_path / "store")
    await ingest_path(stores.blob, stores.dirs, src, workers="processes")
    changed = ["d0/e0/f0", "d1/e1/f1", "d2/e2/f2", "new/a", "new/b"]
    for i, rel in enumerate(changed):
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_bytes(b"changed %d" % i * 1000)
    stats = ImportStats()
    _n, node = await ingest_path(stores.blob, stores.dirs, src, stats=stats, workers="processes")
    assert stats.files == len(files) + 2 and stats.uploaded_files == len(changed)
    fresh = _Stores(tmp_path / "fresh")
    _n, expected = await ingest_path(fresh.blob, fresh.dirs, src, workers="threads")
    assert node == expected
    assert fsck(stores.path).problems == []
    await stores.close()
    await fresh.close()


def _swap_file_for_fifo(src: Path) -> None:
    os.unlink(src / "d1/e2/f5")
    os.mkfifo(src / "d1/e2/f5")


def _remove_file(src: Path) -> None:
    os.unlink(src / "d2/e2/f14")


def _swap_dir_for_symlink(src: Path) -> None:
    os.rename(src / "d3", src / "elsewhere")
    os.symlink("elsewhere", src / "d3")


def _swap_dir_for_another(src: Path) -> None:
    shutil.copytree(src / "d3" / "e0", src / "copy")
    shutil.rmtree(src / "d3" / "e0")
    os.rename(src / "copy", src / "d3" / "e0")


@pytest.mark.parametrize(
    "change", [_swap_file_for_fifo, _remove_file, _swap_dir_for_symlink, _swap_dir_for_another], ids=lambda f: f.__name__
)
async def test_errors_are_the_thread_paths(tmp_path: Path, change: Callable[[Path], None]) -> None:
    """A change between the walk and the reads fails both paths alike: same type and message,
    no link followed, no worker left."""
    failures: dict[str, BaseException] = {}
    before = _children()
    for workers in ("threads", "processes"):
        src = tmp_path / workers / "src"
        src.mkdir(parents=True)
        _tree(src, n=120)
        stores = _Stores(tmp_path / workers / "store")
        progress = _Committed(stores.blob, lambda src=src: change(src))  # type: ignore[misc]
        with pytest.raises(StorageError) as info:
            await ingest_path(stores.blob, stores.dirs, src, progress=progress, workers=workers)
        failures[workers] = info.value
        assert _children() <= before
        await stores.close()
    threads, processes = failures["threads"], failures["processes"]
    assert type(threads) is type(processes)
    assert str(threads).replace("/threads/", "/x/") == str(processes).replace("/processes/", "/x/")
    if isinstance(threads, UnsupportedFileTypeError):
        assert isinstance(processes, UnsupportedFileTypeError)
        assert processes.path.endswith("d1/e2/f5") and processes.file_type == "fifo"


def test_unsupported_file_type_error_pickles() -> None:
    e = pickle.loads(pickle.dumps(UnsupportedFileTypeError("/a/b", "fifo")))
    assert isinstance(e, UnsupportedFileTypeError) and (e.path, e.file_type) == ("/a/b", "fifo")
    assert str(e) == "unsupported file type at /a/b: fifo"


def test_a_worker_checks_a_file_read_again(tmp_path: Path) -> None:
    """The second read of a file (hashed first, found absent, then encoded) must hash as the
    first did."""
    (tmp_path / "f").write_bytes(b"now")
    st = os.stat(tmp_path)
    _importworker.init(str(tmp_path), st.st_dev, st.st_ino, EmbeddedPreparer(1 << 16, "auto"))
    done, grown = _importworker.run("encode", [], [(0, b"f", 3)], [blake3_digest(b"now")])
    assert grown == [] and done[0][1] == blake3_digest(b"now") and done[0][4] is not None
    with pytest.raises(StorageError, match=r"/f changed while it was imported"):
        _importworker.run("encode", [], [(0, b"f", 3)], [blake3_digest(b"before")])


async def test_cancelling_the_import_stops_the_workers(tmp_path: Path) -> None:
    _tree(tmp_path / "src", n=300)
    stores = _Stores(tmp_path / "store", _SlowBlobService)
    before = _children()
    started = asyncio.Event()

    class Started:
        def start(self, files: int, nbytes: int) -> None:
            pass

        def advance(self, nbytes: int) -> None:
            started.set()

    task = asyncio.ensure_future(
        ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=Started(), workers="processes")
    )
    await asyncio.wait_for(started.wait(), 60)
    assert _children() - before  # the workers run
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _children() <= before
    await stores.close()


async def test_a_worker_that_dies_fails_the_import(tmp_path: Path) -> None:
    _tree(tmp_path / "src", n=300)
    stores = _Stores(tmp_path / "store", _SlowBlobService)
    before = _children()

    class KillOne:
        def start(self, files: int, nbytes: int) -> None:
            pass

        def advance(self, nbytes: int) -> None:
            for pid in _children() - before:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # killed by an earlier call, reaped meanwhile
                    pass

    with pytest.raises(StorageError, match=r"an import worker process ended \(exit status -9\)"):
        await ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=KillOne(), workers="processes")
    assert _children() <= before
    assert fsck(stores.path).problems == []
    await stores.close()


def test_ctrl_c_leaves_no_worker(tmp_path: Path) -> None:
    """SIGINT to an importing process (as Ctrl-C sends): it stops, and so do its workers."""
    _tree(tmp_path / "src", n=300)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from castore_di.blobservice.embedded import EmbeddedBlobService
        from castore_di.directoryservice.embedded import EmbeddedDirectoryService
        from castore_di.importer import ingest_path
        from tests.slow_preparer import SlowPreparer

        class Slow(EmbeddedBlobService):
            def preparer(self):
                return SlowPreparer(self.avg_chunk_size, self.compression, 0.05)

        class Started:
            def start(self, files, nbytes):
                pass
            def advance(self, nbytes):
                print("started", flush=True)

        store = {str(tmp_path / "store")!r}
        asyncio.run(ingest_path(Slow(store), EmbeddedDirectoryService(store), {str(tmp_path / "src")!r},
                                progress=Started(), workers="processes"))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        workers = {
            int(e) for e in os.listdir("/proc")
            if e.isdigit() and _parent(int(e)) == proc.pid
        }
        assert workers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) != 0
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_service_without_a_preparer_uses_threads(tmp_path: Path) -> None:
    _tree(tmp_path / "src", n=40)
    before = _children()
    blob = MemoryBlobService()
    stores = _Stores(tmp_path / "store")
    _n, node = await ingest_path(blob, stores.dirs, tmp_path / "src", workers="processes")
    assert isinstance(node, DirectoryNode) and _children() <= before
    await stores.close()


async def test_auto_starts_workers_during_the_walk_of_a_large_first_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``workers="auto"`` on a machine with enough CPUs (lowered here, with the size that
    pays) starts the workers while the walk runs, for a first import; a re-import with a
    stat cache does not start them before it knows how much it must read."""
    from castore_di import importer
    from castore_di.importcache import ImportCache

    monkeypatch.setattr(importer, "AUTO_PROCESSES_MIN_CPUS", 1)
    monkeypatch.setattr(importer, "PROCESS_MIN_FILES", 50)
    _tree(tmp_path / "src", n=200)
    stores = _Stores(tmp_path / "store")
    before = _children()
    seen: list[set[int]] = []

    class AtStart:
        def start(self, files: int, nbytes: int) -> None:  # after the walk, before any read
            seen.append(_children() - before)

        def advance(self, nbytes: int) -> None:
            pass

    cache = ImportCache(directory=str(tmp_path / "cache"), racy_ns=0)
    _n, first = await ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=AtStart(), cache=cache,
                                  workers="auto")
    (tmp_path / "src" / "d0" / "new").write_bytes(b"new")
    _n, second = await ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=AtStart(), cache=cache,
                                   workers="auto")
    assert seen[0] and not seen[1]
    assert first != second and _children() <= before
    await stores.close()


async def test_the_library_starts_no_processes_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ingest_path`` without ``workers`` reads in threads even where ``"auto"`` would start
    processes (the ``castore`` command's default is ``auto``)."""
    from castore_di import importer

    monkeypatch.setattr(importer, "AUTO_PROCESSES_MIN_CPUS", 1)
    monkeypatch.setattr(importer, "PROCESS_MIN_FILES", 50)
    _tree(tmp_path / "src", n=200)
    stores = _Stores(tmp_path / "store")
    before = _children()
    seen: list[set[int]] = []

    class During:
        def start(self, files: int, nbytes: int) -> None:
            seen.append(_children() - before)

        def advance(self, nbytes: int) -> None:
            seen.append(_children() - before)

    await ingest_path(stores.blob, stores.dirs, tmp_path / "src", progress=During())
    assert seen and not any(seen)
    await stores.close()


def test_a_worker_message_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    """A message header announcing more than the limit is refused before any allocation;
    the limit is far above the largest answer (one whole file in a worker)."""
    import io
    import os
    import struct

    from castore_di import _importworker, importer
    from castore_di.errors import StorageError

    assert 2 * importer.WHOLE_IN_WORKER <= _importworker.MAX_MESSAGE
    r, w = os.pipe()
    _importworker.write_message(w, b"x" * 1000)
    os.write(w, struct.pack("<Q", 1 << 60))
    os.close(w)
    with io.FileIO(r, "rb", closefd=True) as f:
        assert _importworker.read_message(f, limit=1000) == b"x" * 1000
        with pytest.raises(StorageError, match="exceeds 1000"):
            _importworker.read_message(f, limit=1000)


@pytest.mark.parametrize("workers", ["auto", "processes"])
async def test_worker_processes_are_created_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    """fork/exec blocks: the walk's thread (``auto``, during the walk) or a worker thread
    (``processes``, after it) creates the processes, never the event loop's thread."""
    import threading

    from castore_di import importer

    monkeypatch.setattr(importer, "AUTO_PROCESSES_MIN_CPUS", 1)
    monkeypatch.setattr(importer, "PROCESS_MIN_FILES", 50)
    where: list[threading.Thread] = []
    real = importer._Worker.__init__

    def spy(self: Any, *args: Any) -> None:
        where.append(threading.current_thread())
        real(self, *args)

    monkeypatch.setattr(importer._Worker, "__init__", spy)
    _tree(tmp_path / "src", n=200)
    stores = _Stores(tmp_path / "store")
    before = _children()
    await ingest_path(stores.blob, stores.dirs, tmp_path / "src", workers=workers)  # type: ignore[arg-type]
    assert where and threading.current_thread() not in where
    assert _children() <= before
    await stores.close()
