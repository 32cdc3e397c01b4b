"""A small application service built on a castore blob service, and its container."""

from __future__ import annotations

from pathlib import Path

import yaml
from dependency_injector import containers, providers

import castore_di
from castore_di import B3Digest, BlobService
from castore_di.composition.host import castore_container

CONFIG = Path(__file__).with_name("catalog.yaml")


class Catalog:
    """Named documents whose contents live in a blob service."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs
        self._names: dict[str, B3Digest] = {}

    async def add(self, name: str, data: bytes) -> B3Digest:
        digest = await self._blobs.put(data)
        self._names[name] = digest
        return digest

    async def get(self, name: str) -> bytes | None:
        digest = self._names.get(name)
        return None if digest is None else await self._blobs.read_bytes(digest)

    async def link(self, name: str, digest: B3Digest) -> bool:
        """Name an existing blob (from anywhere the blob service reads); False if absent."""
        if not await self._blobs.has(digest):
            return False
        self._names[name] = digest
        return True


def load() -> castore_di.CastoreContainer:
    """The catalog's container, loaded from ``catalog.yaml``."""
    return castore_di.load_container(CONFIG)


class CatalogContainer(containers.DeclarativeContainer):
    """The catalog inside an application container: castore's config is ``config.castore``."""

    config = providers.Configuration()
    castore = castore_container(config.castore)
    catalog = providers.Singleton(Catalog, blobs=castore.blob("default"))


def create_container() -> CatalogContainer:
    """The application container with ``catalog.yaml`` as its castore config.

    The file is parsed as is: castore interpolates ``${VAR}`` when it reads its config,
    which happens on first need, so a test can still override ``config.castore``.
    """
    container = CatalogContainer()
    container.config.castore.from_dict(yaml.safe_load(CONFIG.read_text()))
    return container
