"""Tar in and out: the API on a real embedded store and the ``castore`` CLI in a subprocess."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import subprocess
import sys
import sysconfig
import tarfile
from typing import Any

import pytest
import zstandard

from castore_di.archive import ArchiveError, ingest_tar, write_tar
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import StorageError, UnsupportedFileTypeError
from castore_di.exporter import export_node
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode, FileNode, SymlinkNode
from tests.treecmp import assert_same_tree, make_sample_tree

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json")


@pytest.fixture
def services() -> tuple[MemoryBlobService, MemoryDirectoryService]:
    return MemoryBlobService(), MemoryDirectoryService()


def _tar_of(src: pathlib.Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.add(src, arcname=arcname)
    return buf.getvalue()


def _compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd"])
async def test_tar_import_matches_tree_import(tmp_path: pathlib.Path, services: Any, kind: str) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    _name, expected = await ingest_path(blob, dirs, src)
    archive = _compress(_tar_of(src, "src"), kind)
    node = await ingest_tar(blob, dirs, io.BytesIO(archive))
    assert node == expected
    out = tmp_path / "out"
    await export_node(blob, dirs, node, out)
    assert_same_tree(str(src), str(out))


async def test_stdlib_tar_matches_and_exports_deterministically(tmp_path: pathlib.Path, services: Any) -> None:
    blob, dirs = services
    _name, expected = await ingest_path(blob, dirs, STDLIB_JSON)
    assert type(expected) is DirectoryNode
    node = await ingest_tar(blob, dirs, io.BytesIO(_tar_of(pathlib.Path(STDLIB_JSON), "json")))
    assert node == expected
    first, second = io.BytesIO(), io.BytesIO()
    await write_tar(blob, dirs, node.digest, first, top="json")
    await write_tar(blob, dirs, node.digest, second, top="json")
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as t:
        members = t.getmembers()
    names = [m.name for m in members]
    assert names[0] == "json" and all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    # parents first, siblings sorted: a pre-order walk in name order
    assert names == _preorder(members)
    again = await ingest_tar(blob, dirs, io.BytesIO(first.getvalue()))
    assert again == node


def _preorder(members: list[tarfile.TarInfo]) -> list[str]:
    children: dict[str, list[str]] = {}
    for m in members[1:]:
        children.setdefault(m.name.rsplit("/", 1)[0], []).append(m.name)
    out: list[str] = []

    def visit(name: str) -> None:
        out.append(name)
        for child in sorted(children.get(name, []), key=lambda n: os.fsencode(n.rsplit("/", 1)[1])):
            visit(child)

    visit(members[0].name)
    return out


async def test_exported_tar_extracts_to_the_tree(tmp_path: pathlib.Path, services: Any) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    _name, node = await ingest_path(blob, dirs, src)
    buf = io.BytesIO()
    stats = await write_tar(blob, dirs, node.digest, buf, top="top")
    assert stats.files == 5 and stats.symlinks == 3
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        t.extractall(tmp_path / "x", filter="tar")
    assert_same_tree(str(src), str(tmp_path / "x" / "top"))


def _entries(*members: tuple[str, bytes, bytes | None, int]) -> bytes:
    """A tar of (name, type, data or link target, mode) in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = (payload or b"").decode()
                t.addfile(info)
            elif kind in (tarfile.REGTYPE,):
                info.size = len(payload or b"")
                t.addfile(info, io.BytesIO(payload or b""))
            else:
                t.addfile(info)
    return buf.getvalue()


