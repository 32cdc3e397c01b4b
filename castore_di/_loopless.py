"""Coroutines run to completion without an event loop, for short commands on local stores.

The services are async; an event loop exists to keep many waits going at once. A command
such as ``castore ls`` on the embedded store waits on nothing: its reads are short LMDB
lookups, and only opening and closing the store go to a worker thread (so that an event
loop, if there is one, is never blocked). :func:`run_loopless` runs such a command's
coroutine directly: inside it :func:`to_thread` calls its function in place (no loop is
there to block), so no await suspends, and neither asyncio nor a thread pool is started
(about a sixth of the command's time). Services that work this way say so with their
``loopless`` class attribute (:class:`~castore_di.blobservice.base.BlobService`,
:class:`~castore_di.directoryservice.base.DirectoryService`); the CLI runs a read command
this way only when every service it may use does (``CliContext.loopless``).

Code that needs the loop itself (``asyncio.gather``, tasks, futures of other threads) is
not for this runner: a coroutine that suspends inside it is an error, never a hang.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run_loopless", "in_loopless", "to_thread"]

T = TypeVar("T")

_LOOPLESS: contextvars.ContextVar[bool] = contextvars.ContextVar("castore_di_loopless", default=False)


def in_loopless() -> bool:
    """Whether the caller runs inside :func:`run_loopless`."""
    return _LOOPLESS.get()


def run_loopless(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end in this thread, without an event loop; its result (or error).

    Raises:
        RuntimeError: the coroutine suspended (it awaited something only a loop can finish).
    """
    token = _LOOPLESS.set(True)
    try:
        try:
            coro.send(None)
        except StopIteration as done:
            result: T = done.value
            return result
        coro.close()
        raise RuntimeError("a coroutine run without an event loop suspended (it needs asyncio)")
    finally:
        _LOOPLESS.reset(token)


async def to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread(fn, *args, **kwargs)``; inside :func:`run_loopless`, ``fn`` is called in place."""
    if _LOOPLESS.get():
        return fn(*args, **kwargs)
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)
