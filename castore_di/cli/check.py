"""``castore check``, ``castore graph`` and ``castore schema``: configs without building services."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from castore_di.cli import cli, pass_ctx
from castore_di.cli.context import CliContext
from castore_di.composition import CompositionGraph, load_graph
from castore_di.composition.draw import to_dot, to_mermaid, to_tree
from castore_di.composition.schema import config_schema
from castore_di.connectivity import ConnectivityReport
from castore_di.errors import ConfigError

__all__ = ["check_command", "graph_command", "schema_command"]


def _load(ctx: CliContext, config: str | None) -> tuple[str, CompositionGraph]:
    path = config or ctx.config_path
    if not path:
        raise click.UsageError("give a CONFIG file (or --config / CASTORE_CONFIG)")
    return path, load_graph(path)


@cli.command("check")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--connect", is_flag=True,
              help="Also build the instances and make one cheap round trip to each backend.")
@click.option("--instance", "instances", multiple=True, metavar="KIND.NAME",
              help="With --connect: check only this instance (and what it needs). Repeatable.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="With --connect: seconds allowed per instance.")
@pass_ctx
def check_command(ctx: CliContext, config: str | None, quiet: bool, connect: bool, instances: tuple[str, ...],
                  timeout: float) -> None:
    """Validate CONFIG without building any service and print its instance tree.

    Types, fields, values, references and cycles are checked; the first problem is
    reported with its path (e.g. `blobservices.default.remote: unknown instance 'x'`)
    and the exit code is 2. CONFIG defaults to --config / CASTORE_CONFIG.

    With --connect, every instance (or each --instance) is built and its backend reached
    once (gRPC health, an object-store listing, the Bigtable table, the embedded store
    opened): one line per instance, ok or failed with the reason, and the latency. Exit
    code 1 names the instances that failed.
    """
    if instances and not connect:
        raise click.UsageError("--instance goes with --connect")
    path, graph = _load(ctx, config)
    if connect:
        _connect(graph, list(instances), timeout, quiet)
        return
    if quiet:
        return
    named = [i for i in graph if not i.anonymous]
    anonymous = len(graph.instances) - len(named)
    click.echo(f"{path}: ok, {len(named)} instances" + (f" (+{anonymous} from URLs)" if anonymous else ""))
    click.echo(to_tree(graph), nl=False)


def _connect(graph: CompositionGraph, instances: list[str], timeout: float, quiet: bool) -> None:
    from castore_di.cli import EXIT_ERROR
    from castore_di.cli.context import import_dependency_injector
    from castore_di.composition import build_container

    import_dependency_injector()
    container = build_container(graph)

    async def main() -> ConnectivityReport:
        try:
            return await container.check_connectivity(timeout=timeout, instance_ids=instances or None)
        finally:
            await container.aclose()

    report = asyncio.run(main())
    for result in report.results:
        if not (quiet and result.ok):
            click.echo(result.line(max(len(r.instance_id) for r in report.results)))
    if not report.ok:
        click.echo(f"castore: unreachable: {', '.join(report.failed)}", err=True)
        sys.exit(EXIT_ERROR)


@cli.command("graph")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid", "tree"]), default="dot", show_default=True)
@pass_ctx
def graph_command(ctx: CliContext, config: str | None, fmt: str) -> None:
    """Draw the composition graph of CONFIG (Graphviz dot, Mermaid, or a text tree).

    Only instance names, type tags and URLs appear, never option values.
    Example: castore graph castore.yaml | dot -Tsvg > castore.svg
    """
    _path, graph = _load(ctx, config)
    if fmt == "dot":
        click.echo(to_dot(graph), nl=False)
    elif fmt == "mermaid":
        click.echo(to_mermaid(graph), nl=False)
    else:
        click.echo(to_tree(graph), nl=False)


@cli.command("schema")
@click.option("--indent", type=click.IntRange(0, 8), default=2, show_default=True)
def schema_command(indent: int) -> None:
    """Print the JSON Schema (draft 2020-12) of the config format.

    Generated from every registered config class, third-party types included. Point an
    editor at it for YAML completion, e.g. `# yaml-language-server: $schema=castore.schema.json`.
    """
    try:
        schema = config_schema()
    except ConfigError:
        raise
    click.echo(json.dumps(schema, indent=indent or None, sort_keys=False))
