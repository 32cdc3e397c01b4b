"""The one strict cattrs converter that structures config classes.

Unknown keys are rejected; scalars are not coerced (the string ``"false"`` is not a bool,
``0.9`` is not an int); every problem is reported with its path.

A config class whose fields are all of the plain types below (scalars, ``Optional`` of one,
``Literal``, string lists and maps) is structured by the converter's own hooks without
cattrs when the data is valid: the same hooks, the same ``__init__``. Anything else, and any
data these hooks or ``__init__`` refuse, goes through cattrs, which words the error. cattrs
is imported only then (a command that reads a valid config does without it).
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, Union

import attrs

from castore_di.errors import ConfigError, UnknownFieldError

__all__ = ["converter", "structure_config", "suggest", "listing", "brief", "bounded_repr"]

if TYPE_CHECKING:
    import cattrs

    converter: cattrs.Converter  # built on first use: see __getattr__

T = TypeVar("T")


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxfrozenset, r.maxdeque = 3, 12, 12, 12, 12, 12, 12
    r.maxstring = r.maxother = r.maxlong = 200
    return r


_SHORT = _short_repr()


def bounded_repr(value: Any) -> str:
    """``repr(value)``, except that a list, mapping or set shows a few levels and items only
    (one shared through YAML aliases can stand for billions of nodes), and an int too long to
    print is described by its size."""
    try:
        if isinstance(value, (list, tuple, Mapping, set, frozenset)):
            return _SHORT.repr(value)
        return repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        if isinstance(value, int):
            return f"<{type(value).__name__} of {value.bit_length()} bits>"
        return f"<{type(value).__name__}>"


def brief(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters so a message fits on a line."""
    text = bounded_repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text)} characters)"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {brief(value)}"


def _strict(expected: type, *accepted: type) -> Any:
    accepted = accepted or (expected,)

    def hook(value: Any, _type: Any) -> Any:
        if type(value) not in accepted:
            raise ConfigError(f"expected {expected.__name__}, got {_describe(value)}")
        return expected(value) if expected is not type(value) else value

    return hook


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


def _int(value: Any, _type: Any) -> int:
    result: int = _strict(int)(value, int)
    if not _INT_MIN <= result <= _INT_MAX:
        raise ConfigError(f"integer out of range (a signed 64-bit number at most), got {_describe(result)}")
    return result


def _float(value: Any, _type: Any) -> float:
    if type(value) is int:
        _int(value, int)
    result: float = _strict(float, float, int)(value, float)
    if not math.isfinite(result):
        raise ConfigError(f"expected a finite number, got {result!r}")
    return result


def _str(value: Any, _type: Any) -> str:
    result: str = _strict(str)(value, str)
    if "\0" in result:
        raise ConfigError(f"a NUL character is not allowed, got {brief(result)}")
    return result


def _path(value: Any, _type: Any) -> pathlib.Path:
    return pathlib.Path(_str(value, str))


_Hook = Callable[[Any, Any], Any]
_SCALARS: dict[Any, _Hook] = {str: _str, int: _int, bool: _strict(bool), float: _float, pathlib.Path: _path}


def _make_converter() -> cattrs.Converter:
    import cattrs

    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for tp, scalar in _SCALARS.items():
        conv.register_structure_hook(tp, scalar)
    conv.register_structure_hook_func(_is_literal, _literal)
    for tp, hook in _COLLECTIONS:
        conv.register_structure_hook_func(_equals(tp), hook)
    return conv


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Literal


def _equals(tp: Any) -> Any:
    return lambda t: bool(t == tp)


def _literal(value: Any, tp: Any) -> Any:
    allowed = typing.get_args(tp)
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise ConfigError(f"expected one of {', '.join(repr(a) for a in allowed)}, got {_describe(value)}")
    return value


def _string_list(value: Any, _type: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"expected a list, got {_describe(value)}")
    for i, item in enumerate(value):
        if type(item) is not str:
            raise ConfigError(f"expected str, got {_describe(item)}", path=f"[{i}]")
    return tuple(value)


