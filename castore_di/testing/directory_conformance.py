"""The conformance suite every DirectoryService must pass.

Subclass :class:`DirectoryServiceConformance` and provide the fixtures ``directory_service``
and ``backdoor`` (a :class:`DirectoryBackdoor`, or ``None``), as for the blob suite.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import pytest

from castore_di.digests import B3Digest, blake3_digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import ClosedError, ClosureError, IntegrityError, ValidationError
from castore_di.nodes import Directory, DirectoryNode
from castore_di.testing.fixtures import (
    CLOSURE_D,
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_D,
    DIRECTORY_WITH_KEEP,
    chain,
)

__all__ = ["DirectoryServiceConformance", "DirectoryBackdoor", "check_closure_order"]


class DirectoryBackdoor(Protocol):
    async def corrupt(self, digest: B3Digest) -> None:
        """Change the stored bytes of directory ``digest`` (or of the batch holding it)."""


def check_closure_order(root: B3Digest, received: list[Directory]) -> None:
    """Assert root first, each directory once, each after a directory that refers to it."""
    assert received, "empty closure"
    assert received[0].digest == root
    seen: set[B3Digest] = set()
    referenced = {root}
    for d in received:
        assert d.digest not in seen, f"{d.digest} sent twice"
        assert d.digest in referenced, f"{d.digest} sent before a directory referring to it"
        seen.add(d.digest)
        referenced.update(node.digest for _, node in d.directories())
    assert referenced == seen, "closure incomplete"


class DirectoryServiceConformance:
    """Behaviour shared by every directory service."""

    async def test_put_and_get_leaf(self, directory_service: DirectoryService) -> None:
        digest = await directory_service.put(DIRECTORY_A)
        assert digest == DIRECTORY_A.digest
        assert await directory_service.get(digest) == DIRECTORY_A

    async def test_empty_directory(self, directory_service: DirectoryService) -> None:
        empty = Directory()
        assert await directory_service.put(empty) == blake3_digest(b"")
        assert await directory_service.get(empty.digest) == empty

    async def test_absent(self, directory_service: DirectoryService) -> None:
        missing = blake3_digest(b"no such directory")
        assert await directory_service.get(missing) is None
        assert [d async for d in directory_service.get_recursive(missing)] == []

    async def test_put_multiple_and_get_recursive(self, directory_service: DirectoryService) -> None:
        root = await directory_service.put_closure(CLOSURE_D)
        assert root == DIRECTORY_D.digest
        assert await directory_service.get(root) == DIRECTORY_D
        received = [d async for d in directory_service.get_recursive(root)]
        check_closure_order(root, received)
        assert {d.digest for d in received} == {d.digest for d in CLOSURE_D}

    async def test_duplicates_in_closure_are_fine(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        for d in [DIRECTORY_A, DIRECTORY_A, DIRECTORY_C]:
            await putter.put(d)
        assert await putter.close() == DIRECTORY_C.digest
        received = [d async for d in directory_service.get_recursive(DIRECTORY_C.digest)]
        assert received == [DIRECTORY_C, DIRECTORY_A]

    async def test_deep_chain(self, directory_service: DirectoryService) -> None:
        dirs = chain(60)
        root = await directory_service.put_closure(dirs)
        received = [d async for d in directory_service.get_recursive(root)]
        assert received == list(reversed(dirs))

    async def test_wide_closure(self, directory_service: DirectoryService) -> None:
        leaves = [Directory({f"f{i}".encode(): DIRECTORY_A[b"a"]}) for i in range(300)]
        root_dir = Directory({f"d{i}".encode(): leaf.as_node() for i, leaf in enumerate(leaves)})
        root = await directory_service.put_closure([*leaves, root_dir])
        received = [d async for d in directory_service.get_recursive(root)]
        check_closure_order(root, received)
        assert len(received) == 301

    async def test_putter_refuses_unknown_child(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        with pytest.raises(ClosureError):
            await putter.put(DIRECTORY_B)  # its child was never sent
            await putter.close()
        assert await directory_service.get(DIRECTORY_B.digest) is None

    async def test_putter_refuses_wrong_child_size(self, directory_service: DirectoryService) -> None:
        lying = Directory({b"keep": DirectoryNode(DIRECTORY_WITH_KEEP.digest, 42)})
        putter = directory_service.put_multiple_start()
        with pytest.raises(ClosureError):
            await putter.put(DIRECTORY_WITH_KEEP)
            await putter.put(lying)
            await putter.close()
        assert await directory_service.get(lying.digest) is None

    async def test_putter_refuses_disconnected_roots(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        with pytest.raises(ClosureError):
            await putter.put(DIRECTORY_A)
            await putter.put(DIRECTORY_WITH_KEEP)
            await putter.close()

    async def test_putter_refuses_empty_closure(self, directory_service: DirectoryService) -> None:
        with pytest.raises(ClosureError):
            await directory_service.put_multiple_start().close()

    async def test_putter_close_twice_and_put_after_close(self, directory_service: DirectoryService) -> None:
        putter = directory_service.put_multiple_start()
        await putter.put(DIRECTORY_A)
        assert await putter.close() == DIRECTORY_A.digest
        assert await putter.close() == DIRECTORY_A.digest
        with pytest.raises(ClosedError):
            await putter.put(DIRECTORY_WITH_KEEP)

    async def test_same_closure_twice(self, directory_service: DirectoryService) -> None:
        assert await directory_service.put_closure(CLOSURE_D) == await directory_service.put_closure(CLOSURE_D)

    async def test_concurrent_putters(self, directory_service: DirectoryService) -> None:
        closures = [chain(5 + i) for i in range(6)]
        roots = await asyncio.gather(*(directory_service.put_closure(c) for c in closures))
        for c, r in zip(closures, roots):
            assert r == c[-1].digest
            assert [d async for d in directory_service.get_recursive(r)] == list(reversed(c))

    async def test_invalid_directory_cannot_be_built(self) -> None:
        with pytest.raises(ValidationError):
            Directory({b"..": DIRECTORY_A.as_node()})

    async def test_corruption_is_detected(
        self, directory_service: DirectoryService, backdoor: DirectoryBackdoor | None
    ) -> None:
        if backdoor is None:
            pytest.skip("this backend offers no way to reach storage behind the API")
        root = await directory_service.put_closure(CLOSURE_D)
        await backdoor.corrupt(root)
        with pytest.raises(IntegrityError):
            await directory_service.get(root)
