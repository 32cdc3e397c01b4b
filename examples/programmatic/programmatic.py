"""Compose castore services from Python: a dict, URLs, or a single service from one URL.

Run: ``python examples/programmatic/programmatic.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import castore_di
from castore_di import B3Digest, Directory, FileNode, SymlinkNode
from castore_di.nodes import Node

# The same shape a YAML file has: one mapping per kind, one entry per named instance.
# A reference field holds either an instance name ("local") or a URL (an anonymous instance).
CONFIG: dict[str, Any] = {
    "blobservices": {
        "local": {"type": "memory"},
        "remote": "memory://",  # a URL is shorthand for an instance
        "default": {"type": "combined", "local": "local", "remote": "remote"},
    },
    "directoryservices": {
        "default": {"type": "cache", "near": "memory://", "far": "memory://"},
    },
}


async def store_tree(container: castore_di.CastoreContainer, content: bytes) -> B3Digest:
    """Store a two-level tree whose file holds ``content``; returns the root digest."""
    blobs = container.blob_service()  # typed: BlobService, no cast needed
    directories = container.directory_service()
    blob = await blobs.put(content)
    entries: dict[bytes, Node] = {b"hello.txt": FileNode(blob, len(content)), b"link": SymlinkNode(b"hello.txt")}
    leaf = Directory(entries)
    root = Directory({b"docs": leaf.as_node()})
    return await directories.put_closure([leaf, root])  # leaves first


async def read_tree(container: castore_di.CastoreContainer, root: B3Digest) -> dict[str, bytes]:
    """Every file of the tree under ``root`` as ``{path: contents}``."""
    blobs = container.blob_service()
    found: dict[str, bytes] = {}
    prefix: dict[B3Digest, str] = {root: ""}
    async for directory in container.directory_service().get_recursive(root):
        base = prefix[directory.digest]
        for name, child in directory.directories():
            prefix[child.digest] = f"{base}{name.decode()}/"
        for name, file in directory.files():
            data = await blobs.read_bytes(file.digest)
            assert data is not None, f"blob {file.digest} is missing"
            found[f"{base}{name.decode()}"] = data
    return found


async def from_dict() -> dict[str, bytes]:
    """A container from a mapping, validated exactly like a YAML file."""
    async with castore_di.load_container(CONFIG) as container:
        root = await store_tree(container, b"from a dict\n")
        return await read_tree(container, root)


async def from_urls() -> dict[str, bytes]:
    """A container whose ``default`` instances come from URLs."""
    async with castore_di.container_from_addrs(blob="memory://", directory="memory://") as container:
        root = await store_tree(container, b"from URLs\n")
        return await read_tree(container, root)


async def single_service() -> bytes | None:
    """One service from one URL, for scripts that need nothing else."""
    blobs = castore_di.blob_service_from_addr("memory://")
    try:
        digest = await blobs.put(b"just a blob")
        return await blobs.read_bytes(digest)
    finally:
        await blobs.close()


async def main() -> None:
    print("from a dict:", await from_dict())
    print("from URLs:  ", await from_urls())
    print("one service:", await single_service())


if __name__ == "__main__":
    asyncio.run(main())
