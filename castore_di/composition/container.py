"""The dependency-injector container generated from a composition graph.

Shape: a :class:`CastoreContainer` (a ``DynamicContainer``) with one sub-container per
kind (``blobservices``, ``directoryservices``) holding one ``ThreadSafeSingleton`` provider
per named instance, created in dependency order; reference fields become provider keyword
arguments. Anonymous instances (URLs in reference fields) get providers that are not
attributes. Applications inject ``Provide["blobservices.default"]``; tests override
providers with :meth:`CastoreContainer.override_instance`, which also resets every dependent's
cached instance; :meth:`CastoreContainer.aclose` closes services in reverse creation order.

A deep copy (what a host ``DeclarativeContainer`` makes of a ``providers.Container``
holding one) is a *fresh* container for the same validated graph: no service is shared or
copied, each is created anew on first use; overrides of instance providers are carried
over (the overriding providers deep-copied); the copy is closed on its own. Providers
that reference the container's providers and are copied *after* it in the same deepcopy
(a host ``DeclarativeContainer`` copies in declaration order) are rewired to the fresh
container. Copying an instance provider on its own, or before its container, raises
:class:`~castore_di.errors.ConfigError`: it has no container to belong to. (A
``ThreadSafeSingleton`` subclass that copies its container first would lift that, but a
Python subclass makes every call ~2.5x slower: dependency-injector's Cython fast path
checks for Python overrides.)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dependency_injector import containers, providers

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.directoryservice.base import DirectoryService

from castore_di.composition.config import KINDS
from castore_di.composition.graph import CompositionGraph, Instance, InstanceId
from castore_di.errors import ConfigError, InstantiationError, UnknownInstanceError

__all__ = ["CastoreContainer", "build_container"]

T = TypeVar("T")


class _Tracker:
    """Records created services in creation order, for shutdown."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: list[tuple[InstanceId, Any]] = []

    def __deepcopy__(self, memo: dict[Any, Any]) -> "_Tracker":
        # Reached only when an instance provider is copied without its container first.
        raise ConfigError(
            "a castore instance provider was deep-copied before its container: copy the "
            "CastoreContainer (or the providers.Container holding it) first, or in the same deepcopy"
        )


def _instantiate(instance: Instance, tracker: _Tracker, **deps: Any) -> Any:
    try:
        service = instance.config.build(**deps)
    except ConfigError:
        raise
    except Exception as e:
        raise InstantiationError(f"cannot build {instance.type_tag!r} service: {e}", path=instance.id) from e
    with tracker.lock:
        tracker.created.append((instance.id, service))
    return service


