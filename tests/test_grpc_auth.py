"""Who may read and who may write: ``castore serve --read-only / --auth-tokens / --tls-client-ca``.

Every test runs a real ``castore serve`` subprocess on loopback (or a unix socket) and talks
to it with raw grpcio and with the library's clients; certificates are made here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from castore_di.blobservice.grpc import GRPCBlobService
from castore_di.composition import CastoreContainer, load_container, load_graph
from castore_di.errors import AccessDeniedError, ConfigError, StorageError
from castore_di.proto.tvix.castore.protos import rpc_blobstore_pb2 as bpb
from castore_di.proto.tvix.castore.protos import rpc_directory_pb2 as dpb
from castore_di.server.auth import AuthPolicy, TokenTable, check_exposure, is_loopback, parse_tokens
from castore_di.testing.fixtures import BLOB_A, BLOB_A_DIGEST, DIRECTORY_A
from tests.certs import Authority
from tests.servers_grpc import GrpcServerProcess

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
WRITES = ("blob.Put", "directory.Put")
RPCS = (*WRITES, "blob.Stat", "blob.Read", "directory.Get")  # writes first, so reads find what they ask for


# -- raw grpcio ------------------------------------------------------------------------


async def raw_call(channel: grpc.aio.Channel, rpc: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """One call of ``rpc`` (with BLOB_A / DIRECTORY_A) through plain grpcio; returns its status."""
    ser = lambda m: m.SerializeToString()  # noqa: E731
    try:
        if rpc == "blob.Stat":
            await channel.unary_unary("/tvix.castore.v1.BlobService/Stat", request_serializer=ser)(
                bpb.StatBlobRequest(digest=BLOB_A_DIGEST), metadata=metadata, timeout=10
            )
        elif rpc == "blob.Read":
            call = channel.unary_stream("/tvix.castore.v1.BlobService/Read", request_serializer=ser)(
                bpb.ReadBlobRequest(digest=BLOB_A_DIGEST), metadata=metadata, timeout=10
            )
            async for _ in call:
                pass
        elif rpc == "blob.Put":
            await channel.stream_unary("/tvix.castore.v1.BlobService/Put", request_serializer=ser)(
                iter([bpb.BlobChunk(data=BLOB_A)]), metadata=metadata, timeout=10
            )
        elif rpc == "directory.Get":
            call = channel.unary_stream("/tvix.castore.v1.DirectoryService/Get", request_serializer=ser)(
                dpb.GetDirectoryRequest(digest=DIRECTORY_A.digest), metadata=metadata, timeout=10
            )
            async for _ in call:
                pass
        elif rpc == "directory.Put":
            await channel.stream_unary("/tvix.castore.v1.DirectoryService/Put", request_serializer=ser)(
                iter([DIRECTORY_A.to_proto()]), metadata=metadata, timeout=10
            )
        else:
            raise ValueError(rpc)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def audit_lines(server: GrpcServerProcess) -> list[dict[str, str]]:
    return [json.loads(line) for line in server.stderr_lines if line.startswith('{"event":"refused"')]


def wait_for_line(server: GrpcServerProcess, text: str, after: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.stderr_lines[after:]:
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} within {timeout:g} s: {server.stderr_lines[after:]}")


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    """Fresh random tokens per test (so finding one in a log is meaningful)."""
    return {"read": secrets.token_urlsafe(24), "write": secrets.token_urlsafe(24), "other": secrets.token_urlsafe(24)}


def write_tokens(path: Path, lines: list[tuple[str, str]]) -> Path:
    body = "".join(f"{role} {token}  # {role} client\n" for role, token in lines)
    path.write_text("# castore serve tokens\n\n" + body)
    path.chmod(0o600)
    return path


@pytest.fixture
def token_server(tmp_path: Path, tokens: dict[str, str]) -> Iterator[GrpcServerProcess]:
    path = write_tokens(tmp_path / "tokens", [("read", tokens["read"]), ("write", tokens["write"])])
    server = GrpcServerProcess(tmp_path, extra_args=("--auth-tokens", str(path))).start()
    try:
        yield server
    finally:
        server.stop()


def assert_no_token_anywhere(server: GrpcServerProcess, tokens: dict[str, str]) -> None:
    for line in server.stdout_lines + server.stderr_lines:
        for token in tokens.values():
            assert token not in line, "a token reached the server's output"


# -- read-only -------------------------------------------------------------------------


async def test_read_only_refuses_every_put_and_serves_reads(tmp_path: Path) -> None:
    server = GrpcServerProcess(tmp_path, "embedded").start()
    try:
        assert server.address is not None
        async with grpc.aio.insecure_channel(server.address) as ch:
            assert await raw_call(ch, "blob.Put") == OK
            assert await raw_call(ch, "directory.Put") == OK
        server.stop()
        server.extra_args = ("--read-only",)  # the same store, served as a read-only mirror
        server.start()
        async with grpc.aio.insecure_channel(server.address) as ch:
            for rpc in RPCS:
                assert await raw_call(ch, rpc) == (PERMISSION_DENIED if rpc in WRITES else OK), rpc
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.stream_unary("/tvix.castore.v1.BlobService/Put")(iter([b""]), timeout=10)
            assert "read-only" in (info.value.details() or "")
        refused = audit_lines(server)
        assert [(r["method"], r["status"], r["reason"]) for r in refused] == [
            ("/tvix.castore.v1.BlobService/Put", "PERMISSION_DENIED", "read-only"),
            ("/tvix.castore.v1.DirectoryService/Put", "PERMISSION_DENIED", "read-only"),
            ("/tvix.castore.v1.BlobService/Put", "PERMISSION_DENIED", "read-only"),
        ]
        assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in refused)
    finally:
        server.stop()


# -- bearer tokens ---------------------------------------------------------------------


async def test_each_token_role_against_each_rpc_raw_grpcio(
    token_server: GrpcServerProcess, tokens: dict[str, str]
) -> None:
    assert token_server.address is not None
    credentials = {
        "none": (),
        "unknown": bearer(tokens["other"]),
        "malformed": (("authorization", f"Basic {tokens['write']}"),),
        "read": bearer(tokens["read"]),
        "write": bearer(tokens["write"]),
    }
    expected = {
        "none": dict.fromkeys(RPCS, UNAUTHENTICATED),
        "unknown": dict.fromkeys(RPCS, UNAUTHENTICATED),
        "malformed": dict.fromkeys(RPCS, UNAUTHENTICATED),
        "read": {rpc: PERMISSION_DENIED if rpc in WRITES else OK for rpc in RPCS},
        "write": dict.fromkeys(RPCS, OK),
    }
    async with grpc.aio.insecure_channel(token_server.address) as ch:
        for who in ("write", "read", "none", "unknown", "malformed"):
            got = {rpc: await raw_call(ch, rpc, credentials[who]) for rpc in RPCS}
            assert got == expected[who], who
        # the health service stays open for probes, without a token
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/tvix.castore.v1.BlobService/Stat")(b"", timeout=10)
        assert info.value.code() == UNAUTHENTICATED and "bearer token" in (info.value.details() or "")
        # reflection and unknown methods need a token too; with one, an unknown method is UNIMPLEMENTED
        reflect = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        unknown = ch.unary_unary("/x.Y/Z")
        cases = ((reflect, "none", UNAUTHENTICATED), (unknown, "none", UNAUTHENTICATED),
                 (unknown, "read", grpc.StatusCode.UNIMPLEMENTED))
        for method, who, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                request = iter([b""]) if method is reflect else b""
                call = method(request, metadata=credentials[who], timeout=10)
                if method is reflect:
                    async for _ in call:
                        pass
                else:
                    await call
            assert info.value.code() == code
    refused = audit_lines(token_server)
    assert len(refused) == 5 + 5 + 5 + 2 + 1 + 2  # one line per refused call
    assert {r["reason"] for r in refused} == {"no-token", "unknown-token", "malformed-authorization",
                                              "read-token-on-write"}
    assert all(set(r) == {"event", "peer", "method", "status", "reason"} for r in refused)
    token_server.stop()
    assert_no_token_anywhere(token_server, tokens)


async def test_revoked_token_after_sighup(tmp_path: Path, tokens: dict[str, str]) -> None:
    path = write_tokens(tmp_path / "tokens", [("write", tokens["write"]), ("write", tokens["other"])])
    server = GrpcServerProcess(tmp_path, extra_args=("--auth-tokens", str(path))).start()
    try:
        assert server.address is not None and server.proc is not None
        async with grpc.aio.insecure_channel(server.address) as ch:
            assert await raw_call(ch, "blob.Put", bearer(tokens["write"])) == OK
            write_tokens(path, [("write", tokens["other"]), ("read", tokens["read"])])
            seen = len(server.stderr_lines)
            server.proc.send_signal(signal.SIGHUP)
            assert "reloaded 2 tokens" in wait_for_line(server, "reloaded", seen)
            assert await raw_call(ch, "blob.Put", bearer(tokens["write"])) == UNAUTHENTICATED
            assert await raw_call(ch, "blob.Stat", bearer(tokens["write"])) == UNAUTHENTICATED
            assert await raw_call(ch, "blob.Put", bearer(tokens["other"])) == OK
            assert await raw_call(ch, "blob.Put", bearer(tokens["read"])) == PERMISSION_DENIED
            # a broken file on reload keeps the tokens in force and says why (not which token)
            path.write_text(f"admin {tokens['write']}\n")
            seen = len(server.stderr_lines)
            server.proc.send_signal(signal.SIGHUP)
            line = wait_for_line(server, "not reloaded", seen)
            assert "line 1: unknown role" in line and tokens["write"] not in line
            assert await raw_call(ch, "blob.Put", bearer(tokens["other"])) == OK
            assert await raw_call(ch, "blob.Put", bearer(tokens["write"])) == UNAUTHENTICATED
        assert server.stop() == 0
        assert_no_token_anywhere(server, tokens)
    finally:
        server.kill()


async def test_authorised_clients_are_served_while_others_are_refused(
    token_server: GrpcServerProcess, tokens: dict[str, str]
) -> None:
    """A bounded loop of refused calls alongside authorised ones, on loopback."""
    assert token_server.address is not None
    rounds = 150
    refused: dict[str, list[grpc.StatusCode]] = {"none": [], "unknown": [], "read-put": []}
    served: list[grpc.StatusCode] = []

    async def intruder(ch: grpc.aio.Channel) -> None:
        for i in range(rounds):
            refused["none"].append(await raw_call(ch, RPCS[i % len(RPCS)]))
            refused["unknown"].append(await raw_call(ch, "blob.Read", bearer(secrets.token_urlsafe(24))))
            refused["read-put"].append(await raw_call(ch, "directory.Put", bearer(tokens["read"])))

    async def client(ch: grpc.aio.Channel) -> None:
        for i in range(rounds):
            served.append(await raw_call(ch, RPCS[i % len(RPCS)], bearer(tokens["write"])))

    async with grpc.aio.insecure_channel(token_server.address) as bad, grpc.aio.insecure_channel(
        token_server.address
    ) as good:
        await asyncio.gather(intruder(bad), client(good))
    assert served == [OK] * rounds
    assert refused == {"none": [UNAUTHENTICATED] * rounds, "unknown": [UNAUTHENTICATED] * rounds,
                       "read-put": [PERMISSION_DENIED] * rounds}
    assert token_server.proc is not None and token_server.proc.poll() is None
    assert len(audit_lines(token_server)) == 3 * rounds
    token_server.stop()
    assert_no_token_anywhere(token_server, tokens)


# -- mutual TLS ------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    trusted, stranger = Authority(tmp_path, "trusted"), Authority(tmp_path, "stranger")
    server, client, untrusted = (
        trusted.issue("localhost", server=True),
        trusted.issue("builder", server=False),
        stranger.issue("intruder", server=False),
    )
    return {"ca": trusted.cert, "server_cert": server.cert, "server_key": server.key,
            "client_cert": client.cert, "client_key": client.key,
            "untrusted_cert": untrusted.cert, "untrusted_key": untrusted.key}


def mtls_args(pki: dict[str, Path]) -> tuple[str, ...]:
    return ("--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
            "--tls-client-ca", str(pki["ca"]))


def tls_channel(address: str, pki: dict[str, Path], who: str | None) -> grpc.aio.Channel:
    key = cert = None
    if who is not None:
        key, cert = pki[f"{who}_key"].read_bytes(), pki[f"{who}_cert"].read_bytes()
    creds = grpc.ssl_channel_credentials(pki["ca"].read_bytes(), key, cert)
    port = address.rpartition(":")[2]
    return grpc.aio.secure_channel(f"localhost:{port}", creds)


async def test_client_certificates_required(tmp_path: Path, pki: dict[str, Path]) -> None:
    server = GrpcServerProcess(tmp_path, extra_args=mtls_args(pki)).start()
    try:
        assert server.address is not None
        for _ in range(3):  # refused handshakes do not hurt the server
            for who in (None, "untrusted"):
                async with tls_channel(server.address, pki, who) as ch:
                    assert await raw_call(ch, "blob.Stat") == grpc.StatusCode.UNAVAILABLE, who
            async with tls_channel(server.address, pki, "client") as ch:
                for rpc in RPCS:
                    assert await raw_call(ch, rpc) == OK, rpc
        assert server.proc is not None and server.proc.poll() is None
        assert server.stop() == 0
    finally:
        server.kill()


async def test_client_certificate_and_token_both_needed(
    tmp_path: Path, pki: dict[str, Path], tokens: dict[str, str]
) -> None:
    path = write_tokens(tmp_path / "tokens", [("read", tokens["read"]), ("write", tokens["write"])])
    server = GrpcServerProcess(tmp_path, extra_args=(*mtls_args(pki), "--auth-tokens", str(path))).start()
    try:
        assert server.address is not None
        async with tls_channel(server.address, pki, "client") as ch:
            assert await raw_call(ch, "blob.Put") == UNAUTHENTICATED
            assert await raw_call(ch, "blob.Put", bearer(tokens["read"])) == PERMISSION_DENIED
            assert await raw_call(ch, "blob.Put", bearer(tokens["write"])) == OK
        async with tls_channel(server.address, pki, "untrusted") as ch:
            assert await raw_call(ch, "blob.Stat", bearer(tokens["write"])) == grpc.StatusCode.UNAVAILABLE
        refused = audit_lines(server)
        assert [r["reason"] for r in refused] == ["no-token", "read-token-on-write"]
        assert all(r["peer"].startswith("ipv4:127.0.0.1:") and r["client"] == "builder" for r in refused)
        server.stop()
        assert_no_token_anywhere(server, tokens)
    finally:
        server.kill()


# -- safe default ----------------------------------------------------------------------


def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "castore.json"
    config.write_text(json.dumps({"blobservices": {"default": {"type": "memory"}},
                                  "directoryservices": {"default": {"type": "memory"}}}))
    return subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "serve", *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "example.org:8000"])
def test_public_bind_without_protection_is_refused(tmp_path: Path, listen: str) -> None:
    result = run_serve(tmp_path, "--listen", "127.0.0.1:0", "--listen", listen)
    assert result.returncode == 2, result.stderr
    assert "listening on" not in result.stdout
    for flag in ("--tls-client-ca", "--auth-tokens", "--read-only", "--allow-unauthenticated"):
        assert flag in result.stderr
    assert f"refusing to listen on {listen} unprotected" in result.stderr


def test_exposure_rules() -> None:
    for address in ("127.0.0.1:80", "127.8.9.1:80", "[::1]:80", "localhost:80", "unix:/run/c.sock"):
        assert is_loopback(address), address
    for address in ("0.0.0.0:80", "[::]:80", "10.0.0.1:80", "castore.example:80", "localhost.example:80"):
        assert not is_loopback(address), address
    check_exposure(["127.0.0.1:0", "unix:/x"], AuthPolicy())
    check_exposure(["0.0.0.0:0"], AuthPolicy(read_only=True))
    check_exposure(["0.0.0.0:0"], AuthPolicy(client_ca="ca.pem"))
    check_exposure(["0.0.0.0:0"], AuthPolicy(), allow_unauthenticated=True)
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        check_exposure(["127.0.0.1:0", "0.0.0.0:0"], AuthPolicy())


def test_tls_client_ca_needs_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    result = run_serve(tmp_path, "--tls-client-ca", str(pki["ca"]))
    assert result.returncode == 2 and "--tls-client-ca needs --tls-cert" in result.stderr


# -- the tokens file -------------------------------------------------------------------


def test_tokens_file_errors_name_the_line_never_the_token(tmp_path: Path) -> None:
    secret = "s3cr3t-" + secrets.token_hex(12)
    bad = {
        f"admin {secret}\n": "line 1: unknown role",
        f"# c\nwrite {secret} extra\n": "line 2: expected 'read TOKEN' or 'write TOKEN' (a token holds no spaces)",
        "read\n": "line 1: expected 'read TOKEN' or 'write TOKEN', the token is missing",
        "write short\n": "line 1: the token is shorter than 16 characters",
        f"read {secret}\nwrite {secret}\n": "line 2: the same token is listed as both read and write",
        f"read {secret}\u00e9\n": "line 1: a token holds only visible ASCII characters",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError) as info:
            parse_tokens(text, "tokens")
        assert message in str(info.value) and secret not in str(info.value)
    assert parse_tokens(f"# only comments\n\n  write {secret} # ci\nread {secret}x\n", "t")[0][1] == "write"
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no tokens"):
        TokenTable(str(empty))
    table = TokenTable(str(write_tokens(tmp_path / "t", [("read", secret)])))
    assert table.role(secret) == "read" and table.role(secret + "x") is None and table.role("") is None
    assert secret not in repr(table)


def test_tokens_file_open_to_others_draws_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tokens(tmp_path / "t", [("write", secrets.token_urlsafe(24))])
    TokenTable(str(path))
    assert not caplog.records
    path.chmod(0o644)
    TokenTable(str(path))
    assert [r.getMessage() for r in caplog.records] == [
        f"castore serve: the tokens file {path} is open to group or others (chmod 600 it)"
    ]


def test_serve_refuses_a_bad_tokens_file(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(24)
    path = tmp_path / "tokens"
    path.write_text(f"owner {secret}\n")
    result = run_serve(tmp_path, "--auth-tokens", str(path))
    assert result.returncode == 2 and "line 1: unknown role" in result.stderr
    assert secret not in result.stderr + result.stdout


async def test_unix_socket_with_tokens(tmp_path: Path, tokens: dict[str, str]) -> None:
    path = write_tokens(tmp_path / "tokens", [("write", tokens["write"])])
    sock = tmp_path / "c.sock"
    server = GrpcServerProcess(tmp_path, listen=f"unix://{sock}", extra_args=("--auth-tokens", str(path))).start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            assert await raw_call(ch, "blob.Put") == UNAUTHENTICATED
            assert await raw_call(ch, "blob.Put", bearer(tokens["write"])) == OK
        assert audit_lines(server)[0]["peer"].startswith("unix:")
    finally:
        server.stop()


# -- the library's client --------------------------------------------------------------


def client_config(url: str, **fields: str) -> dict[str, dict[str, dict[str, str]]]:
    entry = {"type": "grpc", "url": url, **fields}
    return {"blobservices": {"default": entry}, "directoryservices": {"default": entry}}


@pytest.mark.parametrize("way", ["token_file", "url query", "CASTORE_TOKEN"])
async def test_each_token_role_against_each_rpc_library_client(
    token_server: GrpcServerProcess, tokens: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    way: str,
) -> None:
    monkeypatch.delenv("CASTORE_TOKEN", raising=False)

    def container(who: str | None) -> CastoreContainer:
        fields: dict[str, object] = {"type": "grpc", "url": token_server.url, "retries": 0}
        monkeypatch.delenv("CASTORE_TOKEN", raising=False)
        if who is not None:
            token_file = tmp_path / f"{who}.token"
            token_file.write_text(tokens[who] + "\n")
            if way == "token_file":
                fields["token_file"] = str(token_file)
            elif way == "url query":
                fields["url"] = f"{token_server.url}?token_file={token_file}"
            else:
                monkeypatch.setenv("CASTORE_TOKEN", tokens[who])
        return load_container({"blobservices": {"default": fields}, "directoryservices": {"default": fields}})

    errors: list[str] = []

    async def attempt(rpc: str, c: CastoreContainer) -> str:
        blobs, dirs = c.blob_service(), c.directory_service()
        try:
            if rpc == "blob.Put":
                assert await blobs.put(BLOB_A) == BLOB_A_DIGEST
            elif rpc == "directory.Put":
                assert await dirs.put(DIRECTORY_A) == DIRECTORY_A.digest
            elif rpc == "blob.Stat":
                assert await blobs.has(BLOB_A_DIGEST)
            elif rpc == "blob.Read":
                assert await blobs.read_bytes(BLOB_A_DIGEST) == BLOB_A
            else:
                assert await dirs.get(DIRECTORY_A.digest) == DIRECTORY_A
        except AccessDeniedError as e:
            errors.append(str(e))
            return "UNAUTHENTICATED" if "UNAUTHENTICATED" in str(e) else "PERMISSION_DENIED"
        return "OK"

    expected = {
        "write": dict.fromkeys(RPCS, "OK"),
        "read": {rpc: "PERMISSION_DENIED" if rpc in WRITES else "OK" for rpc in RPCS},
        "other": dict.fromkeys(RPCS, "UNAUTHENTICATED"),
        None: dict.fromkeys(RPCS, "UNAUTHENTICATED"),
    }
    for who in ("write", "read", "other", None):
        async with container(who) as c:
            assert {rpc: await attempt(rpc, c) for rpc in RPCS} == expected[who], who
    assert errors and all("refused the call" in e for e in errors)
    for message in errors:
        for token in tokens.values():
            assert token not in message
    assert any("may only read" in e for e in errors) and any("bearer token" in e for e in errors)


async def test_library_client_with_a_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    server = GrpcServerProcess(tmp_path, extra_args=mtls_args(pki)).start()
    try:
        assert server.address is not None
        url = f"grpc+https://localhost:{server.address.rpartition(':')[2]}"
        trusted = GRPCBlobService(url, ca_file=str(pki["ca"]), cert_file=str(pki["client_cert"]),
                                  key_file=str(pki["client_key"]), retries=0)
        try:
            assert await trusted.put(BLOB_A) == BLOB_A_DIGEST
            for cert, key in ((None, None), (pki["untrusted_cert"], pki["untrusted_key"])):
                other = GRPCBlobService(url, ca_file=str(pki["ca"]), cert_file=cert and str(cert),
                                        key_file=key and str(key), retries=0, timeout=10)
                try:
                    with pytest.raises(StorageError, match="unavailable"):
                        await other.has(BLOB_A_DIGEST)
                finally:
                    await other.close()
            assert await trusted.read_bytes(BLOB_A_DIGEST) == BLOB_A  # still served
        finally:
            await trusted.close()
    finally:
        server.stop()


def test_client_config_rules(tmp_path: Path) -> None:
    https, http = "grpc+https://localhost:1", "grpc+http://localhost:1"
    bad = [
        ({"url": https, "cert_file": "c.pem"}, "cert_file and key_file go together"),
        ({"url": http, "cert_file": "c.pem", "key_file": "k.pem"}, "cert_file is only meaningful with a grpc+https"),
        ({"url": f"{http}?token_file=a", "token_file": "b"}, "token_file is given twice"),
        ({"url": f"{http}?token_file="}, "token_file takes one path"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_graph(client_config(**fields))  # type: ignore[arg-type]
    load_graph(client_config(f"{http}?token_file=a", token_file="a"))


async def test_bad_token_file_is_one_error_without_the_token(
    token_server: GrpcServerProcess, tmp_path: Path, tokens: dict[str, str]
) -> None:
    path = tmp_path / "token"
    for content in (f"{tokens['write']} {tokens['read']}\n", "\n"):
        path.write_text(content)
        client = GRPCBlobService(token_server.url, token_file=str(path), retries=0)
        try:
            with pytest.raises(ConfigError, match="expected one token") as info:
                await client.has(BLOB_A_DIGEST)
            assert tokens["write"] not in str(info.value)
        finally:
            await client.close()
    client = GRPCBlobService(token_server.url, token_file=str(tmp_path / "missing"), retries=0)
    try:
        with pytest.raises(ConfigError, match="cannot read token_file"):
            await client.has(BLOB_A_DIGEST)
    finally:
        await client.close()


def test_check_graph_and_errors_never_print_a_token(
    token_server: GrpcServerProcess, tokens: dict[str, str], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(tokens["read"])
    config = tmp_path / "castore.json"
    config.write_text(json.dumps({
        "blobservices": {"default": {"type": "grpc", "url": token_server.url, "token_file": str(token_file)},
                         "env": f"{token_server.url}?token_file={token_file}"},
        "directoryservices": {"default": {"type": "grpc", "url": token_server.url, "token_file": str(token_file)}},
    }))
    env = {**os.environ, "CASTORE_TOKEN": tokens["write"]}
    outputs = []
    for args in (["check", str(config)], ["graph", str(config)], ["graph", "--format", "tree", str(config)],
                 ["graph", "--format", "mermaid", str(config)], ["-v", "check", str(config)]):
        result = subprocess.run([sys.executable, "-m", "castore_di.cli", *args], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    # a refused call, with and without --verbose (the traceback)
    token_file.write_text(tokens["other"])
    for verbose in ([], ["-v"]):
        result = subprocess.run(
            [sys.executable, "-m", "castore_di.cli", *verbose, "--config", str(config), "stat", str(BLOB_A_DIGEST)],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr, result.stderr
        outputs.append(result.stdout + result.stderr)
    for out in outputs:
        for token in tokens.values():
            assert token not in out
    token_server.stop()
    assert_no_token_anywhere(token_server, tokens)
