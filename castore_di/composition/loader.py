"""Reading configs: YAML, JSON, TOML files or mappings, with environment interpolation.

``${VAR}`` and ``${VAR:-default}`` are replaced inside string values after parsing (never
in the raw text, so a value cannot inject structure); ``$${`` stands for a literal ``${``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Union

from castore_di.errors import ConfigError

__all__ = ["read_config", "interpolate", "ConfigSource"]

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

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
            raise ConfigError(f"environment variable {name!r} is not set (use ${{{name}:-default}})", path=path or None)

        return _VAR_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _parse_file(path: pathlib.Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config: {e.strerror or e}", path=str(path)) from e
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except Exception as e:  # each parser has its own error type; all mean "malformed"
        raise ConfigError(f"malformed {suffix[1:].upper()}: {e}", path=str(path)) from e
    raise ConfigError("unknown config format: use .yaml, .yml, .json or .toml", path=str(path))


def read_config(source: ConfigSource, environ: Mapping[str, str] | None = None) -> Mapping[str, Any]:
    """Parse a file (by extension) or take a mapping, then interpolate the environment."""
    data = source if isinstance(source, Mapping) else _parse_file(pathlib.Path(source))
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    result: Mapping[str, Any] = interpolate(data, environ)
    return result
