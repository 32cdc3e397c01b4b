"""The ``castore`` command starts without loading what it does not need.

``castore ls``/``cat`` on the embedded store of a YAML config import neither
dependency-injector nor cattrs (services are built by :mod:`castore_di.composition.direct`,
valid plain configs structured by the converter's own hooks), nor protobuf (stored directories are
read in their canonical encoding by :meth:`Directory.decode`), nor asyncio (reads run without an
event loop: :mod:`castore_di._loopless`), nor PyYAML once the config's parse is cached
(:mod:`castore_di.composition.parsecache`), nor the transfer code, the
server, other backends' libraries or importlib.metadata. The timings are in
``benches/import_bench.py`` (start-up rows); these tests only check what is loaded.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import pathlib
import subprocess
import sys
import threading
from typing import Any, cast

import attrs
import pytest

from castore_di import ConfigError, load_container, load_graph
from castore_di._loopless import in_loopless, run_loopless, to_thread
from castore_di.cli import _COMMANDS, _load_commands, cli, main
from castore_di.composition import Registry, default_registry
from castore_di.composition.config import BlobServiceConfig, reference
from castore_di.composition.converter import _converter, _plain_fields, structure_config
from castore_di.composition.direct import direct_instances
from castore_di.composition.registry import _entry_points_may_exist
from castore_di.digests import blake3_digest
from castore_di.errors import InstantiationError, StorageError, UnknownInstanceError

# Never loaded by ls/cat of an embedded store (each is at least a few milliseconds, some far more).
HEAVY = ("dependency_injector", "cattrs", "fastapi", "pydantic", "pydantic_settings", "werkzeug", "grpc",
         "obstore", "google.cloud", "importlib.metadata", "tomllib", "castore_di.exporter", "castore_di.importer",
         "castore_di.cli.transfer", "castore_di.cli.serve", "castore_di.cli.check", "castore_di.server",
         "castore_di.composition.container", "tqdm", "google.protobuf", "castore_di.proto", "asyncio", "yaml",
         "concurrent.futures", "traceback", "castore_di.roots", "castore_di.maintenance")

_PROBE = (
    "import sys, json\n"
    "sys.argv = ['castore', *json.loads(sys.argv[1])]\n"
    "from castore_di.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print(json.dumps({'code': code, 'modules': sorted(sys.modules), 'gc': __import__('gc').isenabled()}),"
    " file=sys.__stderr__)\n"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}


def _probe(*args: str) -> tuple[int, set[str], bytes, bool]:
    """Run ``castore ARGS`` as the console script does; its exit code, modules loaded and stdout."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, env=_env(),
                          timeout=120)
    report = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    return report["code"], set(report["modules"]), proc.stdout, report["gc"]


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


@pytest.fixture
def embedded_store(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    """A YAML config of the embedded store holding a two-file tree: (config, tree digest, blob digest)."""
    config = tmp_path / "castore.yaml"
    data = tmp_path / "data"
    config.write_text(f"blobservices:\n  default: {{type: embedded, path: '{data}'}}\n"
                      f"directoryservices:\n  default: {{type: embedded, path: '{data}'}}\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_bytes(b"alpha\n")
    (tree / "b.txt").write_bytes(b"beta\n")
    out = subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "import", "--json",
                          str(tree)], check=True, capture_output=True, env=_env(), timeout=120).stdout
    root = json.loads(out)["digest"]
    out = subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "import", "--json",
                          str(tree / "a.txt")], check=True, capture_output=True, env=_env(), timeout=120).stdout
    return config, root, json.loads(out)["digest"]


def test_command_map_names_each_commands_module() -> None:
    _load_commands()
    for name, module in _COMMANDS.items():
        command = cli.commands.get(name)
        assert command is not None, f"_COMMANDS lists {name!r}, which no module registers"
        assert command.callback is not None and command.callback.__module__ == f"castore_di.cli.{module}", name


