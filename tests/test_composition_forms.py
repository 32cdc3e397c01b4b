"""Reference forms (one, optional, list, map) and registrable kinds, through graph, container, docs."""

from __future__ import annotations

import pathlib
from typing import Any, ClassVar

import attrs
import jsonschema
import pytest
from dependency_injector import providers

from castore_di import ConfigError, CycleError, load_container, load_graph
from castore_di.blobservice.base import BlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.blobservice.mirrored import MirroredBlobService
from castore_di.blobservice.sharded import ShardedBlobService
from castore_di.cli import main
from castore_di.composition import (
    BlobServiceConfig,
    Registry,
    ServiceConfig,
    default_registry,
    reference,
)
from castore_di.composition import ReferenceListOrMap, reference_list, reference_map
from castore_di.composition.docs import render_types
from castore_di.composition.draw import to_dot, to_mermaid, to_tree
from castore_di.composition.schema import config_schema
from castore_di.directoryservice.base import DirectoryService
from castore_di.errors import UnknownInstanceError, UnknownTypeError

# -- a type using every form ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EveryFormConfig(BlobServiceConfig):
    """A test type with one reference of each form."""

    type_tag: ClassVar[str] = "everyform"
    one: str = reference("blobservices", doc="exactly one")
    maybe: str | None = reference("blobservices", optional=True, doc="zero or one")
    many: tuple[str, ...] = reference_list("blobservices", doc="in order")
    named: dict[str, str] = reference_map("directoryservices", doc="by name")
    either: ReferenceListOrMap = reference_map("blobservices", allow_list=True, doc="a list or a map")

    def build(self, **deps: Any) -> Any:
        service = MemoryBlobService()
        service.deps = deps  # type: ignore[attr-defined]
        return service


def _registry() -> Registry:
    reg = default_registry().copy()
    reg.register("blobservices", "everyform", EveryFormConfig)
    return reg


def test_every_form_is_wired_as_provider_arguments() -> None:
    config = {
        "blobservices": {
            "a": "memory://", "b": "memory://",
            "default": {"type": "everyform", "one": "a", "maybe": None, "many": ["b", "memory://", "a"],
                        "named": {"x": "d", "y": "memory://"}, "either": ["a", "memory://"]},
        },
        "directoryservices": {"d": "memory://"},
    }
    container = load_container(config, _registry())
    kwargs = container._slots["blobservices.default"].deps  # the provider arguments of the instance
    assert kwargs["one"] is container.provider("blobservices.a")
    assert isinstance(kwargs["maybe"], providers.Object) and kwargs["maybe"]() is None
    assert isinstance(kwargs["many"], providers.List)
    assert isinstance(kwargs["named"], providers.Dict) and isinstance(kwargs["either"], providers.Dict)
    deps = container.blob_service().deps
    a, b = container.blob_service("a"), container.blob_service("b")
    assert deps["one"] is a and deps["maybe"] is None
    assert deps["many"][0] is b and deps["many"][2] is a
    assert deps["many"][1] is container.blob_service("default.many[1]")
    assert isinstance(deps["many"][1], MemoryBlobService) and deps["many"][1] not in (a, b)
    assert deps["named"]["x"] is container.directory_service("d")
    # A directory held by a blob instance: the holder's kind is part of its name (unique ids).
    assert deps["named"]["y"] is container.directory_service("blobservices.default.named[y]")
    assert list(deps["either"]) == ["a", "memory://"] and deps["either"]["a"] is a
    # an absent optional reference and empty collections
    container = load_container({"blobservices": {"a": "memory://", "default": {"type": "everyform", "one": "a"}}},
                               _registry())
    deps = container.blob_service().deps
    assert deps == {"one": container.blob_service("a"), "maybe": None, "many": [], "named": {}, "either": {}}
    container = load_container({"blobservices": {"a": "memory://", "default": {"type": "everyform", "one": "a",
                                                                                "maybe": "a"}}}, _registry())
    assert container.blob_service().deps["maybe"] is container.blob_service("a")


