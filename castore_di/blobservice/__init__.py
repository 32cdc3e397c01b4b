"""Blob services. ``BUILTIN_TYPES`` is the only list of this kind's built-in type tags."""

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta

__all__ = ["BlobService", "BlobReader", "BlobWriter", "ChunkMeta", "BUILTIN_TYPES"]

BUILTIN_TYPES: dict[str, str] = {
    "combined": "castore_di.blobservice.combined:CombinedBlobServiceConfig",
    "embedded": "castore_di.blobservice.embedded:EmbeddedBlobServiceConfig",
    "grpc": "castore_di.blobservice.grpc:GRPCBlobServiceConfig",
    "memory": "castore_di.blobservice.memory:MemoryBlobServiceConfig",
    "mirrored": "castore_di.blobservice.mirrored:MirroredBlobServiceConfig",
    "objectstore": "castore_di.blobservice.objectstore:ObjectStoreBlobServiceConfig",
    "readonly": "castore_di.blobservice.readonly:ReadOnlyBlobServiceConfig",
    "sharded": "castore_di.blobservice.sharded:ShardedBlobServiceConfig",
}
