"""Connectivity checks against the real local servers, each up and stopped.

``container.check_connectivity()`` and ``castore check --connect``: one round trip per
backend (gRPC health, an object-store listing, a Bigtable ReadRows, the embedded store
opened); one line per instance; exit 1 naming the failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from castore_di import load_container
from castore_di.connectivity import ConnectivityReport

from tests.servers_azure import AzureContainer
from tests.servers_bigtable import FAMILY, INSTANCE, PROJECT, BigtableEmulator, start_emulator
from tests.servers_grpc import GrpcServerProcess
from tests.servers_s3 import S3Bucket, _moto_server_command, free_port, stop, wait_http


async def check(config: dict[str, Any], timeout: float = 20.0) -> ConnectivityReport:
    container = load_container(config)
    try:
        return await container.check_connectivity(timeout=timeout)
    finally:
        await container.aclose()


def by_id(report: ConnectivityReport) -> dict[str, tuple[bool, str]]:
    return {r.instance_id: (r.ok, r.detail) for r in report.results}


def run_check(tmp_path: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "castore.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "castore_di.cli", "check", "--connect", "--timeout", "20", *args, str(path)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )


# -- gRPC: castore serve ------------------------------------------------------------


async def test_grpc_up_then_stopped(tmp_path: Path) -> None:
    server = GrpcServerProcess(tmp_path).start()
    config = {"blobservices": {"default": server.url}, "directoryservices": {"default": server.url}}
    try:
        report = await check(config)
        assert report.ok, str(report)
        assert by_id(report)["blobservices.default"][1].endswith("tvix.castore.v1.BlobService SERVING")
        assert by_id(report)["directoryservices.default"][1].endswith("tvix.castore.v1.DirectoryService SERVING")
    finally:
        server.stop()
    report = await check(config)
    assert report.failed == ["blobservices.default", "directoryservices.default"]
    assert "unavailable" in by_id(report)["blobservices.default"][1]


def test_cli_check_connect_against_a_stopped_server(tmp_path: Path) -> None:
    server = GrpcServerProcess(tmp_path).start()
    url = server.url
    config = {"blobservices": {"local": "memory://", "default": {"type": "combined", "local": "local", "remote": url}},
              "directoryservices": {"default": url}}
    up = run_check(tmp_path, config)
    assert up.returncode == 0, up.stderr
    assert len(up.stdout.splitlines()) == 4 and all(" ok " in line for line in up.stdout.splitlines())
    server.stop()
    down = run_check(tmp_path, config)
    assert down.returncode == 1, down
    lines = down.stdout.splitlines()
    assert len(lines) == 4  # one line per instance, the anonymous remote included
    failed = [line.split()[0] for line in lines if " failed " in line]
    assert failed == ["blobservices.default.remote", "directoryservices.default"]
    assert "unavailable" in lines[[line.split()[0] for line in lines].index("directoryservices.default")]
    assert down.stderr.strip() == "castore: unreachable: blobservices.default.remote, directoryservices.default"
    only = run_check(tmp_path, config, "--instance", "blobservices.local")
    assert only.returncode == 0 and only.stdout.split()[:2] == ["blobservices.local", "ok"]


# -- S3: moto ---------------------------------------------------------------------


def _objectstore(url: str, options: dict[str, str]) -> dict[str, Any]:
    return {
        "blobservices": {"default": {"type": "objectstore", "object_store_url": f"{url}/blobs",
                                     "object_store_options": options}},
        "directoryservices": {"default": {"type": "objectstore", "object_store_url": f"{url}/dirs",
                                          "object_store_options": options}},
    }


async def test_s3_up_missing_bucket_and_stopped() -> None:
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    proc = subprocess.Popen([*_moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(endpoint + "/", proc, 30.0, "moto_server")
        import boto3  # type: ignore[import-untyped]

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="present")
        bucket = S3Bucket("present", endpoint)
        report = await check(_objectstore(bucket.url, bucket.options))
        assert report.ok, str(report)
        assert by_id(report)["blobservices.default"][1] == "object store s3://present/blobs: listed"
        missing = await check(_objectstore("s3://absent-bucket", bucket.options))
        assert missing.failed == ["blobservices.default", "directoryservices.default"]
        assert "LIST failed" in by_id(missing)["blobservices.default"][1]
    finally:
        stop(proc)
    stopped = await check(_objectstore(bucket.url, bucket.options))
    assert stopped.failed == ["blobservices.default", "directoryservices.default"]
    assert "LIST failed" in by_id(stopped)["blobservices.default"][1]


# -- Azure: Azurite ---------------------------------------------------------------


async def test_azure_up_and_stopped(azure_container: AzureContainer) -> None:
    report = await check(_objectstore(azure_container.url, azure_container.options))
    assert report.ok, str(report)
    # The session's Azurite keeps running for other tests: "stopped" is its port closed.
    closed = AzureContainer(azure_container.name, f"http://127.0.0.1:{free_port()}/devstoreaccount1")
    stopped = await check(_objectstore(closed.url, closed.options))
    assert stopped.failed == ["blobservices.default", "directoryservices.default"]
    assert "LIST failed" in by_id(stopped)["directoryservices.default"][1]


# -- Bigtable: the emulator --------------------------------------------------------


def _bigtable(table: str) -> dict[str, Any]:
    return {"directoryservices": {"default": {"type": "bigtable", "project_id": PROJECT, "instance_name": INSTANCE,
                                              "table_name": table, "family_name": FAMILY, "timeout": 5.0}}}


async def test_bigtable_up_missing_table_and_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator: BigtableEmulator = start_emulator(tmp_path / "emulator.log")
    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", emulator.host)
    try:
        table = emulator.create_table()
        report = await check(_bigtable(table))
        assert report.ok, str(report)
        assert by_id(report)["directoryservices.default"][1].endswith(f"/{table}: table readable")
        missing = await check(_bigtable("no-such-table"))
        assert missing.failed == ["directoryservices.default"]
    finally:
        emulator.stop()
    stopped = await check(_bigtable(table))
    assert stopped.failed == ["directoryservices.default"]
    assert "bigtable: unable to read the table" in by_id(stopped)["directoryservices.default"][1]


# -- embedded ---------------------------------------------------------------------


async def test_embedded_opens_or_fails(tmp_path: Path) -> None:
    good = {"blobservices": {"default": {"type": "embedded", "path": str(tmp_path / "store")}},
            "directoryservices": {"default": {"type": "embedded", "path": str(tmp_path / "store")}}}
    report = await check(good)
    assert report.ok, str(report)
    assert by_id(report)["blobservices.default"][1] == f"embedded store {tmp_path / 'store'}: open"
    (tmp_path / "file").write_text("not a directory")
    bad = {"blobservices": {"default": {"type": "embedded", "path": str(tmp_path / "file" / "store")}}}
    failed = await check(bad)
    assert failed.failed == ["blobservices.default"]


async def test_unknown_instance_ids_are_refused() -> None:
    container = load_container({"blobservices": {"default": "memory://"}})
    with pytest.raises(LookupError, match="blobservices.nope"):
        await container.check_connectivity(instance_ids=["blobservices.nope"])