@pytest.mark.parametrize("command", ["ls", "cat"])
def test_ls_and_cat_of_an_embedded_store_load_nothing_heavy(
    command: str, embedded_store: tuple[pathlib.Path, str, str]
) -> None:
    config, root, blob = embedded_store
    code, modules, out, gc_enabled = _probe("--config", str(config), command, root if command == "ls" else blob)
    assert code == 0
    if command == "ls":
        assert b" a.txt\n" in out and b" b.txt\n" in out
    else:
        assert out == b"alpha\n"
    assert "castore_di.cli.inspect" in modules and "lmdb" in modules  # the probe did run the command
    loaded = [name for name in HEAVY if _loaded(modules, name)]
    assert not loaded, f"castore {command} loaded {loaded}"
    assert gc_enabled  # the start-up pause of the collector ends


@pytest.mark.parametrize("args", [["ls", "-R", "--json", "{root}"], ["cat", "{root}", "big.bin"], ["stat", "--chunks", "{big}"],
                                  ["ls", "{root}", "nothing"], ["cat", "{root}"]])
def test_other_reads_run_without_an_event_loop(args: list[str], tmp_path: pathlib.Path) -> None:
    """Listing a tree, a chunked blob, stat, and the errors: no event loop, no thread pool."""
    config = tmp_path / "castore.yaml"
    config.write_text(f"blobservices:\n  default: {{type: embedded, path: '{tmp_path / 'data'}'}}\n"
                      f"directoryservices:\n  default: {{type: embedded, path: '{tmp_path / 'data'}'}}\n")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    big = os.urandom(3 << 20)  # several chunks
    (tree / "big.bin").write_bytes(big)
    (tree / "sub" / "c.txt").write_bytes(b"gamma\n")
    out = subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "import", "--json",
                          str(tree)], check=True, capture_output=True, env=_env(), timeout=120).stdout
    root = json.loads(out)["digest"]
    big_digest = str(blake3_digest(big))
    code, modules, stdout, _ = _probe("--config", str(config), *(a.format(root=root, big=big_digest) for a in args))
    if args[-1] == "nothing":
        assert code == 1
    elif args[0] == "cat" and len(args) == 2:
        assert code == 1  # a directory, not a blob
    else:
        assert code == 0
    if args[0] == "cat" and code == 0:
        assert stdout == big
    elif args[0] == "ls" and code == 0:
        assert {json.loads(line)["path"] for line in stdout.splitlines()} == {"big.bin", "sub", "sub/c.txt"}
    elif args[0] == "stat":
        assert stdout.count(b"\n    b3:") >= 2
    assert "lmdb" in modules and not _loaded(modules, "asyncio") and not _loaded(modules, "concurrent.futures")


def test_a_service_that_needs_the_loop_gets_one(embedded_store: tuple[pathlib.Path, str, str]) -> None:
    """A blob service that does not declare itself loopless: the command runs on an event loop."""
    config, root, blob = embedded_store
    config.write_text(config.read_text().replace("blobservices:\n  default:", "blobservices:\n  default: {type: readonly, "
                                                 "backend: store}\n  store:"))
    for args, want in ((["ls", root], b" a.txt\n"), (["cat", blob], b"alpha\n")):
        code, modules, out, _ = _probe("--config", str(config), *args)
        assert code == 0 and want in out
        assert "asyncio" in modules


def test_a_service_that_cannot_be_built_is_met_where_it_is_used(
        embedded_store: tuple[pathlib.Path, str, str]) -> None:
    """``cat`` of a stored blob never asks for the directory service: a broken one does not matter."""
    config, _, blob = embedded_store
    code, _, out, _ = _probe("--config", str(config), "--directory-service", "absent", "cat", blob)
    assert code == 0 and out == b"alpha\n"
    code, _, out, _ = _probe("--config", str(config), "--directory-service", "absent", "cat", "b3:" + "A" * 43 + "=")
    assert code == 2 and out == b""


