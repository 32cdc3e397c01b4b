"""Metrics and tracing of service operations, per instance (opt-in per container).

``load_container(config, metrics=Metrics())`` wraps every service the container builds in
a thin recorder: Prometheus counters of calls, errors, bytes read and written, and a
latency histogram, labelled with the instance id (``blobservices.default``), its ``type``
tag and the operation; and, when ``opentelemetry-api`` is installed (the ``otel`` extra),
one span per operation. Without ``metrics`` nothing is wrapped: a service call costs what
it did (``benches/metrics_bench.py``). Dependents receive the wrapped services, so a
``combined`` store's calls to its ``remote`` are counted under the remote's id too.

``prometheus-client`` is the ``metrics`` extra; :meth:`Metrics.serve` exposes ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from castore_di.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryPutter, DirectoryService
from castore_di.errors import MissingDependencyError
from castore_di.nodes import Directory

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from castore_di.composition.graph import Instance

__all__ = ["Metrics", "MeteredBlobService", "MeteredDirectoryService"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _tracer(enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("castore_di")


class Metrics:
    """Prometheus metrics (in ``registry``, a fresh one by default) and optional spans.

    Metric names: ``castore_operations_total``, ``castore_operation_errors_total``,
    ``castore_operation_seconds`` (histogram), labels ``instance``, ``type``, ``operation``;
    ``castore_read_bytes_total`` and ``castore_written_bytes_total``, labels ``instance``,
    ``type``. ``tracing=False`` turns the OpenTelemetry spans off.
    """

    def __init__(self, registry: "CollectorRegistry | None" = None, *, tracing: bool = True) -> None:
        try:
            import prometheus_client as prom
        except ImportError as e:
            raise MissingDependencyError(
                "metrics need prometheus-client: pip install 'castore_di[metrics]'"
            ) from e
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        ops = ("instance", "type", "operation")
        self.calls = prom.Counter("castore_operations", "Service operations started.", ops, registry=self.registry)
        self.errors = prom.Counter(
            "castore_operation_errors", "Service operations that raised.", ops, registry=self.registry
        )
        self.latency = prom.Histogram(
            "castore_operation_seconds", "Service operation latency.", ops, buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_read = prom.Counter(
            "castore_read_bytes", "Blob bytes read.", ("instance", "type"), registry=self.registry
        )
        self.bytes_written = prom.Counter(
            "castore_written_bytes", "Blob bytes written.", ("instance", "type"), registry=self.registry
        )
        self.tracer = _tracer(tracing)

    def wrap(self, instance: "Instance", service: Any) -> Any:
        """``service`` wrapped to record its operations (services of unknown kinds unchanged)."""
        if isinstance(service, BlobService):
            return MeteredBlobService(service, _Recorder(self, instance.id, instance.type_tag))
        if isinstance(service, DirectoryService):
            return MeteredDirectoryService(service, _Recorder(self, instance.id, instance.type_tag))
        return service

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    def serve(self, host: str, port: int) -> Any:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the server (``shutdown()``)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _Op:
    """One operation in flight: a latency timer and, with tracing, a span."""

    __slots__ = ("children", "start", "span", "done")

    def __init__(self, recorder: "_Recorder", name: str) -> None:
        self.children = children = recorder.children(name)
        children[0].inc()
        tracer = recorder.tracer
        self.span = None if tracer is None else tracer.start_span(f"castore.{name}", attributes=recorder.attributes)
        self.done = False
        self.start = time.perf_counter()

    def end(self, error: BaseException | None = None, **attributes: Any) -> None:
        if self.done:  # e.g. a failed write, then its abort
            return
        self.done = True
        _calls, errors, latency = self.children
        latency.observe(time.perf_counter() - self.start)
        if error is not None:
            errors.inc()
        span = self.span
        if span is not None:
            self.span = None
            for key, value in attributes.items():
                span.set_attribute(f"castore.{key}", value)
            if error is not None:
                span.record_exception(error)
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, str(error)))
            span.end()


class _Recorder:
    """One instance's labelled metrics (children looked up once per operation name)."""

    __slots__ = ("metrics", "instance_id", "type_tag", "tracer", "attributes", "read", "written", "_children")

    def __init__(self, metrics: Metrics, instance_id: str, type_tag: str) -> None:
        self.metrics = metrics
        self.instance_id = instance_id
        self.type_tag = type_tag
        self.tracer = metrics.tracer
        self.attributes = {"castore.instance": instance_id, "castore.type": type_tag}
        self.read = metrics.bytes_read.labels(instance_id, type_tag)
        self.written = metrics.bytes_written.labels(instance_id, type_tag)
        self._children: dict[str, tuple[Any, Any, Any]] = {}

    def children(self, name: str) -> tuple[Any, Any, Any]:
        children = self._children.get(name)
        if children is None:
            m, labels = self.metrics, (self.instance_id, self.type_tag, name)
            children = self._children[name] = (
                m.calls.labels(*labels), m.errors.labels(*labels), m.latency.labels(*labels)
            )
        return children

    async def run(self, name: str, coro: Any) -> Any:
        if self.tracer is None:  # the common case, without an _Op object
            calls, errors, latency = self.children(name)
            calls.inc()
            start = time.perf_counter()
            try:
                return await coro
            except BaseException:
                errors.inc()
                raise
            finally:
                latency.observe(time.perf_counter() - start)
        op = _Op(self, name)
        try:
            result = await coro
        except BaseException as e:
            op.end(e)
            raise
        op.end()
        return result


