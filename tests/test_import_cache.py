"""The import stat cache (castore_di/importcache.py) through ingest_path and the CLI.

Services are the real in-memory ones (the memory blob service's ``max_bytes`` evicts for
real). Files made by a test have a ``ctime`` of "now", which a program cannot set back,
so these tests use a cache with a 5 ms racy window and wait past it; the CLI test waits
past the default window (2 s).
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import StorageError
from castore_di.importcache import KEY, ImportCache
from castore_di.importer import ImportStats, ingest_path
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node
from tests.test_cli import Castore, _store_config

RACY_NS = 5_000_000


def _tree(root: pathlib.Path) -> pathlib.Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha" * 100)
    (root / "b.txt").write_bytes(b"bravo" * 100)
    (root / "sub" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "sub" / "deeper" / "c.bin").write_bytes(bytes(range(256)) * 9000)  # 2.3 MB: a large file
    (root / "sub" / "link").symlink_to("run.sh")
    (root / "empty").mkdir()
    return root


def _settle() -> None:
    """Let the racy window pass for files written just now."""
    time.sleep(RACY_NS / 1e9 * 4)


async def _import(blob: MemoryBlobService, dirs: MemoryDirectoryService, path: pathlib.Path,
                  cache: ImportCache | None, warnings: list[str] | None = None) -> tuple[Node, ImportStats]:
    stats = ImportStats()
    _name, node = await ingest_path(blob, dirs, path, stats=stats, cache=cache,
                                    warn=None if warnings is None else warnings.append)
    return node, stats


async def _full_digest(path: pathlib.Path) -> Node:
    """The root node of a plain import (no cache) into fresh stores."""
    _name, node = await ingest_path(MemoryBlobService(), MemoryDirectoryService(), path)
    return node


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> ImportCache:
    return ImportCache(str(tmp_path / "cache"), racy_ns=RACY_NS)


async def test_unchanged_tree_reuses_everything(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    first, s1 = await _import(blob, dirs, src, cache)
    assert s1.cached_files == 0 and s1.uploaded_files == 4
    assert os.path.exists(cache.path_for(str(src)))
    again, s2 = await _import(blob, dirs, src, cache)
    assert again == first == await _full_digest(src)
    assert (s2.cached_files, s2.uploaded_files, s2.files, s2.directories, s2.symlinks) == (4, 0, 4, 4, 1)
    assert s2.bytes == s1.bytes


async def test_other_directory_service_rebuilds_directories(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob = MemoryBlobService()
    first, _ = await _import(blob, MemoryDirectoryService(), src, cache)
    dirs = MemoryDirectoryService()  # holds nothing: the cached root cannot be vouched for
    again, stats = await _import(blob, dirs, src, cache)
    assert again == first and stats.cached_files == 4 and stats.uploaded_files == 0
    assert isinstance(again, DirectoryNode)
    assert [d async for d in dirs.get_recursive(again.digest)]  # the closure was put


async def test_changed_file_is_read_again(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    a = src / "a.txt"
    st = a.stat()
    a.write_bytes(b"ALPHA" * 100)  # same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _settle()
    node, stats = await _import(blob, dirs, src, cache)
    assert stats.cached_files == 3 and stats.uploaded_files == 1
    assert node == await _full_digest(src)
    root = await dirs.get(node.digest)  # type: ignore[union-attr]
    assert root is not None and root[b"a.txt"] == FileNode(blake3_digest(b"ALPHA" * 100), 500, False)


async def test_mtime_restored_is_still_seen_through_ctime(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    b = src / "b.txt"
    st = b.stat()
    b.write_bytes(b"BRAVO" * 100)  # same size, same inode, mtime set back: only ctime moves
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (b.stat().st_size, b.stat().st_mtime_ns, b.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    _settle()
    node, stats = await _import(blob, dirs, src, cache)
    assert stats.cached_files == 3 and stats.uploaded_files == 1
    assert node == await _full_digest(src)


async def test_racy_files_are_not_recorded(tmp_path: pathlib.Path) -> None:
    src = _tree(tmp_path / "src")
    # Everything was written within the racy window: it could change again in the same
    # timestamp tick after being read, so nothing may be trusted next time.
    cache = ImportCache(str(tmp_path / "cache"), racy_ns=3600 * 10**9)
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    state = cache.load(str(src))
    assert state.files == {} and state.tree == b""
    (src / "a.txt").write_bytes(b"ALPHA" * 100)  # same size, maybe the same mtime tick
    node, stats = await _import(blob, dirs, src, cache)
    assert stats.cached_files == 0 and stats.files == 4
    assert node == await _full_digest(src)


async def test_one_racy_file_keeps_the_others_but_not_the_tree(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    (src / "fresh.txt").write_bytes(b"just written")
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    state = cache.load(str(src))
    assert len(state.files) == 4 and state.tree == b""
    _settle()
    node, stats = await _import(blob, dirs, src, cache)
    assert stats.cached_files == 4 and stats.uploaded_files == 0 and stats.files == 5
    assert node == await _full_digest(src)
    assert cache.load(str(src)).tree != b""  # now old enough: the whole tree is recorded


async def test_blob_missing_from_the_store_is_read_again(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    (src / "b").write_bytes(b"b" * 100)
    _settle()
    blob, dirs = MemoryBlobService(max_bytes=250), MemoryDirectoryService()
    first, _ = await _import(blob, dirs, src, cache)
    await blob.put(b"c" * 100)  # evicts the least recently used of a's and b's blobs
    gone = [d for d in (blake3_digest(b"a" * 100), blake3_digest(b"b" * 100)) if not await blob.has(d)]
    assert len(gone) == 1
    again, stats = await _import(blob, dirs, src, cache)
    assert again == first
    assert stats.cached_files == 1 and stats.uploaded_files == 1
    assert await blob.has(gone[0])


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "version", "empty"])
async def test_unusable_cache_file_is_ignored_with_a_warning(
    tmp_path: pathlib.Path, cache: ImportCache, damage: str
) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    first, _ = await _import(blob, dirs, src, cache)
    path = pathlib.Path(cache.path_for(str(src)))
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":
        path.write_bytes(raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:])
    elif damage == "foreign":
        path.write_bytes(b'{"files": {}}\n' * 10)
    elif damage == "version":
        path.write_bytes(raw[:8] + (99).to_bytes(4, "little") + raw[12:])
    else:
        path.write_bytes(b"")
    warnings: list[str] = []
    again, stats = await _import(blob, dirs, src, cache, warnings)
    assert again == first and stats.cached_files == 0 and stats.files == 4
    assert len(warnings) == 1 and "ignoring import cache" in warnings[0], warnings
    # The import rewrote it: the next one uses it again, silently.
    warnings.clear()
    _third, stats = await _import(blob, dirs, src, cache, warnings)
    assert stats.cached_files == 4 and warnings == []


async def test_rehash_reads_every_file_and_rewrites(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    first, _ = await _import(blob, dirs, src, cache)
    rehash = ImportCache(cache.directory, racy_ns=RACY_NS, reuse=False)
    again, stats = await _import(blob, dirs, src, rehash)
    assert again == first and stats.cached_files == 0 and stats.files == 4
    assert cache.load(str(src)).tree != b""


async def test_cache_written_only_after_success(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"s" * 10)
    _settle()
    blob, dirs = MemoryBlobService(max_bytes=100), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    path = pathlib.Path(cache.path_for(str(src)))
    before = path.read_bytes()
    (src / "big").write_bytes(b"b" * 1000)  # more than the store takes: the import fails
    _settle()
    with pytest.raises(StorageError):
        await _import(blob, dirs, src, cache)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    other = tmp_path / "other"
    other.mkdir()
    (other / "big").write_bytes(b"b" * 1000)
    _settle()
    with pytest.raises(StorageError):
        await _import(blob, dirs, other, cache)
    assert not os.path.exists(cache.path_for(str(other)))


async def test_single_file_root(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    f = tmp_path / "one.bin"
    f.write_bytes(b"x" * 1000)
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    first, _ = await _import(blob, dirs, f, cache)
    again, stats = await _import(blob, dirs, f, cache)
    assert again == first == FileNode(blake3_digest(b"x" * 1000), 1000, False)
    assert stats.cached_files == 1 and stats.uploaded_files == 0


async def test_exclude_changes_the_tree_not_the_trust(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    await _import(blob, dirs, src, cache)
    stats = ImportStats()
    _n, node = await ingest_path(blob, dirs, src, stats=stats, cache=cache, exclude=["*.txt"])
    _n, want = await ingest_path(MemoryBlobService(), MemoryDirectoryService(), src, exclude=["*.txt"])
    assert node == want and stats.cached_files == 2 and stats.files == 2
    root = await dirs.get(node.digest)  # type: ignore[union-attr]
    assert isinstance(root, Directory) and b"a.txt" not in root


def test_cli_uses_the_cache_and_rehash_ignores_it(tmp_path: pathlib.Path) -> None:
    castore = Castore(_store_config(tmp_path))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100)
    (src / "b").write_bytes(b"b" * 100)
    time.sleep(2.1)  # past the default racy window (ctime cannot be set back)
    [first] = castore.json("import", "--json", str(src))
    cache = ImportCache()  # $XDG_CACHE_HOME is the test's own (tests/conftest.py)
    assert os.path.exists(cache.path_for(str(src)))
    # A cache that lies (b's metadata mapped to a's digest, which the store has) is
    # believed by a normal import: proof that the file is not read. --rehash reads it.
    st = (src / "b").stat()
    key_b = KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, 0)
    state = cache.load(str(src))
    entries = {**state.files, key_b: blake3_digest(b"a" * 100)}
    cache.save(str(src), b"", b"", 0, entries.items())
    [lied] = castore.json("import", "--json", str(src))
    assert lied["digest"] != first["digest"]
    [rehashed] = castore.json("import", "--json", "--rehash", str(src))
    assert rehashed["digest"] == first["digest"]
    [after] = castore.json("import", "--json", str(src))  # --rehash rewrote the cache
    assert after["digest"] == first["digest"]
    # --no-cache neither reads nor writes it.
    os.unlink(cache.path_for(str(src)))
    castore("import", "--no-cache", str(src))
    assert not os.path.exists(cache.path_for(str(src)))
    # A foreign cache file is a warning, not an error.
    os.makedirs(cache.directory, exist_ok=True)
    pathlib.Path(cache.path_for(str(src))).write_bytes(b"garbage")
    proc = castore("import", "--json", str(src))
    assert b"warning: ignoring import cache" in proc.stderr



async def test_directories_are_encoded_as_protobuf_does(tmp_path: pathlib.Path) -> None:
    """The importer writes Directory bytes by hand: each must equal protobuf's deterministic encoding."""
    src = tmp_path / "src"
    deep = src / "d"
    (deep / "nested" / "more").mkdir(parents=True)
    (src / "empty").mkdir()
    for size in (0, 1, 127, 128, 300, 16383, 16384, 70000):
        (src / f"size-{size}").write_bytes(b"x" * size)
    (src / ("long-" + "n" * 240)).write_bytes(b"long name")
    (src / "caf\u00e9 \U0001f600").write_bytes(b"utf-8 name")
    (src / "run").write_bytes(b"#!/bin/sh\n")
    (src / "run").chmod(0o755)
    (src / "link").symlink_to("t" * 300)
    (src / "short").symlink_to("x")
    for i in range(150):  # a directory size over one varint byte
        (deep / "nested" / f"f{i:03}").write_bytes(str(i).encode())
    (deep / "nested" / "more" / "z").write_bytes(b"z")
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    _name, node = await ingest_path(blob, dirs, src)
    assert isinstance(node, DirectoryNode)
    todo, seen = [node.digest], 0
    while todo:
        digest = todo.pop()
        d = await dirs.get(digest)
        assert d is not None
        rebuilt = Directory(list(d.items()))  # encoded by protobuf
        assert blake3_digest(rebuilt.to_proto().SerializeToString(deterministic=True)) == digest
        todo += [child.digest for _n, child in d.directories()]
        seen += 1
    assert seen == 5


