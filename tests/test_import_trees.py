"""Odd trees: swapped-in fifos, any depth, --exclude against git, --skip-special, symlinked export parents."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

from castore_di.blobservice.memory import MemoryBlobService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import UnsupportedFileTypeError
from castore_di.exporter import export_node
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tests.test_cli import Castore, _store_config

DEPTH = 10_000


@pytest.fixture
def castore(tmp_path: pathlib.Path) -> Castore:
    return Castore(_store_config(tmp_path))


def test_file_swapped_for_a_fifo_is_refused_not_waited_on(tmp_path: pathlib.Path) -> None:
    """Between the walk and the read a file becomes a fifo: the import fails at once."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    (src / "victim").write_bytes(b"regular at walk time")
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from castore_di.blobservice.memory import MemoryBlobService
        from castore_di.directoryservice.memory import MemoryDirectoryService
        from castore_di.errors import UnsupportedFileTypeError
        from castore_di.importer import ingest_path

        class Swap:
            def start(self, files, nbytes):  # called after the walk, before any read
                os.unlink({str(src / "victim")!r})
                os.mkfifo({str(src / "victim")!r})
            def advance(self, nbytes, files=1):
                pass

        try:
            asyncio.run(ingest_path(MemoryBlobService(), MemoryDirectoryService(), {str(src)!r}, progress=Swap()))
        except UnsupportedFileTypeError as e:
            print("refused:", e)
            sys.exit(0)
        sys.exit("imported a fifo")
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the import waited on the fifo")
    assert proc.returncode == 0, proc.stderr
    assert "victim" in proc.stdout and "fifo" in proc.stdout


def _make_deep(root: pathlib.Path, depth: int) -> None:
    """``root/d/d/.../d`` ``depth`` levels, with a file and a symlink at the bottom (paths past PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom")
        os.close(leaf)
        os.symlink("leaf.txt", "link", dir_fd=fd)
    finally:
        os.close(fd)


def _read_deep(root: pathlib.Path) -> tuple[int, bytes, str]:
    """(depth, the leaf's bytes, the link's target) of a tree made by ``_make_deep``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while "d" in os.listdir(fd):
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
            depth += 1
        leaf = os.open("leaf.txt", os.O_RDONLY, dir_fd=fd)
        data = os.read(leaf, 100)
        os.close(leaf)
        return depth, data, os.readlink("link", dir_fd=fd)
    finally:
        os.close(fd)


