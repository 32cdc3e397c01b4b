"""Cost of metrics: a resolved ``has()`` on a memory blob service, metrics off and on.

Rows, measured in the same run, interleaved, best of ``--repeat``:
- peer: a ``MemoryBlobService`` constructed directly (no container: what a call cost before);
- a container's ``blobservices.default`` with metrics off (the default): the very same
  class, not wrapped, so any difference to the peer is noise (a second peer row shows it);
- metrics on, tracing off; metrics on with OpenTelemetry spans (API only, no SDK installed
  as provider: the no-op tracer), when ``opentelemetry-api`` is importable;
- peer: prometheus-client's own cost per recorded operation (one counter inc, one observe).

    python benches/metrics_bench.py [--calls N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from castore_di import load_container
from castore_di.blobservice.base import BlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.metrics import Metrics

CONFIG = {"blobservices": {"default": {"type": "memory"}}}


async def per_call(service: BlobService, calls: int) -> float:
    digest = await service.put(b"present")
    has = service.has
    start = time.perf_counter()
    for _ in range(calls):
        await has(digest)
    return (time.perf_counter() - start) / calls


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    services: list[tuple[str, Callable[[], BlobService]]] = [
        ("peer: MemoryBlobService() called directly", MemoryBlobService),
        ("container, metrics off (default)", lambda: load_container(CONFIG).blob_service()),
        ("noise floor: a second MemoryBlobService() called directly", MemoryBlobService),
        ("container, metrics on, tracing off", lambda: load_container(CONFIG, metrics=Metrics(tracing=False)).blob_service()),
    ]
    try:
        import opentelemetry.trace  # noqa: F401

        services.append(("container, metrics on + otel spans (no-op tracer)",
                         lambda: load_container(CONFIG, metrics=Metrics()).blob_service()))
    except ImportError:
        pass
    built = [(name, make()) for name, make in services]
    best = {name: float("inf") for name, _ in built}
    for round_ in range(args.repeat):
        for name, service in built if round_ % 2 else reversed(built):  # alternate the order
            best[name] = min(best[name], await per_call(service, args.calls))
    # What prometheus-client itself costs per recorded operation (one counter inc, one
    # histogram observe), measured in the same run: the floor of any "metrics on" row.
    metrics = Metrics(tracing=False)
    counter = metrics.calls.labels("blobservices.default", "memory", "has")
    histogram = metrics.latency.labels("blobservices.default", "memory", "has")

    def prometheus_only() -> float:
        start = time.perf_counter()
        for _ in range(args.calls):
            counter.inc()
            histogram.observe(0.0001)
        return (time.perf_counter() - start) / args.calls

    best["peer: prometheus-client alone (inc + observe)"] = min(prometheus_only() for _ in range(args.repeat))
    built.append(("peer: prometheus-client alone (inc + observe)", MemoryBlobService()))
    base = best[built[0][0]]
    print(f"resolved has() on a memory blob service, {args.calls} calls x {args.repeat} rounds (best)")
    print(f"{'measure':<58} {'ns/call':>9} {'ratio':>7}")
    for name, _ in built:
        print(f"{name:<58} {best[name] * 1e9:>9.1f} {best[name] / base:>6.3f}x")


if __name__ == "__main__":
    asyncio.run(main())
