"""Composition: configs -> validated graph -> dependency-injector container."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
from typing import Any

import pytest
from dependency_injector import providers
from dependency_injector.wiring import Provide, inject

import castore_di
from castore_di import ConfigError, CycleError, load_container, load_graph
from castore_di.blobservice.base import BlobService
from castore_di.blobservice.combined import CombinedBlobService
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition import blob_service_from_addr, directory_service_from_addr
from castore_di.errors import InstantiationError, UnknownFieldError, UnknownInstanceError, UnknownTypeError
from tests import recording


@pytest.fixture(autouse=True)
def _clear_events() -> None:
    recording.EVENTS.clear()


REFERENCE_EXAMPLE = {
    "blobservices": {
        "root": {"type": "memory"},
        "root2": {"type": "memory"},
        "default": {"type": "combined", "local": "root", "remote": "root2"},
    }
}


async def test_reference_composition_example() -> None:
    container = load_container(REFERENCE_EXAMPLE)
    default = container.blob_service("default")
    assert isinstance(default, CombinedBlobService)
    assert default.local is container.blobservices.root()
    digest = await default.put(b"Hello World")
    assert await default.read_bytes(digest) == b"Hello World"
    assert await container.blobservices.root().has(digest)  # writes go to local
    assert not await container.blobservices.root2().has(digest)
    await container.aclose()


async def test_combined_populates_local_from_remote() -> None:
    container = load_container(REFERENCE_EXAMPLE)
    default = container.blob_service()
    remote = container.blob_service("root2")
    digest = await remote.put(b"only remote")
    assert not await container.blob_service("root").has(digest)
    assert await default.read_bytes(digest) == b"only remote"
    assert await container.blob_service("root").has(digest)


def test_reference_recursion_example_is_refused_before_building() -> None:
    config = {
        "blobservices": {
            "default": {"type": "peer", "label": "default", "peer": "other"},
            "other": {"type": "peer", "label": "other", "peer": "default"},
        }
    }
    with pytest.raises(CycleError) as e:
        load_container(config, recording.registry())
    assert str(e.value) == "reference cycle: blobservices.default -> blobservices.other -> blobservices.default"
    assert e.value.cycle == ["blobservices.default", "blobservices.other", "blobservices.default"]
    assert recording.EVENTS == []


def test_combined_cycle_like_the_reference_test() -> None:
    config = {
        "blobservices": {
            "default": {"type": "combined", "local": "other", "remote": "other"},
            "other": {"type": "combined", "local": "default", "remote": "default"},
        }
    }
    with pytest.raises(CycleError, match="blobservices.default -> blobservices.other -> blobservices.default"):
        load_container(config)


def test_cycle_across_kinds_and_in_unreferenced_entries() -> None:
    config = {
        "blobservices": {
            "default": {"type": "leaf"},
            "x": {"type": "blob_on_dir", "dirs": "y"},
        },
        "directoryservices": {"y": {"type": "dir_on_blob", "blob": "x"}},
    }
    with pytest.raises(CycleError) as e:
        load_container(config, recording.registry())
    assert e.value.cycle == ["blobservices.x", "directoryservices.y", "blobservices.x"]
    assert recording.EVENTS == []


def test_self_reference_is_a_cycle() -> None:
    with pytest.raises(CycleError, match="blobservices.a -> blobservices.a"):
        load_container({"blobservices": {"a": {"type": "peer", "peer": "a"}}}, recording.registry())


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"blobservices": {"default": {"type": "memry"}}}, UnknownTypeError,
         "blobservices.default.type: unknown type 'memry' (known: async_leaf, blob_on_dir, combined, "),
        ({"blobservices": {"default": {"type": "nonsense"}}}, UnknownTypeError,
         "blobservices.default.type: unknown type 'nonsense' (known: async_leaf, blob_on_dir, combined"),
        ({"blobservices": {"default": {"type": "memory", "size": 3}}}, UnknownFieldError,
         "blobservices.default: unknown field 'size'"),
        ({"blobservices": {"a": {"type": "memory"}, "b": "memory://",
                           "default": {"type": "combined", "local": "a", "remote": "x"}}}, UnknownInstanceError,
         "blobservices.default.remote: unknown instance 'x' (known: a, b, default)"),
        ({"blobservices": {"default": {"type": "combined", "local": 1, "remote": "x"}}}, ConfigError,
         "blobservices.default.local: expected str, got int 1"),
        ({"blobservices": {"default": {"type": "combined", "local": "default", "remote": "default",
                                       "populate_local": "false"}}}, ConfigError,
         "blobservices.default.populate_local: expected bool, got str 'false'"),
        ({"blobservices": {"default": {"type": "combined", "local": "a"}, "a": "memory://"}}, ConfigError,
         "blobservices.default.remote: required field missing"),
        ({"blobservice": {}}, ConfigError, "blobservice: unknown section 'blobservice' (known: blobservices, directoryservices); did you mean 'blobservices'?"),
        ({"blobservices": {"default": {"local": "a"}}}, ConfigError, "blobservices.default: missing 'type'"),
        ({"blobservices": {"default": "memory://host"}}, ConfigError, "blobservices.default: invalid url"),
        ({"blobservices": {"default": "nosuch://"}}, UnknownTypeError, "blobservices.default: unknown type 'nosuch'"),
        ({"blobservices": {"default": 3}}, ConfigError, "blobservices.default: expected a mapping"),
        ({"blobservices": {"wire": "memory://"}}, ConfigError, "blobservices.wire: invalid instance name"),
        ({"blobservices": {"my-store": "memory://"}}, ConfigError, "blobservices.my-store: invalid instance name"),
        ({"blobservices": {"default": {"type": "positive", "low": 3, "high": 1}}}, ConfigError,
         "blobservices.default: low (3) must not exceed high (1)"),
        ({"directoryservices": {"default": {"type": "cache", "near": "memory://", "far": "nope"}}},
         UnknownInstanceError, "directoryservices.default.far: unknown instance 'nope' (known: default)"),
    ],
)
def test_bad_configs_name_the_path(config: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as e:
        load_container(config, recording.registry())
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    if "memry" in message:
        assert str(e.value).endswith("positive); did you mean 'memory'?") or "did you mean 'memory'?" in str(e.value)


def test_wrong_type_is_one_error_listing_the_rest() -> None:
    with pytest.raises(ConfigError) as e:
        load_graph({"blobservices": {"default": {"type": "leaf", "label": 1, "delay": "x", "bogus": 1}}},
                   recording.registry())
    assert len(getattr(e.value, "errors")) == 3


def test_names_are_scoped_per_kind() -> None:
    container = load_container({"blobservices": {"default": "memory://"}, "directoryservices": {"default": "memory://"}})
    assert isinstance(container.blob_service(), MemoryBlobService)
    assert container.directory_service() is container.directoryservices.default()


def test_url_references_build_anonymous_instances() -> None:
    container = load_container(
        {"blobservices": {"default": {"type": "combined", "local": "memory://", "remote": "memory://"}}}
    )
    default = container.blob_service()
    assert isinstance(default.local, MemoryBlobService) and default.local is not default.remote
    assert container.provider("blobservices.default.local")() is default.local


def test_typed_accessors_by_name() -> None:
    container = load_container({"blobservices": {"default": {"type": "combined", "local": "memory://", "remote": "memory://"}},
                                "directoryservices": {"d": "memory://"}})
    assert container.blob_service() is container.provider("blobservices.default")()
    assert container.blob_service("default.local") is container.blob_service().local  # anonymous, by id
    assert container.directory_service("d") is container.directoryservices.d()
    with pytest.raises(UnknownInstanceError, match="blobservices.nope: unknown instance") as e:
        container.blob_service("nope")
    assert e.value.__context__ is None or e.value.__suppress_context__
    with pytest.raises(UnknownInstanceError, match="directoryservices.default"):
        container.directory_service()
    with pytest.raises(UnknownInstanceError):
        container.directory_service("default.local")  # a blob instance, not a directory one


def test_nested_url_references() -> None:
    graph = load_graph({"directoryservices": {"default": "cache://?near=memory://&far=cache://%3Fnear%3Dmemory://%26far%3Dmemory://"}})
    assert [i.id for i in graph if i.anonymous] == [
        "directoryservices.default.near", "directoryservices.default.far",
        "directoryservices.default.far.near", "directoryservices.default.far.far",
    ] or len([i for i in graph if i.anonymous]) == 4


def test_construction_failure_names_the_instance() -> None:
    container = load_container({"blobservices": {"default": {"type": "peer", "peer": "bad"}, "bad": {"type": "failing"}}},
                               recording.registry())
    with pytest.raises(InstantiationError) as e:
        container.blob_service()
    assert str(e.value).startswith("blobservices.default -> blobservices.bad: cannot build 'failing' service: disk on fire")
    assert isinstance(e.value.__cause__, InstantiationError) and isinstance(e.value.__cause__.__cause__, RuntimeError)


def test_nothing_is_built_until_used() -> None:
    container = load_container({"blobservices": {"a": {"type": "leaf", "label": "a"},
                                                 "b": {"type": "peer", "label": "b", "peer": "a"}}},
                               recording.registry())
    assert recording.EVENTS == []
    container.blob_service("b")
    assert recording.EVENTS == [("build", "a"), ("build", "b")]


def test_concurrent_first_use_from_threads() -> None:
    container = load_container({"blobservices": {"slow": {"type": "leaf", "delay": 0.05},
                                                 "default": {"type": "peer", "peer": "slow"}}},
                               recording.registry())
    results: list[object] = []
    barrier = threading.Barrier(16)

    def use() -> None:
        barrier.wait()
        results.append(container.blob_service())

    threads = [threading.Thread(target=use) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 16 and len({id(r) for r in results}) == 1
    assert [e for e in recording.EVENTS if e[0] == "build"] == [("build", "leaf"), ("build", "peer")]


async def test_concurrent_first_use_from_tasks() -> None:
    container = load_container({"blobservices": {"default": {"type": "leaf"}}}, recording.registry())

    async def use() -> object:
        await asyncio.sleep(0)
        return container.blob_service()

    results = await asyncio.gather(*(use() for _ in range(100)))
    assert len({id(r) for r in results}) == 1
    assert recording.EVENTS == [("build", "leaf")]


def test_override_is_seen_by_dependents_built_after_it() -> None:
    container = load_container({"blobservices": {"local": {"type": "leaf", "label": "real"},
                                                 "remote": "memory://",
                                                 "default": {"type": "combined", "local": "local", "remote": "remote"}}},
                               recording.registry())
    replacement = MemoryBlobService()
    with container.blobservices.local.override(providers.Object(replacement)):
        assert container.blob_service().local is replacement
    # the helper also resets dependents built before the override
    container.reset("blobservices.local")
    before = container.blob_service()
    other = MemoryBlobService()
    with container.override_instance("blobservices.local", other):
        assert container.blob_service().local is other
        assert container.blob_service() is not before
    assert container.blob_service().local is not other


async def test_shutdown_closes_in_reverse_dependency_order() -> None:
    container = load_container({"blobservices": {"a": {"type": "leaf", "label": "a"},
                                                 "b": {"type": "peer", "label": "b", "peer": "a"},
                                                 "c": {"type": "peer", "label": "c", "peer": "b"}}},
                               recording.registry())
    container.blob_service("c")
    await container.aclose()
    assert [e for e in recording.EVENTS if e[0] == "close"] == [("close", "c"), ("close", "b"), ("close", "a")]
    await container.aclose()  # idempotent
    assert len([e for e in recording.EVENTS if e[0] == "close"]) == 3
    container.blob_service("a")  # a new instance after shutdown
    assert recording.EVENTS[-1] == ("build", "a")


@inject
async def _store(data: bytes, blobs: BlobService = Provide["blobservices.default"]) -> castore_di.B3Digest:
    return await blobs.put(data)


async def test_wiring_with_provide() -> None:
    container = load_container(REFERENCE_EXAMPLE)
    container.wire(modules=[__name__])
    try:
        digest = await _store(b"wired")
        assert await container.blob_service().read_bytes(digest) == b"wired"
    finally:
        container.unwire()


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_file_formats_and_env_interpolation(tmp_path: pathlib.Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASTORE_TEST_LOCAL", "a")
    monkeypatch.delenv("CASTORE_TEST_UNSET", raising=False)
    path = tmp_path / f"c{suffix}"
    combined = {"type": "combined", "local": "${CASTORE_TEST_LOCAL}", "remote": "${CASTORE_TEST_UNSET:-b}"}
    if suffix == ".yaml":
        path.write_text("blobservices:\n  a: memory://\n  b: {type: memory}\n  default:\n"
                        "    type: combined\n    local: ${CASTORE_TEST_LOCAL}\n    remote: ${CASTORE_TEST_UNSET:-b}\n")
    elif suffix == ".json":
        path.write_text(json.dumps({"blobservices": {"a": "memory://", "b": {"type": "memory"}, "default": combined}}))
    else:
        path.write_text('[blobservices]\na = "memory://"\nb = { type = "memory" }\n[blobservices.default]\n'
                        'type = "combined"\nlocal = "${CASTORE_TEST_LOCAL}"\nremote = "${CASTORE_TEST_UNSET:-b}"\n')
    container = load_container(path)
    default = container.blob_service()
    assert default.local is container.blob_service("a") and default.remote is container.blob_service("b")


def test_env_interpolation_errors_and_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASTORE_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="blobservices.default.local: environment variable 'CASTORE_TEST_UNSET'"):
        load_graph({"blobservices": {"default": {"type": "combined", "local": "${CASTORE_TEST_UNSET}", "remote": "x"}}})
    from castore_di.composition.loader import interpolate

    assert interpolate({"a": "$${X}", "b": ["${Y:-d}"]}, {}) == {"a": "${X}", "b": ["d"]}


def test_malformed_files(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("blobservices: [unclosed")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_container(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_container(tmp_path / "missing.yaml")
    other = tmp_path / "c.ini"
    other.write_text("")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_container(other)


def test_from_addr_reference_table() -> None:
    good = ["memory://"]
    bad = ["http://foo.example/test", "memory://foo", "memory:///", "memory:///foo"]
    for url in good:
        assert isinstance(blob_service_from_addr(url), MemoryBlobService)
        assert directory_service_from_addr(url) is not None
    for url in bad:
        with pytest.raises(ConfigError):
            blob_service_from_addr(url)
        with pytest.raises(ConfigError):
            directory_service_from_addr(url)
    assert directory_service_from_addr("cache://?near=memory://&far=memory://") is not None
    with pytest.raises(ConfigError):
        directory_service_from_addr("cache://host?near=memory://&far=memory://")
    with pytest.raises(ConfigError):
        blob_service_from_addr("combined://")


def test_registry_api_and_missing_module() -> None:
    reg = recording.registry()
    reg.register("blobservices", "broken", "castore_di_no_such_module:Config")
    with pytest.raises(castore_di.errors.MissingDependencyError, match="blobservices.default.type: cannot import"):
        load_graph({"blobservices": {"default": {"type": "broken"}}}, reg)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("blobservices", "memory", "x:y")
    with pytest.raises(ConfigError, match="unknown service kind"):
        reg.register("blobservice", "x", "x:y")


def test_dependents() -> None:
    graph = load_graph({"blobservices": {"a": "memory://", "b": {"type": "combined", "local": "a", "remote": "a"},
                                         "c": {"type": "combined", "local": "b", "remote": "d"}, "d": "memory://"}})
    assert graph.dependents("blobservices.a") == ["blobservices.b", "blobservices.c"]
    assert graph.dependents("blobservices.d") == ["blobservices.c"]
