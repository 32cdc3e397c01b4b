"""Every ready container in containers/ validates, and runs end to end where a server exists.

Local and memory run in-process; cached-remote against a real ``castore serve``; s3, azure
and bigtable against the local servers the backend tests use (moto, Azurite, the Bigtable
emulator), reached by setting the environment variables each file reads. GCS has no usable
local emulator, so gcs.yaml is validated only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore_di import CastoreContainer, ConfigError, container_from_addrs, load_container, load_graph
from castore_di.exporter import export_node
from castore_di.importer import ingest_path
from castore_di.nodes import DirectoryNode
from castore_di.testing.fixtures import BLOB_A, BLOB_A_DIGEST, CLOSURE_D, DIRECTORY_A, DIRECTORY_D
from tests.treecmp import assert_same_tree

from tests.servers_azure import AzureContainer
from tests.servers_bigtable import BigtableEmulator
from tests.servers_s3 import S3Bucket

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"
FILES = sorted(p.name for p in CONTAINERS.glob("*.yaml"))

# Values for the variables each file requires, enough for validation (nothing is built).
REQUIRED_ENV = {
    "CASTORE_S3_BUCKET": "bucket",
    "CASTORE_AZURE_CONTAINER": "container",
    "CASTORE_GCS_BUCKET": "bucket",
    "CASTORE_BIGTABLE_PROJECT": "project",
    "CASTORE_BIGTABLE_INSTANCE": "instance",
    "CASTORE_BLOB_STORE_URL": "gs://bucket/castore/blobs",
}


def test_the_expected_files_exist() -> None:
    assert FILES == [
        "azure.yaml", "bigtable.yaml", "cached-remote.yaml", "gcs.yaml", "local.yaml", "memory.yaml", "s3.yaml"
    ]
    for name in FILES:
        assert (CONTAINERS / name).read_text().startswith("#"), f"{name} does not start with a comment"


@pytest.mark.parametrize("name", FILES)
def test_validates(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in REQUIRED_ENV.items():
        monkeypatch.setenv(key, value)
    graph = load_graph(CONTAINERS / name)
    assert "blobservices.default" in graph.instances
    assert "directoryservices.default" in graph.instances


@pytest.mark.parametrize("name", FILES)
def test_castore_check(name: str, tmp_path: Path) -> None:
    env = {**os.environ, **REQUIRED_ENV}
    result = subprocess.run([sys.executable, "-m", "castore_di.cli", "check", str(CONTAINERS / name)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{name}: ok" in result.stdout


@pytest.mark.parametrize("name", ["s3.yaml", "azure.yaml", "gcs.yaml", "bigtable.yaml"])
def test_required_variables_are_reported(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in REQUIRED_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="environment variable 'CASTORE_[A-Z0-9_]+' is not set"):
        load_graph(CONTAINERS / name)


def test_gcs_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTORE_GCS_BUCKET", "my-bucket")
    monkeypatch.setenv("CASTORE_GCS_PREFIX", "team/castore")
    graph = load_graph(CONTAINERS / "gcs.yaml")
    urls = {iid: getattr(graph.instances[iid].config, "object_store_url") for iid in
            ("blobservices.default", "directoryservices.default")}
    assert urls == {
        "blobservices.default": "gs://my-bucket/team/castore/blobs",
        "directoryservices.default": "gs://my-bucket/team/castore/directories",
    }


async def round_trip(container: CastoreContainer) -> None:
    """Store a blob and a directory closure through ``default``; read them back."""
    blobs, directories = container.blob_service(), container.directory_service()
    assert await blobs.put(BLOB_A) == BLOB_A_DIGEST
    assert await blobs.read_bytes(BLOB_A_DIGEST) == BLOB_A
    assert await directories.put_closure(CLOSURE_D) == DIRECTORY_D.digest
    received = [d async for d in directories.get_recursive(DIRECTORY_D.digest)]
    assert received[0] == DIRECTORY_D
    assert sorted(d.digest for d in received) == sorted(d.digest for d in CLOSURE_D)


async def reads_back(container: CastoreContainer) -> None:
    """What :func:`round_trip` stored is there (for a second container over the same storage)."""
    assert await container.blob_service().read_bytes(BLOB_A_DIGEST) == BLOB_A
    received = [d async for d in container.directory_service().get_recursive(DIRECTORY_D.digest)]
    assert len(received) == len(CLOSURE_D) and received[0] == DIRECTORY_D


async def test_memory() -> None:
    async with load_container(CONTAINERS / "memory.yaml") as container:
        await round_trip(container)


async def test_local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CASTORE_DATA_DIR", str(tmp_path / "data"))
    async with load_container(CONTAINERS / "local.yaml") as container:
        await round_trip(container)
    assert any((tmp_path / "data").iterdir())
    async with load_container(CONTAINERS / "local.yaml") as container:
        await reads_back(container)


def test_local_default_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASTORE_DATA_DIR", raising=False)
    config = load_graph(CONTAINERS / "local.yaml").instances["blobservices.default"].config
    assert getattr(config, "resolved_path")() == os.path.expanduser("~/.local/share/castore")


async def test_cached_remote(castore_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CASTORE_REMOTE", castore_server)
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "cache"))
    # Seed the remote directly: the cache starts empty.
    async with container_from_addrs(blob=castore_server, directory=castore_server) as remote:
        await remote.blob_service().put(BLOB_A)
        await remote.directory_service().put_closure(CLOSURE_D)
    async with load_container(CONTAINERS / "cached-remote.yaml") as container:
        assert not await container.blob_service("local").has(BLOB_A_DIGEST)
        await reads_back(container)  # misses locally, fetched from the remote
        assert await container.blob_service("local").read_bytes(BLOB_A_DIGEST) == BLOB_A
        assert await container.directory_service("near").get(DIRECTORY_A.digest) == DIRECTORY_A
        written = await container.blob_service().put(b"written through the cache")
        assert await container.blob_service("remote").has(written)  # write_to: both
        assert await container.blob_service("local").has(written)
    # The cache persists on disk: with the remote unreachable, reads are still served.
    monkeypatch.setenv("CASTORE_REMOTE", "grpc+http://127.0.0.1:9")
    async with load_container(CONTAINERS / "cached-remote.yaml") as container:
        await reads_back(container)


async def test_cached_remote_import_is_readable_from_the_server(
    castore_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Import a tree through cached-remote.yaml; the server alone then holds every blob and directory."""
    monkeypatch.setenv("CASTORE_REMOTE", castore_server)
    monkeypatch.setenv("CASTORE_CACHE_DIR", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha " + os.urandom(16))
    (tree / "sub" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (tree / "sub" / "deeper" / "c").write_bytes(os.urandom(100))
    (tree / "empty").write_bytes(b"")
    os.symlink("a.txt", tree / "link")
    async with load_container(CONTAINERS / "cached-remote.yaml") as container:
        _, root = await ingest_path(container.blob_service(), container.directory_service(), tree)
    assert isinstance(root, DirectoryNode)
    async with container_from_addrs(blob=castore_server, directory=castore_server) as server:
        closure = [d async for d in server.directory_service().get_recursive(root.digest)]
        assert len(closure) == 3 and closure[0].digest == root.digest
        files = [node for d in closure for _, node in d.files()]
        assert len(files) == 4
        for node in files:
            data = await server.blob_service().read_bytes(node.digest)
            assert data is not None and len(data) == node.size
    exported = tmp_path / "out"
    async with container_from_addrs(blob=castore_server, directory=castore_server) as server:
        await export_node(server.blob_service(), server.directory_service(), root, str(exported))
    assert_same_tree(str(tree), str(exported))


@pytest.fixture
def s3_env(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """The variables s3.yaml (and obstore) read, pointing at a fresh bucket in moto."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CASTORE_S3_BUCKET", s3_bucket.name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return s3_bucket


async def test_s3(s3_env: S3Bucket) -> None:
    async with load_container(CONTAINERS / "s3.yaml") as container:
        await round_trip(container)
    async with load_container(CONTAINERS / "s3.yaml") as container:
        await reads_back(container)


async def test_azure(azure_container: AzureContainer, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("AZURE_")]:
        monkeypatch.delenv(key)
    options = azure_container.options
    monkeypatch.setenv("CASTORE_AZURE_CONTAINER", azure_container.name)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", options["account_name"])
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", options["access_key"])
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", options["endpoint"])
    monkeypatch.setenv("AZURE_ALLOW_HTTP", "true")
    async with load_container(CONTAINERS / "azure.yaml") as container:
        await round_trip(container)
    async with load_container(CONTAINERS / "azure.yaml") as container:
        await reads_back(container)


async def test_bigtable(
    bigtable_emulator: BigtableEmulator, bigtable_table: dict[str, Any], s3_env: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CASTORE_BIGTABLE_PROJECT", bigtable_table["project_id"])
    monkeypatch.setenv("CASTORE_BIGTABLE_INSTANCE", bigtable_table["instance_name"])
    monkeypatch.setenv("CASTORE_BIGTABLE_TABLE", bigtable_table["table_name"])
    monkeypatch.setenv("CASTORE_BIGTABLE_FAMILY", bigtable_table["family_name"])
    monkeypatch.setenv("CASTORE_BLOB_STORE_URL", f"s3://{s3_env.name}/castore/blobs")
    async with load_container(CONTAINERS / "bigtable.yaml") as container:
        await round_trip(container)
    async with load_container(CONTAINERS / "bigtable.yaml") as container:
        await reads_back(container)
