"""A cache of parsed YAML configs for the ``castore`` command.

Loading PyYAML and running its pure-Python parser is about a tenth of a short command's
time, on every command, for a file that rarely changes. The command keeps what a YAML
config parsed to, keyed by the BLAKE3 digest of the file's text together with the parser's
identity (castore_di's version, this format's version, and the path, size and modification
time of PyYAML's module and of castore_di's loader): a changed file, another PyYAML or a
changed loader is simply a miss. The key is the content, not the file's metadata, so an
edit within one timestamp tick cannot be missed.

Only plain documents are kept (mappings with string keys, lists, strings, numbers, booleans
and nulls, nothing shared through YAML aliases), so the cached value is exactly what the
parser returned; the structural checks, interpolation and validation run on it as on a
fresh parse, and every error is worded as before. A document the parser refuses is never
cached. Files live under ``$XDG_CACHE_HOME/castore_di/config/`` (default ``~/.cache``),
one per key, readable by the user alone (a config may hold secrets), written atomically
(temporary file, ``rename``), with a magic, a BLAKE3 checksum and a ``marshal`` payload: a
truncated, corrupt or foreign file is ignored, as is every error of the cache itself. At
most :data:`MAX_FILES` are kept (the oldest go first).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import threading
from collections.abc import Callable
from typing import Any, Final

import blake3

__all__ = ["cached_parse", "cache_dir", "MAX_FILES"]

MAX_FILES: Final = 32
_MAGIC: Final = b"CASTCFG1"
_FORMAT: Final = b"1"
_SUM_LEN: Final = 32


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/castore_di/config`` (``~/.cache/castore_di/config`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "castore_di", "config")


def _parser_identity() -> bytes | None:
    """castore_di's version, and the file, size and mtime of PyYAML's module and of the loader
    module that drives it (:mod:`castore_di.composition.loader`); ``None`` without PyYAML."""
    from importlib.machinery import PathFinder

    import castore_di
    from castore_di.composition import loader

    spec = PathFinder.find_spec("yaml")
    if spec is None or not spec.origin:
        return None
    parts = [castore_di.__version__]
    for path in (spec.origin, loader.__file__):
        st = os.stat(path)
        parts += [path, str(st.st_size), str(st.st_mtime_ns)]
    return "\0".join(parts).encode()


def _plain(value: Any, seen: set[int]) -> bool:
    """Whether ``value`` is made of plain, unshared values that ``marshal`` gives back exactly."""
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return True
    if kind is dict or kind is list:
        if id(value) in seen:  # shared through an alias: the checks count such values
            return False
        seen.add(id(value))
        if kind is dict:
            return all(type(k) is str and _plain(v, seen) for k, v in value.items())
        return all(_plain(v, seen) for v in value)
    return False


def cached_parse(text: str, parse: Callable[[str], Any]) -> Any:
    """``parse(text)`` (a YAML parser), or what it returned for the same text before."""
    try:
        identity = _parser_identity()
    except OSError:
        identity = None
    if identity is None:
        return parse(text)
    key = blake3.blake3(_FORMAT + b"\0" + identity + b"\0" + text.encode("utf-8", "surrogatepass")).digest()
    path = os.path.join(cache_dir(), key.hex()[:40])
    # A plain document's marshal form is a few times its text (a 2-byte list item takes 5): a
    # cache file far larger than that is not read.
    found = _load(path, key, 16 * len(text) + 4096)
    if found is not None:
        return found[0]
    data = parse(text)
    if _plain(data, set()):
        _store(path, key, data)
    return data


def _load(path: str, key: bytes, limit: int) -> tuple[Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError:
        return None
    if len(raw) > limit:
        return None
    head = len(_MAGIC) + _SUM_LEN
    if raw[: len(_MAGIC)] != _MAGIC or blake3.blake3(raw[head:]).digest() != raw[len(_MAGIC) : head]:
        return None
    try:
        stored_key, data = marshal.loads(raw[head:])
    except (EOFError, ValueError, TypeError):  # pragma: no cover - the checksum matched
        return None
    return (data,) if stored_key == key else None


def _store(path: str, key: bytes, data: Any) -> None:
    try:
        payload = marshal.dumps((key, data))
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            # Readable by the user alone: a config may hold secrets its own mode protects.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(_MAGIC + blake3.blake3(payload).digest() + payload)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _trim(directory)
    except (OSError, ValueError):
        pass  # a cache: the config was parsed all the same


def _trim(directory: str) -> None:
    entries = []
    for name in os.listdir(directory):
        try:
            entries.append((os.stat(os.path.join(directory, name)).st_mtime_ns, name))
        except OSError:
            continue
    for _, name in sorted(entries)[: max(0, len(entries) - MAX_FILES)]:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
