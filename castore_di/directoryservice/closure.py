"""Validation of directory closures in both directions.

* :class:`LeavesToRoot` checks uploads: each directory may only reference directories
  already added, with the size they really have; at the end there must be exactly one root.
* :class:`RootToLeaves` checks downloads: each directory must have been referenced by one
  received earlier (the first is the requested root), with a matching size, and at the end
  nothing referenced may be missing.
"""

from __future__ import annotations

from collections.abc import Iterable

from castore_di.digests import B3Digest
from castore_di.errors import ClosureError
from castore_di.nodes import Directory

__all__ = ["LeavesToRoot", "RootToLeaves", "leaves_first"]


class LeavesToRoot:
    """Collects directories sent leaves first and validates the closure they form."""

    def __init__(self) -> None:
        self._dirs: dict[B3Digest, Directory] = {}
        self._referenced: set[B3Digest] = set()

    def __len__(self) -> int:
        return len(self._dirs)

    def add(self, directory: Directory) -> bool:
        """Add one directory; ``False`` when it was already present (a duplicate)."""
        digest = directory.digest
        if digest in self._dirs:
            return False
        for name, node in directory.directories():
            child = self._dirs.get(node.digest)
            if child is None:
                raise ClosureError(
                    f"directory {digest} refers to unknown directory {node.digest} as {name!r}; "
                    "directories must be sent leaves first",
                    code="unknown_child",
                )
            if child.size != node.size:
                raise ClosureError(
                    f"directory {digest}: {name!r} has wrong size, specified {node.size}, recorded {child.size}",
                    code="wrong_size",
                )
            self._referenced.add(node.digest)
        self._dirs[digest] = directory
        return True

    def finish(self) -> tuple[B3Digest, list[Directory]]:
        """The root digest and the directories leaves first; one root is required."""
        if not self._dirs:
            raise ClosureError("no directories were sent", code="empty")
        roots = [d for d in self._dirs if d not in self._referenced]
        if len(roots) != 1:
            shown = ", ".join(str(r) for r in roots[:5])
            raise ClosureError(f"closure has {len(roots)} disconnected roots: {shown}", code="disconnected")
        return roots[0], list(self._dirs.values())


class RootToLeaves:
    """Checks a stream of directories that starts at ``root``."""

    def __init__(self, root: B3Digest) -> None:
        self.root = root
        self._expected: dict[B3Digest, int | None] = {root: None}
        self._seen: set[B3Digest] = set()

    def allowed(self, digest: B3Digest) -> bool:
        return digest in self._expected and digest not in self._seen

    def add(self, directory: Directory, digest: B3Digest | None = None) -> None:
        digest = directory.digest if digest is None else digest
        if not self.allowed(digest):
            raise ClosureError(f"received unexpected directory {digest}", code="unexpected")
        want = self._expected[digest]
        if want is not None and want != directory.size:
            raise ClosureError(
                f"directory {digest} has size {directory.size}, but its parent says {want}", code="wrong_size"
            )
        self._seen.add(digest)
        for name, node in directory.directories():
            known = self._expected.get(node.digest)
            if known is not None and known != node.size:
                raise ClosureError(f"{name!r} -> {node.digest} is referenced with two sizes", code="wrong_size")
            self._expected[node.digest] = node.size

    def missing(self) -> set[B3Digest]:
        return set(self._expected) - self._seen

    def finish(self) -> None:
        missing = self.missing()
        if missing and self._seen:
            raise ClosureError(
                f"still expected {len(missing)} directories below {self.root}, but the stream ended",
                code="incomplete",
            )

    def received_any(self) -> bool:
        return bool(self._seen)


def leaves_first(root: B3Digest, directories: Iterable[Directory]) -> list[Directory]:
    """Order a closure so every directory comes after all directories it refers to."""
    by_digest = {d.digest: d for d in directories}
    out: list[Directory] = []
    done: set[B3Digest] = set()
    stack: list[tuple[B3Digest, bool]] = [(root, False)]
    while stack:
        digest, expanded = stack.pop()
        if digest in done:
            continue
        d = by_digest.get(digest)
        if d is None:
            raise ClosureError(f"closure of {root} lacks directory {digest}", code="incomplete")
        if expanded:
            done.add(digest)
            out.append(d)
            continue
        stack.append((digest, True))
        for _name, node in d.directories():
            if node.digest not in done:
                stack.append((node.digest, False))
    return out
