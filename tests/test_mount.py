"""``castore mount`` for real: /dev/fuse, libfuse3 and pyfuse3 (scripts/setup-test-servers)."""

from __future__ import annotations

import asyncio
import bisect
import os
import pathlib
import random
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from castore_di.composition import load_container
from castore_di.digests import B3Digest
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode, FileNode
from tests.cases_embedded import EmbeddedBlobBackdoor
from tests.treecmp import assert_same_tree, make_sample_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
STDLIB = sysconfig.get_paths()["stdlib"]


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not installed (scripts/setup-test-servers installs it): {e}"
    return None


needs_fuse = pytest.mark.skipif(_fuse_missing() is not None, reason=str(_fuse_missing()))


def _mounted(path: pathlib.Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("CASTORE_CONFIG", None)
    return env


def _castore(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "castore_di.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


class MountProcess:
    """``castore mount`` in a subprocess; waits until the mountpoint is mounted."""

    def __init__(self, env: dict[str, str], args: list[str], mountpoint: pathlib.Path) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen([sys.executable, "-m", "castore_di.cli", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _mounted(mountpoint):
            if self.proc.poll() is not None:
                raise AssertionError(f"castore mount exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("castore mount did not mount within 60 s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@needs_fuse
@pytest.mark.slow
def test_mounted_stdlib_equals_the_original(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    imported = _castore(env, "import", STDLIB)
    assert imported.returncode == 0, imported.stderr
    digest = imported.stdout.split()[2]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = MountProcess(env, ["mount", digest, str(mnt)], mnt)
    try:
        assert assert_same_tree(STDLIB, str(mnt)) > 500
        assert os.statvfs(mnt).f_namemax == 255
        with pytest.raises(OSError):
            (mnt / "os.py").write_text("no")  # read-only
    finally:
        code, err = mount.stop(signal.SIGINT)
    assert code == 0 and err == "" and not _mounted(mnt)


@needs_fuse
def test_mount_of_a_remote_castore_serve(tmp_path: pathlib.Path, grpc_memory_server_fresh: Any) -> None:
    url = grpc_memory_server_fresh.url
    env = _env(tmp_path)
    src = tmp_path / "src"
    make_sample_tree(str(src))
    addrs = ["--blob-service-addr", url, "--directory-service-addr", url]
    imported = _castore(env, *addrs, "import", str(src))
    assert imported.returncode == 0, imported.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = MountProcess(env, [*addrs, "mount", imported.stdout.split()[2], str(mnt)], mnt)
    try:
        assert_same_tree(str(src), str(mnt))
        assert os.readlink(mnt / "sub" / "link") == "../hello.txt"
        assert os.stat(mnt / "sub" / "run.sh").st_mode & 0o111 and not os.stat(mnt / "hello.txt").st_mode & 0o111
        inode = os.stat(mnt / "sub" / "deeper" / "dup.txt").st_ino
        assert os.stat(mnt / "sub" / "deeper" / "dup.txt").st_ino == inode  # stable
        for _ in range(2):  # the second answer comes from the kernel's negative cache
            assert not (mnt / "sub" / "nope").exists()
    finally:
        code, err = mount.stop(signal.SIGTERM)
    assert code == 0 and err == "" and not _mounted(mnt)


def test_no_fuse_is_one_line_naming_what_to_install(tmp_path: pathlib.Path) -> None:
    # A pyfuse3 whose extension cannot load, as when libfuse3 is absent.
    fake = tmp_path / "site" / "pyfuse3"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libfuse3.so.3: cannot open shared object file')\n")
    env = _env(tmp_path)
    env["PYTHONPATH"] = f"{fake.parent}{os.pathsep}{ROOT}"
    (tmp_path / "mnt").mkdir()
    result = _castore(env, "mount", "0" * 64, str(tmp_path / "mnt"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "libfuse3" in result.stderr and "apt-get install fuse3" in result.stderr


# -- in-process mount: the reads' chunk fetches are observable ------------------------------


class ThreadMount:
    """``mount_tree`` on its own event loop in a thread (this process reads through the kernel)."""

    def __init__(self, config: dict[str, Any], root: B3Digest, mountpoint: pathlib.Path) -> None:
        from castore_di.mount import mount_tree

        self.ops: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        ready = threading.Event()

        async def run() -> None:
            container = load_container(config)
            self.loop = asyncio.get_running_loop()

            def on_ready(ops: Any) -> None:
                self.ops = ops
                ready.set()

            try:
                await mount_tree(container.blob_service("default"), container.directory_service("default"), root,
                                 mountpoint, ready=on_ready, handle_signals=False)
            finally:
                await container.aclose()

        def main() -> None:
            try:
                asyncio.run(run())
            except BaseException as e:
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(60)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        from castore_di.mount import terminate_from_thread

        assert self.loop is not None
        terminate_from_thread(self.loop)
        self.thread.join(60)
        assert not self.thread.is_alive() and self.error is None


def _config(path: pathlib.Path) -> dict[str, Any]:
    return {
        "blobservices": {"default": {"type": "embedded", "path": str(path), "avg_chunk_size": 65536}},
        "directoryservices": {"default": {"type": "embedded", "path": str(path)}},
    }


@pytest.fixture
def big_tree(tmp_path: pathlib.Path) -> Iterator[tuple[dict[str, Any], B3Digest, pathlib.Path, bytes, FileNode, list[Any]]]:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(7).randbytes(16 << 20)
    (src / "big.bin").write_bytes(data)
    config = _config(tmp_path / "store")

    async def load() -> tuple[DirectoryNode, FileNode, list[Any]]:
        container = load_container(config)
        try:
            blob = container.blob_service("default")
            _name, node = await ingest_path(blob, container.directory_service("default"), src)
            assert type(node) is DirectoryNode
            directory = await container.directory_service("default").get(node.digest)
            assert directory is not None
            file = directory[b"big.bin"]
            assert type(file) is FileNode
            chunks = await blob.chunks(file.digest)
            assert chunks
            return node, file, chunks
        finally:
            await container.aclose()

    node, file, chunks = asyncio.run(load())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield config, node.digest, mnt, data, file, chunks


@needs_fuse
def test_random_reads_fetch_only_the_chunks_they_need(big_tree: Any) -> None:
    config, root, mnt, data, file, chunks = big_tree
    mount = ThreadMount(config, root, mnt)
    try:
        offsets = [0]
        for c in chunks:
            offsets.append(offsets[-1] + c.size)
        rng = random.Random(1)
        allowed: set[B3Digest] = set()
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for _ in range(8):
                start = rng.randrange(len(data) - 5000)
                assert os.pread(fd, 5000, start) == data[start : start + 5000]
                # the kernel reads whole pages and may round a request up to 128 KiB
                lo, hi = max(0, start - (128 << 10)), min(len(data), start + 5000 + (128 << 10))
                first = bisect.bisect_right(offsets, lo) - 1
                last = bisect.bisect_right(offsets, hi - 1) - 1
                allowed.update(c.digest for c in chunks[first : last + 1])
        finally:
            os.close(fd)
        fetched = set(mount.ops.fetched)
        assert fetched and fetched <= allowed, (len(fetched), len(allowed))
        assert len(fetched) < len(chunks) // 4  # 8 reads of a 16 MiB file in ~250 chunks
    finally:
        mount.stop()
    assert not _mounted(mnt)


@needs_fuse
def test_corrupted_chunk_reads_as_eio(big_tree: Any) -> None:
    config, root, mnt, data, file, chunks = big_tree

    async def corrupt() -> None:
        container = load_container(config)
        try:
            await EmbeddedBlobBackdoor(container.blob_service("default")).corrupt(file.digest)  # the last chunk
        finally:
            await container.aclose()

    asyncio.run(corrupt())
    mount = ThreadMount(config, root, mnt)
    try:
        with open(mnt / "big.bin", "rb") as f:
            assert f.read(1000) == data[:1000]  # intact chunks still read
            f.seek(len(data) - chunks[-1].size)
            with pytest.raises(OSError) as info:
                f.read(100)
            assert info.value.errno == 5  # EIO
    finally:
        mount.stop()


async def test_a_stale_readiness_event_wakes_no_one() -> None:
    """The session reader stays registered between requests, so an event selected before a
    task read its request can run after that task waits again: it must not wake the task
    (whose blocking read would stop the loop) unless a request is there."""
    compat = pytest.importorskip("pyfuse3.asyncio")
    from castore_di import mount

    r, w = os.pipe()
    try:
        waiter = asyncio.ensure_future(mount._wait_readable(r))
        await asyncio.sleep(0)  # registered and waiting; the pipe is empty
        assert r in mount._watched
        mount._readable(r)  # a stale event
        await asyncio.sleep(0)
        assert not waiter.done()
        os.write(w, b"x")
        await asyncio.wait_for(waiter, 5)  # a real one wakes it
        assert not compat._read_futures.get(r)
    finally:
        mount._forget(r)
        os.close(r)
        os.close(w)
    assert r not in mount._watched
