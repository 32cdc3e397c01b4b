"""``castore fsck`` and ``castore gc``: the backends' own maintenance, where they have it."""

from __future__ import annotations

from typing import Any

import click

from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.errors import IntegrityError
from castore_di.maintenance import Checkable, Collectable

__all__ = ["fsck_command", "gc_command"]


def _label(kind: str, ctx: CliContext, service: Any) -> str:
    addr = ctx.blob_addr if kind == "blob" else ctx.directory_addr
    name = addr or (ctx.blob_name if kind == "blob" else ctx.directory_name)
    return f"{kind} service {name} ({type(service).__name__})"


@cli.command("fsck")
@click.option("--blobs/--no-blobs", default=True, show_default=True, help="Check the blob service.")
@click.option("--directories/--no-directories", default=True, show_default=True,
              help="Check the directory service.")
@pass_ctx
def fsck_command(ctx: CliContext, blobs: bool, directories: bool) -> None:
    """Verify everything the selected services store, reading it all.

    Prints one summary line per service (what was checked, then `ok` or the number of
    problems), each problem on its own line below it, and notes that are not damage
    (e.g. chunks `castore gc` would remove). A backend without a check says so. Exits 1
    when any problem was found.
    """

    async def run() -> None:
        selected: list[tuple[str, Any]] = []
        if blobs:
            selected.append(("blob", ctx.blob_service()))
        if directories:
            selected.append(("directory", ctx.directory_service()))
        problems = 0
        for kind, service in selected:
            label = _label(kind, ctx, service)
            if not isinstance(service, Checkable):
                click.echo(f"{label}: no consistency check for this backend (nothing checked)")
                continue
            report = await service.fsck()
            problems += len(report.problems)
            click.echo(f"{label}: {report.summary()}")
            for problem in report.problems:
                click.echo(f"  {problem}")
            for note in report.notes:
                click.echo(f"  note: {note}")
        if problems:
            raise IntegrityError(f"fsck found {problems} problem{'s' if problems != 1 else ''}")

    run_async(ctx, run)


@cli.command("gc")
@click.option("-n", "--dry-run", is_flag=True, help="Print the chunks that would be removed; remove nothing.")
@pass_ctx
def gc_command(ctx: CliContext, dry_run: bool) -> None:
    """Remove blob data that no blob refers to (chunks of writes that never finished).

    Safe while other processes write to the same store: chunks of writes still in progress
    are kept. With --dry-run, the digest of each chunk that would be removed is printed,
    one per line, then the summary. A backend without garbage collection says so.
    """

    async def run() -> None:
        service = ctx.blob_service()
        label = _label("blob", ctx, service)
        if not isinstance(service, Collectable):
            click.echo(f"{label}: no garbage collection for this backend (nothing removed)")
            return
        report = await service.gc(dry_run=dry_run)
        if dry_run:
            for digest in report.removed:
                click.echo(digest)
        click.echo(f"{label}: {report.summary()}")

    run_async(ctx, run)