def test_run_loopless() -> None:
    calls: list[str] = []

    async def read(x: int) -> int:
        got = await to_thread(lambda: threading.current_thread().name)
        calls.append(got)
        return x + 1

    assert run_loopless(read(1)) == 2 and calls == [threading.current_thread().name]  # in place
    assert not in_loopless()

    async def fails() -> None:
        await read(0)
        raise StorageError("boom")

    with pytest.raises(StorageError, match="boom"):
        run_loopless(fails())

    import asyncio

    closed: list[bool] = []

    async def suspends() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            closed.append(in_loopless())

    with pytest.raises(RuntimeError, match="suspended"):
        run_loopless(suspends())
    assert closed == [True] and not in_loopless()
    assert asyncio.run(read(5)) == 6 and calls[-1] != threading.current_thread().name  # a worker thread


def test_ls_with_url_options_loads_nothing_heavy() -> None:
    code, modules, _, _ = _probe("--blob-service-addr", "memory://", "--directory-service-addr", "memory://",
                                 "ls", "b3:" + "A" * 43 + "=")
    assert code == 1  # not found, after the services were built
    assert "castore_di.cli.inspect" in modules
    loaded = [name for name in HEAVY if _loaded(modules, name)]
    assert not loaded, loaded


def test_the_whole_config_is_still_validated(embedded_store: tuple[pathlib.Path, str, str]) -> None:
    """An instance the command does not use is checked all the same (and the error worded by cattrs)."""
    config, root, _ = embedded_store
    config.write_text(config.read_text() + "  other: {type: memory, max_entries: 'ten'}\n")
    proc = subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "ls", root],
                          capture_output=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert b"directoryservices.other.max_entries: expected int, got str 'ten'" in proc.stderr, proc.stderr


def test_a_program_calling_main_keeps_its_collector(embedded_store: tuple[pathlib.Path, str, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config, root, _ = embedded_store
    frozen = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "ls", root])
    assert exc.value.code == 0 and "a.txt" in capsys.readouterr().out
    assert gc.isenabled() and gc.get_freeze_count() == frozen


# --- services without dependency-injector ---------------------------------------------------


_CLOSED: list[str] = []


class _Recorder:
    def __init__(self, name: str, inner: Any = None) -> None:
        self.name, self.inner = name, inner

    async def close(self) -> None:
        _CLOSED.append(self.name)


@attrs.frozen(kw_only=True)
class _Failing(BlobServiceConfig):
    type_tag = "failing"

    def build(self) -> Any:
        raise RuntimeError("no luck")


@attrs.frozen(kw_only=True)
class _Leaf(BlobServiceConfig):
    type_tag = "leaf"

    def build(self) -> Any:
        return _Recorder("leaf")


@attrs.frozen(kw_only=True)
class _Wrapper(BlobServiceConfig):
    type_tag = "wrapper"
    inner: str = reference("blobservices")

    def build(self, inner: Any) -> Any:
        return _Recorder("wrapper", inner)


@attrs.frozen(kw_only=True)
class _Async(BlobServiceConfig):
    type_tag = "later"

    async def build(self) -> Any:
        return "built"


def _registry() -> Registry:
    reg = default_registry().copy()
    for cls in (_Failing, _Leaf, _Wrapper, _Async):
        reg.register("blobservices", cls.type_tag, cls)
    return reg


def _error(fn: Any) -> tuple[type, str]:
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    raise AssertionError("no error")


@pytest.mark.parametrize("name", ["top", "missing"])
def test_direct_instances_fail_as_the_container_does(name: str) -> None:
    config = {"blobservices": {"top": {"type": "wrapper", "inner": "broken"}, "broken": {"type": "failing"}}}
    direct = direct_instances(load_graph(config, _registry()))
    assert direct is not None
    container = load_container(config, _registry())
    got, want = _error(lambda: direct.blob_service(name)), _error(lambda: container.blob_service(name))
    assert got == want
    assert got[0] is (InstantiationError if name == "top" else UnknownInstanceError)
    if name == "top":
        assert "blobservices.top -> blobservices.broken: cannot build 'failing' service: no luck" in got[1]


