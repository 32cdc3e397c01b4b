"""``castore ls``, ``castore cat`` and ``castore stat``."""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

import click

from castore_di.blobservice.base import BlobService
from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.cli.output import json_line, quote_name, set_name
from castore_di.cli.params import DIGEST
from castore_di.digests import B3Digest
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import StorageError
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["ls_command", "cat_command", "stat_command", "descend", "format_entry"]


async def descend(dirs: DirectoryService, root: B3Digest, path: str) -> tuple[Node, Directory | None]:
    """The node at ``path`` (``a/b/c``) below the directory ``root``, and its Directory if it is one.

    Raises:
        StorageError: the root or a directory on the way is missing, or nothing is at ``path``.
    """
    directory = await dirs.get(root)
    if directory is None:
        raise StorageError(f"directory {root} not found")
    node: Node = directory.as_node()
    walked: list[str] = []
    for part in (p for p in path.split("/") if p and p != "."):
        if directory is None:
            raise StorageError(f"{'/'.join(walked)} is not a directory")
        child = directory.get(part)
        walked.append(part)
        if child is None:
            raise StorageError(f"no such entry: {'/'.join(walked)} (in {root})")
        node = child
        if type(child) is DirectoryNode:
            directory = await dirs.get(child.digest)
            if directory is None:
                raise StorageError(f"directory {child.digest} at {'/'.join(walked)} does not exist")
        else:
            directory = None
    return node, directory


def format_entry(name: bytes | str, node: Node, size_width: int = 10) -> str:
    """One ``ls -l`` style line: mode, size, digest, name (symlinks: ``name -> target``).

    Names and targets are quoted when they hold control characters, quotes or invalid UTF-8
    (see :mod:`castore_di.cli.output`).
    """
    shown = quote_name(name)
    if type(node) is DirectoryNode:
        return f"dr-xr-xr-x {node.size:>{size_width}} {node.digest} {shown}/"
    if type(node) is FileNode:
        mode = "-r-xr-xr-x" if node.executable else "-r--r--r--"
        return f"{mode} {node.size:>{size_width}} {node.digest} {shown}"
    assert type(node) is SymlinkNode
    return f"lrwxrwxrwx {len(node.target):>{size_width}} {'-':<48} {shown} -> {quote_name(node.target)}"


def _entry_json(name: bytes, node: Node, path: bytes) -> dict[str, Any]:
    out = set_name({}, "path", path)
    set_name(out, "name", name)
    if type(node) is SymlinkNode:
        out["type"] = "symlink"
        set_name(out, "target", node.target)
    elif type(node) is FileNode:
        out.update(type="file", digest=str(node.digest), size=node.size, executable=node.executable)
    else:
        assert type(node) is DirectoryNode
        out.update(type="directory", digest=str(node.digest), size=node.size)
    return out


@cli.command("ls")
@click.argument("digest", type=DIGEST)
@click.argument("path", default="")
@click.option("-R", "--recursive", is_flag=True, help="List subdirectories recursively.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one object per entry (with its path).")
@pass_ctx
def ls_command(ctx: CliContext, digest: B3Digest, path: str, recursive: bool, as_json: bool) -> None:
    """List the directory DIGEST (or PATH inside it) like `ls -l`.

    Columns: mode, size (bytes for files, entries below for directories, target length
    for symlinks), digest, name.
    """

    async def run() -> None:
        dirs = ctx.directory_service()
        if await dirs.get(digest) is None and await ctx.blob_service().has(digest):
            raise StorageError(f"{digest} is a blob, not a directory (use castore cat or castore stat)")
        node, directory = await descend(dirs, digest, path)
        if directory is None:
            name = os.fsencode(path.rstrip("/").rsplit("/", 1)[-1])
            if as_json:
                click.echo(json_line(_entry_json(name, node, os.fsencode(path))))
            else:
                click.echo(format_entry(name, node))
            return
        prefix = os.fsencode(path.strip("/"))
        queue: collections.deque[tuple[bytes, Directory]] = collections.deque([(prefix, directory)])
        first = True
        while queue:
            where, current = queue.popleft()
            if as_json:
                for raw, child in current.items():
                    click.echo(json_line(_entry_json(raw, child, where + b"/" + raw if where else raw)))
            else:
                if recursive:
                    click.echo(("" if first else "\n") + f"{quote_name(where or b'.')}:")
                width = max([len(str(n.size)) for _, n in current.items() if not isinstance(n, SymlinkNode)] +
                            [len(str(len(n.target))) for _, n in current.symlinks()] + [1])
                for raw, child in current.items():
                    click.echo(format_entry(raw, child, width))
            first = False
            if recursive:
                for raw, sub in current.directories():
                    sub_path = where + b"/" + raw if where else raw
                    sub_dir = await dirs.get(sub.digest)
                    if sub_dir is None:
                        raise StorageError(f"directory {sub.digest} at {quote_name(sub_path)} does not exist")
                    queue.append((sub_path, sub_dir))

    run_async(ctx, run, loopless=ctx.loopless())


