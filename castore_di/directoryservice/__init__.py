"""Directory services. ``BUILTIN_TYPES`` is the only list of this kind's built-in type tags."""

from castore_di.directoryservice.base import DirectoryPutter, DirectoryService

__all__ = ["DirectoryService", "DirectoryPutter", "BUILTIN_TYPES"]

BUILTIN_TYPES: dict[str, str] = {
    "bigtable": "castore_di.directoryservice.bigtable:BigtableDirectoryServiceConfig",
    "cache": "castore_di.directoryservice.cache:CacheDirectoryServiceConfig",
    "embedded": "castore_di.directoryservice.embedded:EmbeddedDirectoryServiceConfig",
    "grpc": "castore_di.directoryservice.grpc:GRPCDirectoryServiceConfig",
    "memory": "castore_di.directoryservice.memory:MemoryDirectoryServiceConfig",
    "mirrored": "castore_di.directoryservice.mirrored:MirroredDirectoryServiceConfig",
    "objectstore": "castore_di.directoryservice.objectstore:ObjectStoreDirectoryServiceConfig",
    "readonly": "castore_di.directoryservice.readonly:ReadOnlyDirectoryServiceConfig",
    "sharded": "castore_di.directoryservice.sharded:ShardedDirectoryServiceConfig",
}
