"""Metrics (prometheus-client) and OpenTelemetry spans of service operations."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from castore_di import Directory, load_container
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.digests import blake3_digest
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import ClosureError
from castore_di.importer import ingest_path
from castore_di.metrics import MeteredBlobService, Metrics
from castore_di.nodes import DirectoryNode

from tests.servers_grpc import GrpcServerProcess

CONFIG: dict[str, Any] = {
    "blobservices": {
        "local": {"type": "memory"},
        "default": {"type": "combined", "local": "local", "remote": "memory://"},
    },
    "directoryservices": {"default": {"type": "memory"}},
}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_off_by_default_nothing_is_wrapped() -> None:
    container = load_container(CONFIG)
    assert container.metrics is None
    assert type(container.blob_service("local")) is MemoryBlobService
    assert type(container.directory_service()) is MemoryDirectoryService


async def test_calls_bytes_latency_per_instance_and_type() -> None:
    metrics = Metrics(tracing=False)
    container = load_container(CONFIG, metrics=metrics)
    default = container.blob_service()
    assert isinstance(default, MeteredBlobService) and isinstance(default.inner, CombinedBlobService)
    digest = await default.put(b"x" * 1000)
    assert await default.read_bytes(digest) == b"x" * 1000
    assert await default.has(digest)
    ids = {"instance": "blobservices.default", "type": "combined"}
    assert value(metrics, "castore_operations_total", **ids, operation="write") == 1
    assert value(metrics, "castore_operations_total", **ids, operation="has") == 1
    assert value(metrics, "castore_written_bytes_total", **ids) == 1000
    assert value(metrics, "castore_read_bytes_total", **ids) == 1000
    assert value(metrics, "castore_operation_seconds_count", **ids, operation="has") == 1
    # combined writes to its local store: recorded under that instance too
    local = {"instance": "blobservices.local", "type": "memory"}
    assert value(metrics, "castore_written_bytes_total", **local) == 1000
    text = metrics.exposition().decode()
    assert 'castore_operations_total{instance="blobservices.default",operation="write",type="combined"} 1.0' in text
    await container.aclose()


async def test_errors_are_counted() -> None:
    metrics = Metrics(tracing=False)
    container = load_container(CONFIG, metrics=metrics)
    dirs = container.directory_service()
    putter = dirs.put_multiple_start()
    missing = Directory({b"child": DirectoryNode(blake3_digest(b"not sent"), 1)})
    with pytest.raises(ClosureError):
        await putter.put(missing)
    ids = {"instance": "directoryservices.default", "type": "memory", "operation": "put_multiple"}
    assert value(metrics, "castore_operation_errors_total", **ids) == 1
    assert value(metrics, "castore_operations_total", **ids) == 1
    await container.aclose()


async def test_spans_for_an_imports_puts(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process; no other test sets it
    assert trace.get_tracer_provider() is provider
    metrics = Metrics()  # its tracer comes from the API's global provider
    container = load_container(CONFIG, metrics=metrics)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_bytes(b"alpha")
    (tmp_path / "tree" / "b.txt").write_bytes(b"beta")
    await ingest_path(container.blob_service(), container.directory_service(), tmp_path / "tree")
    spans = exporter.get_finished_spans()
    writes = [s for s in spans if s.name == "castore.write" and s.attributes
              and s.attributes["castore.instance"] == "blobservices.default"]
    assert sorted(s.attributes["castore.size"] for s in writes if s.attributes) == [4, 5]
    assert all(s.attributes and s.attributes["castore.type"] == "combined" for s in writes)
    assert any(s.name == "castore.put_multiple" for s in spans)
    await container.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_metrics_listen(tmp_path: Path) -> None:
    from castore_di.blobservice.grpc import GRPCBlobServiceConfig  # noqa: F401  (grpc installed)

    port = _free_port()
    server = GrpcServerProcess(tmp_path, extra_args=("--metrics-listen", f"127.0.0.1:{port}")).start()
    try:
        import asyncio

        async def use() -> None:
            remote = load_container({"blobservices": {"default": server.url}}).blob_service()
            await remote.put(b"counted by the server")
            await remote.close()

        asyncio.run(use())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'castore_written_bytes_total{instance="blobservices.default",type="memory"} 21.0' in text
    finally:
        server.stop()
