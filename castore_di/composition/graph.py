"""The instance graph: every instance structured, every reference resolved, checked.

Building the graph validates the whole config before any provider or service exists:
unknown sections, types and fields, bad values, missing references and cycles (across
kinds too, and among instances nothing references) are refused with the path of the
problem. A reference holding a URL (``memory://``) becomes an anonymous instance of its
own, named after the field that holds it (``blobservices.default.remote``, or
``blobservices.default.members[1]`` for an element of a list). Every reference form
(one, optional, list, map) is found from the config class's field metadata, so a
third-party type needs no code here; the sections are the registry's kinds.
"""

from __future__ import annotations

import graphlib
import keyword
import re
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from typing import Any, Union

import attrs

from castore_di.composition.config import KINDS, Reference, ServiceConfig, reference_specs
from castore_di.composition.converter import brief, structure_config, suggest
from castore_di.composition.loader import check_structure
from castore_di.composition.registry import Registry, default_registry
from castore_di.errors import ConfigError, CycleError, UnknownInstanceError

__all__ = ["Instance", "CompositionGraph", "build_graph", "InstanceId", "Wiring", "reserved_names"]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# Every public attribute of the dependency-injector classes a lookup such as
# ``Provide["blobservices.<name>"]`` passes through (the section's ``providers.Container`` and
# ``DynamicContainer``, and an instance's ``ThreadSafeSingleton``), as of dependency-injector
# 4.49. Listed rather than read from the classes, so validating a config does not import
# dependency-injector; tests/test_config_limits.py checks the list against the classes.
_DI_NAMES = frozenset("""
    add_args add_attributes add_kwargs apply_container_providers_overridings apply_overridings args
    assign_parent async_ attributes check_dependencies clear_args clear_attributes clear_kwargs cls
    container declarative_parent delegate dependencies disable_async_mode enable_async_mode
    from_json_schema from_schema from_yaml_schema full_reset init_resources is_async_mode_disabled
    is_async_mode_enabled is_async_mode_undefined is_auto_wiring_enabled kwargs last_overriding
    load_config overridden override override_providers overrides overriding_lock parent parent_name
    provided provided_type provider provider_type providers provides register_overrides related reset
    reset_async_mode reset_last_overriding reset_override reset_singletons resolve_provider_name
    set_args set_attributes set_kwargs set_provider set_providers set_provides shutdown_resources
    storage_lock traverse unregister_overrides unwire wire wired_to_modules wired_to_packages
    wiring_config
""".split())


def reserved_names() -> frozenset[str]:
    """Names an instance cannot have: every public attribute of the dependency-injector
    classes a lookup such as ``Provide["blobservices.<name>"]`` passes through, plus the
    kind names (anonymous instance ids use them)."""
    return _RESERVED


_RESERVED = _DI_NAMES | frozenset(KINDS)  # the built-in kinds; build_graph refuses registered ones too


InstanceId = str  # "<kind>.<name>", e.g. "blobservices.default"
# What one reference field resolves to, by form: one -> an id; optional -> an id or None;
# list -> a tuple of ids; map -> {name: id}.
Wiring = Union[InstanceId, None, tuple[InstanceId, ...], Mapping[str, InstanceId]]


@attrs.frozen
class Instance:
    """One service instance: its config and the instances its reference fields resolve to.

    ``refs`` has one entry per edge, labelled ``field`` (one, optional), ``field[i]``
    (list) or ``field[name]`` (map); ``wiring`` has one entry per reference field, in the
    shape ``build`` receives (see :data:`Wiring`).
    """

    id: InstanceId
    kind: str
    name: str
    config: ServiceConfig
    refs: Mapping[str, InstanceId]  # edge label -> instance id
    anonymous: bool = False
    url: str | None = None
    wiring: Mapping[str, Wiring] = attrs.Factory(dict)

    @property
    def type_tag(self) -> str:
        return type(self.config).type_tag


@attrs.frozen
class CompositionGraph:
    """Validated instances in dependency order (every instance after what it references)."""

    instances: Mapping[InstanceId, Instance]
    order: tuple[InstanceId, ...]
    kinds: tuple[str, ...] = ("blobservices", "directoryservices")

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