async def _stream_blob(blob: BlobService, digest: B3Digest, out: Any) -> None:
    reader = await blob.open_read(digest)
    if reader is None:
        raise StorageError(f"blob {digest} not found")
    async with reader:
        async for block in reader.iter_blocks():
            out.write(block)
    out.flush()


@cli.command("cat")
@click.argument("digest", type=DIGEST)
@click.argument("path", required=False)
@pass_ctx
def cat_command(ctx: CliContext, digest: B3Digest, path: str | None) -> None:
    """Write the blob DIGEST to stdout (or the file at PATH inside the directory DIGEST).

    Bytes are verified against their digest as they stream.
    """

    async def run() -> None:
        target = digest
        if path is not None:
            node, _ = await descend(ctx.directory_service(), digest, path)
            if type(node) is not FileNode:
                raise StorageError(f"{path} is not a file")
            target = node.digest
        blob = ctx.blob_service()
        if path is None and not await blob.has(target) and await ctx.directory_service().get(target) is not None:
            raise StorageError(f"{target} is a directory, not a blob (use castore ls or castore export)")
        await _stream_blob(blob, target, sys.stdout.buffer)

    run_async(ctx, run, loopless=ctx.loopless())


@cli.command("stat")
@click.argument("digest", type=DIGEST)
@click.option("--json", "as_json", is_flag=True, help="A JSON object instead of text.")
@click.option("--chunks", "list_chunks", is_flag=True, help="Also list the blob's chunks (digest and size).")
@pass_ctx
def stat_command(ctx: CliContext, digest: B3Digest, as_json: bool, list_chunks: bool) -> None:
    """Describe DIGEST: a blob (size, chunk count) and/or a directory (entries, size).

    The chunk count is fsck's: a blob stored without a chunk list (a small one) is one
    chunk. --chunks lists them (JSON: "chunk_list"). The empty blob and the empty
    directory share a digest; both are shown when present.
    """

    async def run() -> None:
        blob, dirs = ctx.blob_service(), ctx.directory_service()
        found: list[dict[str, Any]] = []
        directory = await dirs.get(digest)
        if directory is not None:
            found.append({
                "digest": str(digest), "type": "directory", "entries": len(directory),
                "directories": len(directory.directories()), "files": len(directory.files()),
                "symlinks": len(directory.symlinks()), "size": directory.size,
                "file_bytes": sum(n.size for _, n in directory.files()),
            })
        chunks = await blob.chunks(digest)
        if chunks is not None:
            reader = await blob.open_read(digest)
            if reader is None:  # vanished between the two calls
                raise StorageError(f"blob {digest} not found")
            async with reader:
                size = reader.size
            listed = [{"digest": str(c.digest), "size": c.size} for c in chunks] or [{"digest": str(digest),
                                                                                     "size": size}]
            info: dict[str, Any] = {"digest": str(digest), "type": "blob", "size": size, "chunks": len(listed)}
            if list_chunks:
                info["chunk_list"] = listed
            found.append(info)
        if not found:
            raise StorageError(f"{digest}: no blob or directory with this digest")
        for info in found:
            if as_json:
                click.echo(json_line(info))
            elif info["type"] == "directory":
                click.echo(f"{info['digest']} directory\n"
                           f"  entries: {info['entries']} ({info['directories']} directories, "
                           f"{info['files']} files, {info['symlinks']} symlinks)\n"
                           f"  size: {info['size']} (entries in the whole tree)\n"
                           f"  file bytes: {info['file_bytes']} (files directly inside)")
            else:
                lines = [f"{info['digest']} blob", f"  size: {info['size']}", f"  chunks: {info['chunks']}"]
                lines += [f"    {c['digest']} {c['size']}" for c in info.get("chunk_list", [])]
                click.echo("\n".join(lines))

    run_async(ctx, run, loopless=ctx.loopless())
