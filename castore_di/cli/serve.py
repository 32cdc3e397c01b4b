"""``castore serve``: serve the selected blob and directory services over gRPC."""

from __future__ import annotations

import logging
from typing import Any

import click

from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.limits import ServerLimits

__all__ = ["serve_command"]

_LIMITS = ServerLimits()


@cli.command("serve")
@click.option(
    "--listen",
    "listen",
    multiple=True,
    default=("127.0.0.1:8000",),
    show_default=True,
    help="Address to bind: HOST:PORT (port 0 picks a free port) or unix:///path. Repeatable.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds in-flight calls may take to finish after SIGTERM/SIGINT.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True),
              help="PEM certificate chain: serve TLS (clients use grpc+https://). Needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="PEM private key for --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, exists=True),
              help="PEM CA certificate(s): require client certificates signed by it (mutual TLS). Needs --tls-cert.")
@click.option("--auth-tokens", type=click.Path(dir_okay=False, exists=True),
              help="File of 'read TOKEN' / 'write TOKEN' lines: require 'authorization: Bearer TOKEN'. "
                   "Re-read on SIGHUP.")
@click.option("--read-only", is_flag=True, help="Refuse every Put (PERMISSION_DENIED).")
@click.option("--allow-unauthenticated", is_flag=True,
              help="Allow a non-loopback address without --tls-client-ca, --auth-tokens or --read-only.")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=_LIMITS.idle_timeout,
              show_default=True, help="Seconds a Put stream may go without a message (or a Read's client without taking one) "
                   "before the call is aborted.")
@click.option("--max-streams", type=click.IntRange(min=1), default=_LIMITS.max_streams, show_default=True,
              help="Streaming calls (Read, Put, recursive Get) served at once; more are refused.")
@click.option("--max-message-size", type=click.IntRange(min=1024), default=_LIMITS.max_message_size,
              show_default=True, help="Bytes of one received message (what one in-flight Put buffers).")
@click.option("--max-blob-size", type=click.IntRange(min=1), default=_LIMITS.max_blob_size, show_default=True,
              help="Bytes one blob Put may carry.")
@click.option("--max-put-directories", type=click.IntRange(min=1), default=_LIMITS.max_put_directories,
              show_default=True, help="Directories in one Directory Put.")
@click.option("--max-put-directory-bytes", type=click.IntRange(min=1), default=_LIMITS.max_put_directory_bytes,
              show_default=True, help="Encoded bytes of one Directory Put.")
@click.option("--max-depth", type=click.IntRange(min=1), default=_LIMITS.max_depth, show_default=True,
              help="Nesting depth of a closure sent in one Directory Put.")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics of every service operation at http://HOST:PORT/metrics.")
@pass_ctx
def serve_command(ctx: CliContext, listen: tuple[str, ...], grace: float, tls_cert: str | None,
                  tls_key: str | None, tls_client_ca: str | None, auth_tokens: str | None, read_only: bool,
                  allow_unauthenticated: bool, idle_timeout: float, max_streams: int, max_message_size: int,
                  max_blob_size: int, max_put_directories: int, max_put_directory_bytes: int,
                  max_depth: int, metrics_listen: str | None) -> None:
    """Serve tvix.castore.v1 BlobService and DirectoryService (with health and reflection).

    Prints "castore serve: listening on ADDRESS" for every bound address; stops on
    SIGTERM/SIGINT after a grace period and closes every service. The --idle-timeout and
    --max-* options bound what one client can make the server hold; a call past a limit
    fails alone (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, naming the option). An address
    that cannot be bound is one error line and exit code 2. Refused calls leave one JSON
    audit line each on stderr. An address other than loopback or a unix socket needs
    --tls-client-ca, --auth-tokens or --read-only (or --allow-unauthenticated).
    """
    from castore_di.errors import ConfigError
    from castore_di.server import AuthPolicy, TokenTable, check_exposure, normalize_listen, serve

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_client_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    for address in listen:
        normalize_listen(address)  # refuse bad addresses before building anything
    limits = ServerLimits(
        idle_timeout=idle_timeout,
        max_streams=max_streams,
        max_message_size=max_message_size,
        max_blob_size=max_blob_size,
        max_put_directories=max_put_directories,
        max_put_directory_bytes=max_put_directory_bytes,
        max_depth=max_depth,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokens = TokenTable(auth_tokens) if auth_tokens is not None else None
    auth = AuthPolicy(read_only=read_only, tokens=tokens, client_ca=tls_client_ca)
    try:
        check_exposure(listen, auth, allow_unauthenticated=allow_unauthenticated)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    metrics_server = _start_metrics(ctx, metrics_listen) if metrics_listen else None
    blob_name = ctx.blob_addr or ctx.blob_name
    directory_name = ctx.directory_addr or ctx.directory_name

    async def main() -> None:
        await serve(
            ctx.blob_service(),
            ctx.directory_service(),
            list(listen),
            grace=grace,
            describe=f"blob service {blob_name}, directory service {directory_name}",
            on_stopped=ctx.aclose,
            tls=(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None,
            auth=auth,
            limits=limits,
        )

    try:
        run_async(ctx, main)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


def _start_metrics(ctx: CliContext, address: str) -> Any:
    """Record every operation of the served services and serve /metrics from a thread."""
    from castore_di.metrics import Metrics

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {address!r}", param_hint="--metrics-listen")
    ctx.metrics = Metrics()
    host = host.strip("[]") or "127.0.0.1"
    try:
        server = ctx.metrics.serve(host, int(port))
    except OSError as e:
        raise click.BadParameter(f"cannot listen on {address}: {e.strerror or e}", param_hint="--metrics-listen")
    click.echo(f"castore serve: metrics on http://{host}:{server.server_port}/metrics", err=True)
    return server
