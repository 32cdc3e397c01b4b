"""The exception tree of castore_di.

Every error the library raises derives from :class:`CastoreError`. Each concrete error
also derives from the builtin a caller would naturally catch: configuration and
validation errors are :class:`ValueError`, storage failures are :class:`OSError`,
lookups of unknown names are :class:`LookupError` as well where that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Union

__all__ = [
    "ErrorTable",
    "describe",
    "first_line",
    "map_errors",
    "CastoreError",
    "ConfigError",
    "UnknownTypeError",
    "UnknownFieldError",
    "BadReferenceError",
    "UnknownInstanceError",
    "CycleError",
    "InstantiationError",
    "MissingDependencyError",
    "DigestError",
    "ValidationError",
    "InvalidNameError",
    "InvalidSymlinkTargetError",
    "InvalidNodeError",
    "WrongSortingError",
    "DuplicateNameError",
    "SizeOverflowError",
    "ClosureError",
    "IntegrityError",
    "StorageError",
    "ClosedError",
    "LockedError",
    "AccessDeniedError",
    "UnsupportedOperationError",
    "UnsupportedFileTypeError",
]


class CastoreError(Exception):
    """Root of every error raised by castore_di."""


# --- configuration and composition -------------------------------------------------


class ConfigError(CastoreError, ValueError):
    """A configuration or composition problem.

    ``path`` names the offending place (``blobservices.default.remote``) where one is known;
    the message always starts with it. Secrets in the message (URL query values, option
    values named like keys or tokens) are masked.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        from castore_di._redact import redact_text

        self.path = path
        self.detail = message = redact_text(message)
        super().__init__(f"{path}: {message}" if path else message)


class UnknownTypeError(ConfigError):
    """A ``type`` tag (or URL scheme) that no registered backend claims."""


class UnknownFieldError(ConfigError):
    """A config key that the backend's config class does not have."""


class BadReferenceError(ConfigError):
    """Base of errors about references between instances."""


class UnknownInstanceError(BadReferenceError, LookupError):
    """A reference to an instance that the config does not define."""


class CycleError(BadReferenceError):
    """Instances that reference each other in a loop; ``cycle`` lists the loop."""

    def __init__(self, message: str, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(message)


class InstantiationError(ConfigError):
    """A service's construction failed; the instance is named, the cause chained."""


class MissingDependencyError(ConfigError, ImportError):
    """A backend's optional library is not installed; the message names the extra."""


# --- data model -------------------------------------------------------------------


class DigestError(CastoreError, ValueError):
    """A digest of the wrong length or an unparsable digest string."""


class ValidationError(CastoreError, ValueError):
    """Data that breaks a castore validation rule. ``code`` names the rule."""

    code: str = "invalid"


class InvalidNameError(ValidationError):
    """A node name that is empty, ``.``, ``..``, too long, or holds ``/`` or NUL."""

    def __init__(self, name: bytes, code: str, reason: str) -> None:
        self.name = name
        self.code = code
        self.reason = reason
        super().__init__(f"invalid name {name!r}: {reason}")


class InvalidSymlinkTargetError(ValidationError):
    """A symlink target that is empty, too long or holds NUL."""

    def __init__(self, target: bytes, code: str, reason: str) -> None:
        self.target = target
        self.code = code
        self.reason = reason
        super().__init__(f"invalid symlink target {target!r}: {reason}")


class InvalidNodeError(ValidationError):
    """A node whose payload is invalid (digest length, symlink target)."""

    def __init__(self, name: bytes, code: str, reason: str) -> None:
        self.name = name
        self.code = code
        self.reason = reason
        super().__init__(f"invalid node with name {name!r}: {reason}")


class WrongSortingError(ValidationError):
    """A list of nodes that is not sorted by name."""

    code = "wrong_sorting"

    def __init__(self, name: bytes) -> None:
        self.name = name
        super().__init__(f"{name!r} is not sorted")


class DuplicateNameError(ValidationError):
    """A name that occurs twice within or across the node lists."""

    code = "duplicate_name"

    def __init__(self, name: bytes) -> None:
        self.name = name
        super().__init__(f"{name!r} is a duplicate name")


class SizeOverflowError(ValidationError):
    """A directory whose total size exceeds 2**64 - 1."""

    code = "size_overflow"

    def __init__(self) -> None:
        super().__init__("total size exceeds u64::MAX")


class ClosureError(ValidationError):
    """A directory closure that is incomplete, out of order or inconsistent."""

    def __init__(self, message: str, code: str = "closure") -> None:
        self.code = code
        super().__init__(message)


# --- storage ----------------------------------------------------------------------


class IntegrityError(CastoreError, OSError):
    """Stored or received bytes that do not match their digest."""


class StorageError(CastoreError, OSError):
    """A backend failed to store or retrieve data."""


class ClosedError(CastoreError, ValueError):
    """An operation on a writer, reader, putter or service that is already closed."""


class LockedError(StorageError):
    """Another process holds the store's write lock."""


class AccessDeniedError(StorageError, PermissionError):
    """A server refused the call: no or an unknown credential, or not allowed (a read-only server)."""


class UnsupportedOperationError(CastoreError, ValueError):
    """An operation the backend does not offer (e.g. ``put`` of a non-root on a batch store)."""


class UnsupportedFileTypeError(StorageError):
    """A file the importer cannot represent (fifo, socket, device); ``path`` names it."""

    def __init__(self, path: str, file_type: str) -> None:
        self.path = path
        self.file_type = file_type
        super().__init__(f"unsupported file type at {path}: {file_type}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by the importer's worker processes
        return type(self), (self.path, self.file_type)


# --- translation at the edges -------------------------------------------------------------

ErrorTable = Mapping[
    Union[type[BaseException], tuple[type[BaseException], ...]],
    Union[type["CastoreError"], Callable[[BaseException], BaseException]],
]


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def map_errors(table: ErrorTable, context: str = "") -> Iterator[None]:
    """Turn library exceptions into ours at an edge: ``map_errors({lmdb.Error: StorageError})``.

    The first matching row wins. A row's value is one of our exception classes (built with
    ``"<context>: <the library's first line>"``) or a function from the library exception
    to ours. The library exception is chained as ``__cause__``. Our own exceptions passing
    through keep their class and rule ``code``; ``context`` is added to them as an exception
    note (shown by :func:`describe`) instead of re-wrapping them. Anything else propagates.
    """
    try:
        yield
    except CastoreError as e:
        if context:
            e.add_note(context)
        raise
    except BaseException as e:
        for library, ours in table.items():
            if isinstance(e, library):
                if isinstance(ours, type):
                    text = first_line(e)
                    raise ours(f"{context}: {text}" if context else text) from e
                raise ours(e) from e
        raise


def describe(e: BaseException) -> str:
    """``str(e)`` with the context notes :func:`map_errors` added, outermost first."""
    text = str(e) or type(e).__name__
    for note in getattr(e, "__notes__", ()):
        text = f"{note}: {text}"
    return text
