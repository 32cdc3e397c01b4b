"""Plumbing of the gRPC clients: URL rules, channel options, retries, error translation.

URL forms (the reference's ``channel_from_url`` rules):

* ``grpc+unix:///path/to/socket``: no host allowed ("host may not be set for unix domain
  sockets");
* ``grpc+http://host[:port]`` (plaintext, port 80 by default) and ``grpc+https://host[:port]``
  (TLS, port 443 by default): no path allowed ("path may not be set");
* the ``grpc+`` prefix is required ("grpc+ prefix is missing from URL");
* query ``wait-connect=1`` connects eagerly (the first use waits for the connection and
  fails when the target is unreachable); the default ``wait-connect=0`` is lazy;
* query ``token_file=PATH`` names the file of the bearer token sent with every call (see
  :class:`GrpcClientConfig`). No other query parameter is accepted.

Nothing here imports grpc at module import time; :class:`LazyChannel` does on first use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs

from castore_di._grpc.wire import MAX_MESSAGE_SIZE, error_from_status
from castore_di.composition.fields import duration, non_negative, parse_query
from castore_di.errors import CastoreError, ClosedError, ConfigError, MissingDependencyError, StorageError

if TYPE_CHECKING:
    import grpc
    import grpc.aio

__all__ = [
    "ChannelTarget",
    "GrpcClient",
    "GrpcClientConfig",
    "LazyChannel",
    "StreamSender",
    "identity",
    "is_not_found",
    "parse_grpc_url",
    "translate_rpc_error",
]

T = TypeVar("T")

log = logging.getLogger("castore_di.grpc")

TOKEN_ENV = "CASTORE_TOKEN"  # the bearer token when no token_file is configured


@attrs.frozen
class ChannelTarget:
    """A parsed channel URL: the grpc target string, TLS or not, eager or lazy connect."""

    url: str
    target: str
    secure: bool
    wait_connect: bool
    token_file: str | None = None

    @property
    def display(self) -> str:
        return self.url


def parse_grpc_url(url: str) -> ChannelTarget:
    """Check a ``grpc+…`` URL against the reference's rules; raises :class:`ConfigError`."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme
    query = parse_query(url, parts.query)  # a key given twice is refused
    wait = query.pop("wait-connect", "0")
    token_file = query.pop("token_file", None)
    if query:
        raise ConfigError(f"invalid url {url!r}: unknown query parameter(s) {', '.join(sorted(query))}")
    if wait not in ("0", "1"):
        raise ConfigError(f"invalid url {url!r}: wait-connect must be 0 or 1")
    wait_connect = wait == "1"
    if token_file is not None and not token_file:
        raise ConfigError(f"invalid url {url!r}: token_file takes one path")
    if scheme == "grpc+unix":
        if parts.netloc:
            raise ConfigError(f"invalid url {url!r}: host may not be set for unix domain sockets")
        if not parts.path:
            raise ConfigError(f"invalid url {url!r}: a socket path is required")
        return ChannelTarget(url, "unix:" + parts.path, False, wait_connect, token_file)
    if parts.path:
        raise ConfigError(f"invalid url {url!r}: path may not be set")
    if not scheme.startswith("grpc+"):
        raise ConfigError(f"invalid url {url!r}: grpc+ prefix is missing from URL")
    inner = scheme[len("grpc+") :]
    if inner not in ("http", "https"):
        raise ConfigError(f"invalid url {url!r}: unsupported scheme {scheme!r} (grpc+http, grpc+https, grpc+unix)")
    host = parts.hostname
    if not host:
        raise ConfigError(f"invalid url {url!r}: a host is required")
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"invalid url {url!r}: {e}") from e
    if port is None:
        port = 443 if inner == "https" else 80
    shown_host = f"[{host}]" if ":" in host else host
    return ChannelTarget(url, f"{shown_host}:{port}", inner == "https", wait_connect, token_file)


def _check_url(_inst: object, _attribute: attrs.Attribute[Any], value: str) -> None:
    parse_grpc_url(value)


