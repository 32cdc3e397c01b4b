"""Fixtures that run a real S3 server (moto's server mode) on 127.0.0.1 for the tests.

``moto_server`` is started once per session on a free port and killed at teardown; each
test that asks for :func:`s3_bucket` gets a fresh bucket. A server that cannot start fails
the test (it is never skipped).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import attrs
import pytest

START_TIMEOUT = 30.0  # seconds; moto is ready in ~0.3 s on an idle machine


@attrs.frozen
class S3Server:
    endpoint: str


@attrs.frozen
class S3Bucket:
    """A fresh bucket: ``url`` (``s3://name``) plus the obstore options that reach it."""

    name: str
    endpoint: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def options(self) -> dict[str, str]:
        return {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "access_key_id": "test",
            "secret_access_key": "test",
            "virtual_hosted_style_request": "false",
            "allow_http": "true",
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _moto_server_command() -> list[str]:
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        raise RuntimeError("moto_server not found: pip install 'moto[server]' (part of the test extra)")
    return [exe]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Poll ``url`` until any HTTP answer arrives; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} within {timeout} s")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    proc = subprocess.Popen(
        [*_moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(endpoint + "/", proc, START_TIMEOUT, "moto_server")
        yield S3Server(endpoint)
    finally:
        stop(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    import boto3  # type: ignore[import-untyped]

    name = f"castore-{uuid.uuid4().hex[:20]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=name)
    return S3Bucket(name, s3_server.endpoint)
