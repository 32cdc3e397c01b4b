"""The importer and exporter through the API, on memory services in one process."""

from __future__ import annotations

import os
import pathlib
import socket
import sysconfig

import pytest

from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import IntegrityError, StorageError, UnsupportedFileTypeError, ValidationError
from castore_di.exporter import export_directory, export_file, export_node
from castore_di.importer import SMALL_FILE, ImportStats, ingest_path
from castore_di.nodes import Directory, DirectoryNode, FileNode, SymlinkNode
from castore_di.proto import castore_pb2
from tests.treecmp import assert_same_tree, make_sample_tree

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture
def services() -> tuple[MemoryBlobService, MemoryDirectoryService]:
    return MemoryBlobService(), MemoryDirectoryService()


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_sample_tree_round_trip(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    name, node = await ingest_path(blob, dirs, src)
    assert name == b"src" and type(node) is DirectoryNode
    root = await dirs.get(node.digest)
    assert root is not None
    assert root[b"hello.txt"] == FileNode(blake3_digest(b"Hello World"), 11, False)
    assert root[b"dangling"] == SymlinkNode(b"/nonexistent/absolute")
    sub = await dirs.get(root[b"sub"].digest)  # type: ignore[union-attr]
    assert sub is not None and sub[b"run.sh"].executable  # type: ignore[union-attr]
    assert sub[b"dirlink"] == SymlinkNode(b"deeper")  # a symlink to a directory is not followed
    # Same bytes under two names are stored once.
    assert sum(1 for d in blob._blobs if d == blake3_digest(b"Hello World")) == 1

    out = tmp_path / "out"
    stats = await export_node(blob, dirs, node, out)
    assert stats.files == 5 and stats.symlinks == 3
    assert assert_same_tree(str(src), str(out)) == 5
    assert not [p for p in out.rglob(".castore-tmp-*")]


async def test_stdlib_round_trip(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    _name, node = await ingest_path(blob, dirs, STDLIB)
    await export_node(blob, dirs, node, tmp_path / "out")
    assert assert_same_tree(STDLIB, str(tmp_path / "out")) > 1000


async def test_import_twice_stores_nothing_new(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    for i in range(40):  # enough small files for the presence heuristic to matter
        (src / f"f{i}").write_bytes(os.urandom(100))
    _, first = await ingest_path(blob, dirs, src)
    blobs_before, dirs_before = dict(blob._blobs), dict(dirs._dirs)

    stats = ImportStats()
    _, second = await ingest_path(blob, dirs, src, stats=stats)
    assert second == first
    assert blob._blobs == blobs_before and dirs._dirs == dirs_before


async def test_import_twice_uploads_nothing(tmp_path: pathlib.Path) -> None:
    """A counting service: the second import of a tree sends no blob writes at all."""

    class Counting(MemoryBlobService):
        writes = 0

        def open_write(self):  # type: ignore[no-untyped-def]
            Counting.writes += 1
            return super().open_write()

    blob, dirs = Counting(), MemoryDirectoryService()
    src = tmp_path / "src"
    make_sample_tree(str(src))
    await ingest_path(blob, dirs, src)
    Counting.writes = 0
    await ingest_path(blob, dirs, src)
    assert Counting.writes == 0


async def test_root_symlink_is_not_followed(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to("d")
    name, node = await ingest_path(blob, dirs, tmp_path / "l")
    assert (name, node) == (b"l", SymlinkNode(b"d"))
    assert not blob._blobs and not dirs._dirs


async def test_root_file_uploads_no_directory(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    f = tmp_path / "tool"
    f.write_bytes(b"x" * (SMALL_FILE + 5))
    f.chmod(0o744)
    name, node = await ingest_path(blob, dirs, f)
    assert name == b"tool"
    assert node == FileNode(blake3_digest(b"x" * (SMALL_FILE + 5)), SMALL_FILE + 5, True)
    assert not dirs._dirs
    out = tmp_path / "copy"
    await export_node(blob, dirs, node, out)
    assert out.read_bytes() == f.read_bytes() and os.stat(out).st_mode & 0o100


async def test_only_owner_exec_bit_counts(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    f = tmp_path / "f"
    f.write_bytes(b"x")
    f.chmod(0o655)  # group/other exec only
    _, node = await ingest_path(blob, dirs, f)
    assert node == FileNode(blake3_digest(b"x"), 1, False)


async def test_fifo_is_refused_with_its_path(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    (tmp_path / "src" / "a").mkdir(parents=True)
    fifo = tmp_path / "src" / "a" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedFileTypeError, match=f"{fifo}: fifo"):
        await ingest_path(blob, dirs, tmp_path / "src")
    with pytest.raises(UnsupportedFileTypeError, match="fifo"):
        await ingest_path(blob, dirs, fifo)
    assert not dirs._dirs


async def test_socket_is_refused(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    path = tmp_path / "s"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        with pytest.raises(UnsupportedFileTypeError, match=f"{path}: socket"):
            await ingest_path(blob, dirs, tmp_path)
    finally:
        sock.close()


async def test_missing_path(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    with pytest.raises(StorageError, match="unable to stat"):
        await ingest_path(*services, tmp_path / "nope")


# --- export refusals ----------------------------------------------------------------------


def _raw_directory(entries: list[tuple[bytes, bytes, int]]) -> bytes:
    """A Directory message with arbitrary (unvalidated) file names."""
    msg = castore_pb2.Directory()
    for name, digest, size in entries:
        msg.files.add(name=name, digest=digest, size=size)
    return msg.SerializeToString(deterministic=True)


@pytest.mark.parametrize("hostile", [b"..", b"../escape", b"a/b", b"/abs", b".", b""])
async def test_hostile_names_from_backend_are_refused(
    tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService], hostile: bytes
) -> None:
    blob, dirs = services
    data = b"payload"
    digest = await blob.put(data)
    raw = _raw_directory([(hostile, digest, len(data))])
    dirs._dirs[blake3_digest(raw)] = raw  # written behind the API
    before = _listing(tmp_path)
    with pytest.raises(ValidationError):
        await export_directory(blob, dirs, blake3_digest(raw), tmp_path / "dest" / "out")
    assert _listing(tmp_path) == before


async def test_hostile_child_below_valid_root_is_refused(
    tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blob, dirs = services
    digest = await blob.put(b"x")
    raw = _raw_directory([(b"../../evil", digest, 1)])
    child = blake3_digest(raw)
    dirs._dirs[child] = raw
    root = Directory({b"ok": FileNode(digest, 1), b"sub": DirectoryNode(child, 1)})
    await dirs.put(root)
    dest = tmp_path / "dest"
    with pytest.raises(ValidationError):
        await export_directory(blob, dirs, root.digest, dest)
    assert not dest.exists() and not (tmp_path / "evil").exists()


async def test_unvalidated_directory_objects_are_refused(
    tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    """Defense in depth: a backend handing out Directory objects that skipped validation."""
    blob, _ = services
    digest = await blob.put(b"evil")
    hostile = Directory.__new__(Directory)
    hostile._entries = ((b"../evil", FileNode(digest, 4)),)
    hostile._index = dict(hostile._entries)
    hostile._size = 1
    hostile._encoded = None
    hostile._digest = None

    class Hostile(MemoryDirectoryService):
        async def get(self, d):  # type: ignore[no-untyped-def]
            return hostile

        def get_recursive(self, root):  # type: ignore[no-untyped-def]
            async def gen():  # type: ignore[no-untyped-def]
                yield hostile

            return gen()

    dest = tmp_path / "dest"
    with pytest.raises(ValidationError, match="refusing to export"):
        await export_directory(blob, Hostile(), hostile.digest, dest)
    assert not (tmp_path / "evil").exists()
    assert _listing(dest) == []


async def test_corrupted_blob_is_refused_and_leaves_no_file(
    tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]
) -> None:
    blob, dirs = services
    good = await blob.put(b"good bytes")
    bad = await blob.put(b"original")
    blob._blobs[bad] = b"tampered"  # same length, wrong bytes
    root = Directory({b"a-good": FileNode(good, 10), b"z-bad": FileNode(bad, 8)})
    await dirs.put(root)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError):
        await export_directory(blob, dirs, root.digest, dest, concurrency=1)
    assert not (dest / "z-bad").exists()
    assert not list(dest.glob(".castore-tmp-*"))


async def test_wrong_size_in_node_is_refused(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    digest = await blob.put(b"12345")
    root = Directory({b"f": FileNode(digest, 4)})
    await dirs.put(root)
    with pytest.raises(IntegrityError, match="4"):
        await export_directory(blob, dirs, root.digest, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


async def test_missing_blob(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    root = Directory({b"f": FileNode(blake3_digest(b"absent"), 6)})
    await dirs.put(root)
    with pytest.raises(StorageError, match="not found"):
        await export_directory(blob, dirs, root.digest, tmp_path / "dest")


async def test_non_empty_destination_is_refused(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    _, node = await ingest_path(blob, dirs, src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_bytes(b"mine")
    with pytest.raises(StorageError, match="not empty"):
        await export_node(blob, dirs, node, dest)
    assert _listing(dest) == ["keep.txt"]
    # Merging writes into it and keeps unrelated files.
    await export_node(blob, dirs, node, dest, merge=True)
    assert (dest / "keep.txt").read_bytes() == b"mine"
    assert (dest / "hello.txt").read_bytes() == b"Hello World"
    # Merging twice replaces files in place.
    await export_node(blob, dirs, node, dest, merge=True)


async def test_destination_that_is_a_file_or_symlink(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    root = Directory({b"f": FileNode(await blob.put(b"x"), 1)})
    await dirs.put(root)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a directory"):
        await export_directory(blob, dirs, root.digest, tmp_path / "file")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to("elsewhere")
    with pytest.raises(StorageError, match="not a directory"):
        await export_directory(blob, dirs, root.digest, tmp_path / "link")
    assert list((tmp_path / "elsewhere").iterdir()) == []


async def test_merge_never_follows_a_planted_symlink(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, dirs = services
    inner = Directory({b"payload": FileNode(await blob.put(b"x"), 1)})
    root = Directory({b"sub": inner.as_node(), b"file": FileNode(await blob.put(b"y"), 1)})
    await dirs.put_closure([inner, root])
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)  # a directory name that points elsewhere
    with pytest.raises(StorageError):
        await export_directory(blob, dirs, root.digest, dest, merge=True)
    assert list(outside.iterdir()) == []


async def test_export_file_refuses_existing_destination(tmp_path: pathlib.Path, services: tuple[MemoryBlobService, MemoryDirectoryService]) -> None:
    blob, _ = services
    node = FileNode(await blob.put(b"content"), 7, True)
    dest = tmp_path / "f"
    await export_file(blob, node, dest)
    assert dest.read_bytes() == b"content" and os.stat(dest).st_mode & 0o100
    with pytest.raises(StorageError, match="exists"):
        await export_file(blob, node, dest)
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    dest.unlink()
    dest.symlink_to(target)
    await export_file(blob, node, dest, replace=True)  # replaces the link, never writes through it
    assert target.read_bytes() == b"keep" and dest.read_bytes() == b"content" and not dest.is_symlink()
