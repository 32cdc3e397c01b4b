"""Hostile and mistaken configs: each gets one ConfigError naming its path (issue 13, configs)."""

from __future__ import annotations

import contextlib
import io
import json
import keyword
import os
import pathlib
import subprocess
import sys
import types
from typing import Any, ClassVar

import attrs
import pytest
from dependency_injector import containers, providers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castore_di import ConfigError, load_container, load_graph
from castore_di.cli import main
from castore_di.blobservice.memory import MemoryBlobService
from castore_di.composition import BlobServiceConfig, DirectoryServiceConfig, Registry, build_graph, reference
from castore_di.composition.draw import to_dot, to_mermaid, to_tree
from castore_di.composition.graph import reserved_names
from castore_di.composition.loader import MAX_DEPTH

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOL = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _limited() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (120, 120))


def castore_limited(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``castore ARGS`` in a child with 2 GiB of address space and 120 s of CPU."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "castore_di.cli", *args], capture_output=True, text=True,
                          env=full_env, preexec_fn=_limited, timeout=300)


def check_error(tmp_path: pathlib.Path, name: str, text: str, limited: bool = False) -> str:
    """``castore check`` of ``text``: exit 2 and one line on stderr, which is returned."""
    path = tmp_path / name
    path.write_text(text)
    if limited:  # in a child with bounded memory: the unfixed loader would exhaust the machine
        result = castore_limited("check", str(path))
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_main("check", str(path))
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and "internal error" not in err
    return err


