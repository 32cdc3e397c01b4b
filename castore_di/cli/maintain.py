"""``castore fsck`` and ``castore gc``: the backends' own maintenance, where they have it."""

from __future__ import annotations

from typing import Any

import click

from castore_di.cli import NothingCheckedError, cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.cli.params import DigestParam
from castore_di.errors import IntegrityError
from castore_di.maintenance import Checkable, Collectable, Compactable, DirectoryListing

__all__ = ["fsck_command", "gc_command"]


def _name(kind: str, ctx: CliContext) -> str:
    addr = ctx.blob_addr if kind == "blob" else ctx.directory_addr
    return addr or (ctx.blob_name if kind == "blob" else ctx.directory_name)


def _label(kind: str, ctx: CliContext, service: Any) -> str:
    return f"{kind} service {_name(kind, ctx)} ({type(service).__name__})"


@cli.command("fsck")
@click.option("--blobs/--no-blobs", default=True, show_default=True, help="Check the blob service.")
@click.option("--directories/--no-directories", default=True, show_default=True,
              help="Check the directory service.")
@click.option("--refs/--no-refs", default=True, show_default=True,
              help="Check that the directories' references resolve (blobs with their sizes, child "
                   "directories).")
@click.option("--root", "roots", multiple=True, type=DigestParam(),
              help="A directory whose closure the reference check follows (for directory services that "
                   "cannot list what they store, e.g. grpc). Repeatable.")
@pass_ctx
def fsck_command(ctx: CliContext, blobs: bool, directories: bool, refs: bool, roots: tuple[Any, ...]) -> None:
    """Verify everything the selected services store, reading it all.

    Prints one summary line per service (what was checked, then `ok` or the number of
    problems), each problem on its own line below it, and notes that are not damage
    (e.g. chunks `castore gc` would remove). Then, unless --no-refs, the reference check
    over the blob and directory services together: every directory the directory service
    lists (and the closures of --root) must find each file's blob with the entry's size
    and each child directory; each dangling reference is printed as
    `dir b3:… entry "x": blob b3:… missing`.

    Exits 1 when any problem was found, and 3 ("nothing checked for <instance>") when a
    selected service had nothing that could be checked.
    """

    async def run() -> None:
        selected: list[tuple[str, Any]] = []
        if blobs:
            selected.append(("blob", ctx.blob_service()))
        if directories:
            selected.append(("directory", ctx.directory_service()))
        problems = 0
        checked: set[str] = set()
        for kind, service in selected:
            label = _label(kind, ctx, service)
            if not isinstance(service, Checkable):
                click.echo(f"{label}: no consistency check for this backend")
                continue
            report = await service.fsck()
            checked.add(kind)
            problems += len(report.problems)
            click.echo(f"{label}: {report.summary()}")
            for problem in report.problems:
                click.echo(f"  {problem}")
            for note in report.notes:
                click.echo(f"  note: {note}")
        if refs and directories:
            from castore_di.refcheck import check_references

            dirs = ctx.directory_service()
            blob_service = ctx.blob_service() if blobs else None
            if isinstance(dirs, DirectoryListing) or roots:
                ref_report = await check_references(blob_service, dirs, list(roots))
                checked.add("directory")
                if blob_service is not None:
                    checked.add("blob")
                problems += len(ref_report.problems)
                click.echo(f"{ref_report.summary()}")
                for problem in ref_report.problems:
                    click.echo(f"  {problem}")
            else:
                click.echo(f"references: {_label('directory', ctx, dirs)} cannot list its directories; "
                           "give --root to check closures")
        if problems:
            raise IntegrityError(f"fsck found {problems} problem{'s' if problems != 1 else ''}")
        unchecked = [f"{kind} service {_name(kind, ctx)}" for kind, _ in selected if kind not in checked]
        if unchecked:
            raise NothingCheckedError(f"nothing checked for {', '.join(unchecked)}")

    run_async(ctx, run)


@cli.command("gc")
@click.option("-n", "--dry-run", is_flag=True, help="Print the chunks that would be removed; remove nothing.")
@click.option("--compact", is_flag=True,
              help="Then rewrite the store compactly so its file shrinks (embedded; refused while another "
                   "process has the store open).")
@pass_ctx
def gc_command(ctx: CliContext, dry_run: bool, compact: bool) -> None:
    """Remove blob data that no blob refers to (chunks of writes that never finished).

    Safe while other processes write to the same store: chunks of writes still in progress
    are kept; chunks of writers that died (their lock is gone) are removed. With --dry-run,
    the digest of each chunk that would be removed is printed, one per line, then the
    summary. Removing frees space inside the store for later writes; --compact then
    rewrites the store (a copy of the pages in use, swapped in atomically) so the file
    itself shrinks. A backend without garbage collection exits 3 ("nothing checked for
    <instance>").
    """
    if compact and dry_run:
        raise click.UsageError("--compact and --dry-run exclude each other")

    async def run() -> None:
        service = ctx.blob_service()
        label = _label("blob", ctx, service)
        if not isinstance(service, Collectable):
            click.echo(f"{label}: no garbage collection for this backend (nothing removed)")
            raise NothingCheckedError(f"nothing checked for blob service {_name('blob', ctx)}")
        report = await service.gc(dry_run=dry_run)
        if dry_run:
            for digest in report.removed:
                click.echo(digest)
        click.echo(f"{label}: {report.summary()}")
        if compact:
            if not isinstance(service, Compactable):
                click.echo(f"{label}: no compaction for this backend")
                raise NothingCheckedError(f"nothing compacted for blob service {_name('blob', ctx)}")
            before, after = await service.compact()
            click.echo(f"{label}: compacted, {before} -> {after} bytes on disk")

    run_async(ctx, run)
