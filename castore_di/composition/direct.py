"""A validated graph's services built on demand without dependency-injector (for the CLI).

:class:`DirectInstances` is what :class:`~castore_di.composition.CastoreContainer`'s typed
accessors do, for a short-lived program that only asks for services by name: each instance
is built once, on first use, after what it references (passed to ``build`` in the same
shapes, :data:`~castore_di.composition.graph.Wiring`), with the same errors (a failed
dependency as ``a -> b: …``) and metrics wrapping, and closed dependents first. It has no
providers, so nothing to override or wire: programs use the container. The ``castore``
command uses this one, so that a command such as ``castore ls`` does not import
dependency-injector and build providers (about a twentieth of its time).

A graph in which some build is ``async def`` (a third-party type) is not for this class:
:func:`direct_instances` returns ``None`` and the caller uses the container.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from castore_di.composition.converter import listing
from castore_di.errors import ConfigError, InstantiationError, UnknownInstanceError

if TYPE_CHECKING:
    from castore_di.blobservice.base import BlobService
    from castore_di.composition.graph import CompositionGraph, InstanceId, Wiring
    from castore_di.directoryservice.base import DirectoryService
    from castore_di.metrics import Metrics

__all__ = ["DirectInstances", "direct_instances", "chain_error", "close_all"]


def chain_error(instance_id: InstanceId, error: BaseException) -> ConfigError:
    """``error`` from a dependency, re-raised with ``instance_id`` prefixed to its chain."""
    if isinstance(error, ConfigError) and error.path:
        try:
            return type(error)(error.detail, path=f"{instance_id} -> {error.path}")
        except TypeError:  # a subclass with its own constructor
            return InstantiationError(error.detail, path=f"{instance_id} -> {error.path}")
    return InstantiationError(f"{type(error).__name__}: {error}", path=instance_id)


async def close_all(services: Iterable[Any]) -> BaseException | None:
    """Close each service in turn (callers pass dependents first); every one is tried and
    the first failure is returned, for the caller to raise once its own state is reset."""
    errors: list[BaseException] = []
    for service in services:
        close = getattr(service, "close", None)
        if close is None:
            continue
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception as e:  # keep closing the rest
            errors.append(e)
    return errors[0] if errors else None


def direct_instances(graph: CompositionGraph, metrics: Metrics | None = None) -> DirectInstances | None:
    """A :class:`DirectInstances` for ``graph``, or ``None`` when one of its builds is async."""
    if any(inspect.iscoroutinefunction(type(i.config).build) for i in graph):
        return None
    return DirectInstances(graph, metrics)


class DirectInstances:
    """Builds the instances of a graph (whose builds are all sync) on first use; see the module docs."""

    def __init__(self, graph: CompositionGraph, metrics: Metrics | None = None) -> None:
        self.graph = graph
        self.metrics = metrics
        self._built: dict[InstanceId, Any] = {}
        self._lock = threading.RLock()

    def blob_service(self, name: str = "default") -> BlobService:
        """The blob service instance ``name``, created on first use."""
        service: BlobService = self.get(f"blobservices.{name}")
        return service

    def directory_service(self, name: str = "default") -> DirectoryService:
        """The directory service instance ``name``, created on first use."""
        service: DirectoryService = self.get(f"directoryservices.{name}")
        return service

    def get(self, instance_id: InstanceId) -> Any:
        """Any instance by id (anonymous ones too), built with what it references."""
        with self._lock:
            if instance_id in self._built:
                return self._built[instance_id]
            instance = self.graph.instances.get(instance_id)
            if instance is None:
                raise UnknownInstanceError(f"unknown instance (known: {listing(self.graph.order)})", path=instance_id)
            deps = {}
            for field, wiring in instance.wiring.items():
                try:
                    deps[field] = self._wired(wiring)
                except Exception as e:
                    raise chain_error(instance_id, e) from e
            try:
                service = instance.config.build(**deps)
            except ConfigError:
                raise
            except Exception as e:
                raise InstantiationError(f"cannot build {instance.type_tag!r} service: {e}", path=instance_id) from e
            if self.metrics is not None:
                service = self.metrics.wrap(instance, service)
            self._built[instance_id] = service
            return service

    def _wired(self, wiring: Wiring) -> Any:
        if wiring is None:
            return None
        if isinstance(wiring, str):
            return self.get(wiring)
        if isinstance(wiring, tuple):
            return [self.get(i) for i in wiring]
        return {key: self.get(i) for key, i in wiring.items()}

    async def aclose(self) -> None:
        """Close every service built, dependents first. Idempotent; later use builds anew."""
        with self._lock:
            created = list(self._built.values())
            self._built.clear()
        error = await close_all(reversed(created))
        if error is not None:
            raise error
