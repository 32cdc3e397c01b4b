"""The layout, checked on the source: no import loops, engines know no service kind, the
server shares only the wire module with the client, composition imports no service module.

Imports are read with ``ast`` as Python runs them at import time: module-level statements,
including ``try``/``if`` bodies, but not ``if TYPE_CHECKING:`` blocks or function bodies.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "castore_di"
SERVICE_PACKAGES = ("castore_di.blobservice", "castore_di.directoryservice")
ENGINES = ("castore_di._embedded", "castore_di._objectstore", "castore_di._grpc")


def _modules() -> dict[str, pathlib.Path]:
    out: dict[str, pathlib.Path] = {}
    for path in PACKAGE.rglob("*.py"):
        if "protos" in path.parts:  # generated code
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _import_time_imports(name: str, path: pathlib.Path) -> set[str]:
    """The castore_di modules (and their parent packages) ``name`` imports when it is imported."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(statements: list[ast.stmt]) -> None:
        for st in statements:
            if isinstance(st, ast.If):
                if isinstance(st.test, ast.Name) and st.test.id == "TYPE_CHECKING":
                    continue
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                visit(st.orelse)
                visit(st.finalbody)
                for handler in st.handlers:
                    visit(handler.body)
            elif isinstance(st, ast.Import):
                found.update(alias.name for alias in st.names)
            elif isinstance(st, ast.ImportFrom):
                base = st.module or ""
                if st.level:
                    pkg = name if is_package else name.rsplit(".", 1)[0]
                    for _ in range(st.level - 1):
                        pkg = pkg.rsplit(".", 1)[0]
                    base = f"{pkg}.{base}" if base else pkg
                found.add(base)
                found.update(f"{base}.{a.name}" for a in st.names if f"{base}.{a.name}" in MODULES)

    visit(ast.parse(path.read_text()).body)
    targets: set[str] = set()
    for imported in found:
        parts = imported.split(".")
        for k in range(1, len(parts) + 1):
            target = ".".join(parts[:k])
            if target in MODULES and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


GRAPH = {name: _import_time_imports(name, path) for name, path in MODULES.items()}


def _area(module: str) -> str:
    """``castore_di.<first component>``: a subpackage or a top-level module."""
    return ".".join(module.split(".")[:2])


def test_the_graph_is_read() -> None:
    assert "castore_di.composition.config" in GRAPH["castore_di.blobservice.embedded"]
    assert "castore_di._grpc.wire" in GRAPH["castore_di.server.blob"]


def test_no_module_import_loop() -> None:
    graphlib.TopologicalSorter(GRAPH).prepare()  # raises CycleError naming the loop


def test_no_import_loop_between_packages() -> None:
    """E.g. composition -> blobservice -> composition is refused even if Python copes with it."""
    areas: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        if name == "castore_di":  # the facade re-exports; every area is imported through it
            continue
        for target in targets:
            if target != "castore_di" and _area(target) != _area(name):
                areas.setdefault(_area(name), set()).add(_area(target))
    graphlib.TopologicalSorter(areas).prepare()


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_know_no_service_kind(engine: str) -> None:
    for name, targets in GRAPH.items():
        if name == engine or name.startswith(engine + "."):
            bad = {t for t in targets if t.startswith(SERVICE_PACKAGES) or t == "castore_di.nodes"}
            assert not bad, f"{name} imports {sorted(bad)}"
            source = MODULES[name].read_text()
            assert "Directory.decode" not in source and "decode_index" not in source, name


def test_composition_imports_no_service_module() -> None:
    for name, targets in GRAPH.items():
        if _area(name) == "castore_di.composition":
            bad = {t for t in targets if t.startswith(SERVICE_PACKAGES)}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_the_server_imports_no_client() -> None:
    clients = {"castore_di._grpc.channel", "castore_di.blobservice.grpc", "castore_di.directoryservice.grpc"}
    for name, targets in GRAPH.items():
        if _area(name) == "castore_di.server":
            assert not targets & clients, f"{name} imports {sorted(targets & clients)}"


def test_only_the_registry_defaults_list_backends() -> None:
    """A module naming a backend module by its dotted path is a registry default."""
    for name, path in MODULES.items():
        text = path.read_text()
        named = [tag for tag in ("blobservice.objectstore:", "directoryservice.bigtable:") if tag in text]
        if named:
            assert name in SERVICE_PACKAGES, f"{name} lists backends ({named})"
