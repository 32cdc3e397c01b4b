"""gRPC servers for composed services: servicers and :func:`serve` (statuses: :mod:`castore_di._grpc.wire`).

``castore serve`` runs :func:`serve`; tests and applications can use :class:`CastoreServer`
directly::

    server = CastoreServer(blob_service, directory_service)
    addresses = await server.start(["127.0.0.1:0"])
    ...
    await server.stop(grace=5)

The server offers ``tvix.castore.v1.BlobService``, ``tvix.castore.v1.DirectoryService``,
gRPC health checking (``grpc.health.v1.Health``: SERVING while up, NOT_SERVING while
stopping) and server reflection. Who may call what is decided by an
:class:`~castore_di.server.auth.AuthPolicy` (read-only, bearer tokens, client certificates;
see :mod:`castore_di.server.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc
import grpc.aio

from castore_di.blobservice.base import BlobService
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import ConfigError
from castore_di._grpc.wire import BLOB_SERVICE, DIRECTORY_SERVICE, MAX_MESSAGE_SIZE, STATUS_TABLE
from castore_di.server.auth import AuthInterceptor, AuthPolicy, TokenTable, check_exposure
from castore_di.server.blob import BlobServicer
from castore_di.server.common import abort_with, status_for
from castore_di.server.directory import DirectoryServicer
from castore_di.limits import ServerLimits, StreamGate

__all__ = [
    "AuthPolicy",
    "BlobServicer",
    "CastoreServer",
    "DirectoryServicer",
    "STATUS_TABLE",
    "ServerLimits",
    "BindError",
    "abort_with",
    "normalize_listen",
    "serve",
    "status_for",
    "TokenTable",
    "check_exposure",
]

log = logging.getLogger("castore_di.server")

_SERVICE_NAMES = (BLOB_SERVICE, DIRECTORY_SERVICE)


def normalize_listen(address: str) -> str:
    """A grpc bind address from ``host:port``, ``[v6]:port`` or ``unix:///path``/``unix:/path``."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                raise ConfigError(f"invalid listen address {address!r}: unix:// takes no host")
            path = path[2:]
        if not path.startswith("/"):
            raise ConfigError(f"invalid listen address {address!r}: the socket path must be absolute")
        return "unix:" + path
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"invalid listen address {address!r}: expected HOST:PORT or unix:///path")
    return address


