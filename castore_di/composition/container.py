"""The dependency-injector container generated from a composition graph.

Shape: a :class:`CastoreContainer` (a ``DynamicContainer``) with one sub-container per
kind (``blobservices``, ``directoryservices``, and any kind the registry adds) holding one
provider per named instance, created in dependency order, and a ``lifecycle`` ``Resource``.
Reference fields are wired as provider arguments in dependency-injector's terms: the
referenced provider, ``providers.Object(None)`` for an absent optional reference, a
``providers.List`` of providers for a list, a ``providers.Dict`` for a map. Anonymous instances (URLs in
reference fields) get providers that are not attributes. Applications inject
``Provide["blobservices.default"]``.

Building. Each instance is built once, on first use, by a slot that the provider calls:
concurrent first use from threads and from asyncio tasks (in any event loop) builds one
instance. A config whose ``build`` is ``async def`` is awaited; its provider (and the
providers of instances that reference it) then return awaitables, as dependency-injector's
async providers do, and :meth:`CastoreContainer.ablob_service` awaits them. A build that
fails is not cached: the next use tries again. Its error names the chain of instances that
needed it: ``blobservices.default -> blobservices.remote: cannot build 'grpc' service: …``.

Lifecycle. ``container.init_resources()`` (or a host container's, when this container is
a slot of it) builds every instance, awaited when called inside an event loop;
``shutdown_resources()`` closes every service built, dependents before what they depend
on, exactly once (:meth:`CastoreContainer.aclose` does the same and is idempotent). A sync
``init_resources()`` (no event loop running) builds only instances whose builds are sync.

Overrides. :meth:`CastoreContainer.override_instance` keeps state: after the block the
original instance and the dependents built before the block come back, the same objects.

A deep copy (what a host ``DeclarativeContainer`` makes of a ``providers.Container``
holding one) is a *fresh* container for the same validated graph: no service is shared or
copied, each is created anew on first use; overrides of instance providers are carried
over (the overriding providers deep-copied); the copy is closed on its own. Providers
that reference the container's providers and are copied *after* it in the same deepcopy
(a host ``DeclarativeContainer`` copies in declaration order) are rewired to the fresh
container. Copying an instance provider on its own, or before its container, raises
:class:`~castore_di.errors.ConfigError`: it has no container to belong to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dependency_injector import containers, providers

from castore_di.composition.converter import listing
from castore_di.composition.direct import chain_error as _chain
from castore_di.composition.direct import close_all
from castore_di.composition.graph import CompositionGraph, Instance, InstanceId, Wiring
from castore_di.errors import ConfigError, InstantiationError, UnknownInstanceError

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.directoryservice.base import DirectoryService
    from castore_di.connectivity import ConnectivityReport
    from castore_di.metrics import Metrics

__all__ = ["CastoreContainer", "build_container"]

T = TypeVar("T")

_UNSET: Any = object()


class _State:
    """What a container's slots share: the services built, in build order, and metrics."""

    def __init__(self, metrics: "Metrics | None" = None) -> None:
        self.lock = threading.Lock()
        self.created: list[tuple[InstanceId, Any]] = []
        self.metrics = metrics

    def __deepcopy__(self, memo: dict[Any, Any]) -> "_State":
        return cast(_State, _orphan_copy())


def _orphan_copy() -> Any:
    # Reached only when an instance provider is copied without its container first.
    raise ConfigError(
        "a castore instance provider was deep-copied before its container: copy the "
        "CastoreContainer (or the providers.Container holding it) first, or in the same deepcopy"
    )


def _wire(wiring: Wiring, all_providers: dict[InstanceId, providers.Provider[Any]]) -> providers.Provider[Any]:
    """The provider argument of one reference field (see :data:`~castore_di.composition.graph.Wiring`)."""
    if wiring is None:
        return providers.Object(None)
    if isinstance(wiring, str):
        return all_providers[wiring]
    if isinstance(wiring, tuple):
        # an empty providers.List gives a tuple; build() is promised a list
        return providers.List(*(all_providers[i] for i in wiring)) if wiring else providers.Factory(list)
    return providers.Dict({key: all_providers[i] for key, i in wiring.items()})


