"""Reading configs: YAML, JSON, TOML files or mappings, with environment interpolation.

``${VAR}`` and ``${VAR:-default}`` are replaced inside string values after parsing (never
in the raw text, so a value cannot inject structure); ``$${`` stands for a literal ``${``.

Every document passes the same structural checks before anything else reads it, each a
:class:`ConfigError` naming the path: the root is a mapping (an empty file is an empty
config), keys are strings, nesting is at most :data:`MAX_DEPTH` levels, no value contains
itself, and values shared through YAML aliases (or shared objects in a mapping given from
Python) stand for at most :data:`MAX_ALIAS_EXPANSION` more units than the document holds
(a unit: one node, or 64 characters of a string). A YAML document may use at most
:data:`MAX_ALIASES` aliases. So a "billion laughs" file is refused in microseconds. A
config file larger than :data:`MAX_CONFIG_BYTES` is refused before it is parsed (PyYAML
would take minutes and gigabytes over a file of hundreds of megabytes).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Union

from castore_di.errors import ConfigError

__all__ = [
    "read_config",
    "interpolate",
    "check_structure",
    "ConfigSource",
    "MAX_DEPTH",
    "MAX_CONFIG_BYTES",
    "MAX_ALIASES",
    "MAX_ALIAS_EXPANSION",
]

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

MAX_DEPTH = 32
MAX_CONFIG_BYTES = 1 << 20  # a config file is read (and parsed) only up to this size
"""Deepest nesting of mappings and lists a config may have (the root counts as level 1)."""
MAX_ALIASES = 10_000
"""Most YAML aliases (``*name``) one document may use."""
MAX_ALIAS_EXPANSION = 100_000
"""Most units (nodes, or 64 characters of a string) that shared values may add when expanded."""

_VAR_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, environ: Mapping[str, str] | None = None, path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string inside ``value``."""
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in env and (env[name] or default is None):
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name!r} is not set: set it (export {name}=...) before running castore",
                path=path or None,
            )

        return _VAR_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _describe(value: Any) -> str:
    from castore_di.composition.converter import bounded_repr

    text = bounded_repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _weight(value: Any) -> int:
    return 1 + len(value) // 64 if isinstance(value, (str, bytes)) else 1


def check_structure(data: Any) -> None:
    """Refuse what no config can be: see the module docs. Raises :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {_describe(data)}")
    # Memoized by object identity, so shared values (YAML aliases) are measured, not walked
    # again: ``sizes`` holds each container's expanded size, ``distinct`` the real size.
    sizes: dict[int, int] = {}
    active: set[int] = set()
    leaves: set[int] = set()
    distinct = 0

    # A path is built only for a message: (parent path, key or index) pairs until then.
    def render(path: tuple[Any, ...] | None) -> str | None:
        parts: list[str] = []
        while path is not None:
            path, part = path
            parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
        text = "".join(reversed(parts)).removeprefix(".")
        return text or None

    def walk(value: Any, path: tuple[Any, ...] | None, depth: int) -> int:
        nonlocal distinct
        if not isinstance(value, (Mapping, list)):
            w = _weight(value)
            if id(value) not in leaves:
                leaves.add(id(value))
                distinct += w
            return w
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a value contains itself (recursive alias)", path=render(path))
        if depth > MAX_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", path=render(path))
        active.add(key)
        size = 1
        distinct += 1
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ConfigError(f"keys must be strings, got {_describe(k)}", path=render(path))
                size += walk(v, (path, k), depth + 1)
        else:
            for i, v in enumerate(value):
                size += walk(v, (path, i), depth + 1)
        active.discard(key)
        sizes[key] = size
        if size - distinct > MAX_ALIAS_EXPANSION:
            raise ConfigError(
                f"shared values (YAML aliases) expand to more than {MAX_ALIAS_EXPANSION} extra nodes",
                path=render(path),
            )
        return size

    walk(data, None, 1)


def _yaml_load(text: str) -> Any:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that counts aliases and nesting while composing (before building anything)."""

        aliases = 0
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            where = f"line {mark.line + 1}, column {mark.column + 1}"
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise ConfigError(f"more than {MAX_ALIASES} YAML aliases ({where})")
                return super().compose_node(parent, index)
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise ConfigError(f"nested deeper than {MAX_DEPTH} levels ({where})")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_file(path: pathlib.Path, cache: bool = False) -> Any:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config: {e.strerror or e}", path=str(path)) from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes (a config names services; data goes elsewhere)",
                          path=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", path=str(path)) from e
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            if cache:
                from castore_di.composition.parsecache import cached_parse

                data = cached_parse(text, _yaml_load)
            else:
                data = _yaml_load(text)
            return {} if data is None else data  # an empty (or comment-only) file is an empty config
        if suffix == ".json":
            import json

            return json.loads(text)
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
    except ConfigError as e:
        raise ConfigError(e.detail, path=str(path)) from None
    except RecursionError:
        raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", path=str(path)) from None
    except Exception as e:  # each parser has its own error type; all mean "malformed"
        raise ConfigError(f"malformed {suffix[1:].upper()}: {e}", path=str(path)) from e
    raise ConfigError("unknown config format: use .yaml, .yml, .json or .toml", path=str(path))


def read_config(source: ConfigSource, environ: Mapping[str, str] | None = None, *,
                cache: bool = False) -> Mapping[str, Any]:
    """Parse a file (by extension) or take a mapping, check its structure, interpolate the environment.

    With ``cache`` (the ``castore`` command), a YAML file's parse is kept in the user's
    cache directory and reused while the text is unchanged (:mod:`.parsecache`).
    """
    data = source if isinstance(source, Mapping) else _parse_file(pathlib.Path(source), cache)
    if isinstance(source, Mapping):
        check_structure(data)
    else:
        try:
            check_structure(data)
        except ConfigError as e:
            raise ConfigError(e.detail, path=e.path or str(source)) from None
    result: Mapping[str, Any] = interpolate(data, environ)
    return result
