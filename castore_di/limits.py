"""What a peer can make a castore server hold, and for how long: :class:`ServerLimits`.

Every limit is a ``castore serve`` option; the defaults suit a server open to clients it
does not trust. A call that hits a limit fails alone, with a status that says which kind
of limit (RESOURCE_EXHAUSTED for sizes and counts, DEADLINE_EXCEEDED for the idle timeout)
and a message naming the limit and the option that sets it; the server keeps serving the
other calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import NoReturn

import attrs

from castore_di.composition.fields import positive
from castore_di.errors import CastoreError

__all__ = ["LimitExceeded", "ServerLimits", "Slot", "StreamGate", "idle_bounded"]


@attrs.frozen(kw_only=True)
class ServerLimits:
    """Bounds on what one call can make the server hold.

    Attributes:
        idle_timeout: seconds a Put stream may go without a message, or a Read's client
            without taking one, before the call is aborted (``--idle-timeout``).
        max_streams: streaming calls (Read, Put, recursive Get) served at once
            (``--max-streams``); one more is refused, not queued.
        max_message_size: bytes of one message, i.e. what the server buffers for an
            in-flight Put before the bytes go into the backend (``--max-message-size``).
            gRPC refuses larger messages itself (RESOURCE_EXHAUSTED).
        max_blob_size: bytes one blob Put may carry (``--max-blob-size``).
        max_put_directories: directories in one Directory Put (``--max-put-directories``).
        max_put_directory_bytes: encoded bytes of one Directory Put (``--max-put-directory-bytes``).
        max_depth: nesting depth of a closure sent in one Directory Put (``--max-depth``).
    """

    idle_timeout: float = attrs.field(default=60.0, validator=positive)
    max_streams: int = attrs.field(default=256, validator=positive)
    max_message_size: int = attrs.field(default=4 << 20, validator=positive)
    max_blob_size: int = attrs.field(default=64 << 30, validator=positive)
    max_put_directories: int = attrs.field(default=1_000_000, validator=positive)
    max_put_directory_bytes: int = attrs.field(default=256 << 20, validator=positive)
    max_depth: int = attrs.field(default=1000, validator=positive)


class LimitExceeded(CastoreError):
    """A call went past a :class:`ServerLimits` bound; the server answers with ``grpc_status``."""

    def __init__(self, grpc_status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = grpc_status  # a grpc.StatusCode member name


def exceeded(code: str, message: str) -> NoReturn:
    raise LimitExceeded(code, message)


class StreamGate:
    """Counts the streaming calls in flight and refuses those beyond ``max_streams``."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.active = 0

    def enter(self, what: str) -> "Slot":
        """Take a slot (give it back with :meth:`Slot.leave`) or raise :class:`LimitExceeded`."""
        if self.active >= self.max_streams:
            exceeded(
                "RESOURCE_EXHAUSTED",
                f"too many concurrent streams ({self.max_streams} in flight; "
                f"the limit is set by castore serve --max-streams)",
            )
        self.active += 1
        return Slot(self)


class Slot:
    """One stream's place in a :class:`StreamGate`; :meth:`leave` is idempotent."""

    __slots__ = ("_gate",)

    def __init__(self, gate: StreamGate) -> None:
        self._gate: StreamGate | None = gate

    def leave(self) -> None:
        if self._gate is not None:
            self._gate.active -= 1
            self._gate = None


async def idle_bounded(requests: AsyncIterator[bytes], timeout: float, what: str) -> AsyncIterator[bytes]:
    """The messages of a client stream; a gap longer than ``timeout`` raises :class:`LimitExceeded`."""
    it = requests.__aiter__()
    while True:
        try:
            raw = await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            exceeded(
                "DEADLINE_EXCEEDED",
                f"{what}: no message for {timeout:g} s (idle timeout; set by castore serve --idle-timeout)",
            )
        yield raw
