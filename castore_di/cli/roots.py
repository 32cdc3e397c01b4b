"""``castore roots``, ``castore forget`` and ``castore prune`` (and ``import --name``)."""

from __future__ import annotations

import json
import time

import click

from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.cli.params import DIGEST
from castore_di.digests import B3Digest
from castore_di.errors import StorageError, ValidationError
from castore_di.nodes import DirectoryNode, FileNode, Node
from castore_di.roots import NamedRoot, named_roots, prune, validate_root_name

__all__ = ["roots_command", "forget_command", "prune_command", "record_name", "check_name"]


def check_name(name: str | None, paths: int) -> None:
    """Validate ``import --name`` before anything is imported."""
    if name is None:
        return
    if paths != 1:
        raise click.UsageError("--name names one tree: give exactly one PATH (or --tar)")
    try:
        validate_root_name(name)
    except ValidationError as e:
        raise click.BadParameter(str(e), param_hint="--name") from e


async def record_name(ctx: CliContext, name: str, node: Node, size: int) -> None:
    """Record ``node`` under ``name``; a replaced name is reported on stderr."""
    if not isinstance(node, (DirectoryNode, FileNode)):
        raise click.UsageError("--name: a symlink cannot be a named root")
    root = NamedRoot(name=name, digest=node.digest, created=time.time(), size=size,
                     entries=node.size if isinstance(node, DirectoryNode) else 0)
    old = await named_roots(ctx.directory_service()).set_root(root)
    if old is not None and old.digest != root.digest:
        click.echo(f"castore: root {name!r} now names {root.digest} (was {old.digest})", err=True)


@cli.command("roots")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per root.")
@pass_ctx
def roots_command(ctx: CliContext, as_json: bool) -> None:
    """List named roots: `<name> <b3:digest> <created (UTC)> <bytes>`, sorted by name.

    Roots are named by `castore import --name NAME` and dropped by `castore forget NAME`;
    `castore prune` keeps what they reach. Only the embedded store keeps names.
    """

    async def run() -> None:
        for root in await named_roots(ctx.directory_service()).list_roots():
            data = root.to_json()
            if as_json:
                click.echo(json.dumps(data))
            else:
                click.echo(f"{root.name} {root.digest} {data['created']} {root.size}")

    run_async(ctx, run)


@cli.command("forget")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def forget_command(ctx: CliContext, names: tuple[str, ...]) -> None:
    """Drop named roots (the trees stay until `castore prune`). An unknown name is an error."""

    async def run() -> None:
        roots = named_roots(ctx.directory_service())
        missing = []
        for name in names:
            old = await roots.forget_root(name)
            if old is None:
                missing.append(name)
            else:
                click.echo(f"forgot {name} {old.digest}")
        if missing:
            raise StorageError(f"no root named {', '.join(repr(m) for m in missing)}")

    run_async(ctx, run)


@cli.command("prune")
@click.option("-n", "--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
@click.option("--keep", "keep", multiple=True, type=DIGEST, help="Also keep this tree (or blob). Repeatable.")
@click.option("--all-unnamed", is_flag=True,
              help="Run even when the store has no named roots (then only --keep is kept).")
@click.option("--wait", "wait", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Give up after waiting this long for other processes to close the store (default: wait).")
@pass_ctx
def prune_command(ctx: CliContext, dry_run: bool, keep: tuple[B3Digest, ...], all_unnamed: bool,
                  wait: float | None) -> None:
    """Delete every blob, chunk and directory not reachable from a named root or --keep.

    Refuses when the store has no named roots unless --keep or --all-unnamed says what to
    keep. Waits until no other process uses the store (an import, a server, a mount) and
    holds it alone while it runs (other processes are refused meanwhile), so nothing a
    running import writes is lost. `castore gc` is the
    other, always-safe cleanup: only data that no blob or writer can reach.
    """

    async def run() -> None:
        def waiting() -> None:
            click.echo("castore: waiting for other processes to close the store (an import, a server, a mount)",
                       err=True)

        report = await prune(ctx.blob_service(), ctx.directory_service(), keep=list(keep),
                             all_unnamed=all_unnamed, dry_run=dry_run, wait=wait, on_wait=waiting)
        click.echo(report.summary())

    run_async(ctx, run)