async def test_paths_order_and_duplicates(services: Any) -> None:
    blob, dirs = services
    archive = _entries(
        ("./top/b/../a/x.sh", tarfile.REGTYPE, b"#!/bin/sh\n", 0o744),  # parents implicit, .. resolved
        ("top/link", tarfile.SYMTYPE, b"a/x.sh", 0o777),
        ("top/dup", tarfile.REGTYPE, b"old", 0o644),
        ("top/dup", tarfile.REGTYPE, b"new", 0o600),  # later entry replaces
        ("top/", tarfile.DIRTYPE, None, 0o755),  # the root may come last
        ("top/d", tarfile.DIRTYPE, None, 0o755),
        ("top/d/inner", tarfile.REGTYPE, b"i", 0o644),
        ("top/d", tarfile.DIRTYPE, None, 0o700),  # two directories merge
    )
    node = await ingest_tar(blob, dirs, io.BytesIO(archive))
    root = await dirs.get(node.digest)
    assert root is not None and sorted(root) == [b"a", b"d", b"dup", b"link"]  # b/.. vanished
    a = await dirs.get(root[b"a"].digest)  # type: ignore[union-attr]
    assert a is not None and type(a[b"x.sh"]) is FileNode and a[b"x.sh"].executable
    assert root[b"link"] == SymlinkNode(b"a/x.sh")
    assert await blob.read_bytes(root[b"dup"].digest) == b"new"  # type: ignore[union-attr]
    d = await dirs.get(root[b"d"].digest)  # type: ignore[union-attr]
    assert d is not None and list(d) == [b"inner"]


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        ((("/abs/x", tarfile.REGTYPE, b"x", 0o644),), ArchiveError, "absolute"),
        ((("top/../../x", tarfile.REGTYPE, b"x", 0o644),), ArchiveError, "leaves the archive"),
        ((("a/x", tarfile.REGTYPE, b"x", 0o644), ("b/y", tarfile.REGTYPE, b"y", 0o644)), ArchiveError, "top level"),
        ((("file", tarfile.REGTYPE, b"x", 0o644),), ArchiveError, "not a directory"),
        ((("top/l", tarfile.SYMTYPE, b"", 0o777),), ArchiveError, "without a target"),
        ((("top/x", tarfile.REGTYPE, b"x", 0o644), ("top/h", tarfile.LNKTYPE, b"top/x", 0o644)),
         UnsupportedFileTypeError, "hard link"),
        ((("top/f", tarfile.FIFOTYPE, None, 0o644),), UnsupportedFileTypeError, "fifo"),
    ],
)
async def test_refused_archives(services: Any, members: Any, error: type[Exception], match: str) -> None:
    blob, dirs = services
    with pytest.raises(error, match=match):
        await ingest_tar(blob, dirs, io.BytesIO(_entries(*members)))


async def test_truncated_and_garbage_archives(tmp_path: pathlib.Path, services: Any) -> None:
    blob, dirs = services
    src = tmp_path / "src"
    make_sample_tree(str(src))
    data = _tar_of(src, "src")
    with pytest.raises((StorageError, ArchiveError)):
        await ingest_tar(blob, dirs, io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ArchiveError):
        await ingest_tar(blob, dirs, io.BytesIO(b"this is not a tar archive at all" * 40))
    damaged = bytearray(gzip.compress(data))
    damaged[len(damaged) // 2] ^= 0xFF  # inside a stored (incompressible) block: only the CRC tells
    with pytest.raises(ArchiveError, match="decompress"):
        await ingest_tar(blob, dirs, io.BytesIO(bytes(damaged)))
    for kind in ("gzip", "zstd"):
        with pytest.raises(ArchiveError, match="truncated|decompress|cannot read"):
            await ingest_tar(blob, dirs, io.BytesIO(_compress(data, kind)[:200]))


def _castore(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "castore_di.cli", *args], env=env, input=stdin,
                          capture_output=True, timeout=300)


def test_cli_round_trips(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path))
    env.pop("CASTORE_CONFIG", None)
    src = tmp_path / "src"
    make_sample_tree(str(src))
    tree = _castore(env, "import", str(src))
    assert tree.returncode == 0, tree.stderr
    digest = tree.stdout.split()[2].decode()
    # tree -> tar (stdout) -> import from stdin: same digest
    out = _castore(env, "export", digest, "--tar", "-")
    assert out.returncode == 0, out.stderr
    back = _castore(env, "import", "--tar", "-", stdin=zstandard.ZstdCompressor().compress(out.stdout))
    assert back.returncode == 0, back.stderr
    assert back.stdout.split()[:3] == [b"-", b"directory", digest.encode()]
    # tar file -> import -> export -> the same bytes
    (tmp_path / "a.tar").write_bytes(out.stdout)
    again = _castore(env, "import", "--tar", str(tmp_path / "a.tar"))
    assert again.returncode == 0 and again.stdout.split()[2].decode() == digest
    second = _castore(env, "export", digest, "--tar", str(tmp_path / "b.tar"))
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "b.tar").read_bytes() == out.stdout
    usage = _castore(env, "import", str(src), "--tar", "x.tar")
    assert usage.returncode == 2 and b"one of them" in usage.stderr
    bad = _castore(env, "import", "--tar", "-", stdin=b"\x1f\x8bnot gzip at all")
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1, bad.stderr