def test_reference_graph_lists_every_edge_and_dependents() -> None:
    graph = load_graph({"blobservices": {"a": "memory://", "b": "memory://",
                                         "m": {"type": "mirrored", "members": ["a", "b"]},
                                         "s": {"type": "sharded", "shards": {"left": "m", "right": "memory://"}}}})
    assert dict(graph.instances["blobservices.s"].refs) == {
        "shards[left]": "blobservices.m", "shards[right]": "blobservices.s.shards[right]"}
    assert graph.dependents("blobservices.b") == ["blobservices.m", "blobservices.s"]
    tree = to_tree(graph)
    assert "│   ├── members[0] -> blobservices.a (memory)" in tree and "shards[right] -> memory:// (memory)" in tree
    assert '[label="members[1]"]' in to_dot(graph)
    assert '-->|"shards[left]"|' in to_mermaid(graph)


@pytest.mark.parametrize(
    ("config", "loop"),
    [
        ({"a": {"type": "mirrored", "members": ["memory://", "b"]}, "b": {"type": "readonly", "backend": "a"}},
         "blobservices.a -> blobservices.b (members[1]) -> blobservices.a"),
        ({"a": {"type": "sharded", "shards": {"k": "b"}}, "b": {"type": "mirrored", "members": ["memory://", "a"]}},
         "blobservices.a -> blobservices.b (shards[k]) -> blobservices.a (members[1])"),
        ({"a": {"type": "sharded", "shards": ["memory://", "a"]}}, "blobservices.a -> blobservices.a (shards[1])"),
        ({"a": {"type": "everyform", "one": "memory://", "maybe": "b"}, "b": {"type": "combined", "local": "a",
                                                                             "remote": "memory://"}},
         "blobservices.a -> blobservices.b -> blobservices.a"),
        ({"a": {"type": "everyform", "one": "memory://", "either": {"z": "a"}}},
         "blobservices.a -> blobservices.a (either[z])"),
    ],
    ids=["list", "map", "list-as-map", "optional", "self-map"],
)
def test_cycles_through_every_form_name_the_loop(config: dict[str, Any], loop: str) -> None:
    with pytest.raises(CycleError) as e:
        load_graph({"blobservices": config}, _registry())
    assert str(e.value) == f"reference cycle: {loop}"


