"""``castore check``, ``graph`` and ``schema``; config-only commands, run in-process."""

from __future__ import annotations

import json
import pathlib
from typing import Any, ClassVar

import attrs
import jsonschema
import pytest

from castore_di.cli import main
from castore_di.composition import BlobServiceConfig, Registry, default_registry, load_graph, reference
from castore_di.composition.config import reference_fields
from castore_di.composition.draw import to_dot, to_mermaid, to_tree
from castore_di.composition.schema import config_schema

CONFIG = """\
blobservices:
  local: {type: memory}
  default: {type: combined, local: local, remote: "memory://"}
directoryservices:
  default: {type: cache, near: "memory://", far: memory}
  memory: {type: memory}
"""


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.fixture
def config(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "castore.yaml"
    path.write_text(CONFIG)
    return path


def test_check_prints_the_instance_tree(capsys: pytest.CaptureFixture[str], config: pathlib.Path) -> None:
    code, out, err = run(capsys, "check", str(config))
    assert (code, err) == (0, "")
    assert out == (
        f"{config}: ok, 4 instances (+2 from URLs)\n"
        "blobservices\n"
        "├── default (combined)\n"
        "│   ├── local -> blobservices.local (memory)\n"
        "│   └── remote -> memory:// (memory)\n"
        "└── local (memory)\n"
        "directoryservices\n"
        "├── default (cache)\n"
        "│   ├── far -> directoryservices.memory (memory)\n"
        "│   └── near -> memory:// (memory)\n"
        "└── memory (memory)\n"
    )
    assert run(capsys, "check", "-q", str(config))[:2] == (0, "")
    # The global --config is the default CONFIG.
    assert run(capsys, "--config", str(config), "check", "-q")[0] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blobservices:\n  default: {type: combined, local: nope, remote: 'memory://'}\n",
         "blobservices.default.local: unknown instance 'nope' (known: default)"),
        ("blobservices:\n  default: {type: memroy}\n", "blobservices.default.type: unknown type 'memroy'"),
        ("blobservices:\n  default: {type: memory, extra: 1}\n", "blobservices.default: unknown field 'extra'"),
        ("blobservices:\n  a: {type: combined, local: b, remote: b}\n  b: {type: combined, local: a, remote: a}\n",
         "reference cycle: blobservices.a -> blobservices.b -> blobservices.a"),
        ("blobservice: {}\n", "unknown section 'blobservice'"),
        ("blobservices: [\n", "malformed YAML"),
    ],
)
def test_check_refuses_bad_configs_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "check", str(path))
    assert code == 2 and out == ""
    assert err.startswith("castore: ") and message in err and err.count("\n") == 1


def test_check_without_config_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASTORE_CONFIG", raising=False)
    code, _out, err = run(capsys, "check")
    assert code == 2 and "CONFIG" in err


