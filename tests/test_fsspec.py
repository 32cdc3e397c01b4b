"""The ``castore://`` fsspec filesystem over a real embedded store (and a real castore serve)."""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import pathlib
import tomllib
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

from castore_di.composition import load_container
from castore_di.digests import B3Digest
from castore_di.errors import IntegrityError
from castore_di.fsspec_fs import CastoreFileSystem
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode
from tests.cases_embedded import EmbeddedBlobBackdoor
from tests.treecmp import assert_same_tree, make_sample_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSV = b"name,value\nalpha,1\nbeta,2\ngamma,3\n"


def _config(path: pathlib.Path) -> dict[str, Any]:
    return {
        "blobservices": {"default": {"type": "embedded", "path": str(path), "avg_chunk_size": 65536}},
        "directoryservices": {"default": {"type": "embedded", "path": str(path)}},
    }


def _import(config: dict[str, Any], src: pathlib.Path) -> B3Digest:
    async def run() -> B3Digest:
        container = load_container(config)
        try:
            _name, node = await ingest_path(container.blob_service("default"), container.directory_service("default"), src)
        finally:
            await container.aclose()
        assert type(node) is DirectoryNode
        return node.digest

    return asyncio.run(run())


@pytest.fixture
def tree(tmp_path: pathlib.Path) -> Iterator[tuple[CastoreFileSystem, str, pathlib.Path, dict[str, Any]]]:
    src = tmp_path / "src"
    make_sample_tree(str(src))
    (src / "data.csv").write_bytes(CSV)
    (src / "sub" / "escape").symlink_to("../../outside")
    (src / "loop").symlink_to("loop")
    config = _config(tmp_path / "store")
    root = _import(config, src)
    fs = CastoreFileSystem(config=config, skip_instance_cache=True)
    yield fs, root.hex(), src, config
    fs.close()


def test_entry_point_names_this_class() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    value = meta["project"]["entry-points"]["fsspec.specs"]["castore"]
    module, _, name = value.partition(":")
    assert getattr(importlib.import_module(module), name) is CastoreFileSystem
    assert CastoreFileSystem.protocol == "castore"


def test_open_through_fsspec_registry(tree: Any) -> None:
    _fs, root, _src, config = tree
    fsspec.register_implementation("castore", CastoreFileSystem, clobber=True)
    with fsspec.open(f"castore://{root}/sub/deeper/dup.txt", "rb", config=config) as f:
        assert f.read() == b"Hello World"
    with fsspec.open(f"castore://{root}/data.csv", "rt", config=config) as f:
        assert f.readline() == "name,value\n"


def test_ls_info_and_types(tree: Any) -> None:
    fs, root, _src, _config = tree
    names = fs.ls(root, detail=False)
    assert names == sorted(names)
    assert set(names) == {f"{root}/{n}" for n in ("dangling", "data.csv", "empty", "empty.bin", "hello.txt", "loop", "sub")}
    assert fs.ls(f"castore://{root}/", detail=False) == names  # protocol and trailing slash stripped
    detail = {e["name"]: e for e in fs.ls(f"{root}/sub")}
    assert detail[f"{root}/sub/run.sh"]["type"] == "file" and detail[f"{root}/sub/run.sh"]["executable"]
    assert detail[f"{root}/sub/deeper"]["type"] == "directory"
    link = detail[f"{root}/sub/link"]
    assert link["type"] == "file" and link["islink"] and link["destination"] == "../hello.txt" and link["size"] == 11
    assert detail[f"{root}/sub/dirlink"]["type"] == "directory"
    assert detail[f"{root}/sub/escape"]["type"] == "other"  # leaves the tree: not resolved
    info = fs.info(f"{root}/hello.txt")
    assert info["name"] == f"{root}/hello.txt" and info["size"] == 11 and info["type"] == "file"
    assert fs.info(root)["type"] == "directory"
    assert fs.info(f"{root}/dangling")["type"] == "other"  # an absolute target is outside the tree
    assert fs.ls(f"{root}/hello.txt", detail=False) == [f"{root}/hello.txt"]
    assert fs.isdir(f"{root}/sub/dirlink") and fs.isfile(f"{root}/sub/link")
    assert fs.size(f"{root}/sub/deeper/big.bin") == 4 << 20


def test_missing_paths_and_refusals(tree: Any) -> None:
    fs, root, _src, _config = tree
    assert fs.exists(f"{root}/sub/run.sh") and fs.exists(f"{root}/sub/dirlink/big.bin")
    assert not fs.exists(f"{root}/nope") and not fs.exists(f"{root}/sub/..//../x")
    assert not fs.exists("0" * 64)  # a root that is not stored
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/nope")
    with pytest.raises(FileNotFoundError):
        fs.cat(f"{root}/sub/escape")
    with pytest.raises(NotADirectoryError):
        fs.info(f"{root}/hello.txt/x")
    with pytest.raises(OSError, match="Too many levels"):
        fs.cat(f"{root}/loop")
    with pytest.raises(IsADirectoryError):
        fs.open(f"{root}/sub")
    with pytest.raises(ValueError, match="not a digest"):
        fs.ls("not-a-digest/x")
    with pytest.raises(PermissionError):
        fs.open(f"{root}/new.txt", "wb")
    with pytest.raises(PermissionError):
        fs.rm(f"{root}/hello.txt")
    with pytest.raises(PermissionError):
        fs.mkdir(f"{root}/newdir")


