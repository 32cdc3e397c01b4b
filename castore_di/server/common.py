"""What the servicers share: raw message handling, NOT_FOUND, errors as statuses, registration."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, NoReturn, TypeAlias

import grpc
import grpc.aio

from castore_di._grpc.wire import error_details
from castore_di.digests import B3_LEN, B3Digest
from castore_di.errors import CastoreError, DigestError, ValidationError, map_errors

__all__ = [
    "Context",
    "Servicer",
    "SendWatch",
    "StreamInterrupted",
    "abort_with",
    "give_back_memory",
    "not_found",
    "parse_digest",
    "parse_message",
    "require_clean_end",
    "status_for",
]

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


class StreamInterrupted(CastoreError):
    """The client's stream ended by cancellation, deadline or a lost connection, not a half-close."""

    grpc_status = "CANCELLED"


async def require_clean_end(context: Context, what: str) -> None:
    """Return only if the client half-closed its stream; raise if the call was cancelled.

    grpc.aio ends the request iterator the same way for a half-close and for a cancelled
    call (client cancel, deadline, lost connection), so a Put cannot tell a complete upload
    from an interrupted one by its messages. Sending the (empty) initial metadata can: on a
    cancelled call the send fails, or the handler task is cancelled while it waits (grpc
    delivers the cancellation first), and a half-closed call takes it.
    """
    try:
        await context.send_initial_metadata(())
    except asyncio.CancelledError:
        raise
    except Exception as e:  # grpc's ExecuteBatchError / UsageError on a finished call
        raise StreamInterrupted(f"{what}: the client did not finish the stream (cancelled or disconnected)") from e


_trim_lock = threading.Lock()
_trim_state: dict[str, Any] = {"fn": None, "running": False, "dirty": False}


def _malloc_trim() -> Any:
    if _trim_state["fn"] is None:
        fn: Any = False
        try:
            import ctypes

            fn = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            pass
        _trim_state["fn"] = fn
    return _trim_state["fn"]


def give_back_memory() -> None:
    """Return freed heap to the OS after an aborted Put (glibc keeps it otherwise).

    A cancelled Put of a memory backend frees its buffer, but glibc keeps freed blocks below
    its (growing) mmap threshold in the heap, so RSS stayed at the high-water mark of
    abandoned uploads. ``malloc_trim`` runs in a thread, one at a time, again as long as
    more Puts were aborted meanwhile.
    """
    trim = _malloc_trim()
    if not trim:
        return
    with _trim_lock:
        _trim_state["dirty"] = True
        if _trim_state["running"]:
            return
        _trim_state["running"] = True

    def run() -> None:
        while True:
            with _trim_lock:
                if not _trim_state["dirty"]:
                    _trim_state["running"] = False
                    return
                _trim_state["dirty"] = False
            trim(0)

    asyncio.get_running_loop().run_in_executor(None, run)


class SendWatch:
    """Aborts a server-streaming call whose client takes no message for ``timeout`` seconds.

    A client that stops reading a Read stream stalls the server's write (HTTP/2 flow
    control) while it holds a stream slot and an open reader; the servicer marks when a
    message waits for the client (:meth:`waiting`) and when it went (:meth:`sent`).
    """

    def __init__(
        self,
        context: Context,
        timeout: float,
        what: str,
        on_expire: Iterable[Callable[[], Awaitable[None] | None]] = (),
    ) -> None:
        self._on_expire = tuple(on_expire)
        self._context = context
        self._timeout = timeout
        self._what = what
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._task = asyncio.ensure_future(self._watch())

    def waiting(self) -> None:
        self._since = self._loop.time()

    def sent(self) -> None:
        self._since = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._timeout / 4)
            since = self._since
            if since is not None and self._loop.time() - since >= self._timeout:
                for release in self._on_expire:
                    done = release()
                    if done is not None:
                        await done
                try:
                    await self._context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{self._what}: the client took no message for {self._timeout:g} s "
                        "(idle timeout; set by castore serve --idle-timeout)",
                    )
                except BaseException:  # AbortError, or the call already ended
                    pass
                return

    def close(self) -> None:
        self._task.cancel()


def parse_message(msg_cls: Any, raw: bytes, what: str) -> Any:
    """Decode a request; undecodable bytes are a :class:`ValidationError` (INVALID_ARGUMENT)."""
    with map_errors({Exception: ValidationError}, f"cannot decode {what}"):  # protobuf's DecodeError
        return msg_cls.FromString(raw)


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
