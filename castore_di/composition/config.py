"""Config classes: the base every backend's config derives from, references, URL helpers.

A backend declares a frozen attrs class beside its service::

    @attrs.frozen(kw_only=True)
    class CombinedBlobServiceConfig(BlobServiceConfig):
        type_tag: ClassVar[str] = "combined"
        local: str = reference("blobservices")
        remote: str = reference("blobservices")

        def build(self, local: BlobService, remote: BlobService) -> CombinedBlobService: ...

Fields made with :func:`reference` name another instance (or hold a URL that builds an
anonymous one); the composition passes the built services to ``build`` as keyword
arguments with the field's name. Nothing here imports a backend library.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, ClassVar, TypeVar

import attrs

from castore_di.errors import ConfigError

__all__ = [
    "ServiceConfig",
    "BlobServiceConfig",
    "DirectoryServiceConfig",
    "reference",
    "reference_fields",
    "REFERENCE_KEY",
    "KINDS",
    "parse_memory_url",
    "url_tag",
]

REFERENCE_KEY = "castore_di.reference"
KINDS = ("blobservices", "directoryservices")

C = TypeVar("C", bound="ServiceConfig")


def reference(kind: str, *, doc: str = "") -> Any:
    """An attrs field that references an instance of ``kind`` by name or by URL."""
    if kind not in KINDS:
        raise ValueError(f"unknown service kind {kind!r} (known: {', '.join(KINDS)})")
    return attrs.field(
        metadata={REFERENCE_KEY: kind, "doc": doc},
        validator=attrs.validators.instance_of(str),
    )


def reference_fields(cls: type) -> dict[str, str]:
    """``{field name: referenced kind}`` for a config class."""
    return {f.name: f.metadata[REFERENCE_KEY] for f in attrs.fields(cls) if REFERENCE_KEY in f.metadata}


class ServiceConfig:
    """Base of every backend config class.

    Subclasses are frozen, keyword-only attrs classes with a ``type_tag`` and a ``build``
    method that receives referenced services as keyword arguments. A sync ``build`` must do
    no I/O; a service that must connect or open something first defines ``async def build``,
    which the container awaits (see :mod:`castore_di.composition.container`).
    """

    kind: ClassVar[str]
    type_tag: ClassVar[str]

    def build(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - every config class defines build

    @classmethod
    def from_url(cls: type[C], url: str) -> C:
        """A config from a URL (``memory://``); types without a URL form refuse."""
        raise ConfigError(f"type {cls.type_tag!r} cannot be built from a URL")


class BlobServiceConfig(ServiceConfig):
    kind: ClassVar[str] = "blobservices"


class DirectoryServiceConfig(ServiceConfig):
    kind: ClassVar[str] = "directoryservices"


def url_tag(url: str) -> str:
    """The registry tag of a URL: its scheme up to the first ``+`` (``grpc+http`` -> ``grpc``)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise ConfigError(f"not a URL: {url!r}")
    return scheme.split("+", 1)[0]


def parse_memory_url(url: str) -> None:
    """Accept exactly ``memory://`` (no host, no path), as the reference does."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc or parts.path or parts.query:
        raise ConfigError(f"invalid url {url!r}: memory:// takes no host, path or query")
