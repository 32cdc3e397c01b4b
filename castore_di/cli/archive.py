"""Tar forms of ``castore import`` and ``castore export`` (``--tar FILE|-``)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import IO

import click

from castore_di.archive import TarStats, ingest_tar, write_tar
from castore_di.cli.context import CliContext
from castore_di.digests import B3Digest
from castore_di.nodes import DirectoryNode

__all__ = ["import_tar", "export_tar"]


@contextlib.contextmanager
def _opened(path: str, mode: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer if mode == "rb" else sys.stdout.buffer
        return
    try:
        f = open(path, mode)
    except OSError as e:
        raise click.FileError(path, e.strerror) from e
    with f:
        yield f


async def import_tar(ctx: CliContext, path: str, as_json: bool) -> tuple[DirectoryNode, int]:
    """Import one archive, print its root as ``castore import`` prints a directory; the root and its bytes."""
    from castore_di.cli.transfer import node_json, node_line

    stats = TarStats()
    with _opened(path, "rb") as source:
        node = await ingest_tar(ctx.blob_service(), ctx.directory_service(), source, stats=stats)
    click.echo(json.dumps(node_json(path, node)) if as_json else node_line(path, node))
    return node, stats.bytes


async def export_tar(ctx: CliContext, digest: B3Digest, path: str, top: str | None) -> TarStats:
    """Write the tree ``digest`` as a tar to ``path`` (``-``: standard output)."""
    with _opened(path, "wb") as out:
        return await write_tar(ctx.blob_service(), ctx.directory_service(), digest, out, top=top or digest.hex())