@attrs.frozen(kw_only=True)
class GrpcClientConfig:
    """Fields shared by the ``grpc`` blob and directory service configs.

    Attributes:
        url: ``grpc+http://host:port``, ``grpc+https://host[:port]`` or ``grpc+unix:///path``,
            optionally with ``?wait-connect=1`` and ``?token_file=PATH``.
        ca_file: PEM file of root certificates for ``grpc+https`` (system roots otherwise).
        cert_file: PEM client certificate for ``grpc+https`` servers that require one (mutual
            TLS); needs ``key_file``.
        key_file: PEM private key of ``cert_file``.
        token_file: file holding the bearer token sent with every call (``authorization:
            Bearer TOKEN``); also the URL query ``token_file``. Without either, the
            ``CASTORE_TOKEN`` environment variable, if set. The token is never shown.
        timeout: deadline in seconds of unary calls (Stat, non-recursive Get); null for none.
        stream_timeout: deadline of streaming calls (Read, Put, recursive Get); null for none.
        connect_timeout: how long ``wait-connect=1`` waits for the connection.
        retries: retries of idempotent calls (Stat, Read, Get) on UNAVAILABLE.
        retry_backoff: first retry delay in seconds; doubles per retry (jitter -25 %).
        retry_backoff_max: upper bound of one retry delay.
    """

    type_tag: ClassVar[str] = "grpc"

    url: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_url])
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None
    timeout: float | None = attrs.field(default=30.0, validator=duration(optional=True, positive=True))
    stream_timeout: float | None = attrs.field(default=None, validator=duration(optional=True, positive=True))
    connect_timeout: float = attrs.field(default=10.0, validator=duration())
    retries: int = attrs.field(default=5, validator=non_negative)
    retry_backoff: float = attrs.field(default=0.1, validator=duration())
    retry_backoff_max: float = attrs.field(default=2.0, validator=duration())

    def __attrs_post_init__(self) -> None:
        target = parse_grpc_url(self.url)
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None and not target.secure:
                raise ConfigError(f"{name} is only meaningful with a grpc+https url")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together")
        if None not in (self.token_file, target.token_file) and self.token_file != target.token_file:
            raise ConfigError("token_file is given twice (field and URL query) with different paths")

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`LazyChannel` (besides the URL)."""
        return {
            "ca_file": self.ca_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "token_file": self.token_file,
            "timeout": self.timeout,
            "stream_timeout": self.stream_timeout,
            "connect_timeout": self.connect_timeout,
            "retries": self.retries,
            "retry_backoff": self.retry_backoff,
            "retry_backoff_max": self.retry_backoff_max,
        }


def _import_grpc() -> Any:
    try:
        import grpc
        import grpc.aio
    except ImportError as e:  # pragma: no cover - grpcio is a core dependency
        raise MissingDependencyError("the grpc services need grpcio: pip install grpcio") from e
    return grpc


class LazyChannel:
    """A ``grpc.aio`` channel created on first use, on the running event loop.

    Construction does no I/O (and needs no event loop). The channel is created by the
    first :meth:`get`; with ``wait-connect=1`` that call also waits (``connect_timeout``)
    for the connection and raises :class:`StorageError` when the target is unreachable.
    A channel belongs to one event loop: used from another loop, a new one is made.
    The bearer token (``token_file``, the URL's ``token_file`` query, else ``CASTORE_TOKEN``)
    is read when the channel is made and sent as ``authorization`` metadata on every call.
    Reconnect backoff is kept short (0.1 s to 1 s) and the default retries of idempotent
    calls span more than that (about 2.3 to 3.1 s), so a restarted server is found again
    by the same client.
    """

    def __init__(
        self,
        url: str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token_file: str | None = None,
        timeout: float | None = 30.0,
        stream_timeout: float | None = None,
        connect_timeout: float = 10.0,
        retries: int = 5,
        retry_backoff: float = 0.1,
        retry_backoff_max: float = 2.0,
    ) -> None:
        self.target = parse_grpc_url(url)
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.token_file = token_file if token_file is not None else self.target.token_file
        self.metadata: tuple[tuple[str, str], ...] = ()  # (authorization, Bearer …) once the channel is made
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),  # retries are ours, bounded and only for idempotent calls
        ]

    def _credentials(self, grpc: Any) -> Any:
        files: dict[str, bytes | None] = {}
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            files[name] = None
            if path is not None:
                try:
                    with open(path, "rb") as f:
                        files[name] = f.read()
                except OSError as e:
                    raise StorageError(f"cannot read {name} {path!r}: {e.strerror or e}") from None
        return grpc.ssl_channel_credentials(
            root_certificates=files["ca_file"], private_key=files["key_file"], certificate_chain=files["cert_file"]
        )

    def _token_metadata(self) -> tuple[tuple[str, str], ...]:
        """The ``authorization`` metadata (blocking: reads the token file)."""
        if self.token_file is not None:
            try:
                with open(self.token_file, encoding="utf-8", errors="replace") as f:
                    token = f.read().strip()
            except OSError as e:
                raise ConfigError(f"cannot read token_file {self.token_file!r}: {e.strerror or e}") from None
            source = f"token_file {self.token_file!r}"
        else:
            token = os.environ.get(TOKEN_ENV, "").strip()
            source = TOKEN_ENV
            if not token:
                return ()
        if not token or not all("!" <= c <= "~" for c in token):
            raise ConfigError(f"{source}: expected one token of visible ASCII characters (no spaces)")
        if not self.target.secure and not _is_local(self.target.target):
            log.warning("sending a bearer token in the clear to %s: use grpc+https", self.target.display)
        return (("authorization", f"Bearer {token}"),)

    async def get(self) -> "grpc.aio.Channel":
        """The channel of the running loop (created, and with wait-connect connected, on demand)."""
        if self._closed:
            raise ClosedError(f"gRPC client for {self.target.display} is closed")
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is loop:
            return self._channel
        if self._lock is None or self._loop is not loop:
            self._lock = asyncio.Lock()
            self._loop = loop
            self._channel = None
        async with self._lock:
            if self._channel is None:
                grpc = _import_grpc()
                # token and certificate files are read off the event loop
                self.metadata = await asyncio.to_thread(self._token_metadata)
                if self.target.secure:
                    credentials = await asyncio.to_thread(self._credentials, grpc)
                    channel = grpc.aio.secure_channel(self.target.target, credentials, options=self._options())
                else:
                    channel = grpc.aio.insecure_channel(self.target.target, options=self._options())
                if self.target.wait_connect:
                    try:
                        await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
                    except asyncio.TimeoutError:
                        await channel.close()
                        raise StorageError(
                            f"gRPC server {self.target.display} unreachable "
                            f"(wait-connect=1, waited {self.connect_timeout:g} s)"
                        ) from None
                self._channel = channel
            return self._channel

    async def get_ready(self) -> "grpc.aio.Channel":
        """The channel, connected: waits up to ``connect_timeout`` when it is not ready.

        Used before calls that cannot be retried (Put), and by an explicit eager connect.
        """
        channel = await self.get()
        grpc = _import_grpc()
        if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return channel
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise StorageError(
                f"gRPC server {self.target.display} unavailable (not ready after {self.connect_timeout:g} s)"
            ) from None
        return channel

    async def connect(self) -> None:
        """Create the channel now and wait for the connection (eager connect on demand)."""
        await self.get_ready()

    async def close(self) -> None:
        """Close the channel (if it belongs to the running loop). Idempotent."""
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                if self._loop is asyncio.get_running_loop():
                    await channel.close()
            except RuntimeError:  # no running loop / loop closed: nothing left to release
                pass

    def _delay(self, attempt: int) -> float:
        base = min(self.retry_backoff_max, self.retry_backoff * (2**attempt))
        delay: float = base * (0.75 + random.random() / 4)
        return delay

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent call, retrying on UNAVAILABLE with bounded exponential backoff.

        Errors are translated into castore_di exceptions (see :func:`translate_rpc_error`);
        callers that treat NOT_FOUND as absence catch it before (``call`` may return None).
        """
        grpc = _import_grpc()
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise translate_rpc_error(e, what, self.target.display) from e


def _is_local(target: str) -> bool:
    """Whether a channel target (``unix:…``, ``host:port``) stays on this machine."""
    if target.startswith("unix:"):
        return True
    host = target.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def identity(data: bytes) -> bytes:
    """The (de)serializer of raw calls: messages are encoded and decoded by the callers."""
    return data


def is_not_found(e: BaseException) -> bool:
    """Whether ``e`` is a failed call with status NOT_FOUND (absence, not an error)."""
    grpc = _import_grpc()
    return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.NOT_FOUND


class GrpcClient:
    """Base of the gRPC service clients: a :class:`LazyChannel` and the call helpers."""

    # The service name a connectivity check asks the server's grpc.health.v1 about.
    _health_service = ""

    def __init__(self, url: str, **options: Any) -> None:
        self._chan = LazyChannel(url, **options)

    async def check_connectivity(self) -> str:
        """One ``grpc.health.v1.Health/Check`` of this client's service, not retried.

        A server without the health service (UNIMPLEMENTED) still answered: reachable.
        """
        from grpc_health.v1 import health_pb2

        grpc = _import_grpc()
        channel = await self._chan.get()
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=identity, response_deserializer=identity
        )
        request = health_pb2.HealthCheckRequest(service=self._health_service).SerializeToString()
        target = self._chan.target.display
        try:
            raw = await check(request, timeout=self._chan.connect_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return f"gRPC {target}: reachable (no health service)"
            raise translate_rpc_error(e, "health check", target) from e
        status = health_pb2.HealthCheckResponse.FromString(raw).status
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise StorageError(f"gRPC {target}: {self._health_service or 'server'} is {name}")
        return f"gRPC {target}: {self._health_service} {name}"

    @property
    def url(self) -> str:
        return self._chan.target.url

    async def connect(self) -> None:
        """Connect now (otherwise the first call does); raises StorageError if unreachable."""
        await self._chan.connect()

    async def close(self) -> None:
        await self._chan.close()

    async def _unary_stream(self, method: str, request: bytes, timeout: float | None) -> Any:
        """Start a server-streaming call (the returned call is also an async iterator)."""
        channel = await self._chan.get()
        multicallable = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
        return multicallable(request, timeout=timeout, metadata=self._chan.metadata)

    async def _stream_sender(self, method: str, depth: int) -> "StreamSender":
        """Start a client-streaming call (not retried: waits for a ready channel first)."""
        channel = await self._chan.get_ready()
        multicallable = channel.stream_unary(method, request_serializer=identity, response_deserializer=identity)
        return StreamSender(
            multicallable, method.rsplit("/", 1)[-1], self.url, self._chan.stream_timeout, depth, self._chan.metadata
        )


def translate_rpc_error(e: "grpc.aio.AioRpcError", what: str, target: str) -> CastoreError:
    """Turn a failed call into the library's exception (:func:`.wire.error_from_status`)."""
    return error_from_status(e.code().name, e.details() or "", e.trailing_metadata() or (), what, target)


class StreamSender:
    """Feeds a client-streaming call from a bounded queue (the request-iterator style).

    grpcio streams an iterator about twice as fast as awaiting ``call.write`` per message.
    The queue bounds what is buffered (``depth`` messages); when the call ends early (the
    server failed or vanished) the queue is drained so no sender blocks, and the next
    :meth:`send` or :meth:`finish` raises the translated error.
    """

    def __init__(
        self,
        multicallable: Any,
        what: str,
        target: str,
        timeout: float | None,
        depth: int = 4,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=depth)
        self._what = what
        self._target = target
        self._done = False
        self.call = multicallable(self._requests(), timeout=timeout, metadata=metadata)
        self.call.add_done_callback(self._on_done)

    async def _requests(self) -> Any:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def _on_done(self, _call: object) -> None:
        self._done = True
        while not self._queue.empty():
            self._queue.get_nowait()

    async def _response(self) -> bytes:
        """The call's serialized response; a failed or cancelled call raises ours."""
        grpc = _import_grpc()
        try:
            response: bytes = await self.call
        except grpc.aio.AioRpcError as e:
            raise translate_rpc_error(e, self._what, self._target) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise StorageError(f"{self._what}: call to {self._target} was cancelled") from None
        return response

    async def _raise(self) -> None:
        await self._response()
        raise StorageError(f"{self._what}: the server {self._target} ended the call early")

    async def send(self, message: bytes) -> None:
        if self._done:
            await self._raise()
        await self._queue.put(message)
        if self._done:
            await self._raise()

    async def finish(self) -> bytes:
        """End the stream and return the serialized response."""
        if not self._done:
            await self._queue.put(None)
        return await self._response()

    def cancel(self) -> None:
        self.call.cancel()
