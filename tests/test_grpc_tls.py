"""TLS end to end: ``castore serve --tls-cert/--tls-key`` and the ``grpc+https`` client."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.errors import StorageError
from castore_di.testing.fixtures import BLOB_A, BLOB_A_DIGEST
from tests.servers_grpc import GrpcServerProcess


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[GrpcServerProcess, Path]]:
    cert, key = _self_signed(tmp_path, "localhost")
    server = GrpcServerProcess(tmp_path, extra_args=("--tls-cert", str(cert), "--tls-key", str(key)))
    server.start()
    try:
        yield server, cert
    finally:
        server.stop()


async def test_https_with_configured_ca(tls_server: tuple[GrpcServerProcess, Path]) -> None:
    server, cert = tls_server
    port = server.address.rpartition(":")[2] if server.address else ""
    client = GRPCBlobService(f"grpc+https://localhost:{port}", ca_file=str(cert), retries=0)
    try:
        assert await client.put(BLOB_A) == BLOB_A_DIGEST
        assert await client.read_bytes(BLOB_A_DIGEST) == BLOB_A
    finally:
        await client.close()


async def test_https_refuses_an_untrusted_certificate(tls_server: tuple[GrpcServerProcess, Path], tmp_path: Path) -> None:
    server, _cert = tls_server
    port = server.address.rpartition(":")[2] if server.address else ""
    other, _ = _self_signed(tmp_path, "other")
    for ca in (None, str(other)):  # system roots, then a CA that did not sign the server's certificate
        client = GRPCBlobService(f"grpc+https://localhost:{port}", ca_file=ca, retries=0, timeout=5)
        try:
            with pytest.raises(StorageError):
                await client.has(BLOB_A_DIGEST)
        finally:
            await client.close()


async def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: tuple[GrpcServerProcess, Path]) -> None:
    server, _cert = tls_server
    client = GRPCBlobService(server.url, retries=0, timeout=5)
    try:
        with pytest.raises(StorageError):
            await client.has(BLOB_A_DIGEST)
    finally:
        await client.close()


def test_tls_options_go_together(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from castore_di.cli import _load_commands, cli

    _load_commands()
    cert, _key = _self_signed(tmp_path, "localhost")
    result = CliRunner().invoke(cli, ["serve", "--tls-cert", str(cert)])
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
