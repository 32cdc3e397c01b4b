"""Config classes: the base every backend's config derives from, references, URL helpers.

A backend declares a frozen attrs class beside its service::

    @attrs.frozen(kw_only=True)
    class CombinedBlobServiceConfig(BlobServiceConfig):
        type_tag: ClassVar[str] = "combined"
        local: str = reference("blobservices")
        remote: str = reference("blobservices")

        def build(self, local: BlobService, remote: BlobService) -> CombinedBlobService: ...

Fields made with :func:`reference` name another instance (or hold a URL that builds an
anonymous one); the composition passes the built services to ``build`` as keyword
arguments with the field's name. The other reference forms:

* ``reference(kind, optional=True)``: absent or ``null`` -> ``build`` receives ``None``;
* :func:`reference_list`: ``[a, b, "memory://"]`` -> a ``list`` of services, in order;
* :func:`reference_map`: ``{name: reference}`` -> a ``dict`` of services by name; with
  ``allow_list=True`` a list is accepted too, each element keyed by its own text.

Kinds are not fixed: :meth:`~castore_di.composition.registry.Registry.register_kind` adds
one (its config base class derives from :class:`ServiceConfig` with its own ``kind``).
Nothing here imports a backend library.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union

import attrs

from castore_di.composition.fields import parse_query
from castore_di.errors import ConfigError

__all__ = [
    "ServiceConfig",
    "BlobServiceConfig",
    "DirectoryServiceConfig",
    "Reference",
    "reference",
    "reference_list",
    "reference_map",
    "ReferenceListOrMap",
    "reference_fields",
    "reference_specs",
    "REFERENCE_KEY",
    "REFERENCE_FORM_KEY",
    "KINDS",
    "check_kind_name",
    "parse_memory_url",
    "split_wrapper_url",
    "url_tag",
]

REFERENCE_KEY = "castore_di.reference"
REFERENCE_FORM_KEY = "castore_di.reference_form"
KINDS = ("blobservices", "directoryservices")  # the built-in kinds; a registry may add more
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")

C = TypeVar("C", bound="ServiceConfig")

Form = Literal["one", "optional", "list", "map"]


def check_kind_name(kind: object) -> str:
    """A kind is a lower-case identifier (``pathinfoservices``): it names a config section."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ConfigError(f"invalid service kind {kind!r}: use lower-case letters, digits and '_'")
    return kind


def _reference_field(kind: str, form: Form, doc: str, min_items: int, allow_list: bool, **kw: Any) -> Any:
    check_kind_name(kind)
    metadata = {REFERENCE_KEY: kind, REFERENCE_FORM_KEY: form, "doc": doc,
                "min_items": min_items, "allow_list": allow_list}
    return attrs.field(metadata=metadata, **kw)


def reference(kind: str, *, doc: str = "", optional: bool = False) -> Any:
    """A field that references one instance of ``kind`` by name or by URL.

    With ``optional=True`` the field defaults to ``None`` and ``build`` then receives ``None``.
    Annotate it ``str`` (or ``str | None`` when optional).
    """
    if optional:
        return _reference_field(kind, "optional", doc, 0, False, default=None,
                                validator=attrs.validators.optional(attrs.validators.instance_of(str)))
    return _reference_field(kind, "one", doc, 0, False, validator=attrs.validators.instance_of(str))


def _min_items(n: int, keyed: bool = False) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if len(value) < n:
            raise ConfigError(f"needs at least {n} references, got {len(value)}", path=attribute.name)
        if not isinstance(value, Mapping):
            # A name listed twice is a mistake; a URL twice is two anonymous instances, unless
            # the elements are keys (a map given as a list).
            dups = [v for i, v in enumerate(value) if v in value[:i] and (keyed or "://" not in v)]
            if dups:
                raise ConfigError(f"{dups[0]!r} is listed twice", path=attribute.name)

    return check


def reference_list(kind: str, *, doc: str = "", min_items: int = 0) -> Any:
    """A field holding a list of references (names or URLs); ``build`` receives a ``list``.

    Annotate it ``tuple[str, ...]``. A name may not be listed twice (a URL may: each is an
    anonymous instance of its own).
    """
    return _reference_field(kind, "list", doc, min_items, False, converter=tuple, validator=_min_items(min_items),
                            **({} if min_items else {"factory": tuple}))


