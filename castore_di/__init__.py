"""castore_di: content-addressed storage (tvix castore compatible) composed with dependency-injector.

The facade loads no backend library; backends are imported when an instance is built.
"""

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
