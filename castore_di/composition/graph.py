"""The instance graph: every instance structured, every reference resolved, checked.

Building the graph validates the whole config before any provider or service exists:
unknown sections, types and fields, bad values, missing references and cycles (across
kinds too, and among instances nothing references) are refused with the path of the
problem. A reference holding a URL (``memory://``) becomes an anonymous instance of its
own, named after the field that holds it (``blobservices.default.remote``).
"""

from __future__ import annotations

import functools
import graphlib
import keyword
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from castore_di.composition.config import KINDS, ServiceConfig, reference_fields
from castore_di.composition.loader import check_structure
from castore_di.composition.converter import brief, structure_config, suggest
from castore_di.composition.registry import Registry, default_registry
from castore_di.errors import ConfigError, CycleError, UnknownInstanceError

__all__ = ["Instance", "CompositionGraph", "build_graph", "InstanceId", "reserved_names"]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@functools.cache
def reserved_names() -> frozenset[str]:
    """Names an instance cannot have: every public attribute of the dependency-injector
    classes a lookup such as ``Provide["blobservices.<name>"]`` passes through (the section's
    ``providers.Container`` and ``DynamicContainer``, and the ``ThreadSafeSingleton`` of an
    instance), plus the kind names (anonymous instance ids use them)."""
    from dependency_injector import containers, providers

    names: set[str] = set(KINDS)
    for obj in (containers.DynamicContainer, containers.DynamicContainer(), providers.Container,
                providers.Container(containers.DynamicContainer), providers.ThreadSafeSingleton,
                providers.ThreadSafeSingleton(object)):
        names.update(n for n in dir(obj) if _NAME_RE.match(n))
    return frozenset(names)


InstanceId = str  # "<kind>.<name>", e.g. "blobservices.default"


@attrs.frozen
class Instance:
    """One service instance: its config and the instances its reference fields resolve to."""

    id: InstanceId
    kind: str
    name: str
    config: ServiceConfig
    refs: Mapping[str, InstanceId]  # field name -> instance id
    anonymous: bool = False
    url: str | None = None

    @property
    def type_tag(self) -> str:
        return type(self.config).type_tag


@attrs.frozen
class CompositionGraph:
    """Validated instances in dependency order (every instance after what it references)."""

    instances: Mapping[InstanceId, Instance]
    order: tuple[InstanceId, ...]

    def __iter__(self) -> Iterator[Instance]:
        return (self.instances[i] for i in self.order)

    def names(self, kind: str) -> list[str]:
        return [i.name for i in self if i.kind == kind and not i.anonymous]

    def dependents(self, instance_id: InstanceId) -> list[InstanceId]:
        """Every instance that (transitively) references ``instance_id``, in build order."""
        affected = {instance_id}
        for iid in self.order:
            if any(ref in affected for ref in self.instances[iid].refs.values()):
                affected.add(iid)
        return [i for i in self.order if i in affected and i != instance_id]


def _check_name(kind: str, name: object) -> str:
    path = f"{kind}.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name) or keyword.iskeyword(name) or name in reserved_names():
        raise ConfigError(
            "invalid instance name: use letters, digits and '_', starting with a letter, "
            "and not a Python keyword, a section name or a dependency-injector attribute name",
            path=path,
        )
    return name


def _structure(registry: Registry, kind: str, path: str, raw: Any) -> tuple[ServiceConfig, str | None]:
    if isinstance(raw, str):
        return registry.resolve_url(kind, raw, path), raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping with a 'type' (or a URL string), got {type(raw).__name__}", path=path)
    if "type" not in raw:
        raise ConfigError(f"missing 'type'{suggest('', registry.tags(kind))}", path=path)
    cls = registry.resolve(kind, raw["type"], f"{path}.type")
    data = {k: v for k, v in raw.items() if k != "type"}
    return structure_config(data, cls, path), None


def build_graph(config: Mapping[str, Any], registry: Registry | None = None) -> CompositionGraph:
    """Validate a parsed config and return its instance graph. Builds no service."""
    registry = registry or default_registry()
    check_structure(config)
    for key in config:
        if key not in KINDS:
            raise ConfigError(f"unknown section {key!r}{suggest(str(key), KINDS)}", path=str(key))

    instances: dict[InstanceId, Instance] = {}
    pending: list[tuple[str, str, ServiceConfig, str | None, bool]] = []
    for kind in KINDS:
        section: Any = config.get(kind) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"expected a mapping of instance names, got {type(section).__name__}", path=kind)
        for name, raw in section.items():
            _check_name(kind, name)
            cfg, url = _structure(registry, kind, f"{kind}.{name}", raw)
            pending.append((kind, name, cfg, url, False))
    names = {(kind, name) for kind, name, *_ in pending}

    while pending:
        kind, name, cfg, url, anonymous = pending.pop(0)
        iid = f"{kind}.{name}"
        refs: dict[str, InstanceId] = {}
        for field, ref_kind in reference_fields(type(cfg)).items():
            value: str = getattr(cfg, field)
            path = f"{iid}.{field}"
            if "://" in value:
                sub_cfg = registry.resolve_url(ref_kind, value, path)
                # Named after the field that holds it; crossing kinds adds the holder's kind, so
                # ids stay unique (kind names are reserved instance names).
                sub_name = f"{name}.{field}" if ref_kind == kind else f"{kind}.{name}.{field}"
                pending.append((ref_kind, sub_name, sub_cfg, value, True))
                refs[field] = f"{ref_kind}.{sub_name}"
            elif (ref_kind, value) in names:
                refs[field] = f"{ref_kind}.{value}"
            else:
                known = [n for k, n in names if k == ref_kind]
                raise UnknownInstanceError(f"unknown instance {brief(value)}{suggest(value, known)}", path=path)
        if iid in instances:  # cannot happen (ids follow the config's paths); never replace silently
            raise ConfigError("two instances with one id", path=iid)
        instances[iid] = Instance(iid, kind, name, cfg, refs, anonymous, url)

    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for iid, inst in instances.items():
        sorter.add(iid, *inst.refs.values())
    try:
        order = tuple(sorter.static_order())
    except graphlib.CycleError as e:
        raise _cycle_error(list(e.args[1]), list(instances)) from None
    return CompositionGraph(instances, order)


def _cycle_error(loop: list[str], config_order: list[str]) -> CycleError:
    # graphlib lists the loop dependency-first; we print it as "references" arrows,
    # starting at the member that comes first in the config, so the message is stable.
    path = list(reversed(loop))[:-1]
    start = min(range(len(path)), key=lambda i: config_order.index(path[i]))
    path = path[start:] + path[:start]
    path.append(path[0])
    return CycleError(f"reference cycle: {' -> '.join(path)}", cycle=path)