def _check_name(kind: str, name: object, kinds: Collection[str] = ()) -> str:
    path = f"{kind}.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name) or keyword.iskeyword(name) or name in reserved_names() or name in kinds:
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
    kinds = registry.kinds()
    check_structure(config)
    for key in config:
        if key not in kinds:
            raise ConfigError(f"unknown section {key!r}{suggest(str(key), kinds)}", path=str(key))

    instances: dict[InstanceId, Instance] = {}
    pending: deque[tuple[str, str, ServiceConfig, str | None, bool]] = deque()
    for kind in kinds:
        section: Any = config.get(kind) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"expected a mapping of instance names, got {type(section).__name__}", path=kind)
        for name, raw in section.items():
            _check_name(kind, name, kinds)
            cfg, url = _structure(registry, kind, f"{kind}.{name}", raw)
            pending.append((kind, name, cfg, url, False))
    names = {(kind, name) for kind, name, *_ in pending}

    while pending:
        kind, name, cfg, url, anonymous = pending.popleft()
        iid = f"{kind}.{name}"
        refs: dict[str, InstanceId] = {}
        wiring: dict[str, Wiring] = {}

        def resolve(spec: Reference, label: str, value: str) -> InstanceId:
            path = f"{iid}.{label}"
            if "://" in value:
                sub_cfg = registry.resolve_url(spec.kind, value, path)
                # Named after the field that holds it; crossing kinds adds the holder's kind, so
                # ids stay unique (kind names are reserved instance names).
                sub_name = f"{name}.{label}" if spec.kind == kind else f"{kind}.{name}.{label}"
                pending.append((spec.kind, sub_name, sub_cfg, value, True))
                target = f"{spec.kind}.{sub_name}"
            elif (spec.kind, value) in names:
                target = f"{spec.kind}.{value}"
            else:
                known = [n for k, n in names if k == spec.kind]
                raise UnknownInstanceError(f"unknown instance {brief(value)}{suggest(value, known)}", path=path)
            refs[label] = target
            return target

        for field, spec in reference_specs(type(cfg)).items():
            if spec.kind not in kinds:
                raise ConfigError(f"reference to unknown service kind {spec.kind!r}{suggest(spec.kind, kinds)}",
                                  path=f"{iid}.{field}")
            value: Any = getattr(cfg, field)
            if spec.form == "one" or (spec.form == "optional" and value is not None):
                wiring[field] = resolve(spec, field, value)
            elif spec.form == "optional":
                wiring[field] = None
            elif spec.form == "list":
                wiring[field] = tuple(resolve(spec, f"{field}[{i}]", v) for i, v in enumerate(value))
            elif isinstance(value, Mapping):
                wiring[field] = {key: resolve(spec, f"{field}[{key}]", v) for key, v in value.items()}
            else:  # a map field given as a list: each element is keyed by its own text
                wiring[field] = {v: resolve(spec, f"{field}[{i}]", v) for i, v in enumerate(value)}
        if iid in instances:  # cannot happen (ids follow the config's paths); never replace silently
            raise ConfigError("two instances with one id", path=iid)
        instances[iid] = Instance(iid, kind, name, cfg, refs, anonymous, url, wiring)

    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for iid, inst in instances.items():
        sorter.add(iid, *inst.refs.values())
    try:
        order = tuple(sorter.static_order())
    except graphlib.CycleError as e:
        raise _cycle_error(list(e.args[1]), list(instances), instances) from None
    return CompositionGraph(instances, order, kinds)


def _cycle_error(loop: list[str], config_order: list[str], instances: Mapping[InstanceId, Instance]) -> CycleError:
    # graphlib lists the loop dependency-first; we print it as "references" arrows,
    # starting at the member that comes first in the config, so the message is stable.
    # An arrow taken through an element of a list or map names it: "b (members[1])".
    path = list(reversed(loop))[:-1]
    start = min(range(len(path)), key=lambda i: config_order.index(path[i]))
    path = path[start:] + path[:start]
    path.append(path[0])
    shown = [path[0]]
    for source, target in zip(path, path[1:]):
        labels = [label for label, t in instances[source].refs.items() if t == target]
        plain = any("[" not in label for label in labels)
        shown.append(target if plain or not labels else f"{target} ({labels[0]})")
    return CycleError(f"reference cycle: {' -> '.join(shown)}", cycle=path)
