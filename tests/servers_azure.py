"""Fixtures that run a real Azure Blob server (Azurite) on 127.0.0.1 for the tests.

Azurite 3.35.0 comes from npm through ``scripts/setup-test-servers``; if it is missing the
session fixture runs that script once (bounded), so plain ``pytest`` works. Each test that
asks for :func:`azure_container` gets a fresh container, created with a SharedKey-signed
REST call (obstore cannot create containers). A server that cannot start fails the test.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.servers_s3 import free_port, stop, wait_http

# The published development account of the Azure storage emulators.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-08-06"
START_TIMEOUT = 30.0
SETUP_TIMEOUT = 600.0

ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class AzureServer:
    endpoint: str  # http://127.0.0.1:PORT/devstoreaccount1


@attrs.frozen
class AzureContainer:
    """A fresh container: ``url`` (``az://name``) plus the obstore options that reach it."""

    name: str
    endpoint: str

    @property
    def url(self) -> str:
        return f"az://{self.name}"

    @property
    def options(self) -> dict[str, str]:
        return {
            "account_name": ACCOUNT,
            "access_key": ACCOUNT_KEY,
            "endpoint": self.endpoint,
            "allow_http": "true",
        }


def find_azurite(install: bool = True) -> str:
    """The azurite-blob executable; runs scripts/setup-test-servers once if it is missing."""
    candidates = [os.environ.get("AZURITE_BLOB", ""), str(ROOT / ".cache/npm/node_modules/.bin/azurite-blob")]
    candidates.append(shutil.which("azurite-blob") or "")
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    if install:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts/setup-test-servers")],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
        )
        try:
            return find_azurite(install=False)
        except RuntimeError:
            raise RuntimeError(
                f"scripts/setup-test-servers did not provide azurite-blob:\n{result.stdout}\n{result.stderr}"
            ) from None
    raise RuntimeError("azurite-blob not found: run scripts/setup-test-servers (needs npm)")


def shared_key_request(endpoint: str, method: str, path: str, query: dict[str, str]) -> int:
    """Send a body-less request signed with the account key (SharedKey); returns the status."""
    date = email.utils.formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": API_VERSION}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    # The emulator's URL path starts with the account name, which the resource repeats.
    url_path = urllib.parse.urlsplit(endpoint).path + path
    canonical_resource = f"/{ACCOUNT}{url_path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    content_type = "application/octet-stream"
    # VERB, Content-Encoding, -Language, -Length (empty for 0), -MD5, -Type, Date, If-* (4), Range
    fields = [method, "", "", "", "", content_type, "", "", "", "", "", ""]
    to_sign = "\n".join(fields) + "\n" + canonical_headers
    to_sign += canonical_resource
    signature = base64.b64encode(
        hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode("utf-8"), hashlib.sha256).digest()
    ).decode()
    url = endpoint + path + "?" + "&".join(f"{k}={v}" for k, v in query.items())
    request = urllib.request.Request(url, method=method, data=b"" if method == "PUT" else None)
    for k, v in headers.items():
        request.add_header(k, v)
    request.add_header("Content-Type", content_type)
    request.add_header("Authorization", f"SharedKey {ACCOUNT}:{signature}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: HTTP {e.code}: {e.read()[:500]!r}") from e


@pytest.fixture(scope="session")
def azure_server() -> Iterator[AzureServer]:
    exe = find_azurite()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="azurite-") as location:
        proc = subprocess.Popen(
            [
                exe,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(port),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--silent",
                "--skipApiVersionCheck",
            ],
            cwd=location,  # --location cannot go with --inMemoryPersistence; keep stray files here
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
            wait_http(endpoint + "?comp=list", proc, START_TIMEOUT, "azurite-blob")
            yield AzureServer(endpoint)
        finally:
            stop(proc)


@pytest.fixture
def azure_container(azure_server: AzureServer) -> AzureContainer:
    name = f"castore-{uuid.uuid4().hex[:20]}"
    status = shared_key_request(azure_server.endpoint, "PUT", f"/{name}", {"restype": "container"})
    assert status == 201, status
    return AzureContainer(name, azure_server.endpoint)