@pytest.mark.parametrize(
    ("instance", "error", "message"),
    [
        ({"type": "mirrored", "members": ["memory://"]}, ConfigError,
         "blobservices.default.members: needs at least 2 references, got 1"),
        ({"type": "mirrored", "members": "memory://"}, ConfigError,
         "blobservices.default.members: expected a list, got str 'memory://'"),
        ({"type": "mirrored", "members": ["a", "a"]}, ConfigError, "blobservices.default.members: 'a' is listed twice"),
        ({"type": "mirrored", "members": ["a", 3]}, ConfigError,
         "blobservices.default.members[1]: expected str, got int 3"),
        ({"type": "mirrored", "members": ["a", "nope"]}, UnknownInstanceError,
         "blobservices.default.members[1]: unknown instance 'nope' (known: a, default)"),
        ({"type": "mirrored", "members": ["a", "nosuch://"]}, UnknownTypeError,
         "blobservices.default.members[1]: unknown type 'nosuch'"),
        ({"type": "sharded", "shards": {"x": "nope"}}, UnknownInstanceError,
         "blobservices.default.shards[x]: unknown instance 'nope'"),
        ({"type": "sharded", "shards": {}}, ConfigError, "blobservices.default.shards: needs at least 1 references"),
        ({"type": "sharded", "shards": 3}, ConfigError, "blobservices.default.shards: expected a list or a mapping"),
        ({"type": "sharded", "shards": ["memory://", "memory://"]}, ConfigError,
         "blobservices.default.shards: 'memory://' is listed twice"),
        ({"type": "sharded", "shards": {"x": "a"}, "weights": {"y": 2}}, ConfigError,
         "blobservices.default.weights: weights for unknown shard(s) 'y'"),
        ({"type": "sharded", "shards": {"x": "a"}, "weights": {"x": 0}}, ConfigError,
         "blobservices.default.weights: weights must be positive"),
        ({"type": "everyform", "one": "a", "maybe": 3}, ConfigError, "blobservices.default.maybe: expected str"),
        ({"type": "combined", "local": "a", "remote": "a", "write_to": "all"}, ConfigError,
         "blobservices.default.write_to: expected one of 'local', 'remote', 'both', got str 'all'"),
        ({"type": "memory", "max_bytes": 0}, ConfigError, "blobservices.default"),
        ("readonly+nothing", ConfigError, "blobservices.default: "),
        ("mirrored://?member=memory://&other=1", ConfigError, "blobservices.default: invalid url"),
    ],
)
def test_bad_references_name_the_path(instance: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as e:
        load_graph({"blobservices": {"a": "memory://", "default": instance}}, _registry())
    assert str(e.value).startswith(message), str(e.value)


def test_url_forms() -> None:
    graph = load_graph({
        "blobservices": {
            "x": "memory://",
            "r": "readonly+memory://",
            "r2": "readonly://x",
            "m": "mirrored://?member=memory://&member=x",
            "s": "sharded://?shard=x&shard=memory://%3Fmax_bytes%3D10",
            "bounded": "memory://?max_bytes=100",
        },
        "directoryservices": {"r": "readonly+grpc+http://127.0.0.1:1", "m": "mirrored://?member=memory://&member=memory://",
                              "s": "sharded://?shard=memory://", "bounded": "memory://?max_entries=5"},
    })
    inst = graph.instances
    assert dict(inst["blobservices.r"].refs) == {"backend": "blobservices.r.backend"}
    assert dict(inst["blobservices.r2"].refs) == {"backend": "blobservices.x"}
    assert dict(inst["blobservices.m"].refs) == {"members[0]": "blobservices.m.members[0]", "members[1]": "blobservices.x"}
    assert inst["blobservices.s.shards[1]"].url == "memory://?max_bytes=10"
    assert inst["blobservices.bounded"].config.max_bytes == 100  # type: ignore[attr-defined]
    assert inst["directoryservices.r.backend"].type_tag == "grpc"
    assert inst["directoryservices.bounded"].config.max_entries == 5  # type: ignore[attr-defined]


async def test_built_services_keep_the_config_names() -> None:
    container = load_container({"blobservices": {
        "x": "memory://", "y": "memory://",
        "m": {"type": "mirrored", "members": ["x", "y"]},
        "s": {"type": "sharded", "shards": ["x", "y", "memory://"], "weights": {"y": 3}},
    }})
    m = container.blob_service("m")
    assert isinstance(m, MirroredBlobService) and m.names == ["x", "y"]
    assert m.members == [container.blob_service("x"), container.blob_service("y")]
    s = container.blob_service("s")
    assert isinstance(s, ShardedBlobService) and list(s.shards) == ["x", "y", "memory://"]
    await container.aclose()


# -- the docs, the schema, the CLI -------------------------------------------------------


def test_docs_and_schema_describe_every_form() -> None:
    reg = Registry()
    reg.register("blobservices", "everyform", EveryFormConfig)
    text = render_types(reg)
    assert "| `one` | reference to blobservices (name or URL) | required | exactly one |" in text
    assert "| `maybe` | optional reference to blobservices (name, URL or null) | `null` | zero or one |" in text
    assert "| `many` | list of references to blobservices (names or URLs) | `[]` | in order |" in text
    assert "| `named` | map of name -> reference to directoryservices (name or URL) | `{}` | by name |" in text
    assert "map of name -> reference to blobservices (name or URL; or a list, keyed by each element)" in text
    builtin = render_types()
    assert "| `members` | list of references to blobservices (names or URLs, at least 2) | required |" in builtin

    schema = config_schema(_registry())
    props = schema["$defs"]["blobservices.everyform"]["properties"]
    assert props["maybe"]["anyOf"][1] == {"type": "null"}
    assert props["many"]["type"] == "array" and props["many"]["items"]["type"] == "string"
    assert props["named"]["type"] == "object"
    assert {o["type"] for o in props["either"]["anyOf"]} == {"array", "object"}
    assert schema["$defs"]["blobservices.mirrored"]["properties"]["members"]["minItems"] == 2
    good = {"blobservices": {"a": "memory://", "default": {"type": "everyform", "one": "a", "maybe": None,
                                                          "many": ["a"], "named": {"x": "d"}, "either": ["a"]}}}
    jsonschema.validate(good, schema)
    for bad in ({"type": "everyform", "one": "a", "many": "a"}, {"type": "everyform", "one": "a", "named": ["x"]},
                {"type": "mirrored", "members": ["a"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"blobservices": {"default": bad}}, schema)


def test_castore_graph_and_schema_show_the_forms(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("blobservices:\n  a: memory://\n  default: {type: mirrored, members: [a, 'memory://']}\n"
                    "directoryservices:\n  default: {type: sharded, shards: {one: 'memory://', two: 'memory://'}}\n")
    with pytest.raises(SystemExit) as exc:
        main(["graph", str(path), "--format", "tree"])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None)
    assert "members[1] -> memory:// (memory)" in out and "shards[two] -> memory:// (memory)" in out
    with pytest.raises(SystemExit):
        main(["schema"])
    assert '"minItems": 2' in capsys.readouterr().out


# -- a kind registered by a third party --------------------------------------------------


class PathInfoService:
    """A tiny third-party service kind: path -> root digest, with its blobs and directories."""

    def __init__(self, blobs: BlobService, directories: DirectoryService, fallback: "PathInfoService | None") -> None:
        self.blobs = blobs
        self.directories = directories
        self.fallback = fallback
        self.entries: dict[str, str] = {}

    def lookup(self, path: str) -> str | None:
        found = self.entries.get(path)
        if found is None and self.fallback is not None:
            return self.fallback.lookup(path)
        return found


class PathInfoServiceConfig(ServiceConfig):
    """Base of the ``pathinfoservices`` kind's config classes."""

    kind: ClassVar[str] = "pathinfoservices"


@attrs.frozen(kw_only=True)
class MemoryPathInfoServiceConfig(PathInfoServiceConfig):
    """Path infos in memory, over a blob and a directory service."""

    type_tag: ClassVar[str] = "memory"
    blobs: str = reference("blobservices", doc="where contents are")
    directories: str = reference("directoryservices", doc="where trees are")
    fallback: str | None = reference("pathinfoservices", optional=True, doc="asked on a miss")

    def build(self, blobs: BlobService, directories: DirectoryService,
              fallback: PathInfoService | None) -> PathInfoService:
        return PathInfoService(blobs, directories, fallback)

    @classmethod
    def from_url(cls, url: str) -> "MemoryPathInfoServiceConfig":
        """``memory://`` over the ``default`` blob and directory services."""
        return cls(blobs="default", directories="default")


@attrs.frozen(kw_only=True)
class BlobOverPathInfoConfig(BlobServiceConfig):
    """A blob type that references the new kind (for cross-kind cycles)."""

    type_tag: ClassVar[str] = "via_pathinfo"
    pathinfo: str = reference("pathinfoservices")

    def build(self, pathinfo: PathInfoService) -> BlobService:
        return pathinfo.blobs


def _kind_registry() -> Registry:
    reg = default_registry().copy()
    reg.register_kind(PathInfoServiceConfig)
    reg.register("pathinfoservices", "memory", MemoryPathInfoServiceConfig)
    reg.register("blobservices", "via_pathinfo", BlobOverPathInfoConfig)
    return reg


KIND_CONFIG = {
    "blobservices": {"default": "memory://"},
    "directoryservices": {"default": "memory://"},
    "pathinfoservices": {
        "upstream": {"type": "memory", "blobs": "default", "directories": "default"},
        "default": {"type": "memory", "blobs": "default", "directories": "default", "fallback": "upstream"},
    },
}


async def test_a_registered_kind_gets_a_section_with_the_same_checks() -> None:
    reg = _kind_registry()
    assert reg.kinds() == ("blobservices", "directoryservices", "pathinfoservices")
    container = load_container(KIND_CONFIG, reg)
    default = container.provider("pathinfoservices.default")()
    assert default is container.pathinfoservices.default()
    assert default.blobs is container.blob_service() and default.directories is container.directory_service()
    container.pathinfoservices.upstream().entries["/nix/store/x"] = "b3:..."
    assert default.lookup("/nix/store/x") == "b3:..."
    graph = load_graph(KIND_CONFIG, reg)
    assert "pathinfoservices\n├── default (memory)" in to_tree(graph)
    assert "pathinfoservices.default.fallback" not in graph.instances
    # a URL instance of the new kind
    url_graph = load_graph({"blobservices": {"default": "memory://"}, "directoryservices": {"default": "memory://"},
                            "pathinfoservices": {"default": "memory://"}}, reg)
    assert dict(url_graph.instances["pathinfoservices.default"].refs) == {
        "blobs": "blobservices.default", "directories": "directoryservices.default"}
    await container.aclose()


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"pathinfoservices": {"default": {"type": "memry"}}}, UnknownTypeError,
         "pathinfoservices.default.type: unknown type 'memry' (known: memory); did you mean 'memory'?"),
        ({"pathinfoservices": {"default": {"type": "memory", "blobs": "nope", "directories": "x"}}},
         UnknownInstanceError, "pathinfoservices.default.blobs: unknown instance 'nope' (known: none)"),
        ({"pathinfoservices": {"default": {"type": "memory", "blobs": "a", "directories": "b", "extra": 1}},
          "blobservices": {"a": "memory://"}, "directoryservices": {"b": "memory://"}}, ConfigError,
         "pathinfoservices.default: unknown field 'extra'"),
        ({"pathinfoservice": {}}, ConfigError, "pathinfoservice: unknown section 'pathinfoservice' (known: "
                                               "blobservices, directoryservices, pathinfoservices); did you mean"),
        ({"blobservices": {"b": {"type": "via_pathinfo", "pathinfo": "p"}},
          "directoryservices": {"d": "memory://"},
          "pathinfoservices": {"p": {"type": "memory", "blobs": "b", "directories": "d"}}}, CycleError,
         "reference cycle: blobservices.b -> pathinfoservices.p -> blobservices.b"),
    ],
)
def test_a_registered_kind_is_checked_like_the_built_in_ones(
    config: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as e:
        load_graph(config, _kind_registry())
    assert str(e.value).startswith(message), str(e.value)


def test_kind_registration_rules_and_docs() -> None:
    reg = _kind_registry()
    with pytest.raises(ConfigError, match="already registered"):
        reg.register_kind(PathInfoServiceConfig)

    class NoKind(ServiceConfig):
        pass

    with pytest.raises(ConfigError, match="declaring its own 'kind'"):
        reg.register_kind(NoKind)

    class Reserved(ServiceConfig):
        kind: ClassVar[str] = "graph"

    with pytest.raises(ConfigError, match="taken by the container"):
        reg.register_kind(Reserved)

    class Bad(ServiceConfig):
        kind: ClassVar[str] = "Path-Infos"

    with pytest.raises(ConfigError, match="invalid service kind"):
        reg.register_kind(Bad)
    with pytest.raises(ConfigError, match="is not a pathinfoservices config class"):
        wrong = _kind_registry()
        wrong.register("pathinfoservices", "wrong", "castore_di.blobservice.memory:MemoryBlobServiceConfig")
        load_graph({"pathinfoservices": {"x": {"type": "wrong"}}}, wrong)
    # without the kind, a reference to it is refused with its path
    plain = default_registry().copy()
    plain.register("blobservices", "via_pathinfo", BlobOverPathInfoConfig)
    with pytest.raises(ConfigError, match="blobservices.b.pathinfo: reference to unknown service kind 'pathinfoservices'"):
        load_graph({"blobservices": {"b": {"type": "via_pathinfo", "pathinfo": "p"}}}, plain)
    text = render_types(reg)
    assert "Types of `pathinfoservices`: `memory`." in text
    assert "| `fallback` | optional reference to pathinfoservices (name, URL or null) | `null` | asked on a miss |" in text
    schema = config_schema(reg)
    assert "pathinfoservices" in schema["properties"]
    jsonschema.validate(KIND_CONFIG, schema)


@attrs.frozen(kw_only=True)
class AsyncMemoryConfig(BlobServiceConfig):
    """A memory store whose build is async."""

    type_tag: ClassVar[str] = "async_memory"

    async def build(self) -> MemoryBlobService:
        return MemoryBlobService()


async def test_async_builds_through_lists_and_maps() -> None:
    reg = _registry()
    reg.register("blobservices", "async_memory", AsyncMemoryConfig)
    container = load_container({"blobservices": {
        "x": {"type": "async_memory"},
        "m": {"type": "mirrored", "members": ["x", "memory://"]},
        "s": {"type": "sharded", "shards": {"a": "x", "b": "m"}},
    }}, reg)
    m = await container.ablob_service("m")
    s = await container.ablob_service("s")
    x = await container.ablob_service("x")
    assert isinstance(m, MirroredBlobService) and m.members[0] is x
    assert isinstance(s, ShardedBlobService) and s.shards == {"a": x, "b": m}
    await container.aclose()