class _Delegating:
    """Roles and attributes the wrapper does not define come from the wrapped service."""

    _inner: Any

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


class MeteredBlobService(_Delegating, BlobService):
    """A blob service whose operations are recorded; ``inner`` is the service itself."""

    def __init__(self, inner: BlobService, recorder: _Recorder) -> None:
        self._inner = inner
        self._rec = recorder

    @property
    def inner(self) -> BlobService:
        return self._inner  # type: ignore[no-any-return]

    async def has(self, digest: B3Digest) -> bool:
        return await self._rec.run("has", self._inner.has(digest))  # type: ignore[no-any-return]

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self._rec.run("chunks", self._inner.chunks(digest))  # type: ignore[no-any-return]

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await self._rec.run("open_read", self._inner.open_read(digest))
        return None if reader is None else _MeteredReader(reader, self._rec)

    def open_write(self) -> BlobWriter:
        return _MeteredWriter(self._inner.open_write(), self._rec)

    async def close(self) -> None:
        await self._inner.close()


class _MeteredReader(BlobReader):
    def __init__(self, inner: BlobReader, recorder: _Recorder) -> None:
        self._inner = inner
        self._rec = recorder

    @property
    def size(self) -> int:
        return self._inner.size

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        self._rec.read.inc(len(data))
        return data

    async def seek(self, offset: int, whence: int = 0) -> int:
        return await self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    async def close(self) -> None:
        await self._inner.close()


class _MeteredWriter(BlobWriter):
    """Records one ``write`` operation from open to close (or abort), and the bytes written."""

    def __init__(self, inner: BlobWriter, recorder: _Recorder) -> None:
        super().__init__()
        self._inner = inner
        self._rec = recorder
        self._op = _Op(recorder, "write")
        self._size = 0

    async def _write(self, data: bytes) -> None:
        try:
            await self._inner.write(data)
        except BaseException as e:
            self._op.end(e)
            raise
        self._size += len(data)
        self._rec.written.inc(len(data))

    async def _finish(self) -> B3Digest:
        try:
            digest = await self._inner.close()
        except BaseException as e:
            self._op.end(e)
            raise
        self._op.end(size=self._size, digest=str(digest))
        return digest

    async def _abort(self) -> None:
        try:
            await self._inner.abort()
        finally:
            self._op.end(size=self._size, aborted=True)


class MeteredDirectoryService(_Delegating, DirectoryService):
    """A directory service whose operations are recorded; ``inner`` is the service itself."""

    def __init__(self, inner: DirectoryService, recorder: _Recorder) -> None:
        self._inner = inner
        self._rec = recorder

    @property
    def inner(self) -> DirectoryService:
        return self._inner  # type: ignore[no-any-return]

    async def get(self, digest: B3Digest) -> Directory | None:
        return await self._rec.run("get", self._inner.get(digest))  # type: ignore[no-any-return]

    async def put(self, directory: Directory) -> B3Digest:
        return await self._rec.run("put", self._inner.put(directory))  # type: ignore[no-any-return]

    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return self._recursive(root)

    async def _recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        op = _Op(self._rec, "get_recursive")
        count = 0
        try:
            async for directory in self._inner.get_recursive(root):
                count += 1
                yield directory
        except BaseException as e:
            op.end(e, directories=count)
            raise
        op.end(directories=count)

    def put_multiple_start(self) -> DirectoryPutter:
        return _MeteredPutter(self._inner.put_multiple_start(), self._rec)

    async def close(self) -> None:
        await self._inner.close()


class _MeteredPutter(DirectoryPutter):
    def __init__(self, inner: DirectoryPutter, recorder: _Recorder) -> None:
        self._inner = inner
        self._op = _Op(recorder, "put_multiple")
        self._count = 0

    async def put(self, directory: Directory) -> None:
        try:
            await self._inner.put(directory)
        except BaseException as e:
            self._op.end(e, directories=self._count)
            raise
        self._count += 1

    async def close(self) -> B3Digest:
        try:
            root = await self._inner.close()
        except BaseException as e:
            self._op.end(e, directories=self._count)
            raise
        self._op.end(directories=self._count, root=str(root))
        return root
