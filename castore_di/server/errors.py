"""The one table from castore_di exceptions to gRPC status codes, and the abort helper.

Decisions (divergences from the reference, which maps nearly everything to INTERNAL):

* invalid input (a bad digest, an invalid Directory, a broken closure) is INVALID_ARGUMENT
  with our message, and our exception class (and rule code) travel in trailing metadata
  (``castore-error``, ``castore-error-code``) so our client re-raises the same class;
* stored bytes that fail verification are DATA_LOSS;
* a backend failure (:class:`StorageError`) is INTERNAL: it is not a transport problem, so
  clients should not blindly retry it; a store locked by another process or a service
  already closed (server shutting down) is UNAVAILABLE, which clients may retry;
* a call past a server limit (:mod:`castore_di.limits`) is RESOURCE_EXHAUSTED or
  DEADLINE_EXCEEDED; a stream the client did not finish is CANCELLED (nothing is stored);
* anything unexpected is INTERNAL with the exception's type and message.

Absence is not an error of the services (``None``/``False``); the servicers turn it into
NOT_FOUND themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import grpc

from castore_di.errors import (
    CastoreError,
    ClosedError,
    ConfigError,
    DigestError,
    IntegrityError,
    LockedError,
    StorageError,
    UnsupportedOperationError,
    ValidationError,
)
from castore_di.grpc_channel import ERROR_CLASS_KEY, ERROR_CODE_KEY

if TYPE_CHECKING:
    import grpc.aio

__all__ = ["STATUS_TABLE", "status_for", "abort_with"]

# First match wins: more specific classes come first.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (DigestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),  # ClosureError and every Directory rule
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (LockedError, grpc.StatusCode.UNAVAILABLE),
    (StorageError, grpc.StatusCode.INTERNAL),
    (ClosedError, grpc.StatusCode.UNAVAILABLE),
    (UnsupportedOperationError, grpc.StatusCode.UNIMPLEMENTED),
    (ConfigError, grpc.StatusCode.INTERNAL),
    (CastoreError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of an exception (INTERNAL when no row matches)."""
    from castore_di.server.common import StreamInterrupted
    from castore_di.limits import LimitExceeded

    if isinstance(exc, LimitExceeded):
        code: grpc.StatusCode = getattr(grpc.StatusCode, exc.code)
        return code
    if isinstance(exc, StreamInterrupted):
        return grpc.StatusCode.CANCELLED
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: "grpc.aio.ServicerContext[object, object]", exc: BaseException, what: str = "") -> NoReturn:
    """Abort the call with the status of ``exc``; its class and rule code go in trailing metadata."""
    code = status_for(exc)
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, CastoreError) and status_for(exc) == grpc.StatusCode.INTERNAL:
        text = f"internal error ({type(exc).__name__}): {text}"
    details = f"{what}: {text}" if what else text
    metadata: list[tuple[str, str]] = [(ERROR_CLASS_KEY, type(exc).__name__)]
    rule = getattr(exc, "code", None)
    if isinstance(exc, ValidationError) and isinstance(rule, str):
        metadata.append((ERROR_CODE_KEY, rule))
    await context.abort(code, details, tuple(metadata))
    raise AssertionError("unreachable")  # pragma: no cover - abort raises
