"""Comparing two filesystem trees: entries, types, bytes, executable bits, symlink targets."""

from __future__ import annotations

import os
import stat


def _entries(root: str) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(top, name)
            out[os.path.relpath(path, root)] = os.lstat(path)
    return out


def assert_same_tree(original: str, copy: str) -> int:
    """Raise AssertionError on the first difference; returns the number of files compared."""
    a, b = _entries(original), _entries(copy)
    assert sorted(a) == sorted(b), f"entries differ: only in original {sorted(set(a) - set(b))[:5]}, only in copy {sorted(set(b) - set(a))[:5]}"
    files = 0
    for rel, sa in a.items():
        sb = b[rel]
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), f"{rel}: type differs"
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(os.path.join(original, rel)) == os.readlink(os.path.join(copy, rel)), f"{rel}: target"
        elif stat.S_ISREG(sa.st_mode):
            assert bool(sa.st_mode & 0o100) == bool(sb.st_mode & 0o100), f"{rel}: executable bit differs"
            assert sa.st_size == sb.st_size, f"{rel}: size differs"
            with open(os.path.join(original, rel), "rb") as fa, open(os.path.join(copy, rel), "rb") as fb:
                while True:
                    x, y = fa.read(1 << 20), fb.read(1 << 20)
                    assert x == y, f"{rel}: contents differ"
                    if not x:
                        break
            files += 1
    return files


def make_sample_tree(root: str) -> None:
    """A small tree with every kind of entry the importer handles."""
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty"))
    with open(os.path.join(root, "hello.txt"), "wb") as f:
        f.write(b"Hello World")
    with open(os.path.join(root, "empty.bin"), "wb"):
        pass
    with open(os.path.join(root, "sub", "run.sh"), "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(os.path.join(root, "sub", "run.sh"), 0o755)
    with open(os.path.join(root, "sub", "deeper", "big.bin"), "wb") as f:
        f.write(os.urandom(3 << 20) + b"x" * (1 << 20))  # above the small-file limit
    with open(os.path.join(root, "sub", "deeper", "dup.txt"), "wb") as f:
        f.write(b"Hello World")
    os.symlink("../hello.txt", os.path.join(root, "sub", "link"))
    os.symlink("/nonexistent/absolute", os.path.join(root, "dangling"))
    os.symlink("deeper", os.path.join(root, "sub", "dirlink"))
