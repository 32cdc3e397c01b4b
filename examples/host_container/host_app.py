"""A host application that embeds a castore container configured from its own Configuration.

The castore config is the ``castore`` key of the host's ``providers.Configuration`` (here
loaded from ``containers/memory.yaml``; tests change it per test with ``from_dict``); the
castore services start and stop with the host's ``init_resources()`` /
``shutdown_resources()``; their operations are recorded in the host's ``metrics``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dependency_injector import containers, providers
from dependency_injector.wiring import Provide, inject

from castore_di import B3Digest, BlobService, Directory, DirectoryService, FileNode
from castore_di.composition.host import castore_container
from castore_di.metrics import Metrics

CONFIG = Path(__file__).resolve().parents[2] / "containers" / "memory.yaml"


class Archive:
    """The host's own service: stores named files as a one-level directory."""

    def __init__(self, blobs: BlobService, directories: DirectoryService) -> None:
        self.blobs = blobs
        self.directories = directories

    async def store(self, files: dict[str, bytes]) -> B3Digest:
        entries = {}
        for name, data in files.items():
            entries[name.encode()] = FileNode(await self.blobs.put(data), len(data))
        return await self.directories.put(Directory(entries))

    async def load(self, root: B3Digest) -> dict[str, bytes]:
        directory = await self.directories.get(root)
        if directory is None:
            raise KeyError(f"no archive {root}")
        out: dict[str, bytes] = {}
        for name, node in directory.files():
            data = await self.blobs.read_bytes(node.digest)
            if data is None:
                raise KeyError(f"archive {root}: blob {node.digest} is missing")
            out[name.decode()] = data
        return out


class Application(containers.DeclarativeContainer):
    """The host container: its own providers wired to the embedded castore instances."""

    config = providers.Configuration()
    metrics = providers.Singleton(Metrics)
    castore = castore_container(config.castore, metrics=metrics)
    archive = providers.Singleton(
        Archive,
        blobs=castore.blobservices.default,  # attribute access, as dependency-injector users write it
        directories=castore.directory("default"),  # the typed equivalent
    )


def create_application(castore_config: Path | dict[str, Any] = CONFIG) -> Application:
    """An application whose castore config is a file (read as is: castore interpolates ``${VAR}``) or a dict."""
    application = Application()
    if isinstance(castore_config, Path):
        castore_config = yaml.safe_load(castore_config.read_text())
    application.config.from_dict({"castore": castore_config})
    return application


@inject
async def archive_files(files: dict[str, bytes], archive: Archive = Provide[Application.archive]) -> B3Digest:
    """A host function that gets the archive injected."""
    return await archive.store(files)


@inject
async def blob_exists(digest: B3Digest, blobs: BlobService = Provide["castore.blobservices.default"]) -> bool:
    """A host function that gets the embedded blob service injected by its string id."""
    return await blobs.has(digest)
