"""castore_di: content-addressed storage (tvix castore compatible) composed with dependency-injector.

The facade loads no backend library; backends are imported when an instance is built.
Names are imported on first use (PEP 562): importing a submodule, such as the CLI,
does not load the composition layer (and so dependency-injector).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
    from castore_di.composition import (
        CastoreContainer,
        Registry,
        blob_service_from_addr,
        container_from_addrs,
        default_registry,
        directory_service_from_addr,
        load_container,
        load_graph,
    )
    from castore_di.digests import B3Digest
    from castore_di.directoryservice.base import DirectoryPutter, DirectoryService
    from castore_di.errors import (
        CastoreError,
        ClosureError,
        ConfigError,
        CycleError,
        IntegrityError,
        StorageError,
        ValidationError,
    )
    from castore_di.nodes import Directory, DirectoryNode, FileNode, SymlinkNode

__all__ = [
    "B3Digest",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "CastoreContainer",
    "CastoreError",
    "ChunkMeta",
    "ClosureError",
    "ConfigError",
    "CycleError",
    "Directory",
    "DirectoryNode",
    "DirectoryPutter",
    "DirectoryService",
    "FileNode",
    "IntegrityError",
    "Registry",
    "StorageError",
    "SymlinkNode",
    "ValidationError",
    "blob_service_from_addr",
    "container_from_addrs",
    "default_registry",
    "directory_service_from_addr",
    "load_container",
    "load_graph",
]

__version__ = "0.1.0"

_HOMES = {
    "B3Digest": "castore_di.digests",
    "BlobReader": "castore_di.blobservice.base",
    "BlobService": "castore_di.blobservice.base",
    "BlobWriter": "castore_di.blobservice.base",
    "ChunkMeta": "castore_di.blobservice.base",
    "CastoreContainer": "castore_di.composition",
    "Registry": "castore_di.composition",
    "blob_service_from_addr": "castore_di.composition",
    "container_from_addrs": "castore_di.composition",
    "default_registry": "castore_di.composition",
    "directory_service_from_addr": "castore_di.composition",
    "load_container": "castore_di.composition",
    "load_graph": "castore_di.composition",
    "DirectoryPutter": "castore_di.directoryservice.base",
    "DirectoryService": "castore_di.directoryservice.base",
    "CastoreError": "castore_di.errors",
    "ClosureError": "castore_di.errors",
    "ConfigError": "castore_di.errors",
    "CycleError": "castore_di.errors",
    "IntegrityError": "castore_di.errors",
    "StorageError": "castore_di.errors",
    "ValidationError": "castore_di.errors",
    "Directory": "castore_di.nodes",
    "DirectoryNode": "castore_di.nodes",
    "FileNode": "castore_di.nodes",
    "SymlinkNode": "castore_di.nodes",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'castore_di' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
