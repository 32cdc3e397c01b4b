"""JSON Schema (draft 2020-12) of the config format, generated from the registry.

Every registered config class (built-in and third-party) becomes a ``$defs`` entry: an
object with ``type`` fixed to its tag, one property per attrs field (type, default, and
the description :func:`~castore_di.composition.docs.field_docs` reads, as the README
does), ``required`` for fields without a default and ``additionalProperties: false``,
matching the strict converter. A reference is a string, an instance name or a URL;
an optional one may be ``null``, a list reference is an array of them, a map reference an
object of them. An instance is one of its kind's definitions or a URL string; every kind
of the registry (third-party ones too) is a section.
"""

from __future__ import annotations

import enum
import pathlib
import types
import typing
from typing import Any, Literal, Union

import attrs

from castore_di.composition.config import REFERENCE_FORM_KEY, REFERENCE_KEY, ServiceConfig
from castore_di.composition.docs import field_docs
from castore_di.composition.registry import Registry, default_registry
from castore_di.errors import ConfigError

__all__ = ["config_schema", "field_schema", "SCHEMA_DIALECT"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_NAME_PATTERN = "^[A-Za-z][A-Za-z0-9_]*$"
_URL_PATTERN = "^[A-Za-z][A-Za-z0-9+.-]*://"
_JSON_SCALARS = (str, int, float, bool, type(None))
_FACTORY: Any = type(attrs.Factory(list))


def _type_schema(tp: Any) -> dict[str, Any]:
    """A schema for a Python type annotation; unknown types accept anything."""
    if tp is Any or tp is object:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [_type_schema(a) for a in args]
        if any(o == {} for o in options):
            return {}
        return {"anyOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset, typing.Sequence, typing.AbstractSet) or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"type": "array", "prefixItems": [_type_schema(a) for a in args], "items": False}
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin in (dict, typing.Mapping) or tp is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) == 2 else {}}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str or tp is pathlib.Path or (isinstance(tp, type) and issubclass(tp, pathlib.PurePath)):
        return {"type": "string"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and attrs.has(tp):
        return _attrs_object(tp)
    return {}


def _json_default(value: Any) -> tuple[bool, Any]:
    """Whether ``value`` can be shown as a JSON default, and its JSON form."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, pathlib.PurePath):
        return True, str(value)
    if isinstance(value, _JSON_SCALARS):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_json_default(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if isinstance(value, dict):
        pairs = {str(k): _json_default(v) for k, v in value.items()}
        return all(ok for ok, _ in pairs.values()), {k: v for k, (_, v) in pairs.items()}
    return False, None


def field_schema(
    field: attrs.Attribute[Any], hints: dict[str, Any], doc: str | None = None
) -> tuple[dict[str, Any], bool]:
    """The schema of one config field and whether it is required.

    ``doc`` is the field's description; ``None`` reads only ``metadata["doc"]`` (callers
    with the class at hand pass what :func:`~castore_di.composition.docs.field_docs` found).
    """
    if doc is None:
        doc = field.metadata.get("doc", "")
    if REFERENCE_KEY in field.metadata:
        schema = _reference_schema(field, doc)
    else:
        schema = dict(_type_schema(hints.get(field.name, field.type)))
        if doc:
            schema["description"] = doc
    required = field.default is attrs.NOTHING
    if not required:
        default = field.default
        if isinstance(default, _FACTORY):
            if default.takes_self:
                return schema, False
            default = default.factory()
        ok, value = _json_default(default)
        if ok:
            schema["default"] = value
    return schema, required


def _reference_schema(field: attrs.Attribute[Any], doc: str) -> dict[str, Any]:
    kind = field.metadata[REFERENCE_KEY]
    form = field.metadata.get(REFERENCE_FORM_KEY, "one")
    min_items = field.metadata.get("min_items", 0)
    one = {"type": "string", "minLength": 1}
    prefix = f"{doc.rstrip('.')}. " if doc else ""
    what = f"The name of a {kind} instance, or a URL (scheme://...) for an anonymous one."
    if form == "optional":
        return {"anyOf": [one, {"type": "null"}], "description": prefix + what + " null: none."}
    array = {"type": "array", "items": one, "uniqueItems": True, **({"minItems": min_items} if min_items else {})}
    if form == "list":
        return {**array, "description": prefix + f"A list of references. Each: {what}"}
    obj = {"type": "object", "additionalProperties": one, **({"minProperties": min_items} if min_items else {})}
    if form == "map":
        if field.metadata.get("allow_list"):
            return {"anyOf": [obj, array], "description": prefix + "A map of name -> reference, or a list of "
                    f"references keyed by their own text. Each: {what}"}
        return {**obj, "description": prefix + f"A map of name -> reference. Each: {what}"}
    return {**one, "description": prefix + what}


def _attrs_object(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = {}
    docs = field_docs(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        name = field.alias if getattr(field, "alias", None) else field.name
        properties[name], is_required = field_schema(field, hints, docs[field.name])
        if is_required:
            required.append(name)
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else ""


def _class_schema(cls: type[ServiceConfig]) -> dict[str, Any]:
    obj = _attrs_object(cls)
    type_property = {"const": cls.type_tag, "description": f"The type tag, {cls.type_tag!r}."}
    obj["properties"] = {"type": type_property, **obj["properties"]}
    obj["required"] = ["type", *obj.get("required", [])]
    title = f"{cls.kind}: {cls.type_tag}"
    described = _summary(cls)
    return {"title": title, **({"description": described} if described else {}), **obj}


def config_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of a castore config for ``registry`` (the default registry if ``None``).

    A type whose config class cannot be imported (a missing optional library) still gets
    a definition: an object with that ``type`` and any other keys, described as unavailable.
    """
    registry = registry or default_registry()
    defs: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for kind in registry.kinds():
        refs: list[dict[str, Any]] = []
        for tag in registry.tags(kind):
            key = f"{kind}.{tag}"
            try:
                cls = registry.resolve(kind, tag)
                defs[key] = _class_schema(cls)
            except ConfigError as e:
                defs[key] = {
                    "title": f"{kind}: {tag}",
                    "description": f"unavailable here: {e}",
                    "type": "object",
                    "properties": {"type": {"const": tag}},
                    "required": ["type"],
                }
            refs.append({"$ref": f"#/$defs/{key}"})
        refs.append({
            "type": "string",
            "pattern": _URL_PATTERN,
            "description": "A URL whose scheme (up to '+') names the type, e.g. memory://",
        })
        properties[kind] = {
            "type": "object",
            "description": f"Named {kind} instances; 'default' is the one commands use.",
            "propertyNames": {"pattern": _NAME_PATTERN},
            "additionalProperties": {"oneOf": refs},
        }
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "castore_di configuration",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "$defs": defs,
    }
