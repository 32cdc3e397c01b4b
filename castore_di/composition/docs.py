"""The "Built-in types" reference, generated from the config classes so it cannot drift.

For every type registered for a kind: the class docstring's summary, its URL form (the
``from_url`` docstring), and one row per field with its type, default and description. A
field's description is, in order of preference, ``metadata["doc"]`` (what
:func:`~castore_di.composition.config.reference` sets), the string literal right after the
field in the class body (an attribute docstring), or its entry in an ``Attributes:`` section
of the class docstring. ``scripts/gen_config_docs.py`` writes the result into README.md
between ``<!-- config-types -->`` and ``<!-- /config-types -->``.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
import types
import typing
from typing import Any

import attrs

from castore_di.composition.config import REFERENCE_KEY, Reference, ServiceConfig, reference_specs
from castore_di.composition.registry import Registry

__all__ = ["BEGIN", "END", "builtin_registry", "field_docs", "reference_type_text", "render_types", "replace_section"]

BEGIN = "<!-- config-types -->"
END = "<!-- /config-types -->"

_SECTION_HEADERS = ("Attributes:", "Fields:", "Args:")
_FACTORY: Any = type(attrs.Factory(list))


def builtin_registry() -> Registry:
    """A registry of the built-in types only (installed third-party types left out)."""
    from castore_di import blobservice, directoryservice

    registry = Registry()
    registry.register_many("blobservices", blobservice.BUILTIN_TYPES)
    registry.register_many("directoryservices", directoryservice.BUILTIN_TYPES)
    return registry


def _one_line(text: str) -> str:
    """One line of Markdown: whitespace collapsed, reST roles and double backticks simplified."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("``", "`")


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for string literals that follow annotated fields in class bodies."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override what their bases say
        if klass is object or not attrs.has(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                out[node.target.id] = _one_line(inspect.cleandoc(following.value.value))
    return out


def _docstring_section(cls: type) -> dict[str, str]:
    """``{field: text}`` from an ``Attributes:`` (or ``Fields:``/``Args:``) docstring section."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        for i, line in enumerate(lines):
            if line.strip() not in _SECTION_HEADERS:
                continue
            entry_indent: int | None = None
            name: str | None = None
            for entry in lines[i + 1 :]:
                if not entry.strip():
                    continue
                indent = len(entry) - len(entry.lstrip())
                if entry_indent is None:
                    entry_indent = indent
                if indent < entry_indent or indent == 0:
                    break  # the section ended
                match = re.match(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", entry.strip())
                if indent == entry_indent and match:
                    name = match.group(1)
                    out[name] = match.group(2)
                elif name is not None:
                    out[name] = f"{out[name]} {entry.strip()}"
    return {k: _one_line(v) for k, v in out.items()}


def field_docs(cls: type) -> dict[str, str]:
    """The description of every field of a config class (empty when undocumented)."""
    attribute_docs = _attribute_docstrings(cls)
    section_docs = _docstring_section(cls)
    out: dict[str, str] = {}
    for field in attrs.fields(cls):
        doc = field.metadata.get("doc") or attribute_docs.get(field.name) or section_docs.get(field.name) or ""
        out[field.name] = _one_line(doc)
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(field: attrs.Attribute[Any]) -> str:
    default: Any = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, _FACTORY):
        if default.takes_self:
            return "computed"
        default = default.factory()
    try:
        text = json.dumps(default)
    except (TypeError, ValueError):
        text = repr(default)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _summary(text: str | None) -> str:
    doc = inspect.cleandoc(text or "")
    return _one_line(doc.split("\n\n", 1)[0]) if doc else ""


def _url_form(cls: type[ServiceConfig]) -> str:
    if cls.from_url.__func__ is ServiceConfig.from_url.__func__:  # type: ignore[attr-defined]
        return "none"
    return _summary(cls.from_url.__doc__) or f"scheme `{cls.type_tag}` (`{cls.type_tag}://…` or `{cls.type_tag}+…://…`)"


def reference_type_text(spec: Reference) -> str:
    """How the types reference describes a reference field of each form."""
    at_least = f", at least {spec.min_items}" if spec.min_items else ""
    if spec.form == "optional":
        return f"optional reference to {spec.kind} (name, URL or null)"
    if spec.form == "list":
        return f"list of references to {spec.kind} (names or URLs{at_least})"
    if spec.form == "map":
        also = "; or a list, keyed by each element" if spec.allow_list else ""
        return f"map of name -> reference to {spec.kind} (name or URL{at_least}{also})"
    return f"reference to {spec.kind} (name or URL)"


def _render_type(cls: type[ServiceConfig]) -> list[str]:
    lines = [f"#### `{cls.type_tag}` ({cls.kind})", ""]
    summary = _summary(cls.__doc__)
    if summary:
        lines += [summary, ""]
    lines += [f"URL form: {_url_form(cls)}", ""]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {}
    docs = field_docs(cls)
    fields = [f for f in attrs.fields(typing.cast(Any, cls)) if f.init]
    if not fields:
        return lines + ["No fields.", ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    specs = reference_specs(cls)
    for field in fields:
        if REFERENCE_KEY in field.metadata:
            type_text = reference_type_text(specs[field.name])
        else:
            type_text = f"`{_type_name(hints.get(field.name, field.type))}`"
        lines.append(f"| `{field.name}` | {_cell(type_text)} | {_cell(_default(field))} | {_cell(docs[field.name])} |")
    return lines + [""]


def render_types(registry: Registry | None = None) -> str:
    """Markdown for every type of ``registry`` (the built-in types by default)."""
    registry = registry or builtin_registry()
    lines: list[str] = []
    for kind in registry.kinds():
        tags = registry.tags(kind)
        lines += [f"Types of `{kind}`: " + ", ".join(f"`{t}`" for t in tags) + ".", ""]
    for kind in registry.kinds():
        for tag in registry.tags(kind):
            lines += _render_type(registry.resolve(kind, tag))
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_section(document: str, rendered: str) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` set to ``rendered``."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    return document[: start + len(BEGIN)] + "\n" + rendered + document[end:]
