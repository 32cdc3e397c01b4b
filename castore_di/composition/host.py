"""A castore container as a slot of a host application's ``DeclarativeContainer``.

A host declares the castore container as a class attribute and wires its own providers to
the instances it needs::

    class Application(containers.DeclarativeContainer):
        castore = castore_container("castore.yaml")
        catalog = providers.Singleton(Catalog, blobs=castore.blob("default"))

    app = Application()
    app.wire(modules=[views])          # Provide["castore.blobservices.default"] works too

Declaring the slot in the class body (rather than assigning a provider to an *instance*)
is what keeps ``wire()`` working (dependency-injector issue #634). Instantiating the host
deep-copies its providers, and a deep copy of a :class:`CastoreContainer` is a fresh
castore container built from the same validated graph (no services shared, overrides
carried over), with the host's references rewired to it: every host instance gets its
own services. A plain ``providers.Container(container=castore)`` behaves the same;
:class:`CastoreContainerProvider` adds the typed :meth:`~CastoreContainerProvider.blob`
and :meth:`~CastoreContainerProvider.directory`. The config is read and validated when
the class body runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from dependency_injector import containers, providers

from castore_di.composition.container import CastoreContainer
from castore_di.composition.loader import ConfigSource
from castore_di.composition.registry import Registry

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.directoryservice.base import DirectoryService

__all__ = ["CastoreContainerProvider", "castore_container", "fresh_copy"]


def fresh_copy(container: CastoreContainer, memo: dict[int, Any] | None = None) -> CastoreContainer:
    """A new container for ``container``'s graph, recording old -> new objects in ``memo``.

    Nothing built by ``container`` is shared: every service is created anew on first use.
    Overrides of instance providers are carried over. With ``memo`` (a ``copy.deepcopy``
    memo), providers that referenced the old container's providers are copied onto the new.
    The same as ``copy.deepcopy(container, memo)`` (:meth:`CastoreContainer.__deepcopy__`).
    """
    return container.__deepcopy__({} if memo is None else memo)


class CastoreContainerProvider(providers.Container):  # type: ignore[type-arg]
    """A ``providers.Container`` slot for a :class:`CastoreContainer` in a host container.

    Calling it returns the castore container. Attribute access reaches the kinds
    (``slot.blobservices.default``); :meth:`blob` and :meth:`directory` are the typed
    equivalents. Each deep copy (each host instance) holds a fresh castore container, as
    :meth:`CastoreContainer.__deepcopy__` makes.
    """

    # For type checkers: the kinds are reached through ``providers.Container.__getattr__``.
    blobservices: providers.Container[containers.DynamicContainer]
    directoryservices: providers.Container[containers.DynamicContainer]

    def __init__(self, container: CastoreContainer | None = None) -> None:
        # ``None`` only while dependency-injector duplicates the provider in a deep copy.
        super().__init__(None, container=container)  # type: ignore[arg-type]

    @property
    def castore(self) -> CastoreContainer:
        """The castore container this slot holds."""
        return cast(CastoreContainer, self.container)

    def blob(self, name: str = "default") -> providers.Provider[BlobService]:
        """The provider of blob service instance ``name``, for host provider arguments."""
        return self.castore.provider(f"blobservices.{name}")

    def directory(self, name: str = "default") -> providers.Provider[DirectoryService]:
        """The provider of directory service instance ``name``."""
        return self.castore.provider(f"directoryservices.{name}")


def castore_container(source: ConfigSource, registry: Registry | None = None) -> CastoreContainerProvider:
    """A host-container slot holding the castore container of ``source``.

    ``source`` is what :func:`castore_di.load_container` takes (a file path or a mapping);
    it is read and validated now. Services are created on first use, per host instance.
    """
    from castore_di.composition import load_container

    return CastoreContainerProvider(load_container(source, registry))
