"""``castore mount DIGEST MOUNTPOINT``."""

from __future__ import annotations

import click

from castore_di.cli import cli, pass_ctx, run_async
from castore_di.cli.context import CliContext
from castore_di.cli.params import DIGEST
from castore_di.digests import B3Digest

__all__ = ["mount_command"]


@cli.command("mount")
@click.argument("digest", type=DIGEST)
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--debug", is_flag=True, help="libfuse's debug output on stderr.")
@pass_ctx
def mount_command(ctx: CliContext, digest: B3Digest, mountpoint: str, debug: bool) -> None:
    """Mount the directory DIGEST read-only at MOUNTPOINT (FUSE), in the foreground.

    Directories are fetched when first looked up, file reads fetch only the chunks they
    touch (each verified; a corrupted one reads as an I/O error). Works with every
    backend, a remote `castore serve` included. Ctrl-C, SIGTERM or `umount MOUNTPOINT`
    unmount it. Needs /dev/fuse, libfuse3 and pyfuse3 (pip install 'castore_di[mount]').
    """
    from castore_di.mount import mount_tree, require_fuse

    require_fuse()  # before any service is built: the error names what to install

    async def run() -> None:
        await mount_tree(ctx.blob_service(), ctx.directory_service(), digest, mountpoint, debug=debug)

    run_async(ctx, run)
