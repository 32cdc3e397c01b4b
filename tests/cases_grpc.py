"""Conformance cases for the grpc backend (see tests/cases.py).

The grpc clients talk to a real ``castore serve`` subprocess (tests/servers_grpc.py) with
memory services, and with the embedded default once it exists; each test gets its own
server (an empty store), as the suites expect.

The embedded-backed case has a backdoor: the test process opens the server's LMDB store
(LMDB is shared between processes) and flips a stored byte with the embedded cases'
backdoors, so the server's verification must fail and the client must re-raise it as
IntegrityError (DATA_LOSS on the wire). The memory-backed server keeps its store in
another process's memory: no backdoor (corruption on the wire is covered by
tests/test_grpc_client.py with a fake servicer).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cases_base import Case
from tests.servers_grpc import GrpcServerProcess, grpc_backends


def _server(request: pytest.FixtureRequest, backend: str) -> GrpcServerProcess:
    server: GrpcServerProcess = request.getfixturevalue(f"grpc_{backend}_server_fresh")
    return server


def _instances(backend: str) -> Any:
    def instances(request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"default": {"type": "grpc", "url": _server(request, backend).url}}

    return instances


class _ServerStore:
    """The server's embedded store, opened in the test process; what the embedded backdoors use."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from castore_di._embedded import acquire, release
        from castore_di.blobservice.embedded import _BlobRecords
        from castore_di.directoryservice.embedded import _DirectoryRecords

        env = acquire(str(_server(request, "embedded").data_dir))
        request.addfinalizer(lambda: release(env))
        self.blobs = _BlobRecords(env)
        self.dirs = _DirectoryRecords(env)


class _ServerBlobs:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._records = _ServerStore(request).blobs

    def _store(self) -> Any:
        return self._records


class _ServerDirectories:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._records = _ServerStore(request).dirs

    def _store(self) -> Any:
        return self._records


def _blob_backdoor(service: Any, request: pytest.FixtureRequest) -> Any:
    from tests.cases_embedded import EmbeddedBlobBackdoor

    return EmbeddedBlobBackdoor(_ServerBlobs(request))


def _directory_backdoor(service: Any, request: pytest.FixtureRequest) -> Any:
    from tests.cases_embedded import EmbeddedDirectoryBackdoor

    return EmbeddedDirectoryBackdoor(_ServerDirectories(request))


def _name(backend: str) -> str:
    return "grpc" if backend == "memory" else f"grpc-{backend}"


BLOB_CASES: list[Case] = [
    Case(_name(b), ("grpc",), _instances(b), _blob_backdoor if b == "embedded" else None) for b in grpc_backends()
]
DIRECTORY_CASES: list[Case] = [
    Case(_name(b), ("grpc",), _instances(b), _directory_backdoor if b == "embedded" else None) for b in grpc_backends()
]
