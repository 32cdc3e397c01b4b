"""Composition: registry, strict config structuring, graph validation, container building.

Attributes load their module on first access (as attrs does), so importing a submodule
such as :mod:`castore_di.composition.config` (which every backend does) loads neither the
container machinery nor any service module. Composition never imports a service module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.composition.config import (
        BlobServiceConfig,
        DirectoryServiceConfig,
        ReferenceListOrMap,
        ServiceConfig,
        reference,
        reference_fields,
        reference_list,
        reference_map,
    )
    from castore_di.composition.container import CastoreContainer, build_container
    from castore_di.composition.graph import CompositionGraph, Instance, build_graph
    from castore_di.composition.host import CastoreContainerProvider, castore_container
    from castore_di.composition.loader import ConfigSource, read_config
    from castore_di.composition.registry import Registry, default_registry
    from castore_di.directoryservice.base import DirectoryService
    from castore_di.metrics import Metrics

__all__ = [
    "BlobServiceConfig",
    "CastoreContainer",
    "CastoreContainerProvider",
    "castore_container",
    "CompositionGraph",
    "ConfigSource",
    "DirectoryServiceConfig",
    "Instance",
    "Registry",
    "ServiceConfig",
    "build_container",
    "build_graph",
    "default_registry",
    "load_container",
    "load_graph",
    "blob_service_from_addr",
    "directory_service_from_addr",
    "container_from_addrs",
    "addr_config",
    "read_config",
    "reference",
    "reference_fields",
    "reference_list",
    "reference_map",
    "ReferenceListOrMap",
]

_LAZY: dict[str, str] = {
    "BlobServiceConfig": "config",
    "DirectoryServiceConfig": "config",
    "ServiceConfig": "config",
    "reference": "config",
    "reference_fields": "config",
    "reference_list": "config",
    "reference_map": "config",
    "ReferenceListOrMap": "config",
    "CastoreContainer": "container",
    "build_container": "container",
    "CompositionGraph": "graph",
    "Instance": "graph",
    "build_graph": "graph",
    "CastoreContainerProvider": "host",
    "castore_container": "host",
    "ConfigSource": "loader",
    "read_config": "loader",
    "Registry": "registry",
    "default_registry": "registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_graph(source: ConfigSource, registry: Registry | None = None) -> CompositionGraph:
    """Read and validate a config; returns the instance graph without building anything."""
    from castore_di.composition.graph import build_graph
    from castore_di.composition.loader import read_config

    return build_graph(read_config(source), registry)


def load_container(
    source: ConfigSource, registry: Registry | None = None, *, metrics: Metrics | None = None
) -> CastoreContainer:
    """Read a config (a YAML/JSON/TOML path or a mapping) and return its container.

    The whole config is validated first (types, fields, references, cycles); services are
    created on first use of their providers. With ``metrics`` (a
    :class:`castore_di.metrics.Metrics`), every service's operations are recorded.
    """
    from castore_di.composition.container import build_container

    return build_container(load_graph(source, registry), metrics)


def container_from_addrs(
    blob: str | None = None,
    directory: str | None = None,
    registry: Registry | None = None,
    *,
    metrics: Metrics | None = None,
) -> CastoreContainer:
    """A container whose ``default`` instances are built from URLs (``memory://`` …)."""
    from castore_di.composition.container import build_container
    from castore_di.composition.graph import build_graph

    return build_container(build_graph(addr_config(blob, directory), registry), metrics)


def addr_config(blob: str | None = None, directory: str | None = None) -> dict[str, dict[str, str]]:
    """The config :func:`container_from_addrs` builds: each URL as the ``default`` instance of its kind."""
    config: dict[str, dict[str, str]] = {}
    if blob is not None:
        config["blobservices"] = {"default": blob}
    if directory is not None:
        config["directoryservices"] = {"default": directory}
    return config


def blob_service_from_addr(url: str, registry: Registry | None = None) -> BlobService:
    """One blob service from a URL, e.g. ``memory://`` or ``grpc+http://host:port``."""
    return container_from_addrs(blob=url, registry=registry).blob_service()


def directory_service_from_addr(url: str, registry: Registry | None = None) -> DirectoryService:
    """One directory service from a URL."""
    return container_from_addrs(directory=url, registry=registry).directory_service()
