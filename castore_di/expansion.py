"""The size a directory closure expands to on disk, checked before an export writes.

A closure is a DAG: a directory whose entries all name the same subdirectory, nested 14
levels deep, is 1.2 KB of directories that expand to 192 MB of files. An export computes
the expansion from the closure it already fetched (every distinct directory once) and
refuses one that exceeds ``--max-size`` or the free space (bytes and inodes) at the
destination, before anything is written.
"""

from __future__ import annotations

import os
import shutil

import attrs

from castore_di.digests import B3Digest
from castore_di.directoryservice.closure import leaves_first
from castore_di.errors import StorageError
from castore_di.nodes import Directory

__all__ = ["Expansion", "ExportTooLargeError", "check_export_fits", "expansion"]


class ExportTooLargeError(StorageError):
    """The tree would not fit: over ``--max-size`` or over the free space at the destination."""


@attrs.frozen
class Expansion:
    """What exporting a tree writes: file and symlink-target bytes, and entries (inodes)."""

    bytes: int
    entries: int


def expansion(closure: dict[B3Digest, Directory], root: B3Digest) -> Expansion:
    """The expansion of ``root`` over its (complete) closure, each directory computed once."""
    sizes: dict[B3Digest, tuple[int, int]] = {}
    for directory in leaves_first(root, closure.values()):
        total, entries = 0, 1
        for _name, node in directory.directories():
            child = sizes[node.digest]
            total += child[0]
            entries += child[1]
        for _name, f in directory.files():
            total += f.size
            entries += 1
        for _name, s in directory.symlinks():
            total += len(s.target)
            entries += 1
        sizes[directory.digest] = (total, entries)
    total, entries = sizes[root]
    return Expansion(total, entries)


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_export_fits(
    closure: dict[B3Digest, Directory], root: B3Digest, dest: str | os.PathLike[str], max_size: int | None
) -> Expansion:
    """Refuse (:class:`ExportTooLargeError`) a tree larger than ``max_size`` or the free space at ``dest``."""
    need = expansion(closure, root)
    shown = os.fspath(dest)
    if max_size is not None and need.bytes > max_size:
        raise ExportTooLargeError(
            f"refusing to export {root}: it expands to {need.bytes} bytes in {need.entries} entries, "
            f"more than --max-size {max_size} bytes"
        )
    where = _existing_parent(shown)
    free = shutil.disk_usage(where).free
    if need.bytes > free:
        raise ExportTooLargeError(
            f"refusing to export {root}: it expands to {need.bytes} bytes, more than the {free} bytes "
            f"free at {shown}"
        )
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):  # no statvfs (Windows): bytes were checked
        return need
    if st.f_files and need.entries > st.f_favail:
        raise ExportTooLargeError(
            f"refusing to export {root}: it expands to {need.entries} entries, more than the "
            f"{st.f_favail} inodes free at {shown}"
        )
    return need
