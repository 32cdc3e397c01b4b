"""The pytest plugin's fixtures (loaded through the ``pytest11`` entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from castore_di import CastoreContainer, container_from_addrs
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.testing.fixtures import BLOB_A, BLOB_A_DIGEST, CLOSURE_D, DIRECTORY_D
from castore_di.testing.plugin import CastoreServer

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("castore_di")


async def _round_trip(container: CastoreContainer) -> None:
    blobs, directories = container.blob_service(), container.directory_service()
    assert await blobs.put(BLOB_A) == BLOB_A_DIGEST
    assert await blobs.read_bytes(BLOB_A_DIGEST) == BLOB_A
    assert await directories.put_closure(CLOSURE_D) == DIRECTORY_D.digest
    received = [d async for d in directories.get_recursive(DIRECTORY_D.digest)]
    assert received[0] == DIRECTORY_D and set(received) == set(CLOSURE_D)


async def test_memory_container(castore_memory_container: CastoreContainer) -> None:
    assert isinstance(castore_memory_container.blob_service(), MemoryBlobService)
    assert isinstance(castore_memory_container.directory_service(), MemoryDirectoryService)
    await _round_trip(castore_memory_container)


async def test_memory_container_is_fresh_per_test(castore_memory_container: CastoreContainer) -> None:
    assert not await castore_memory_container.blob_service().has(BLOB_A_DIGEST)


async def test_embedded_container(castore_embedded_container: CastoreContainer) -> None:
    blob_config = castore_embedded_container.graph.instances["blobservices.default"].config
    assert blob_config.type_tag == "embedded"
    await _round_trip(castore_embedded_container)
    assert any(Path(getattr(blob_config, "path")).iterdir()), "nothing was written to the temporary directory"


async def test_server(castore_server: str) -> None:
    assert castore_server.startswith("grpc+http://127.0.0.1:")
    async with container_from_addrs(blob=castore_server, directory=castore_server) as container:
        await _round_trip(container)
    # A second client sees what the first one stored: the data lives in the server.
    async with container_from_addrs(blob=castore_server, directory=castore_server) as container:
        assert await container.blob_service().read_bytes(BLOB_A_DIGEST) == BLOB_A
        assert await container.directory_service().get(DIRECTORY_D.digest) == DIRECTORY_D


def test_server_that_cannot_start_fails() -> None:
    server = CastoreServer(["--config", "/nonexistent/castore.yaml"])
    with pytest.raises(RuntimeError, match="did not start"):
        server.start(timeout=30)
    assert server.proc is not None and server.proc.poll() is not None


def test_server_stops() -> None:
    with CastoreServer() as server:
        proc = server.proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None


_SYNC_TEST = '''
import asyncio
from castore_di import CastoreContainer

def test_sync(castore_memory_container: CastoreContainer) -> None:
    blobs = castore_memory_container.blob_service()
    assert asyncio.run(blobs.read_bytes(asyncio.run(blobs.put(b"x")))) == b"x"
'''

_RUN_WITHOUT_PYTEST_ASYNCIO = """
import sys

class _Hide:  # as if pytest-asyncio were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pytest_asyncio":
            raise ImportError(name)

sys.meta_path.insert(0, _Hide())
import pytest
sys.exit(pytest.main(["-q", "-p", "castore_di.testing.plugin", "-p", "no:cacheprovider", "-o", "addopts=", sys.argv[1]]))
"""


def test_fixtures_without_pytest_asyncio(tmp_path: Path) -> None:
    (tmp_path / "test_sync.py").write_text(_SYNC_TEST)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # our plugin is loaded with -p
    result = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_PYTEST_ASYNCIO, str(tmp_path / "test_sync.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
