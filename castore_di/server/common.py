"""What the servicers share: raw message handling, NOT_FOUND, errors as statuses, registration."""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn, TypeAlias

import grpc
import grpc.aio

from castore_di._grpc.wire import error_details
from castore_di.digests import B3_LEN, B3Digest
from castore_di.errors import DigestError, ValidationError

__all__ = ["Context", "Servicer", "abort_with", "not_found", "parse_digest", "parse_message", "status_for"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of an exception (the table in :mod:`castore_di._grpc.wire`)."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, error_details(exc)[0])
    return code


async def abort_with(context: Context, exc: BaseException, what: str = "") -> NoReturn:
    """Abort the call with the status of ``exc``; its class and rule code go in trailing metadata."""
    name, details, metadata = error_details(exc, what)
    await context.abort(getattr(grpc.StatusCode, name), details, metadata)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


async def not_found(context: Context, message: str) -> NoReturn:
    """Abort with NOT_FOUND (how the servicers report absence)."""
    await context.abort(grpc.StatusCode.NOT_FOUND, message)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def parse_message(msg_cls: Any, raw: bytes, what: str) -> Any:
    """Decode a request; undecodable bytes are a :class:`ValidationError` (INVALID_ARGUMENT)."""
    try:
        return msg_cls.FromString(raw)
    except Exception as e:  # protobuf's DecodeError
        raise ValidationError(f"cannot decode {what}: {e}") from e


def parse_digest(raw: bytes) -> B3Digest:
    """A request's digest field; a wrong length is a :class:`DigestError`."""
    if len(raw) != B3_LEN:
        raise DigestError(f"invalid digest length: {len(raw)}")
    return B3Digest(raw)


class Servicer:
    """Base of the servicers: registers :meth:`handlers` under :attr:`SERVICE_NAME`.

    Handlers take and return raw bytes; the servicers (de)serialise messages themselves so
    bad bytes become INVALID_ARGUMENT.
    """

    SERVICE_NAME: ClassVar[str]

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        raise NotImplementedError

    def add_to_server(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.SERVICE_NAME, self.handlers()),))