def run_main(*args: str) -> tuple[int, str, str]:
    """``castore ARGS`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(list(args))
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


# --- loader limits --------------------------------------------------------------------


def test_billion_laughs_is_refused(tmp_path: pathlib.Path) -> None:
    err = check_error(tmp_path, "lol.yaml", LOL, limited=True)
    assert "aliases" in err and "expand to more than" in err


def test_recursive_alias_is_refused(tmp_path: pathlib.Path) -> None:
    assert "contains itself" in check_error(tmp_path, "rec.yaml", "blobservices: &a {x: [*a]}\n", limited=True)


def test_too_many_aliases(tmp_path: pathlib.Path) -> None:
    text = "x: &a 1\ny: [" + ", ".join(["*a"] * 10_001) + "]\n"
    assert "more than 10000 YAML aliases" in check_error(tmp_path, "many.yaml", text)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 900, 100_000])
@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_depth_limit_in_every_format(tmp_path: pathlib.Path, suffix: str, levels: int) -> None:
    nested = "[" * levels + "]" * levels
    text = {".yaml": f"blobservices:\n  default: {nested}\n", ".json": f'{{"blobservices": {{"default": {nested}}}}}',
            ".toml": f"[blobservices]\ndefault = {nested}\n"}[suffix]
    err = check_error(tmp_path, f"deep{suffix}", text, limited=levels > 1000)
    assert f"nested deeper than {MAX_DEPTH} levels" in err
    # Where the parser gets that far, the message names the path (YAML: the line).
    if suffix == ".yaml":
        assert "line 2" in err
    elif levels < 500:
        assert "blobservices.default[0][0]" in err


def test_depth_limit_for_mappings() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ConfigError, match=r"^blobservices\.x\.x(\.x)*: nested deeper than 32 levels"):
        load_graph({"blobservices": deep})
    loop: dict[str, Any] = {"type": "memory"}
    loop["self"] = loop
    with pytest.raises(ConfigError, match=r"^blobservices\.default\.self: a value contains itself"):
        load_graph({"blobservices": {"default": loop}})


@pytest.mark.parametrize("root", ["0", "false", "[]", "'text'", "1.5"])
def test_non_mapping_roots_are_refused(tmp_path: pathlib.Path, root: str) -> None:
    err = check_error(tmp_path, "root.yaml", root + "\n")
    assert "a config must be a mapping of sections" in err


def test_empty_yaml_file_is_an_empty_config(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert not load_graph(path).instances


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blobservices:\n  default: {type: memory, 3: x}\n", "blobservices.default: keys must be strings, got int 3"),
        ("blobservices:\n  default: {type: objectstore, object_store_url: 'memory:///',"
         " object_store_options: {true: x}}\n",
         "blobservices.default.object_store_options: keys must be strings, got bool True"),
        ("1: {}\n", "keys must be strings, got int 1"),
        ("blobservices: [memory://]\n", "blobservices: expected a mapping of instance names, got list"),
        ("blobservices:\n  default: {type: grpc, url: 'grpc+http://h:1', timeout: 2020-01-01}\n",
         "blobservices.default.timeout: expected float, got date"),
        ("blobservices:\n  default: {type: objectstore, object_store_url: 'memory:///',"
         " object_store_options: {a: [1]}}\n", "blobservices.default.object_store_options"),
    ],
)
def test_structural_problems_name_their_path(tmp_path: pathlib.Path, text: str, message: str) -> None:
    assert message in check_error(tmp_path, "bad.yaml", text)


def test_non_string_key_from_python() -> None:
    with pytest.raises(ConfigError, match=r"^blobservices\.default: keys must be strings, got NoneType None"):
        load_graph({"blobservices": {"default": {"type": "memory", None: 1}}})


# --- sense checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ("{type: grpc, url: 'grpc+http://h:1', timeout: .inf}",
         "blobservices.default.timeout: expected a finite number, got inf"),
        ("{type: grpc, url: 'grpc+http://h:1', retry_backoff: .nan}",
         "blobservices.default.retry_backoff: expected a finite number"),
        ("{type: embedded, map_size: 18446744073709551616}", "blobservices.default.map_size: integer out of range"),
        ("{type: embedded, path: \"a\\0b\"}", "blobservices.default.path: a NUL character is not allowed"),
        ("{type: embedded, map_size: 1152921504606846976}",
         "blobservices.default.map_size: map_size must be between 1 and 140737488355328 (what a process can map)"),
        ("{type: grpc, url: 'grpc+http://h:1', timeout: 1.0e+12}", "blobservices.default.timeout: timeout must be at most"),
        ("'embedded:///tmp/a%00b'", "a NUL character is not allowed"),
        ("'embedded:///tmp/a?sync_interval=inf'", "sync_interval: expected a finite number"),
        ("{type: objectstore, object_store_url: \"file:///tmp/a\\0b\"}",
         "blobservices.default.object_store_url: a NUL character is not allowed"),
    ],
)
def test_values_that_would_break_at_run_time(tmp_path: pathlib.Path, instance: str, message: str) -> None:
    assert message in check_error(tmp_path, "c.yaml", f"blobservices:\n  default: {instance}\n")


# --- names ----------------------------------------------------------------------------


def test_every_dependency_injector_attribute_is_refused() -> None:
    names = set()
    for obj in (containers.DynamicContainer, containers.DynamicContainer(), providers.Container,
                providers.Container(containers.DynamicContainer), providers.ThreadSafeSingleton,
                providers.ThreadSafeSingleton(object)):
        names |= {n for n in dir(obj) if n[:1].isalpha()}
    assert {"provided", "providers", "wire", "override", "container", "parent"} <= names
    assert names <= reserved_names()
    for name in sorted(names) + ["blobservices", "directoryservices"]:
        with pytest.raises(ConfigError, match=f"blobservices.{name}: invalid instance name"):
            load_graph({"blobservices": {name: "memory://"}})


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.from_regex(r"\A[A-Za-z][A-Za-z0-9_]{0,12}\Z"))
def test_provide_resolves_every_accepted_name(name: str) -> None:
    config = {"blobservices": {name: "memory://", "other": "memory://"}}
    try:
        graph = load_graph(config)
    except ConfigError:
        assert name in reserved_names() or keyword.iskeyword(name)
        return
    container = load_container(config)
    module = types.ModuleType(f"provide_{name}")
    exec(  # a module of its own: wiring patches module-level functions
        "from dependency_injector.wiring import Provide, inject\n"
        f"@inject\ndef use(service=Provide['blobservices.{name}']):\n    return service\n", module.__dict__)
    container.wire(modules=[module])
    try:
        got = module.use()
    finally:
        container.unwire()
    assert isinstance(got, MemoryBlobService) and got is container.blob_service(name)
    assert got is not container.blob_service("other") and graph.instances[f"blobservices.{name}"]


# --- messages -------------------------------------------------------------------------


def test_unknown_reference_message_fits_on_a_screen() -> None:
    section: dict[str, Any] = {f"i{n}": "memory://" for n in range(100_000)}
    section["default"] = {"type": "combined", "local": "i1", "remote": "nope"}
    with pytest.raises(ConfigError) as e:
        load_graph({"blobservices": section})
    message = str(e.value)
    assert message.startswith("blobservices.default.remote: unknown instance 'nope' (known: default, i0, i1,")
    assert "… and 99981 more)" in message and len(message) < 400


@attrs.frozen(kw_only=True)
class _HoldsBlobConfig(DirectoryServiceConfig):
    type_tag: ClassVar[str] = "holdsblob"
    remote: str = reference("blobservices")

    def build(self, remote: Any) -> Any:  # pragma: no cover - not built here
        return remote


@attrs.frozen(kw_only=True)
class _HoldsBlob2Config(BlobServiceConfig):
    type_tag: ClassVar[str] = "holdsblob"
    remote: str = reference("blobservices")

    def build(self, remote: Any) -> Any:  # pragma: no cover - not built here
        return remote


def test_anonymous_ids_are_unique_across_kinds() -> None:
    registry = Registry()
    registry.register("blobservices", "memory", "castore_di.blobservice.memory:MemoryBlobServiceConfig")
    registry.register("blobservices", "holdsblob", _HoldsBlob2Config)
    registry.register("directoryservices", "holdsblob", _HoldsBlobConfig)
    graph = build_graph({"blobservices": {"x": {"type": "holdsblob", "remote": "memory://"}},
                         "directoryservices": {"x": {"type": "holdsblob", "remote": "memory://"}}}, registry)
    anonymous = [i for i in graph if i.anonymous]
    assert len(anonymous) == 2 and len({i.id for i in anonymous}) == 2
    assert graph.instances["blobservices.x"].refs["remote"] != graph.instances["directoryservices.x"].refs["remote"]


SECRET_CONFIG = """\
blobservices:
  default: {type: combined, local: "objectstore+https://acct.blob.core.windows.net/c/p?sv=2020&sig=SECRET2",
            remote: "objectstore+http://user:SECRET3@localhost:9/b/p?token=SECRET4"}
