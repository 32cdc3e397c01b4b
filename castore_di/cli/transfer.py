"""``castore import`` and ``castore export``."""

from __future__ import annotations

import gc
import os
import sys
import threading
from typing import IO, Any

import click

from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.cli.output import json_line, quote_name, set_name
from castore_di.cli.params import DIGEST, DigestParam
from castore_di.errors import StorageError
from castore_di.exporter import export_directory, export_file, export_symlink
from castore_di.importer import DEFAULT_CONCURRENCY, ImportStats, Workers, ingest_path
from castore_di.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["import_command", "export_command", "DigestParam", "Progress", "node_json", "node_line"]


class Progress:
    """A progress bar on stderr, drawn by tqdm: bytes (within files too), files, rate, ETA.

    tqdm rather than rich: one small dependency-free library that already does what a
    transfer bar needs (byte units, ETA, terminal width, thread-safe updates, quiet when not
    a terminal), imported only when a bar is shown. ``partial`` (called from worker threads
    too) reports bytes done inside a file still in progress; ``advance`` finishes a file.
    ``finish`` draws the final state, so a completed transfer ends at 100 %.
    """

    def __init__(self, label: str, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._label = label
        self._lock = threading.Lock()
        self._files = self._total_files = 0
        self._done = 0  # bytes of finished files
        self._partial: dict[object, int] = {}
        self._bar: Any = None

    def start(self, files: int, nbytes: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self._total_files = files
        self._bar = tqdm(total=nbytes, desc=self._label, file=self._stream, unit="B", unit_scale=True,
                         unit_divisor=1024, dynamic_ncols=True, leave=True, mininterval=0.1, miniters=1,
                         postfix=self._postfix(), bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B"
                         "{postfix} [{elapsed}<{remaining}, {rate_fmt}]")

    def _postfix(self) -> str:
        return f"{self._files}/{self._total_files} files"

    def _update(self) -> None:
        bar = self._bar
        if bar is None:
            return
        n = self._done + sum(self._partial.values())
        if n != bar.n:
            bar.set_postfix_str(self._postfix(), refresh=False)
            bar.update(n - bar.n)

    def partial(self, key: object, nbytes: int) -> None:
        """``nbytes`` of the file ``key`` are done (it is still in progress)."""
        if self._bar is None:
            return
        with self._lock:
            if nbytes:
                self._partial[key] = nbytes
            elif self._partial.pop(key, None) is None:
                return
            self._update()

    def advance(self, nbytes: int, key: object = None) -> None:
        """One file of ``nbytes`` is done."""
        if self._bar is None:
            return
        with self._lock:
            self._partial.pop(key, None)
            self._files += 1
            self._done += nbytes
            self._update()

    def finish(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
                self._bar.refresh()
                self._bar.close()
                self._bar = None


def node_json(path: str | bytes, node: Node) -> dict[str, Any]:
    """The ``--json`` form of a root node (names as in :mod:`castore_di.cli.output`)."""
    out = set_name({}, "path", path)
    if type(node) is SymlinkNode:
        out["type"] = "symlink"
        return set_name(out, "target", node.target)
    assert isinstance(node, (FileNode, DirectoryNode))
    out.update(type="file" if type(node) is FileNode else "directory", digest=str(node.digest), size=node.size)
    if type(node) is FileNode:
        out["executable"] = node.executable
    return out


def node_line(path: str | bytes, node: Node) -> str:
    """The human form: ``<path> <type> <b3:digest> <size>`` (symlinks: ``<path> symlink <target>``)."""
    if type(node) is SymlinkNode:
        return f"{quote_name(path)} symlink {quote_name(node.target)}"
    assert isinstance(node, (FileNode, DirectoryNode))
    if type(node) is DirectoryNode:
        kind = "directory"
    else:
        kind = "executable" if isinstance(node, FileNode) and node.executable else "file"
    return f"{quote_name(path)} {kind} {node.digest} {node.size}"


@cli.command("import")
@click.argument("paths", nargs=-1, type=click.Path(exists=False))
@click.option("--tar", "tar", metavar="FILE|-", help="Import a tar archive (plain, gzip or zstd) instead of PATHS.")
@click.option("--name", metavar="NAME", help="Record the imported root under NAME (see `castore roots`).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per path instead of text.")
@click.option("-j", "--concurrency", type=click.IntRange(1, 1024), default=DEFAULT_CONCURRENCY, show_default=True,
              help="Files read and uploaded at once.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when it is a terminal).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Leave out paths matching this gitignore-style pattern (relative to each PATH; repeatable).")
@click.option("--skip-special", is_flag=True,
              help="Skip fifos, sockets and devices with a warning each instead of failing.")
@click.option("--rehash", is_flag=True,
              help="Read every file, trusting no cached digest (the import cache is rewritten).")
@click.option("--no-cache", is_flag=True, help="Neither use nor write the import cache.")
@click.option("--workers", type=click.Choice(["auto", "threads", "processes"]), default="auto", show_default=True,
              help="Who reads small files: threads, worker processes, or auto (processes for a large first import).")
@pass_ctx
def import_command(ctx: CliContext, paths: tuple[str, ...], tar: str | None, name: str | None, as_json: bool,
                   concurrency: int, progress: bool | None, excludes: tuple[str, ...], skip_special: bool,
                   rehash: bool, no_cache: bool, workers: Workers) -> None:
    """Import files, directories and symlinks; print the root node of each PATH.

    Text output is one line per PATH: `<path> <type> <b3:digest> <size>` where type is
    directory, file or executable and size is bytes for files and the number of entries
    below for directories; a symlink prints `<path> symlink <target>` (never followed).
    With --json: {"path", "type", "digest", "size"} per line (symlinks: "target"); a
    path or target that is not UTF-8 also comes as "path_b64"/"target_b64" (exact bytes).
    Paths with control characters, quotes or invalid UTF-8 are quoted in text output.
    Fifos, sockets and devices are refused with an error naming the path, or skipped
    with a warning on stderr with --skip-special. --exclude takes gitignore patterns
    (`*.pyc`, `build/`, `/top-only`, `!keep.pyc`), matched below each PATH.
    With --tar FILE (- for standard input): the archive's one top-level directory.
    A file whose device, inode, size, mtime, ctime and mode are those recorded by the
    last import of the same PATH (and whose blob the store still has) is not read
    again (cache in $XDG_CACHE_HOME/castore_di/import); --rehash reads every file.
    """
    if bool(tar) == bool(paths):
        raise click.UsageError("give PATHS or --tar FILE (one of them)")
    from castore_di.cli.roots import check_name, record_name

    check_name(name, 1 if tar else len(paths))

    def warn(message: str) -> None:
        click.echo(f"castore: warning: {message}", err=True)

    async def run() -> None:
        if tar:
            from castore_di.cli.archive import import_tar

            tree, size = await import_tar(ctx, tar, as_json)
            if name:
                await record_name(ctx, name, tree, size)
            return
        from castore_di.importcache import ImportCache

        blob, dirs = ctx.blob_service(), ctx.directory_service()
        cache = None if no_cache else ImportCache(reuse=not rehash)
        for path in paths:
            bar = Progress(f"importing {quote_name(path)}", enabled=progress)
            stats = ImportStats()
            try:
                _name, node = await ingest_path(blob, dirs, path, concurrency=concurrency, progress=bar, stats=stats,
                                                exclude=excludes, skip_special=skip_special, warn=warn,
                                                cache=cache, workers=workers)
            finally:
                bar.finish()
            if name:
                await record_name(ctx, name, node, stats.bytes)
            if as_json:
                click.echo(json_line(node_json(path, node)))
            else:
                click.echo(node_line(path, node))

    run_async(ctx, run)


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    """A byte count: digits with an optional K, M, G or T suffix (powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self._UNITS and text[-1:] else ""
        digits = text[: len(text) - len(unit)]
        if not digits.isdigit():
            self.fail(f"{value!r} is not a size (e.g. 1000000, 512M, 10G)", param, ctx)
        return int(digits) * self._UNITS[unit]


@cli.command("export")
@click.argument("source")
@click.argument("dest", type=click.Path(), required=False)
@click.option("--tar", "tar", metavar="FILE|-", help="Write the directory as a deterministic tar instead of DEST.")
@click.option("--tar-top", metavar="NAME", help="With --tar: the top-level directory's name (default: the digest in hex).")
@click.option("--directory", "form", flag_value="directory", help="SOURCE is a directory digest.")
@click.option("--file", "form", flag_value="file", help="SOURCE is a blob digest; DEST becomes one file.")
@click.option("--symlink", "form", flag_value="symlink", help="SOURCE is a symlink target; DEST becomes the symlink.")
@click.option("--executable", is_flag=True, help="With --file: make DEST executable.")
@click.option("-f", "--force", is_flag=True,
              help="Write into a non-empty DEST directory (same-named files are replaced, "
                   "directories reused, symlinks in the way refused), or replace an existing file/symlink DEST.")
@click.option("-j", "--concurrency", type=click.IntRange(1, 1024), default=DEFAULT_CONCURRENCY, show_default=True,
              help="Worker threads writing files (at most 3 from the embedded store, 8 otherwise).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when it is a terminal).")
@click.option("--max-size", type=ByteSize(), default=None,
              help="Refuse a tree that expands to more bytes than this (e.g. 10G); the free space at DEST "
                   "is always checked.")
@pass_ctx
def export_command(ctx: CliContext, source: str, dest: str | None, tar: str | None, tar_top: str | None,
                   form: str | None, executable: bool, force: bool, concurrency: int, progress: bool | None,
                   max_size: int | None) -> None:
    """Materialize a stored node at DEST.

    Without --directory/--file/--symlink, SOURCE is a digest looked up as a directory
    first, then as a blob. A directory is written into DEST, which must not exist or be
    empty unless --force; every blob is verified (size and BLAKE3), a file that fails the
    check is removed again (with --force files are written under a temporary name and
    renamed over the old ones), symlinks are created as
    symlinks and never followed, and names that could escape DEST are refused. The size
    the tree expands to is computed first: more than --max-size or the free space at DEST
    is refused before anything is written.
    With --tar FILE (- for standard output) a directory is written as one tar, streamed.
    """
    if (dest is None) == (tar is None):
        raise click.UsageError("give DEST or --tar FILE (one of them)")
    if tar is not None:
        from castore_di.cli.archive import export_tar

        digest = DIGEST.convert(source, None, click.get_current_context())
        run_async(ctx, lambda: export_tar(ctx, digest, tar, tar_top))
        return
    assert dest is not None
    if form == "symlink":
        export_symlink(SymlinkNode(os.fsencode(source)), dest, replace=force)
        return
    click_ctx = click.get_current_context()
    digest = DIGEST.convert(source, next(p for p in click_ctx.command.params if p.name == "source"), click_ctx)
    if executable and form not in ("file", None):
        raise click.UsageError("--executable only applies to a file")

    async def run() -> None:
        blob, dirs = ctx.blob_service(), ctx.directory_service()
        kind = form
        if kind is None:
            kind = "directory" if await dirs.get(digest) is not None else "file"
        if kind == "directory":
            if executable:
                raise click.UsageError("--executable only applies to a file")
            bar = Progress(f"exporting {digest}", enabled=progress)
            # The closure's ~10 objects per entry live until the export ends and it makes few
            # garbage cycles: collecting meanwhile would only rescan them (0.1-0.3 s on the
            # stdlib tree). This process ends after the command.
            gc.disable()
            try:
                await export_directory(blob, dirs, digest, dest, merge=force, concurrency=concurrency,
                                       progress=bar if bar.enabled else None, max_size=max_size)
            finally:
                gc.enable()
                bar.finish()
            return
        reader = await blob.open_read(digest)
        if reader is None:
            what = "blob" if form == "file" else "directory or blob"
            raise StorageError(f"{what} {digest} not found")
        async with reader:
            size = reader.size
        await export_file(blob, FileNode(digest, size, executable), dest, replace=force)

    run_async(ctx, run)
