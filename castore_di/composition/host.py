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
and :meth:`~CastoreContainerProvider.directory`. With a file path or a mapping, the config
is read and validated when the class body runs.

The config can also come from the host's own ``providers.Configuration`` (or an option of
it)::

    class Application(containers.DeclarativeContainer):
        config = providers.Configuration()
        castore = castore_container(config.castore)
        archive = providers.Singleton(Archive, blobs=castore.blob("default"))

    app = Application()
    app.config.from_dict({"castore": {"blobservices": {"default": "memory://"}}})

Then each host instance reads its castore config when it is *first needed* (its first
service, ``app.castore()``, or ``app.init_resources()``), so ``config.from_dict`` or
``config.castore.override(...)`` before that (per test) takes effect. The whole config is
validated then, before any service is built; errors name the path inside the host config
(``config.castore.blobservices.default.type: unknown type …``). Host providers reference
instances through :class:`LazyCastoreSlot` stand-ins that resolve on call; override
instances with ``app.castore().override_instance(...)``.

Lifecycle: the slot takes part in the host's ``init_resources()`` / ``shutdown_resources()``
(sync or awaited): init builds every castore instance, shutdown closes them, dependents
first, once. Resource shutdown in dependency-injector follows direct Resource edges only,
so a host *Resource* that uses castore services should take ``castore.lifecycle`` (a
Resource whose value is the castore container) as an argument: it is then shut down first.
"""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any, cast

from dependency_injector import containers, providers

from castore_di.composition.config import KINDS
from castore_di.composition.container import CastoreContainer, _lifecycle
from castore_di.composition.loader import ConfigSource
from castore_di.composition.registry import Registry
from castore_di.errors import ConfigError, CycleError

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.directoryservice.base import DirectoryService
    from castore_di.metrics import Metrics

__all__ = [
    "CastoreContainerProvider",
    "LazyCastoreSlot",
    "castore_container",
    "fresh_copy",
    "init_resources",
    "shutdown_resources",
]

HostConfig = providers.Configuration | providers.ConfigurationOption


async def init_resources(container: Any) -> None:
    """``await container.init_resources()`` for strictly typed code.

    dependency-injector's stub types the call as an optional awaitable (it is ``None`` when
    no resource is async); this awaits it when there is something to await.
    """
    result = container.init_resources()
    if result is not None:
        await result


async def shutdown_resources(container: Any) -> None:
    """``await container.shutdown_resources()`` for strictly typed code (see :func:`init_resources`)."""
    result = container.shutdown_resources()
    if result is not None:
        await result


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


def castore_container(
    source: "ConfigSource | HostConfig",
    registry: Registry | None = None,
    *,
    metrics: "Metrics | providers.Provider[Metrics] | None" = None,
) -> "CastoreContainerProvider | LazyCastoreSlot":
    """A host-container slot holding the castore container of ``source``.

    ``source`` is what :func:`castore_di.load_container` takes (a file path or a mapping),
    read and validated now; or a host ``providers.Configuration`` (or an option of one),
    read and validated when first needed, per host instance (see the module docs).
    Services are created on first use, per host instance. ``metrics`` (a
    :class:`~castore_di.metrics.Metrics`, or with a Configuration source also a host
    provider of one, e.g. ``providers.Singleton(Metrics)``) records every operation.
    """
    if isinstance(source, (providers.Configuration, providers.ConfigurationOption)):
        return LazyCastoreSlot(source, registry, metrics=metrics)
    if isinstance(metrics, providers.Provider):
        raise ConfigError("a metrics provider needs a Configuration source; pass a Metrics object")
    from castore_di.composition import load_container

    return CastoreContainerProvider(load_container(source, registry, metrics=metrics))


def _instance(container: CastoreContainer, instance_id: str) -> Any:
    return container.provider(instance_id)()


class _KindRefs:
    """``slot.blobservices``: attribute access yields the stand-in of each instance."""

    def __init__(self, slot: "LazyCastoreSlot", kind: str) -> None:
        self._slot = slot
        self._kind = kind

    def __getattr__(self, name: str) -> providers.Provider[Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._slot.ref(f"{self._kind}.{name}")


class LazyCastoreSlot(providers.Provider):  # type: ignore[type-arg]
    """A host slot whose castore config comes from a host ``Configuration`` (option).

    Calling it returns the castore container, created (config read and validated) on the
    first call of this host instance. ``slot.blobservices.<name>``, :meth:`blob`,
    :meth:`directory` and :meth:`ref` are stand-in providers for host provider arguments
    and wiring ids; they resolve through the container when called (overrides of the
    slot itself, e.g. ``Application(castore=other_container)``, apply).
    """

    blobservices: Any
    directoryservices: Any

    def __init__(
        self,
        config: "HostConfig | None" = None,
        registry: Registry | None = None,
        *,
        metrics: "Metrics | providers.Provider[Metrics] | None" = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._metrics = metrics
        self._container: CastoreContainer | None = None
        self._lock = threading.Lock()
        self._refs: dict[str, providers.Provider[Any]] = {}
        self.lifecycle = providers.Resource(_slot_lifecycle, _Unresolved(self))
        super().__init__()

    def __getattr__(self, name: str) -> Any:
        if name in KINDS:
            return _KindRefs(self, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __deepcopy__(self, memo: dict[Any, Any] | None = None) -> "LazyCastoreSlot":
        memo = {} if memo is None else memo
        copied = memo.get(id(self))
        if copied is not None:
            return cast(LazyCastoreSlot, copied)
        fresh = type(self)(None, self._registry)  # a fresh slot: its own container, made on need
        memo[id(self)] = fresh
        memo[id(self.lifecycle)] = fresh.lifecycle
        fresh._config = copy.deepcopy(self._config, memo)
        if isinstance(self._metrics, providers.Provider):
            fresh._metrics = copy.deepcopy(self._metrics, memo)
        else:
            fresh._metrics = self._metrics  # one registry for every host instance
        for iid, ref in self._refs.items():
            memo[id(ref)] = fresh.ref(iid)
        for overriding in self.overridden:
            fresh.override(copy.deepcopy(overriding, memo))
        return fresh

    @property
    def related(self) -> Any:
        yield self.lifecycle
        if self._config is not None:
            yield self._config
        if isinstance(self._metrics, providers.Provider):
            yield self._metrics
        yield from super().related

    def _provide(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CastoreContainer:
        return self.castore

    @property
    def castore(self) -> CastoreContainer:
        """This slot's own castore container (not an override), created on first need."""
        container = self._container
        if container is None:
            with self._lock:
                container = self._container
                if container is None:
                    container = self._container = self._load()
        return container

    def _load(self) -> CastoreContainer:
        from castore_di.composition import load_container

        if self._config is None:
            raise ConfigError("castore slot has no configuration")
        name = self._config.get_name()
        raw = self._config()
        if raw is None:
            raise ConfigError("no castore configuration given (empty host config)", path=name)
        metrics = self._metrics() if isinstance(self._metrics, providers.Provider) else self._metrics
        try:
            return load_container(raw, self._registry, metrics=metrics)
        except CycleError as e:  # its message names full instance ids: prefix the config's place
            raise CycleError(f"{name}: {e}", e.cycle) from e
        except ConfigError as e:
            path = f"{name}.{e.path}" if e.path else name
            try:
                error = type(e)(e.detail, path=path)
            except TypeError:  # a subclass with its own constructor keeps its message
                raise e from None
            raise error from e

    def ref(self, instance_id: str) -> providers.Provider[Any]:
        """The stand-in provider of ``"<kind>.<name>"`` (one per id, reused)."""
        ref = self._refs.get(instance_id)
        if ref is None:
            ref = self._refs[instance_id] = providers.Callable(_instance, self, instance_id)
        return ref

    def blob(self, name: str = "default") -> providers.Provider[BlobService]:
        """The stand-in provider of blob service instance ``name``."""
        return self.ref(f"blobservices.{name}")

    def directory(self, name: str = "default") -> providers.Provider[DirectoryService]:
        """The stand-in provider of directory service instance ``name``."""
        return self.ref(f"directoryservices.{name}")


class _Unresolved:
    """Passes a provider to a provider's function as the provider itself (not its value)."""

    def __init__(self, target: LazyCastoreSlot) -> None:
        self.target = target

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Unresolved":
        return _Unresolved(copy.deepcopy(self.target, memo))


def _slot_lifecycle(slot: _Unresolved) -> Any:
    slot.target.lifecycle.reset_async_mode()
    return _lifecycle(slot.target())