directoryservices:
  default: {type: cache, near: "memory://", far: "objectstore+s3://b/p?aws_secret_access_key=SECRET1&region=eu-west-1"}
"""


def test_secrets_never_printed_by_check_and_graph(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(SECRET_CONFIG)
    outputs = [run_main("check", str(path)), *(run_main("graph", "--format", f, str(path))
                                                 for f in ("dot", "mermaid", "tree"))]
    for code, out, err in outputs:
        assert code == 0, err
        assert "SECRET" not in out + err
    assert "aws_secret_access_key=***&region=eu-west-1" in outputs[0][1]
    assert "sig=***" in outputs[0][1] and "user:***@" in outputs[0][1]
    graph = load_graph(path)
    assert not any("SECRET" in draw(graph) for draw in (to_dot, to_mermaid, to_tree))


def test_secrets_never_in_errors(tmp_path: pathlib.Path) -> None:
    for text in ("blobservices:\n  default: {type: objectstore, object_store_url: 's3://b?aws_secret_access_key=SECRET'}\n",
                 "blobservices:\n  default: {type: combined, local: 'memory://', remote: 'grpc+http://u:SECRET@h:1/?t=1'}\n",
                 "blobservices:\n  default: {type: objectstore, object_store_url: 'memory:///',"
                 " object_store_options: {azure_storage_account_key: [SECRET]}}\n",
                 'blobservices:\n  default: "nosuch://u:SECRET@h/?token=SECRET"\n'):
        err = check_error(tmp_path, "c.yaml", text)
        assert "SECRET" not in err, err


def test_unset_variable_hint_names_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_S3")}
    result = subprocess.run([sys.executable, "-m", "castore_di.cli", "check", str(ROOT / "containers" / "s3.yaml")],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 2
    assert "environment variable 'CASTORE_S3_BUCKET' is not set: set it (export CASTORE_S3_BUCKET=...)" in result.stderr
    assert ":-default" not in result.stderr
    ok = subprocess.run([sys.executable, "-m", "castore_di.cli", "check", "-q", str(ROOT / "containers" / "s3.yaml")],
                        capture_output=True, text=True, timeout=120,
                        env={**env, "PYTHONPATH": str(ROOT), "CASTORE_S3_BUCKET": "b"})
    assert ok.returncode == 0, ok.stderr


# --- hostile documents, generated -------------------------------------------------------


def test_hostile_documents_only_ever_get_config_errors() -> None:
    """Runs tests/support/hostile_configs.py in a child with 2 GiB of address space."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "hostile_configs.py")],
                            capture_output=True, text=True, preexec_fn=_limited, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["examples"] >= 150 and summary["config_errors"] > 0


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_over_the_size_limit_is_refused_before_parsing(tmp_path: pathlib.Path, suffix: str) -> None:
    """Hundreds of megabytes of YAML (a long string written out under each of a few aliases'
    parents) would take PyYAML minutes and gigabytes: the file is refused by its size."""
    from castore_di.composition.loader import MAX_CONFIG_BYTES, read_config

    path = tmp_path / f"c{suffix}"
    empty = "{}" if suffix == ".json" else ""  # an empty config, padded with blanks
    path.write_text(empty + " " * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes") as info:
        read_config(path)
    assert str(path) in str(info.value)
    path.write_text(empty + " " * (MAX_CONFIG_BYTES - 100) + "\n")  # just under: parsed as usual
    assert read_config(path) == {}
