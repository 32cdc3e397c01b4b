"""Connectivity checks: build each instance and make one cheap round trip to its backend.

A service takes part by having the :class:`Connectable` role (an ``async def
check_connectivity()``), as :class:`~castore_di.maintenance.Checkable` does for ``fsck``;
this module and ``castore check --connect`` name no backend. Services without the role
(memory stores, combinators over other instances) are reported as ``ok`` with nothing to
reach: their building was the check. Failures are reported, never raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from castore_di.composition.container import CastoreContainer

__all__ = ["Connectable", "ConnectivityReport", "ConnectivityResult", "check_connectivity"]


@runtime_checkable
class Connectable(Protocol):
    """A service whose backend can be reached with one cheap round trip."""

    async def check_connectivity(self) -> str:
        """Make one round trip (no retries); return what was reached, raise when unreachable."""
        ...


@attrs.frozen
class ConnectivityResult:
    """The outcome for one instance: ``ok``, what was reached or why not, and the latency."""

    instance_id: str
    ok: bool
    detail: str
    seconds: float

    def line(self, width: int = 0) -> str:
        verdict = "ok" if self.ok else "failed"
        return f"{self.instance_id:<{width}}  {verdict:<6}  {self.seconds * 1000:8.1f} ms  {self.detail}"


@attrs.frozen
class ConnectivityReport:
    """Every instance checked, in dependency order."""

    results: tuple[ConnectivityResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.instance_id for r in self.results if not r.ok]

    def lines(self) -> list[str]:
        width = max((len(r.instance_id) for r in self.results), default=0)
        return [r.line(width) for r in self.results]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if text.startswith(type(e).__name__) else f"{type(e).__name__}: {text}"


async def _check_one(container: "CastoreContainer", instance_id: str, timeout: float) -> ConnectivityResult:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            service = await container.aget(instance_id)
            if isinstance(service, Connectable):
                detail = await service.check_connectivity()
            else:
                detail = "built (no backend to reach)"
    except TimeoutError:
        return ConnectivityResult(instance_id, False, f"timed out after {timeout:g} s", time.perf_counter() - start)
    except Exception as e:
        return ConnectivityResult(instance_id, False, _reason(e), time.perf_counter() - start)
    return ConnectivityResult(instance_id, True, detail, time.perf_counter() - start)


async def check_connectivity(
    container: "CastoreContainer", *, timeout: float = 10.0, instance_ids: Iterable[str] | None = None
) -> ConnectivityReport:
    """Check every instance of ``container`` (or those named), concurrently, each within ``timeout``."""
    ids = list(container.graph.order if instance_ids is None else instance_ids)
    for iid in ids:
        container.provider(iid)  # unknown ids fail before anything is built
    results = await asyncio.gather(*(_check_one(container, iid, timeout) for iid in ids))
    return ConnectivityReport(tuple(results))