def reference_map(kind: str, *, doc: str = "", min_items: int = 0, allow_list: bool = False) -> Any:
    """A field mapping names to references; ``build`` receives a ``dict`` of services by name.

    Annotate it ``dict[str, str]``, or ``ReferenceListOrMap`` with ``allow_list=True``: a list
    is then accepted too, each element keyed by its own text (the instance name or URL).
    """
    return _reference_field(kind, "map", doc, min_items, allow_list, validator=_min_items(min_items, keyed=True),
                            **({} if min_items else {"factory": dict}))


ReferenceListOrMap = Union[tuple[str, ...], dict[str, str]]
"""The annotation of a :func:`reference_map` field with ``allow_list=True``."""


@attrs.frozen
class Reference:
    """How a config class declares one reference field."""

    field: str
    kind: str
    form: Form
    min_items: int = 0
    allow_list: bool = False


_SPECS: dict[type, dict[str, Reference]] = {}


def reference_specs(cls: type) -> dict[str, Reference]:
    """``{field name: Reference}`` for every reference field of a config class (cached per class)."""
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    out: dict[str, Reference] = {}
    for f in attrs.fields(cls):
        if REFERENCE_KEY in f.metadata:
            md = f.metadata
            out[f.name] = Reference(f.name, md[REFERENCE_KEY], md.get(REFERENCE_FORM_KEY, "one"),
                                    md.get("min_items", 0), md.get("allow_list", False))
    _SPECS[cls] = out
    return out


def reference_fields(cls: type) -> dict[str, str]:
    """``{field name: referenced kind}`` for a config class (every reference form)."""
    return {name: spec.kind for name, spec in reference_specs(cls).items()}


class ServiceConfig:
    """Base of every backend config class.

    Subclasses are frozen, keyword-only attrs classes with a ``type_tag`` and a ``build``
    method that receives referenced services as keyword arguments. A sync ``build`` must do
    no I/O; a service that must connect or open something first defines ``async def build``,
    which the container awaits (see :mod:`castore_di.composition.container`).
    """

    kind: ClassVar[str]
    """The config section (service kind) this class belongs to."""
    type_tag: ClassVar[str]

    def build(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - every config class defines build

    @classmethod
    def from_url(cls: type[C], url: str) -> C:
        """A config from a URL (``memory://``); types without a URL form refuse."""
        raise ConfigError(f"type {cls.type_tag!r} cannot be built from a URL")


class BlobServiceConfig(ServiceConfig):
    kind: ClassVar[str] = "blobservices"


class DirectoryServiceConfig(ServiceConfig):
    kind: ClassVar[str] = "directoryservices"


def url_tag(url: str) -> str:
    """The registry tag of a URL: its scheme up to the first ``+`` (``grpc+http`` -> ``grpc``)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise ConfigError(f"not a URL: {url!r}")
    return scheme.split("+", 1)[0]


def split_wrapper_url(url: str, tag: str) -> str:
    """The wrapped reference of a wrapper type's URL: ``tag+<url>`` -> ``<url>``, ``tag://name`` -> ``name``."""
    if url.startswith(f"{tag}+"):
        inner = url[len(tag) + 1 :]
        if "://" not in inner:
            raise ConfigError(f"invalid url {url!r}: expected {tag}+<url>")
        return inner
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != tag or not parts.netloc or parts.path or parts.query:
        raise ConfigError(f"invalid url {url!r}: expected {tag}+<url> or {tag}://<instance name>")
    return parts.netloc


def parse_memory_url(url: str, allowed: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """Accept ``memory://`` with no host or path (as the reference), and only ``allowed`` query keys."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc or parts.path:
        raise ConfigError(f"invalid url {url!r}: memory:// takes no host or path")
    query = parse_query(url, parts.query)  # a key given twice is refused
    if set(query) - allowed or (parts.query and not query):
        known = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(f"invalid url {url!r}: unknown query parameter (allowed: {known})")
    return query
