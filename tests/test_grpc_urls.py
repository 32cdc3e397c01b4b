"""URL and config rules of the grpc clients (reference sections 1.5 and 4.5)."""

from __future__ import annotations

import pytest

from castore_di import load_container
from castore_di.blobservice.grpc import GRPCBlobService, GRPCBlobServiceConfig
from castore_di.composition import default_registry
from castore_di.digests import blake3_digest
from castore_di.directoryservice.grpc import GRPCDirectoryService
from castore_di.errors import ConfigError, StorageError
from castore_di._grpc.channel import parse_grpc_url

# (url, must succeed) for both kinds, from the reference's from_addr tests
FROM_ADDR = [
    ("grpc+unix:///path/to/somewhere", True),
    ("grpc+unix://host.example/path/to/somewhere", False),
    ("grpc+http://[::1]:12345", True),
    ("grpc+http://localhost", True),
    ("grpc+https://localhost", True),
    ("grpc+http://localhost/some-path", False),
    ("grpc+unix:///path/to/somewhere?wait-connect=0", True),
    ("grpc+http://localhost?wait-connect=0", True),
    ("grpc+http://localhost?wait-connect=1", True),  # eager, but construction does no I/O
    ("grpc+http://localhost?wait-connect=2", False),
    ("grpc+http://localhost?other=1", False),
    ("grpc+ftp://localhost", False),
    ("grpc://localhost", False),
]


@pytest.mark.parametrize("kind", ["blobservices", "directoryservices"])
@pytest.mark.parametrize(("url", "ok"), FROM_ADDR, ids=[u for u, _ in FROM_ADDR])
def test_from_addr(kind: str, url: str, ok: bool) -> None:
    registry = default_registry()
    if ok:
        config = registry.resolve_url(kind, url)
        assert config.url == url  # type: ignore[attr-defined]
        service = config.build()
        assert isinstance(service, GRPCBlobService if kind == "blobservices" else GRPCDirectoryService)
    else:
        with pytest.raises(ConfigError):
            registry.resolve_url(kind, url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("grpc+unix://host.example/path/to/somewhere", "host may not be set for unix domain sockets"),
        ("grpc+http://localhost/some-path", "path may not be set"),
        ("http://localhost", "grpc+ prefix is missing from URL"),
    ],
)
def test_reference_error_texts(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_grpc_url(url)
    assert message in str(info.value)


def test_targets() -> None:
    assert parse_grpc_url("grpc+http://[::1]:12345").target == "[::1]:12345"
    assert parse_grpc_url("grpc+http://localhost").target == "localhost:80"
    https = parse_grpc_url("grpc+https://example.com")
    assert https.target == "example.com:443" and https.secure
    unix = parse_grpc_url("grpc+unix:///run/castore.sock?wait-connect=1")
    assert unix.target == "unix:/run/castore.sock" and unix.wait_connect and not unix.secure


async def test_wait_connect_fails_without_socket(tmp_path: object) -> None:
    service = GRPCBlobService("grpc+unix:///path/to/somewhere?wait-connect=1", connect_timeout=0.5)
    with pytest.raises(StorageError, match="unreachable"):
        await service.has(blake3_digest(b"x"))
    lazy = GRPCDirectoryService("grpc+unix:///path/to/somewhere", retries=0)
    with pytest.raises(StorageError, match="unavailable"):
        await lazy.get(blake3_digest(b"x"))


async def test_wait_connect_fails_for_unresolvable_host() -> None:
    service = GRPCBlobService("grpc+http://nonexist.invalid?wait-connect=1", connect_timeout=2)
    with pytest.raises(StorageError):
        await service.connect()


def test_config_fields() -> None:
    container = load_container(
        {
            "blobservices": {
                "default": {
                    "type": "grpc",
                    "url": "grpc+https://localhost:8443",
                    "ca_file": "/nonexistent/ca.pem",
                    "timeout": 5,
                    "stream_timeout": 600.0,
                    "retries": 2,
                }
            }
        }
    )
    service = container.blob_service()
    assert isinstance(service, GRPCBlobService) and service.url == "grpc+https://localhost:8443"
    with pytest.raises(ConfigError, match="ca_file"):
        GRPCBlobServiceConfig(url="grpc+http://localhost:1", ca_file="/x.pem")
    with pytest.raises(ConfigError, match="timeout"):
        GRPCBlobServiceConfig(url="grpc+http://localhost:1", timeout=-1)
    with pytest.raises(ConfigError):
        load_container({"blobservices": {"default": {"type": "grpc", "url": "grpc+http://h:1", "bogus": 1}}})
    with pytest.raises(ConfigError, match="path may not be set"):
        load_container({"directoryservices": {"default": {"type": "grpc", "url": "grpc+http://h:1/x"}}})


async def test_unreadable_ca_file_is_a_storage_error() -> None:
    service = GRPCBlobService("grpc+https://localhost:1", ca_file="/nonexistent/ca.pem")
    with pytest.raises(StorageError, match="ca_file"):
        await service.has(blake3_digest(b"x"))
