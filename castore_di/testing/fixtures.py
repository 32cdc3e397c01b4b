"""Directories and blobs used by the conformance suites and tests."""

from __future__ import annotations

from castore_di.digests import B3Digest, blake3_digest
from castore_di.nodes import Directory, FileNode, SymlinkNode

__all__ = [
    "BLOB_A",
    "BLOB_A_DIGEST",
    "DIRECTORY_A",
    "DIRECTORY_B",
    "DIRECTORY_C",
    "DIRECTORY_D",
    "DIRECTORY_WITH_KEEP",
    "chain",
    "CLOSURE_D",
]

BLOB_A = b"Hello World"
BLOB_A_DIGEST: B3Digest = blake3_digest(BLOB_A)

DIRECTORY_WITH_KEEP = Directory({b".keep": FileNode(blake3_digest(b""), 0, False)})
DIRECTORY_A = Directory([(b"a", FileNode(BLOB_A_DIGEST, len(BLOB_A), True)), (b"l", SymlinkNode(b"../a"))])
DIRECTORY_B = Directory({b"keep": DIRECTORY_WITH_KEEP.as_node()})
DIRECTORY_C = Directory({b"x": DIRECTORY_A.as_node(), b"y": DIRECTORY_A.as_node()})
# D refers to A directly and through B and C: a diamond, so order and dedup matter.
DIRECTORY_D = Directory(
    [
        (b"a", DIRECTORY_A.as_node()),
        (b"b", DIRECTORY_B.as_node()),
        (b"c", DIRECTORY_C.as_node()),
        (b"f", FileNode(BLOB_A_DIGEST, len(BLOB_A))),
    ]
)
# Leaves-to-root upload order of D's closure.
CLOSURE_D = [DIRECTORY_WITH_KEEP, DIRECTORY_A, DIRECTORY_B, DIRECTORY_C, DIRECTORY_D]


def chain(depth: int) -> list[Directory]:
    """A chain of nested directories, leaves first; the last one is the root."""
    out = [Directory({b"leaf": SymlinkNode(b"target")})]
    for i in range(depth - 1):
        out.append(Directory({f"d{i}".encode(): out[-1].as_node()}))
    return out