def _server_credentials(tls: tuple[str, str], client_ca: str | None = None) -> "grpc.ServerCredentials":
    cert_file, key_file = tls
    try:
        with open(cert_file, "rb") as f:
            cert = f.read()
        with open(key_file, "rb") as f:
            key = f.read()
        ca: bytes | None = None
        if client_ca is not None:
            with open(client_ca, "rb") as f:
                ca = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read TLS certificate, key or client CA: {e}") from e
    # with a client CA the handshake itself refuses clients without a certificate it signed
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class _DroppedPeerNoise(logging.Filter):
    """Drops grpc's traceback for a write to a call that already ended (client gone, or cut off
    by the idle timeout): expected on a server that bounds its clients, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ExecuteBatchError raised in core by servicer method")


class BindError(ConfigError):
    """An address could not be bound (in use, not permitted, no such interface)."""


class _Held:
    keep = False


@contextlib.contextmanager
def _core_log_held() -> Iterator[_Held]:
    """Hold what gRPC's C core writes to stderr meanwhile; pass it on unless the bind failed.

    A failed bind makes the core log its own line; ours (:class:`BindError`) says the same
    once, with the reason.
    """
    held = _Held()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to hold
        yield held
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                tmp.seek(0)
                text = tmp.read()
                if text:
                    os.write(2, text)


def _bind_reason(address: str) -> str:
    """Why binding ``address`` fails, asked of the OS (grpc's own error gives no reason)."""
    import socket

    try:
        if address.startswith("unix:"):
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(address[len("unix:") :])
            return "refused by gRPC"
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, sockaddr in infos:
            with socket.socket(family, kind, proto) as s:
                s.bind(sockaddr)
        return "refused by gRPC"
    except OSError as e:
        return e.strerror or str(e)


class CastoreServer:
    """A ``grpc.aio`` server for one blob and one directory service (either may be None)."""

    def __init__(
        self,
        blob_service: BlobService | None,
        directory_service: DirectoryService | None,
        *,
        tls: tuple[str, str] | None = None,
        auth: AuthPolicy | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        """``tls`` is ``(certificate chain PEM file, private key PEM file)``; plaintext without it.

        ``auth`` says who may call what (everyone everything without it); its ``client_ca``
        needs ``tls``. ``limits`` bound what one call can make the server hold
        (:class:`ServerLimits`).
        """
        if blob_service is None and directory_service is None:
            raise ConfigError("nothing to serve: no blob and no directory service")
        self.auth = auth if auth is not None else AuthPolicy()
        if self.auth.client_ca is not None and tls is None:
            raise ConfigError("client certificates (--tls-client-ca) need TLS (--tls-cert and --tls-key)")
        self.blob_service = blob_service
        self.directory_service = directory_service
        self._credentials = _server_credentials(tls, self.auth.client_ca) if tls is not None else None
        self.limits = limits if limits is not None else ServerLimits()
        self._server: grpc.aio.Server | None = None
        self._health: object | None = None
        self.addresses: list[str] = []

    async def start(self, listen: Sequence[str]) -> list[str]:
        """Bind every address and start; returns the bound addresses (ports resolved)."""
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        binds = [normalize_listen(a) for a in listen]
        interceptors = [AuthInterceptor(self.auth)] if self.auth.read_only or self.auth.tokens is not None else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.limits.max_message_size),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.so_reuseport", 0),
            ]
        )
        names: list[str] = []
        gate = StreamGate(self.limits.max_streams)
        if self.blob_service is not None:
            BlobServicer(self.blob_service, limits=self.limits, gate=gate).add_to_server(server)
            names.append(_SERVICE_NAMES[0])
        if self.directory_service is not None:
            DirectoryServicer(self.directory_service, limits=self.limits, gate=gate).add_to_server(server)
            names.append(_SERVICE_NAMES[1])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bound: list[str] = []
        for address in binds:
            try:
                with _core_log_held() as held:
                    if self._credentials is not None:
                        port = server.add_secure_port(address, self._credentials)
                    else:
                        port = server.add_insecure_port(address)
                    held.keep = True
            except RuntimeError as e:
                raise BindError(f"cannot listen on {address}: {_bind_reason(address)}") from e
            if address.startswith("unix:"):
                bound.append("unix://" + address[len("unix:") :])
            else:
                bound.append(f"{address.rpartition(':')[0]}:{port}")
        await server.start()
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self.addresses = server, health_servicer, bound
        return bound

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let running calls finish for ``grace`` seconds, then cancel them."""
        server, self._server = self._server, None
        if server is None:
            return
        health_servicer = self._health
        if health_servicer is not None:
            await health_servicer.enter_graceful_shutdown()  # type: ignore[attr-defined]
        await server.stop(grace)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(
    blob_service: BlobService | None,
    directory_service: DirectoryService | None,
    listen: Sequence[str],
    *,
    grace: float = 5.0,
    describe: str = "",
    on_stopped: Callable[[], Awaitable[None]] | None = None,
    tls: tuple[str, str] | None = None,
    auth: AuthPolicy | None = None,
    limits: ServerLimits | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully and run ``on_stopped``.

    Prints ``castore serve: listening on ADDRESS`` on stdout for every bound address (the
    machine-readable line test fixtures wait for), and logs one line at start and one at stop.
    With bearer tokens in ``auth``, SIGHUP re-reads the tokens file (a broken file keeps the
    previous tokens and logs why). An address that cannot be bound raises :class:`BindError`
    (a :class:`ConfigError`) naming it and the reason; nothing is logged as started or stopped then.
    """
    logging.getLogger("grpc._cython.cygrpc").addFilter(_DroppedPeerNoise())
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    # handlers first: a signal that arrives right after the listening line must not kill us
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    tokens = auth.tokens if auth is not None else None
    reloads: set[asyncio.Task[None]] = set()
    if tokens is not None:
        def on_hangup() -> None:
            task = loop.create_task(_reload_tokens(tokens))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    server = CastoreServer(blob_service, directory_service, tls=tls, auth=auth, limits=limits)
    try:
        addresses = await server.start(listen)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop(0)
        if on_stopped is not None:
            await on_stopped()
        raise
    try:
        log.info(
            "castore serve: started%s on %s; access: %s",
            f" ({describe})" if describe else "", ", ".join(addresses), server.auth.describe(),
        )
        for address in addresses:
            print(f"castore serve: listening on {address}", flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop(grace)
        if on_stopped is not None:
            await on_stopped()
        log.info(
            "castore serve: stopped (%s, grace %gs)", received[0] if received else "cancelled", grace
        )
        sys.stdout.flush()


async def _reload_tokens(tokens: TokenTable) -> None:
    try:
        count = await asyncio.to_thread(tokens.reload)
    except ConfigError as e:
        log.error("castore serve: tokens not reloaded, the previous %d stay in force: %s", len(tokens), e)
    else:
        log.info("castore serve: reloaded %d tokens from %s", count, tokens.path)