async def test_direct_instances_build_once_and_close_dependents_first() -> None:
    graph = load_graph({"blobservices": {"top": {"type": "wrapper", "inner": "leaf"}, "leaf": {"type": "leaf"}}},
                       _registry())
    direct = direct_instances(graph)
    assert direct is not None
    top: Any = direct.blob_service("top")
    assert top.name == "wrapper" and top.inner is direct.blob_service("leaf")
    assert direct.blob_service("top") is top
    _CLOSED.clear()
    await direct.aclose()
    assert _CLOSED == ["wrapper", "leaf"]
    await direct.aclose()
    assert _CLOSED == ["wrapper", "leaf"]
    assert direct.blob_service("top") is not top  # built anew after closing


def test_an_async_build_is_left_to_the_container() -> None:
    graph = load_graph({"blobservices": {"default": {"type": "later"}}}, _registry())
    assert direct_instances(graph) is None
    assert inspect.iscoroutinefunction(_Async.build)


# --- config structuring without cattrs ------------------------------------------------------


def _plain_classes() -> list[Any]:
    reg = default_registry()
    found = []
    for kind in reg.kinds():
        for tag in reg.tags(kind):
            try:
                cls = reg.resolve(kind, tag)
            except ConfigError:
                continue  # an optional library missing
            if _plain_fields(cast(Any, cls)) is not None:
                found.append(cls)
    return found


def test_the_embedded_and_memory_configs_are_plain() -> None:
    tags = {(c.kind, c.type_tag) for c in _plain_classes()}
    assert {("blobservices", "embedded"), ("directoryservices", "embedded"), ("blobservices", "memory")} <= tags


@pytest.mark.parametrize("data", [
    {},
    {"path": "/tmp/x", "map_size": 1 << 30, "durability": "full", "sync_interval": 2, "compression": "none"},
    {"path": None, "max_bytes": None},
    {"path": "/tmp/x", "max_bytes": 10},
])
def test_plain_structuring_equals_cattrs(data: dict[str, Any]) -> None:
    from castore_di.blobservice.embedded import EmbeddedBlobServiceConfig

    assert structure_config(data, EmbeddedBlobServiceConfig, "x") == _converter().structure(
        dict(data), EmbeddedBlobServiceConfig)


@pytest.mark.parametrize("data", [
    {"map_size": True}, {"map_size": 1 << 70}, {"sync_interval": float("nan")}, {"durability": "sometimes"},
    {"path": "a\0b"}, {"avg_chunk_size": "big"}, {"max_bytes": 0}, {"unknown": 1}, {"path": 3, "bad": 1},
])
def test_refused_data_is_worded_by_cattrs(data: dict[str, Any]) -> None:
    from castore_di.blobservice.embedded import EmbeddedBlobServiceConfig

    with pytest.raises(ConfigError) as plain:
        structure_config(data, EmbeddedBlobServiceConfig, "blobservices.default")
    assert str(plain.value).startswith("blobservices.default")


def test_entry_point_look_finds_a_declaring_distribution(tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    groups = ("castore_di.services", "castore_di.kinds")
    for name, text in (("other-1.0.dist-info", "[console_scripts]\nother = other:main\n"),
                       ("plain-2.0.dist-info", None)):
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "entry_points.txt").write_text(text)
    monkeypatch.setattr(sys, "path", [str(tmp_path), str(tmp_path / "absent")])
    assert not _entry_points_may_exist(groups)
    info = tmp_path / "castore_extra-1.0.dist-info"
    info.mkdir()
    (info / "entry_points.txt").write_text("[castore_di.services]\nblobservices.extra = extra:Config\n")
    assert _entry_points_may_exist(groups)
    zipped = tmp_path / "bundle.zip"
    zipped.write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(zipped)])
    assert _entry_points_may_exist(groups)  # what it cannot look into counts as a yes