class _Slot:
    """Builds one instance once and caches it; a failed build is not cached.

    ``value`` is the built service (``_UNSET`` before). Sync builds run under ``lock``;
    async builds publish a ``concurrent.futures.Future`` that other threads and tasks (of
    any event loop) wait on.
    """

    __slots__ = ("instance", "state", "deps", "is_async", "value", "lock", "pending", "provider")

    def __init__(self, instance: Instance, state: _State, deps: dict[str, providers.Provider[Any]], is_async: bool):
        self.instance = instance
        self.state = state
        self.deps = deps
        self.is_async = is_async
        self.value: Any = _UNSET
        self.lock = threading.Lock()
        self.pending: concurrent.futures.Future[Any] | None = None
        # The slot is an argument (not a bound method) so that copying a provider copies the
        # slot, which refuses unless its container is being copied (see the module docs).
        # Sync instances get a ThreadSafeSingleton in front of the slot: a cached call stays in
        # dependency-injector's C code (~4x faster than a Python call). The slot keeps the
        # truth; resetting the singleton makes it ask the slot again.
        self.provider: providers.Provider[Any] = (
            providers.Callable(_Slot.aget, self) if is_async else providers.ThreadSafeSingleton(_Slot.get, self)
        )

    def __deepcopy__(self, memo: dict[Any, Any]) -> "_Slot":
        return cast(_Slot, _orphan_copy())

    def set(self, value: Any) -> None:
        """Make ``value`` (``_UNSET``: nothing) the cached instance."""
        self.value = value
        reset = getattr(self.provider, "reset", None)
        if reset is not None:
            reset()

    def access(self) -> Any:
        """Sync access for the typed accessors (an async instance must be built already)."""
        if self.is_async and not self.provider.overridden:
            return self.built()
        return self.provider()

    # -- sync ----------------------------------------------------------------------------

    def get(self) -> Any:
        value = self.value
        if value is not _UNSET:
            return value
        with self.lock:
            if self.value is _UNSET:
                deps = {}
                for field, provider in self.deps.items():
                    try:
                        dep = provider()
                    except Exception as e:
                        raise _chain(self.instance.id, e) from e
                    if inspect.isawaitable(dep):
                        _discard(dep)
                        raise InstantiationError(
                            f"{field!r} is built asynchronously (an async override?): await this instance",
                            path=self.instance.id,
                        )
                    deps[field] = dep
                self._publish(self._call_build(deps))
            return self.value

    def _call_build(self, deps: dict[str, Any]) -> Any:
        instance = self.instance
        try:
            return instance.config.build(**deps)
        except ConfigError:
            raise
        except Exception as e:
            raise InstantiationError(f"cannot build {instance.type_tag!r} service: {e}", path=instance.id) from e

    def _publish(self, service: Any) -> None:
        metrics = self.state.metrics
        if metrics is not None:
            service = metrics.wrap(self.instance, service)
        with self.state.lock:
            self.state.created.append((self.instance.id, service))
        self.value = service

    # -- async ---------------------------------------------------------------------------

    async def aget(self) -> Any:
        value = self.value
        if value is not _UNSET:
            return value
        with self.lock:
            if self.value is not _UNSET:
                return self.value
            future = self.pending
            owner = future is None
            if future is None:
                future = self.pending = concurrent.futures.Future()
        if not owner:
            return await asyncio.wrap_future(future)
        try:
            deps = {}
            for field, provider in self.deps.items():
                try:
                    dep = provider()
                    if inspect.isawaitable(dep):
                        dep = await dep
                except Exception as e:
                    raise _chain(self.instance.id, e) from e
                deps[field] = dep
            service = self._call_build(deps)
            if inspect.isawaitable(service):
                try:
                    service = await service
                except ConfigError:
                    raise
                except Exception as e:
                    raise InstantiationError(
                        f"cannot build {self.instance.type_tag!r} service: {e}", path=self.instance.id
                    ) from e
        except BaseException as e:
            with self.lock:
                self.pending = None
            future.set_exception(e)
            future.exception()  # retrieved: a failure nobody else waited for is not logged
            raise
        with self.lock:
            self._publish(service)
            self.pending = None
        future.set_result(self.value)
        return self.value

    def built(self) -> Any:
        """The cached service for sync access to an async-built instance, or a clear error."""
        value = self.value
        if value is _UNSET:
            raise InstantiationError(
                "is built asynchronously: await container.ablob_service()/adirectory_service() "
                "or init_resources() first",
                path=self.instance.id,
            )
        return value