async def test_garbage_collector_is_paused_only_while_importing(tmp_path: pathlib.Path, cache: ImportCache) -> None:
    import gc

    src = _tree(tmp_path / "src")
    seen: list[bool] = []

    class Probe:
        def start(self, files: int, nbytes: int) -> None:
            seen.append(gc.isenabled())

        def advance(self, nbytes: int) -> None:
            pass

    assert gc.isenabled()
    await ingest_path(MemoryBlobService(), MemoryDirectoryService(), src, progress=Probe())
    assert seen == [False] and gc.isenabled()
    with pytest.raises(StorageError):  # a failed import resumes it too
        await ingest_path(MemoryBlobService(max_bytes=10), MemoryDirectoryService(), src)
    assert gc.isenabled()
    gc.disable()
    try:  # and leaves it off when it was off
        await ingest_path(MemoryBlobService(), MemoryDirectoryService(), src)
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_cache_is_bounded(tmp_path: pathlib.Path, cache: ImportCache, monkeypatch: pytest.MonkeyPatch) -> None:
    import castore_di.importcache as importcache

    monkeypatch.setattr(importcache, "MAX_ENTRIES", 2)
    monkeypatch.setattr(importcache, "MAX_FILES", 2)
    src = _tree(tmp_path / "src")
    _settle()
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    first, _ = await _import(blob, dirs, src, cache)
    state = cache.load(str(src))
    assert len(state.files) == 2 and state.tree == b""  # a partial record never vouches for the tree
    again, stats = await _import(blob, dirs, src, cache)
    assert again == first and stats.cached_files == 2
    roots = []
    for i in range(3):
        r = tmp_path / f"r{i}"
        r.mkdir()
        (r / "f").write_bytes(str(i).encode())
        roots.append(r)
    _settle()
    for r in roots:
        await _import(blob, dirs, r, cache)
        time.sleep(0.01)  # distinct write times
    kept = sorted(p for p in os.listdir(cache.directory) if p.endswith(".cache"))
    assert kept == sorted(os.path.basename(cache.path_for(str(r))) for r in roots[1:])