def test_check_builds_nothing(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    # An embedded store whose directory would be created on build: check leaves no trace.
    data = tmp_path / "never-created"
    path = tmp_path / "c.yaml"
    path.write_text(f"blobservices:\n  default: 'objectstore+file://{data}'\n")
    assert run(capsys, "check", str(path))[0] == 0
    assert not data.exists()


def test_graph_dot_and_mermaid(capsys: pytest.CaptureFixture[str], config: pathlib.Path) -> None:
    code, dot, _ = run(capsys, "graph", str(config), "--format", "dot")
    assert code == 0
    assert dot.startswith('digraph "castore" {') and dot.rstrip().endswith("}")
    assert '"blobservices.default" -> "blobservices.local" [label="local"];' in dot
    assert '"blobservices.default" -> "blobservices.default.remote" [label="remote"];' in dot
    assert 'subgraph "cluster_directoryservices"' in dot and "style=dashed" in dot

    code, mermaid, _ = run(capsys, "graph", str(config), "--format", "mermaid")
    assert code == 0 and mermaid.startswith("flowchart LR\n")
    assert "subgraph blobservices" in mermaid and '-->|"local"|' in mermaid
    graph = load_graph(config)
    assert mermaid == to_mermaid(graph) and dot == to_dot(graph)
    assert run(capsys, "graph", str(config), "--format", "tree")[1] == to_tree(graph)


def test_draw_escapes_labels() -> None:
    graph = load_graph({"blobservices": {"default": 'memory://'}})
    assert to_dot(graph, name='a"b').startswith('digraph "a\\"b" {')


def test_schema_validates_real_configs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for kind in ("blobservices", "directoryservices"):
        for tag in default_registry().tags(kind):
            assert f"{kind}.{tag}" in schema["$defs"]

    import yaml

    validator.validate(yaml.safe_load(CONFIG))
    bad = [
        {"blobservices": {"default": {"type": "memory", "extra": 1}}},
        {"blobservices": {"default": {"type": "memroy"}}},
        {"blobservices": {"default": {"type": "combined", "local": "a"}}},  # remote is required
        {"blobservices": {"default": {"type": "combined", "local": 1, "remote": "b"}}},
        {"blobservice": {}},
        {"blobservices": {"1bad": {"type": "memory"}}},
    ]
    for config in bad:
        assert list(validator.iter_errors(config)), config


def test_schema_describes_every_field_of_every_builtin_type() -> None:
    """Descriptions come from the reader the README uses (metadata, attribute docstrings, sections)."""
    from castore_di.composition.docs import builtin_registry, field_docs

    registry = builtin_registry()
    schema = config_schema(registry)
    undocumented = []
    for kind in ("blobservices", "directoryservices"):
        for tag in registry.tags(kind):
            definition = schema["$defs"][f"{kind}.{tag}"]
            assert definition.get("description"), f"{kind}.{tag}"
            for name, prop in definition["properties"].items():
                if not prop.get("description", "").strip():
                    undocumented.append(f"{kind}.{tag}.{name}")
            docs = field_docs(registry.resolve(kind, tag))
            for name, doc in docs.items():
                if name in definition["properties"] and name not in reference_fields(registry.resolve(kind, tag)):
                    assert definition["properties"][name].get("description", "") == doc
    assert not undocumented, f"fields without a description: {', '.join(undocumented)}"


def test_schema_of_a_third_party_type() -> None:
    @attrs.frozen(kw_only=True)
    class ThirdPartyBlobServiceConfig(BlobServiceConfig):
        """A plugin's blob service.

        More text that is not the summary.

        Attributes:
            retries: how often to retry.
        """

        type_tag: ClassVar[str] = "thirdparty"
        endpoint: str
        retries: int = 3
        ratio: float = 0.5
        verify: bool = True
        tags: list[str] = attrs.field(factory=list)
        mode: str | None = None
        """how to connect"""
        backing: str = reference("blobservices", doc="where misses go")

        def build(self, backing: Any) -> Any:  # pragma: no cover - not built here
            return backing

    registry = Registry()
    registry.register("blobservices", "memory", "castore_di.blobservice.memory:MemoryBlobServiceConfig")
    registry.register("blobservices", "thirdparty", ThirdPartyBlobServiceConfig)
    registry.register("blobservices", "broken", "no_such_module_xyz:Config")
    schema = config_schema(registry)
    jsonschema.Draft202012Validator.check_schema(schema)
    d = schema["$defs"]["blobservices.thirdparty"]
    assert d["description"] == "A plugin's blob service."
    assert d["additionalProperties"] is False
    assert d["required"] == ["type", "endpoint", "backing"]
    props = d["properties"]
    assert props["type"]["const"] == "thirdparty" and "thirdparty" in props["type"]["description"]
    assert props["endpoint"] == {"type": "string"}
    assert props["retries"] == {"type": "integer", "default": 3, "description": "how often to retry."}
    assert props["ratio"] == {"type": "number", "default": 0.5}
    assert props["verify"] == {"type": "boolean", "default": True}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert props["mode"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None,
                             "description": "how to connect"}
    assert props["backing"]["type"] == "string" and "where misses go" in props["backing"]["description"]
    assert "unavailable" in schema["$defs"]["blobservices.broken"]["description"]

    v = jsonschema.Draft202012Validator(schema)
    v.validate({"blobservices": {"x": {"type": "thirdparty", "endpoint": "e", "backing": "memory://"}}})
    assert list(v.iter_errors({"blobservices": {"x": {"type": "thirdparty", "endpoint": "e", "backing": "m",
                                                          "retries": "3"}}}))