def _discard(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


class _SyncLifecycle:
    def __init__(self, container: "CastoreContainer") -> None:
        self.container = container

    def __enter__(self) -> "CastoreContainer":
        self.container.init_sync()
        return self.container

    def __exit__(self, *exc: object) -> None:
        self.container.close()


class _AsyncLifecycle:
    def __init__(self, container: "CastoreContainer") -> None:
        self.container = container

    async def __aenter__(self) -> "CastoreContainer":
        await self.container.init()
        return self.container

    async def __aexit__(self, *exc: object) -> None:
        await self.container.aclose()


def _lifecycle(container: "CastoreContainer") -> _SyncLifecycle | _AsyncLifecycle:
    # One Resource serves sync and awaited init_resources(): dependency-injector picks the
    # sync or async path from what this returns, and fixes it per call only after a reset.
    container.lifecycle.reset_async_mode()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _SyncLifecycle(container)
    return _AsyncLifecycle(container)


class CastoreContainer(containers.DynamicContainer):  # type: ignore[misc]
    """The container of a composition. Build it with :func:`castore_di.load_container`."""

    blobservices: providers.Container[containers.DynamicContainer]
    directoryservices: providers.Container[containers.DynamicContainer]
    lifecycle: providers.Resource[Any]
    graph: CompositionGraph
    _state: _State
    _slots: dict[InstanceId, _Slot]
    _all: dict[InstanceId, providers.Provider[Any]]
    _blobs: dict[str, Callable[[], Any]]
    _directories: dict[str, Callable[[], Any]]

    def _setup(self, graph: CompositionGraph, metrics: "Metrics | None" = None) -> None:
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "_state", _State(metrics))
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_all", {})
        # Per-kind name -> sync access, so the typed accessors skip formatting an instance id.
        object.__setattr__(self, "_blobs", {})
        object.__setattr__(self, "_directories", {})
        by_kind: dict[str, dict[str, Callable[[], Any]]] = {"blobservices": self._blobs, "directoryservices": self._directories}
        for kind in graph.kinds:
            setattr(self, kind, providers.Container(containers.DynamicContainer))
            by_kind.setdefault(kind, {})
        self.lifecycle = providers.Resource(_lifecycle, self)
        for instance in graph:
            deps = {field: _wire(wiring, self._all) for field, wiring in instance.wiring.items()}
            is_async = inspect.iscoroutinefunction(type(instance.config).build) or any(
                self._slots[ref].is_async for ref in instance.refs.values()
            )
            slot = _Slot(instance, self._state, deps, is_async)
            self._slots[instance.id] = slot
            self._all[instance.id] = slot.provider
            by_kind[instance.kind][instance.name] = slot.access if is_async else slot.provider
            if not instance.anonymous:
                getattr(self, instance.kind).container.set_provider(instance.name, slot.provider)

    def __deepcopy__(self, memo: dict[Any, Any] | None) -> "CastoreContainer":
        """A fresh container for the same graph (see the module docs); ``memo`` maps old to new."""
        memo = {} if memo is None else memo
        copied = memo.get(id(self))
        if copied is not None:
            return cast(CastoreContainer, copied)
        fresh = type(self)()
        fresh._setup(self.graph, self._state.metrics)
        memo[id(self)] = fresh
        for kind in self.graph.kinds:
            old_sub, new_sub = getattr(self, kind), getattr(fresh, kind)
            memo[id(old_sub)] = new_sub
            memo[id(old_sub.container)] = new_sub.container
        memo[id(self.lifecycle)] = fresh.lifecycle
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
        return self._slot(instance_id).provider

    def _slot(self, instance_id: str) -> _Slot:
        try:
            return self._slots[instance_id]
        except KeyError:
            raise UnknownInstanceError(
                f"unknown instance (known: {listing(self._slots)})", path=instance_id
            ) from None

    @property
    def metrics(self) -> "Metrics | None":
        """The metrics this container records into, if enabled (:func:`castore_di.load_container`)."""
        return self._state.metrics

    def blob_service(self, name: str = "default") -> BlobService:
        """The blob service instance ``name``, created on first use.

        An async-built instance must have been built already (awaited accessor or
        ``init_resources()``); otherwise this raises :class:`InstantiationError`.
        """
        try:
            access = self._blobs[name]
        except KeyError:
            access = self._slot(f"blobservices.{name}").access  # raises UnknownInstanceError
        return cast("BlobService", access())

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The directory service instance ``name``, created on first use (see :meth:`blob_service`)."""
        try:
            access = self._directories[name]
        except KeyError:
            access = self._slot(f"directoryservices.{name}").access  # raises UnknownInstanceError
        return cast("DirectoryService", access())

    async def ablob_service(self, name: str = "default") -> BlobService:
        """The blob service instance ``name``, awaiting an async build."""
        return cast("BlobService", await self.aget(f"blobservices.{name}"))

    async def adirectory_service(self, name: str = "default") -> DirectoryService:
        """The directory service instance ``name``, awaiting an async build."""
        return cast("DirectoryService", await self.aget(f"directoryservices.{name}"))

    async def aget(self, instance_id: str) -> Any:
        """Any instance by id, through its provider (overrides apply), awaited when async."""
        result = self._slot(instance_id).provider()
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- lifecycle ---------------------------------------------------------------------

    async def init(self, instance_ids: Iterable[str] | None = None) -> None:
        """Build every instance (or those named, and what they need), in dependency order."""
        ids = self.graph.order if instance_ids is None else list(instance_ids)
        for iid in ids:
            await self.aget(iid)

    def init_sync(self) -> None:
        """Build every instance whose build is sync (what a sync ``init_resources()`` does)."""
        for iid in self.graph.order:
            slot = self._slots[iid]
            if not slot.is_async:
                slot.provider()

    async def aclose(self) -> None:
        """Close every service this container created, dependents first. Idempotent.

        Every cached instance is dropped; later use builds new ones.
        """
        with self._state.lock:
            created = list(self._state.created)
            self._state.created.clear()
        for slot in self._slots.values():
            slot.set(_UNSET)
        error = await close_all(service for _iid, service in reversed(created))
        if self.lifecycle.initialized:  # a later init_resources() starts again
            self.lifecycle.reset_state()  # type: ignore[attr-defined]  # in 4.49, not in its stub
        if error is not None:
            raise error

    def close(self) -> None:
        """Synchronous :meth:`aclose` for code without a running event loop."""
        asyncio.run(self.aclose())

    async def __aenter__(self) -> "CastoreContainer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def check_connectivity(
        self, timeout: float = 10.0, instance_ids: Iterable[str] | None = None
    ) -> "ConnectivityReport":
        """Build each instance (default: all) and make one cheap round trip to its backend.

        See :mod:`castore_di.connectivity`; failures are reported, not raised.
        """
        from castore_di.connectivity import check_connectivity

        return await check_connectivity(self, timeout=timeout, instance_ids=instance_ids)

    # -- tests -------------------------------------------------------------------------

    def reset(self, instance_id: str, *, dependents: bool = True) -> None:
        """Drop the cached instance of ``instance_id`` (and of everything that uses it).

        Dropped services are still closed by :meth:`aclose`.
        """
        ids = [instance_id, *(self.graph.dependents(instance_id) if dependents else [])]
        for iid in ids:
            self._slot(iid).set(_UNSET)

    @contextlib.contextmanager
    def override_instance(self, instance_id: str, replacement: Any) -> Iterator[None]:
        """Override one instance; dependents used inside the block see the replacement.

        ``replacement`` is a provider or a ready object. The original instance is not
        touched: after the block it (and every dependent built before the block) comes
        back, the very same objects with their state. Dependents built inside the block are
        discarded on exit (and closed by :meth:`aclose`). Nests, and works for anonymous
        (URL) instances.
        """
        provider = self.provider(instance_id)
        repl = replacement if isinstance(replacement, providers.Provider) else providers.Object(replacement)
        dependents = [self._slots[iid] for iid in self.graph.dependents(instance_id)]
        saved = [slot.value for slot in dependents]
        for slot in dependents:
            slot.set(_UNSET)
        with provider.override(repl):
            try:
                yield
            finally:
                for slot, value in zip(dependents, saved):
                    slot.set(value)


def build_container(graph: CompositionGraph, metrics: "Metrics | None" = None) -> CastoreContainer:
    """A container for a validated graph. Creates providers only, no services.

    With ``metrics``, every service built is wrapped to record its operations.
    """
    container = CastoreContainer()
    container._setup(graph, metrics)
    return container