def test_cat_and_ranges(tree: Any, tmp_path: pathlib.Path) -> None:
    fs, root, src, _config = tree
    big = (src / "sub" / "deeper" / "big.bin").read_bytes()
    path = f"{root}/sub/deeper/big.bin"
    assert fs.cat(path) == big
    assert fs.cat_file(path, start=1_000_000, end=1_000_100) == big[1_000_000:1_000_100]
    assert fs.cat_file(path, start=-10) == big[-10:]
    assert fs.cat_file(path, start=10, end=-10) == big[10:-10]
    assert fs.cat_file(f"{root}/empty.bin") == b""
    assert fs.cat([f"{root}/hello.txt", f"{root}/sub/link"]) == {
        f"{root}/hello.txt": b"Hello World", f"{root}/sub/link": b"Hello World"}
    assert fs.cat_ranges([path, path], [0, 5], [3, 8]) == [big[0:3], big[5:8]]


def test_open_is_seekable(tree: Any) -> None:
    fs, root, src, _config = tree
    big = (src / "sub" / "deeper" / "big.bin").read_bytes()
    with fs.open(f"{root}/sub/deeper/big.bin", block_size=1 << 16) as f:
        assert f.seekable() and f.size == len(big)
        assert f.read(10) == big[:10]
        f.seek(3_000_000)
        assert f.tell() == 3_000_000
        assert f.read(70_000) == big[3_000_000:3_070_000]
        f.seek(-5, io.SEEK_END)
        assert f.read() == big[-5:]
        f.seek(100)
        assert f.read(-1) == big[100:]


def test_walk_find_glob(tree: Any) -> None:
    fs, root, src, _config = tree
    files = fs.find(root)
    # As fsspec's local filesystem does: a symlink is described by what it points to (so the
    # walk enters sub/dirlink), one that does not resolve is listed as a non-directory.
    expected = set()
    for top, dirs, names in os.walk(src, followlinks=True):
        for name in names:
            expected.add(f"{root}/{os.path.relpath(os.path.join(top, name), src)}")
    assert set(files) == expected
    assert f"{root}/sub/dirlink/big.bin" in files and f"{root}/dangling" in files
    withdirs = fs.find(root, withdirs=True)
    assert {f"{root}/sub", f"{root}/sub/deeper", f"{root}/empty"} <= set(withdirs)
    assert fs.find(root, maxdepth=1) == sorted(p for p in expected if p.count("/") == 1)
    walked = list(fs.walk(root))
    assert walked[0][0] == root and "sub" in walked[0][1] and "hello.txt" in walked[0][2]
    assert fs.glob(f"{root}/sub/*.sh") == [f"{root}/sub/run.sh"]
    assert fs.glob(f"castore://{root}/**/*.txt") == sorted(
        [f"{root}/hello.txt", f"{root}/sub/deeper/dup.txt", f"{root}/sub/dirlink/dup.txt"])
    assert fs.du(f"{root}/sub/deeper") == (4 << 20) + 11


def test_get_copies_a_subtree(tree: Any, tmp_path: pathlib.Path) -> None:
    fs, root, src, _config = tree
    out = tmp_path / "got"
    fs.get(f"{root}/sub/deeper", str(out), recursive=True)
    assert_same_tree(str(src / "sub" / "deeper"), str(out))


def test_corrupted_chunk_is_an_error_not_wrong_bytes(tree: Any) -> None:
    fs, root, src, config = tree
    node = fs.info(f"{root}/sub/deeper/big.bin")
    digest = B3Digest.parse(node["digest"])

    async def corrupt() -> None:
        container = load_container(config)
        try:
            await EmbeddedBlobBackdoor(container.blob_service("default")).corrupt(digest)
        finally:
            await container.aclose()

    asyncio.run(corrupt())
    with pytest.raises(IntegrityError):
        fs.cat(f"{root}/sub/deeper/big.bin")
    # the chunks before the damaged (last) one still read
    assert fs.cat_file(f"{root}/sub/deeper/big.bin", 0, 100) == (src / "sub" / "deeper" / "big.bin").read_bytes()[:100]


def test_pandas_reads_a_csv(tree: Any) -> None:
    pd = pytest.importorskip("pandas")
    _fs, root, _src, config = tree
    fsspec.register_implementation("castore", CastoreFileSystem, clobber=True)
    frame = pd.read_csv(f"castore://{root}/data.csv", storage_options={"config": config})
    assert list(frame["name"]) == ["alpha", "beta", "gamma"] and list(frame["value"]) == [1, 2, 3]


def test_reads_from_a_remote_castore_serve(grpc_memory_server_fresh: Any, tmp_path: pathlib.Path) -> None:
    url = grpc_memory_server_fresh.url
    src = tmp_path / "src"
    make_sample_tree(str(src))
    config = {"blobservices": {"default": url}, "directoryservices": {"default": url}}
    root = _import(config, src)
    fs = CastoreFileSystem(blob_service_addr=url, directory_service_addr=url, skip_instance_cache=True)
    try:
        assert fs.cat(f"{root.hex()}/sub/link") == b"Hello World"
        with fs.open(f"{root.hex()}/sub/deeper/big.bin") as f:
            f.seek(2 << 20)
            assert f.read(100) == (src / "sub" / "deeper" / "big.bin").read_bytes()[2 << 20 : (2 << 20) + 100]
    finally:
        fs.close()