class CastoreContainer(containers.DynamicContainer):  # type: ignore[misc]
    """The container of a composition. Build it with :func:`castore_di.load_container`."""

    blobservices: providers.Container[containers.DynamicContainer]
    directoryservices: providers.Container[containers.DynamicContainer]
    graph: CompositionGraph
    _tracker: _Tracker
    _all: dict[InstanceId, providers.Provider[Any]]
    _blobs: dict[str, providers.Provider[BlobService]]
    _directories: dict[str, providers.Provider[DirectoryService]]

    def _setup(self, graph: CompositionGraph) -> None:
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "_tracker", _Tracker())
        object.__setattr__(self, "_all", {})
        # Per-kind name -> provider, so the typed accessors skip formatting an instance id.
        object.__setattr__(self, "_blobs", {})
        object.__setattr__(self, "_directories", {})
        by_kind: dict[str, dict[str, Any]] = {"blobservices": self._blobs, "directoryservices": self._directories}
        for kind in KINDS:
            setattr(self, kind, providers.Container(containers.DynamicContainer))
        all_providers: dict[InstanceId, providers.Provider[Any]] = self._all
        for instance in graph:
            deps = {field: all_providers[ref] for field, ref in instance.refs.items()}
            provider: providers.Provider[Any] = providers.ThreadSafeSingleton(
                _instantiate, instance, self._tracker, **deps
            )
            all_providers[instance.id] = provider
            by_kind[instance.kind][instance.name] = provider
            if not instance.anonymous:
                getattr(self, instance.kind).container.set_provider(instance.name, provider)

    def __deepcopy__(self, memo: dict[Any, Any] | None) -> "CastoreContainer":
        """A fresh container for the same graph (see the module docs); ``memo`` maps old to new."""
        memo = {} if memo is None else memo
        copied = memo.get(id(self))
        if copied is not None:
            return cast(CastoreContainer, copied)
        fresh = type(self)()
        fresh._setup(self.graph)
        memo[id(self)] = fresh
        for kind in KINDS:
            old_sub, new_sub = getattr(self, kind), getattr(fresh, kind)
            memo[id(old_sub)] = new_sub
            memo[id(old_sub.container)] = new_sub.container
        for iid, provider in self._all.items():
            memo[id(provider)] = fresh._all[iid]
        for iid, provider in self._all.items():
            for overriding in provider.overridden:
                fresh._all[iid].override(copy.deepcopy(overriding, memo))
        fresh.wiring_config = copy.deepcopy(self.wiring_config, memo)
        if self.parent is not None:
            fresh.assign_parent(copy.deepcopy(self.parent, memo))
        return fresh

    # -- typed access ------------------------------------------------------------------

    def provider(self, instance_id: str) -> providers.Provider[Any]:
        """The provider of ``"<kind>.<name>"`` (anonymous instances included)."""
        try:
            return self._all[instance_id]
        except KeyError:
            raise UnknownInstanceError(
                f"unknown instance (known: {', '.join(sorted(self._all)) or 'none'})", path=instance_id
            ) from None

    def blob_service(self, name: str = "default") -> BlobService:
        """The blob service instance ``name``, created on first use."""
        try:
            provider = self._blobs[name]
        except KeyError:
            provider = self.provider(f"blobservices.{name}")  # raises UnknownInstanceError
        return provider()

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The directory service instance ``name``, created on first use."""
        try:
            provider = self._directories[name]
        except KeyError:
            provider = self.provider(f"directoryservices.{name}")  # raises UnknownInstanceError
        return provider()

    # -- tests -------------------------------------------------------------------------

    def reset(self, instance_id: str, *, dependents: bool = True) -> None:
        """Drop the cached instance of ``instance_id`` (and of everything that uses it)."""
        ids = [instance_id, *(self.graph.dependents(instance_id) if dependents else [])]
        for iid in ids:
            provider = self.provider(iid)
            reset = getattr(provider, "reset", None)
            if reset is not None:
                reset()

    @contextlib.contextmanager
    def override_instance(self, instance_id: str, replacement: Any) -> Iterator[None]:
        """Override one provider; dependents created inside see the replacement.

        ``replacement`` is a provider or a ready object. Cached dependents are reset on
        entry and on exit, so nothing keeps the replacement after the block.
        """
        provider = self.provider(instance_id)
        repl = replacement if isinstance(replacement, providers.Provider) else providers.Object(replacement)
        self.reset(instance_id)
        with provider.override(repl):
            try:
                yield
            finally:
                self.reset(instance_id)

    # -- shutdown ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every service this container created, dependents first. Idempotent."""
        with self._tracker.lock:
            created = list(self._tracker.created)
            self._tracker.created.clear()
        for provider in self._all.values():
            reset = getattr(provider, "reset", None)
            if reset is not None:
                reset()
        errors: list[BaseException] = []
        for _iid, service in reversed(created):
            close = getattr(service, "close", None)
            if close is None:
                continue
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:  # keep closing the rest; report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Synchronous :meth:`aclose` for code without a running event loop."""
        asyncio.run(self.aclose())

    async def __aenter__(self) -> "CastoreContainer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def build_container(graph: CompositionGraph) -> CastoreContainer:
    """A container for a validated graph. Creates providers only, no services."""
    container = CastoreContainer()
    container._setup(graph)
    return container