def _string_map(value: Any, _type: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {_describe(value)}")
    for key, item in value.items():
        if type(key) is not str or not key:
            raise ConfigError(f"keys must be non-empty strings, got {_describe(key)}")
        if type(item) is not str:
            raise ConfigError(f"expected str, got {_describe(item)}", path=f"[{key}]")
    return dict(value)


def _string_list_or_map(value: Any, _type: Any) -> tuple[str, ...] | dict[str, str]:
    if isinstance(value, Mapping):
        return _string_map(value, _type)
    if isinstance(value, (list, tuple)):
        return _string_list(value, _type)
    raise ConfigError(f"expected a list or a mapping, got {_describe(value)}")


# Reference lists and maps (and string maps such as options): a string is not a list of
# its characters, a list of pairs is not a mapping.
_COLLECTIONS: list[tuple[Any, _Hook]] = [(tuple[str, ...], _string_list), (dict[str, str], _string_map),
                                         (Union[tuple[str, ...], dict[str, str]], _string_list_or_map)]


@functools.cache
def _converter() -> cattrs.Converter:
    return _make_converter()


def __getattr__(name: str) -> Any:
    if name == "converter":  # built (and cattrs imported) on first use
        return _converter()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain_hook(tp: Any) -> _Hook | None:
    """The converter's hook for ``tp`` when it is a plain type (see the module docs), else None."""
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar
    if _is_literal(tp):
        return _literal
    for known, hook in _COLLECTIONS:
        if tp == known:
            return hook
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        if len(args) == 2 and type(None) in args:
            inner_type = args[0] if args[1] is type(None) else args[1]
            inner = _plain_hook(inner_type)
            if inner is not None:
                return lambda value, _t: None if value is None else inner(value, inner_type)
    return None


@functools.cache
def _plain_fields(cls: type) -> dict[str, tuple[_Hook, Any, bool]] | None:
    """Field name -> (hook, type, required) when every field of ``cls`` is plain, else None."""
    if not attrs.has(cls):
        return None
    try:
        attrs.resolve_types(cls)  # as cattrs does: the annotations are strings
    except Exception:  # an annotation that does not resolve: cattrs reports it as it always did
        return None
    plan = {}
    for f in attrs.fields(cls):
        hook = _plain_hook(f.type)
        if hook is None or not f.init or f.alias != f.name:
            return None
        plan[f.name] = (hook, f.type, f.default is attrs.NOTHING)
    return plan


_SCALAR_TYPES = (str, int, float, bool, type(None))


def _flat(value: Any) -> bool:
    """A scalar, or a list or mapping of strings: what a plain field holds when it is valid."""
    if type(value) in _SCALAR_TYPES:
        return True
    if type(value) in (list, tuple):
        return all(type(item) is str for item in value)
    if isinstance(value, Mapping):
        return all(type(k) is str and type(v) is str for k, v in value.items())
    return False


def _structure_plain(data: Mapping[str, Any], cls: type[T]) -> T | None:
    """``cls`` from valid ``data`` with the converter's hooks; None when cattrs must do it."""
    plan = _plain_fields(typing.cast(type, cls))
    if plan is None:
        return None
    kwargs = {}
    try:
        for key, value in data.items():
            hook, tp, _ = plan[key]
            if not _flat(value):  # a refusal would describe it at length, twice: leave it to cattrs
                return None
            kwargs[key] = hook(value, tp)
        if any(required and name not in kwargs for name, (_, _, required) in plan.items()):
            return None
        return cls(**kwargs)
    except Exception:  # an unknown key, a refused value, a validator: cattrs words the error
        return None


def listing(names: Iterable[str], limit: int = 20) -> str:
    """``a, b, c`` for a message; past ``limit`` names, ``a, b, … and N more``."""
    shown = sorted(names)
    if not shown:
        return "none"
    if len(shown) <= limit:
        return ", ".join(shown)
    return f"{', '.join(shown[:limit])} … and {len(shown) - limit} more"


def suggest(word: str, known: Iterable[str]) -> str:
    """`` (known: a, b)``, plus ``; did you mean 'x'?`` when one is close, to end a message."""
    known = list(known)
    text = f" (known: {listing(known)})"
    import difflib  # only when a hint is shown

    # difflib is quadratic in the word: skip the hint for long words or huge lists.
    close = difflib.get_close_matches(word, known, n=1) if len(word) <= 100 and len(known) <= 5000 else []
    if close:
        text += f"; did you mean {close[0]!r}?"
    return text


def _flatten(exc: BaseException, path: str, cls: type | None, out: list[ConfigError]) -> None:
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            _flatten(sub, f"{path}.{note.name}", None, out)
        for sub in without:
            _flatten(sub, path, getattr(exc, "cl", cls), out)
    elif isinstance(exc, IterableValidationError):
        with_notes_i, without_i = exc.group_exceptions()
        for sub_i, note_i in with_notes_i:
            _flatten(sub_i, f"{path}[{note_i.index!r}]", None, out)
        for sub_j in without_i:
            _flatten(sub_j, path, None, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            out.append(UnknownFieldError(f"unknown field {key!r}{suggest(key, known)}", path=path))
    elif isinstance(exc, KeyError):
        out.append(ConfigError("required field missing", path=path))
    elif isinstance(exc, ConfigError):
        from castore_di._redact import is_secret_name  # its patterns are compiled for errors only

        full = _join(path, exc.path)
        detail = exc.detail
        if is_secret_name(re.split(r"[.\[\]']+", full.rstrip("]'"))[-1]):
            detail = re.sub(r"(got \w+) .*", r"\1 (the value of a secret is not shown)", detail)
        out.append(ConfigError(detail, path=full))
    else:
        out.append(ConfigError(str(exc) or type(exc).__name__, path=path))


def _join(path: str, sub: str | None) -> str:
    if not sub:
        return path
    return f"{path}{sub}" if sub.startswith("[") else f"{path}.{sub}"


def structure_config(data: Mapping[str, Any], cls: type[T], path: str) -> T:
    """Structure ``data`` into ``cls``; raise one :class:`ConfigError` naming the path."""
    plain = _structure_plain(data, cls)
    if plain is not None:
        return plain
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

    try:
        return _converter().structure(dict(data), cls)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as e:
        errors: list[ConfigError] = []
        _flatten(e, path, cls, errors)
        first = errors[0]
        if len(errors) > 1:
            rest = "; ".join(str(x) for x in errors[1:])
            err = type(first)(f"{first.detail} (also: {rest})", path=first.path)
        else:
            err = first
        err.errors = errors  # type: ignore[attr-defined]
        raise err from e
    except (ValueError, TypeError) as e:  # attrs validators run in __init__
        if isinstance(e, ConfigError):
            raise ConfigError(e.detail, path=_join(path, e.path)) from e
        raise ConfigError(str(e), path=path) from e
