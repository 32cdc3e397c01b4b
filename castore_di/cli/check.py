"""``castore check``, ``castore graph`` and ``castore schema``: configs without building services."""

from __future__ import annotations

import json

import click

from castore_di.cli import cli, pass_ctx
from castore_di.cli.context import CliContext
from castore_di.composition import CompositionGraph, load_graph
from castore_di.composition.draw import to_dot, to_mermaid, to_tree
from castore_di.composition.schema import config_schema
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
@pass_ctx
def check_command(ctx: CliContext, config: str | None, quiet: bool) -> None:
    """Validate CONFIG without building any service and print its instance tree.

    Types, fields, values, references and cycles are checked; the first problem is
    reported with its path (e.g. `blobservices.default.remote: unknown instance 'x'`)
    and the exit code is 2. CONFIG defaults to --config / CASTORE_CONFIG.
    """
    path, graph = _load(ctx, config)
    if quiet:
        return
    named = [i for i in graph if not i.anonymous]
    anonymous = len(graph.instances) - len(named)
    click.echo(f"{path}: ok, {len(named)} instances" + (f" (+{anonymous} from URLs)" if anonymous else ""))
    click.echo(to_tree(graph), nl=False)


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