def _rmtree_deep(root: pathlib.Path) -> None:
    """Remove a ``_make_deep`` tree bottom-up through ``..`` (shutil.rmtree recurses)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    while "d" in os.listdir(fd):
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    try:
        while True:
            for name in os.listdir(fd):
                os.unlink(name, dir_fd=fd)
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            if not os.path.samestat(os.fstat(fd), os.stat(root)) or "d" in os.listdir(fd):
                os.rmdir("d", dir_fd=fd)
            if os.path.samestat(os.fstat(fd), os.stat(root)):
                break
    finally:
        os.close(fd)
    shutil.rmtree(root)


@pytest.fixture
def fast_tmp(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A directory on tmpfs when there is one (deep trees are slow to make on some disks)."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = pathlib.Path(tempfile.mkdtemp(dir="/dev/shm", prefix="castore-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_10k_levels_import_and_export(fast_tmp: pathlib.Path) -> None:
    tmp_path = fast_tmp
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    src = tmp_path / "src"
    _make_deep(src, DEPTH)
    try:
        _name, node = await ingest_path(blob, dirs, src)
    finally:
        _rmtree_deep(src)
    assert isinstance(node, DirectoryNode)
    out = tmp_path / "out"
    await export_node(blob, dirs, node, out)
    try:
        assert _read_deep(out) == (DEPTH, b"at the bottom", "leaf.txt")
    finally:
        _rmtree_deep(out)


async def _files_below(dirs: MemoryDirectoryService, node: Node) -> set[str]:
    """Relative paths of the files and symlinks in an imported tree."""
    out: set[str] = set()
    stack: list[tuple[str, Node]] = [("", node)]
    while stack:
        prefix, n = stack.pop()
        if isinstance(n, DirectoryNode):
            directory = await dirs.get(n.digest)
            assert directory is not None
            for name, child in directory.items():
                stack.append((f"{prefix}{os.fsdecode(name)}" + ("/" if isinstance(child, DirectoryNode) else ""), child))
        elif isinstance(n, (FileNode, SymlinkNode)):
            out.add(prefix)
    return out


def _git_untracked(tree: pathlib.Path, patterns: list[str], tmp: pathlib.Path) -> set[str]:
    """The files git would add below ``tree`` with ``patterns`` as its exclude file."""
    excludes = tmp / "patterns"
    excludes.write_text("".join(p + "\n" for p in patterns))
    env = {**os.environ, "GIT_DIR": str(tmp / "git"), "GIT_WORK_TREE": str(tree),
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    if not (tmp / "git").exists():
        subprocess.run(["git", "init", "-q"], env=env, check=True, cwd=tree)
    out = subprocess.run(["git", "ls-files", "--others", "-z", f"--exclude-from={excludes}"],
                         env=env, check=True, cwd=tree, capture_output=True).stdout
    return {p for p in out.decode().split("\0") if p}


PATTERN_SETS = [
    ["*.pyc"],
    ["*.pyc", "!keep.pyc"],
    ["build/"],
    ["build"],
    ["/top.txt"],
    ["top.txt"],
    ["docs/**/*.md"],
    ["**/b"],
    ["a/**"],
    ["*.log", "!a/b/log.log"],
    ["build/", "!build/k"],
    ["[ab]*", "!*.txt"],
    ["a?c", "x.py[co]"],
    ["*", "!*/", "!*.md"],
    ["\\#hash", "spaced\\ "],
    ["# comment", "", "d*/"],
    ["a/**/z", "**/build"],
    ["*.txt", "!top.txt"],
    ["/a/b/", "a/b"],
    ["a", "!a/"],
    ["*/", "!docs/"],
    ["**", "!**/", "!*.pyc"],
]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
@pytest.mark.parametrize("patterns", PATTERN_SETS, ids=lambda p: " ".join(p) or "empty")
async def test_exclude_matches_git(tmp_path: pathlib.Path, patterns: list[str]) -> None:
    tree = tmp_path / "t"
    for rel in ["x.pyc", "keep.pyc", "a/b/y.pyc", "a/keep.pyc", "top.txt", "a/top.txt", "build/k", "build/j",
                "a/build/z", "docs/x/r.md", "docs/s.md", "a/abc", "a/b/log.log", "c.log", "bx.txt", "b/inner",
                "#hash", "spaced ", "deep/er/file.md", "x.pyo"]:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(rel.encode())
    (tree / "a" / "link").symlink_to("top.txt")
    expected = _git_untracked(tree, patterns, tmp_path)
    blob, dirs = MemoryBlobService(), MemoryDirectoryService()
    _name, node = await ingest_path(blob, dirs, tree, exclude=patterns)
    assert await _files_below(dirs, node) == expected


def test_skip_special_skips_with_a_warning_each(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "file").write_bytes(b"kept")
    os.mkfifo(src / "sub" / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    try:
        refused = castore("import", str(src), expect=1)
        assert str(src / "sub" / "fifo") in refused.stderr.decode() or str(src / "sock") in refused.stderr.decode()
        ok = castore("import", "--json", "--skip-special", str(src))
    finally:
        sock.close()
    err = ok.stderr.decode()
    assert f"skipping {src / 'sub' / 'fifo'}: fifo" in err
    assert f"skipping {src / 'sock'}: socket" in err
    (src / "sub" / "fifo").unlink()
    (src / "sock").unlink()
    assert [json.loads(line) for line in ok.stdout.decode().splitlines()] == castore.json("import", "--json", str(src))


def test_exclude_on_the_command_line(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    (src / "build").mkdir(parents=True)
    (src / "build" / "out.o").write_bytes(b"o")
    (src / "main.c").write_bytes(b"int main;")
    (src / "main.pyc").write_bytes(b"pyc")
    [root] = castore.json("import", "--json", "--exclude", "build/", "--exclude", "*.pyc", str(src))
    listing = castore("ls", "-R", str(root["digest"])).stdout.decode()
    assert "main.c" in listing and "build" not in listing and "main.pyc" not in listing


async def test_socket_is_skipped_through_the_api(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "s"))
    warnings: list[str] = []
    try:
        with pytest.raises(UnsupportedFileTypeError, match="socket"):
            await ingest_path(MemoryBlobService(), MemoryDirectoryService(), src)
        blob, dirs = MemoryBlobService(), MemoryDirectoryService()
        _n, node = await ingest_path(blob, dirs, src, skip_special=True, warn=warnings.append)
    finally:
        sock.close()
    assert warnings == [f"skipping {src / 's'}: socket"]
    assert await _files_below(dirs, node) == {"f"}


def test_export_through_a_symlinked_parent(tmp_path: pathlib.Path, castore: Castore) -> None:
    """The user's own path may pass through symlinks; what export creates is never followed."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello")
    [blob] = castore.json("import", "--json", str(src))
    castore("export", "--file", str(blob["digest"]), str(tmp_path / "via" / "out.txt"))
    assert (real / "out.txt").read_bytes() == b"hello"
    castore("export", "--symlink", "target", str(tmp_path / "via" / "ln"))
    assert os.readlink(real / "ln") == "target"
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"f")
    [root] = castore.json("import", "--json", str(tree))
    castore("export", str(root["digest"]), str(tmp_path / "via" / "copy"))
    assert (real / "copy" / "d" / "f").read_bytes() == b"f"
    # An existing symlink at the final name is refused, never followed (even with --force).
    (real / "planted").symlink_to(tmp_path / "elsewhere")
    castore("export", "--file", str(blob["digest"]), str(tmp_path / "via" / "planted"), expect=1)
    assert not (tmp_path / "elsewhere").exists()


@pytest.fixture
def small_tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_says_so_and_the_store_stays_usable(tmp_path: pathlib.Path, small_tmpfs: pathlib.Path) -> None:
    config = tmp_path / "full.yaml"
    store = small_tmpfs / "store"
    config.write_text(f"blobservices:\n  default: {{type: embedded, path: '{store}'}}\n"
                      f"directoryservices:\n  default: {{type: embedded, path: '{store}'}}\n")
    castore = Castore(config)
    kept = tmp_path / "kept.txt"
    kept.write_bytes(b"stored before the disk filled up")
    [first] = castore.json("import", "--json", str(kept))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # incompressible, three times the disk
    failed = castore("import", str(big), expect=1)
    assert "no space left on device" in failed.stderr.decode().lower()
    assert castore("cat", str(first["digest"])).stdout == kept.read_bytes()
    assert "ok" in castore("fsck").stdout.decode()
    later = tmp_path / "later.txt"
    later.write_bytes(b"small enough to fit")
    [second] = castore.json("import", "--json", str(later))
    assert castore("cat", str(second["digest"])).stdout == later.read_bytes()
