"""The registry: per service kind, ``type`` tag -> config class, imported on first use.

Built-in types are listed (as dotted paths) in ``castore_di.blobservice.BUILTIN_TYPES`` and
``castore_di.directoryservice.BUILTIN_TYPES``; third-party types come from the entry-point
group ``castore_di.services`` (name ``<kind>.<tag>``, value ``module:ConfigClass``) or from
:meth:`Registry.register`. Kinds are registered too: ``blobservices`` and
``directoryservices`` are built in; a third party adds one (``pathinfoservices``) with
:meth:`Registry.register_kind` or the entry-point group ``castore_di.kinds`` (name = kind,
value = ``module:ConfigBaseClass``), and configs then get a section of that name.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Mapping
from typing import Union

from castore_di.composition.config import (
    KINDS,
    BlobServiceConfig,
    DirectoryServiceConfig,
    ServiceConfig,
    check_kind_name,
    url_tag,
)
from castore_di.composition.converter import brief, suggest
from castore_di.errors import ConfigError, MissingDependencyError, UnknownTypeError

__all__ = ["Registry", "default_registry", "ENTRY_POINT_GROUP", "KINDS_ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "castore_di.services"
KINDS_ENTRY_POINT_GROUP = "castore_di.kinds"

_Target = Union[str, type[ServiceConfig]]
# Attributes of the container a kind's sub-container would shadow.
_RESERVED_KINDS = {"graph", "provider", "providers", "reset", "close", "aclose", "parent", "container",
                   "wire", "unwire", "override", "overridden", "dependencies", "wiring_config",
                   "blob_service", "directory_service", "override_instance", "traverse", "reset_singletons",
                   "init_resources", "shutdown_resources", "set_provider", "set_providers"}


class Registry:
    """Maps ``(kind, tag)`` to config classes; lookups import lazily and cache."""

    def __init__(self) -> None:
        self._targets: dict[str, dict[str, _Target]] = {k: {} for k in KINDS}
        self._bases: dict[str, type[ServiceConfig]] = {
            "blobservices": BlobServiceConfig, "directoryservices": DirectoryServiceConfig,
        }
        self._lock = threading.Lock()

    def register_kind(self, base: type[ServiceConfig], *, replace: bool = False) -> None:
        """Add the service kind ``base.kind``: a config section whose types derive from ``base``.

        ``base`` is a :class:`ServiceConfig` subclass with its own ``kind`` (for example
        ``"pathinfoservices"``); the kind's types are registered with :meth:`register`.
        """
        if not (isinstance(base, type) and issubclass(base, ServiceConfig)) or "kind" not in vars(base):
            raise ConfigError(f"{base!r} is not a ServiceConfig subclass declaring its own 'kind'")
        kind = check_kind_name(base.kind)
        if kind in _RESERVED_KINDS:
            raise ConfigError(f"invalid service kind {kind!r}: the name is taken by the container")
        with self._lock:
            if kind in self._bases and not replace:
                raise ConfigError(f"service kind {kind!r} is already registered")
            self._bases[kind] = base
            self._targets.setdefault(kind, {})

    def kinds(self) -> tuple[str, ...]:
        """The registered kinds: the built-in ones first, then in registration order."""
        return tuple(self._targets)

    def kind_base(self, kind: str) -> type[ServiceConfig]:
        """The config base class of ``kind``."""
        return self._bases[kind]

    def register(self, kind: str, tag: str, target: _Target, *, replace: bool = False) -> None:
        """Register a config class (or its ``module:Class`` path) under ``kind``/``tag``."""
        if kind not in self._targets:
            raise ConfigError(f"unknown service kind {kind!r}{suggest(kind, self.kinds())}")
        if not tag or "+" in tag or ":" in tag:
            raise ConfigError(f"invalid type tag {tag!r}")
        with self._lock:
            if tag in self._targets[kind] and not replace:
                raise ConfigError(f"type {tag!r} is already registered for {kind}")
            self._targets[kind][tag] = target

    def register_many(self, kind: str, types: Mapping[str, _Target]) -> None:
        for tag, target in types.items():
            self.register(kind, tag, target)

    def tags(self, kind: str) -> list[str]:
        return sorted(self._targets[kind])

    def resolve(self, kind: str, tag: object, path: str | None = None) -> type[ServiceConfig]:
        """The config class for ``tag``; an unknown tag lists the known ones."""
        known = self._targets[kind]
        if not isinstance(tag, str) or tag not in known:
            shown = brief(tag) if isinstance(tag, str) else brief(repr(tag))
            raise UnknownTypeError(f"unknown type {shown}{suggest(str(tag), list(known))}", path=path)
        target = known[tag]
        if isinstance(target, str):
            cls = _import(target, path)
            if not (isinstance(cls, type) and issubclass(cls, self._bases[kind])) or cls.kind != kind:
                raise ConfigError(f"{target} is not a {kind} config class", path=path)
            with self._lock:
                self._targets[kind][tag] = cls
            return cls
        return target

    def resolve_url(self, kind: str, url: str, path: str | None = None) -> ServiceConfig:
        """A config from a URL: the scheme up to ``+`` picks the type."""
        try:
            tag = url_tag(url)
        except ConfigError as e:
            raise ConfigError(e.detail, path=path) from None
        cls = self.resolve(kind, tag, path)
        try:
            return cls.from_url(url)
        except ConfigError as e:
            raise type(e)(e.detail, path=path) from e
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid URL {url!r}: {e}", path=path) from e

    def load_entry_points(self) -> None:
        """Register third-party kinds (``castore_di.kinds``), then types (``castore_di.services``)."""
        if not _entry_points_may_exist((KINDS_ENTRY_POINT_GROUP, ENTRY_POINT_GROUP)):
            return
        import importlib.metadata

        for ep in importlib.metadata.entry_points(group=KINDS_ENTRY_POINT_GROUP):
            base = _import(ep.value, f"{KINDS_ENTRY_POINT_GROUP}:{ep.name}")
            if getattr(base, "kind", None) != ep.name:
                raise ConfigError(f"entry point {ep.name!r} in {KINDS_ENTRY_POINT_GROUP}: {ep.value} has another kind")
            self.register_kind(base, replace=True)  # type: ignore[arg-type]
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            kind, sep, tag = ep.name.partition(".")
            if not sep or kind not in self._targets:
                raise ConfigError(
                    f"entry point {ep.name!r} in {ENTRY_POINT_GROUP}: name must be '<kind>.<tag>' "
                    f"with kind one of {', '.join(self.kinds())}"
                )
            self.register(kind, tag, ep.value, replace=True)

    def copy(self) -> "Registry":
        new = Registry()
        new._bases = dict(self._bases)
        new._targets = {kind: dict(types) for kind, types in self._targets.items()}
        return new


def _entry_points_may_exist(groups: tuple[str, ...]) -> bool:
    """Whether an installed distribution may declare an entry point in one of ``groups``.

    A quick look at the ``entry_points.txt`` files importlib.metadata would read (the
    ``*.dist-info``/``*.egg-info`` directories on ``sys.path``), so that the usual case, no
    third-party backend, costs neither importlib.metadata's import nor its full scan (about
    20 ms of every ``castore`` command). What this look cannot see (a zip file on
    ``sys.path``, a finder of distributions other than the standard one) answers yes.
    """
    from importlib.machinery import PathFinder

    if any(hasattr(f, "find_distributions") and f is not PathFinder for f in sys.meta_path):
        return True
    for root in sys.path:
        try:
            children = os.listdir(root or ".")
        except OSError:
            if os.path.isfile(root):
                return True
            continue
        egg = root.lower().endswith(".egg")
        for child in children:
            low = child.lower()
            if low.endswith((".dist-info", ".egg-info")) or (egg and low == "egg-info"):
                try:
                    with open(os.path.join(root, child, "entry_points.txt"), "rb") as f:
                        text = f.read()
                except OSError:
                    continue
                if any(group.encode() in text for group in groups):
                    return True
    return False


def _import(target: str, path: str | None) -> object:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingDependencyError(f"cannot import {module_name}: {e}", path=path) from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ConfigError(f"{module_name} has no attribute {attr!r}", path=path) from e


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry: built-in types plus installed entry points."""
    global _default
    with _default_lock:
        if _default is None:
            from castore_di import blobservice, directoryservice

            reg = Registry()
            reg.register_many("blobservices", blobservice.BUILTIN_TYPES)
            reg.register_many("directoryservices", directoryservice.BUILTIN_TYPES)
            reg.load_entry_points()
            _default = reg
        return _default
