"""Drawing a :class:`~castore_di.composition.graph.CompositionGraph`: a text tree, Graphviz dot, Mermaid.

Nodes are instances (named ones solid, anonymous URL instances dashed), grouped by kind;
edges go from an instance to the instances its reference fields name, labelled with the
field (``members[1]``, ``shards[eu]`` for elements of lists and maps). No config value other
than type tags and URLs of anonymous instances is shown, and secrets in those URLs (query
values named like keys, tokens, passwords, signatures; a password in the user part) are
masked, so secrets never end up in documentation.
"""

from __future__ import annotations

from castore_di._redact import redact_url
from castore_di.composition.graph import CompositionGraph, Instance

__all__ = ["to_dot", "to_mermaid", "to_tree", "FORMATS"]


def _by_kind(graph: CompositionGraph) -> dict[str, list[Instance]]:
    out: dict[str, list[Instance]] = {k: [] for k in graph.kinds}
    for iid in sorted(graph.instances):
        inst = graph.instances[iid]
        out.setdefault(inst.kind, []).append(inst)
    return out


def _url(inst: Instance) -> str:
    return redact_url(inst.url or "")


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: CompositionGraph, name: str = "castore") -> str:
    """Graphviz ``digraph`` source: one cluster per kind, reference edges labelled."""
    lines = [f"digraph {_dot_quote(name)} {{", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for kind, instances in _by_kind(graph).items():
        if not instances:
            continue
        lines.append(f"  subgraph {_dot_quote('cluster_' + kind)} {{")
        lines.append(f"    label={_dot_quote(kind)};")
        for inst in instances:
            label = f"{_url(inst)}\n{inst.type_tag}" if inst.anonymous else f"{inst.name}\n{inst.type_tag}"
            style = ", style=dashed" if inst.anonymous else ""
            lines.append(f"    {_dot_quote(inst.id)} [label={_dot_quote(label)}{style}];")
        lines.append("  }")
    for iid in sorted(graph.instances):
        for field, target in sorted(graph.instances[iid].refs.items()):
            lines.append(f"  {_dot_quote(iid)} -> {_dot_quote(target)} [label={_dot_quote(field)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    return text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(graph: CompositionGraph) -> str:
    """A Mermaid ``flowchart``: one subgraph per kind, reference edges labelled."""
    ids = {iid: f"n{i}" for i, iid in enumerate(sorted(graph.instances))}
    lines = ["flowchart LR"]
    for kind, instances in _by_kind(graph).items():
        if not instances:
            continue
        lines.append(f"  subgraph {kind}")
        for inst in instances:
            head = _url(inst) if inst.anonymous else inst.name
            text = f"{_mermaid_text(head)}<br/>{_mermaid_text(inst.type_tag)}"
            shape = f'(["{text}"])' if inst.anonymous else f'["{text}"]'
            lines.append(f"    {ids[inst.id]}{shape}")
        lines.append("  end")
    for iid in sorted(graph.instances):
        for field, target in sorted(graph.instances[iid].refs.items()):
            lines.append(f'  {ids[iid]} -->|"{_mermaid_text(field)}"| {ids[target]}')
    return "\n".join(lines) + "\n"


def to_tree(graph: CompositionGraph) -> str:
    """Named instances per kind, each with its references expanded below it."""
    lines: list[str] = []

    def walk(inst: Instance, prefix: str) -> None:
        refs = sorted(inst.refs.items())
        for i, (field, target) in enumerate(refs):
            last = i == len(refs) - 1
            child = graph.instances[target]
            where = _url(child) if child.anonymous else child.id
            lines.append(f"{prefix}{'└── ' if last else '├── '}{field} -> {where} ({child.type_tag})")
            walk(child, prefix + ("    " if last else "│   "))

    for kind, instances in _by_kind(graph).items():
        named = [i for i in instances if not i.anonymous]
        if not named:
            continue
        lines.append(kind)
        for n, inst in enumerate(named):
            last = n == len(named) - 1
            lines.append(f"{'└── ' if last else '├── '}{inst.name} ({inst.type_tag})")
            walk(inst, "    " if last else "│   ")
    return "\n".join(lines) + "\n"


FORMATS = {"dot": to_dot, "mermaid": to_mermaid, "tree": to_tree}
