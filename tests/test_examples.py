"""Every example runs: its own tests (in a separate pytest process) and its entry points.

The third-party backend is installed for real (``pip install --target`` into a temporary
directory, so the project's environment is not changed) and then used from another process
through its ``castore_di.services`` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXAMPLE_DIRS = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def test_every_example_is_listed() -> None:
    assert EXAMPLE_DIRS == ["fastapi_app", "host_container", "programmatic", "testing_overrides", "third_party_backend"]
    for name in EXAMPLE_DIRS:
        assert (EXAMPLES / name / "README.md").is_file(), f"{name} has no README.md"
        assert list((EXAMPLES / name).glob("test_*.py")), f"{name} has no tests"


@pytest.mark.parametrize("name", EXAMPLE_DIRS)
def test_example_suite_passes(name: str, tmp_path: Path) -> None:
    """The example's own tests, as a user would run them (``pytest examples/<name>``)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "pt"),
         str(EXAMPLES / name)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert " skipped" not in result.stdout, result.stdout[-2000:]


@pytest.fixture(scope="module")
def installed_backend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``castore-sqlite`` pip-installed into a fresh directory; returns that directory."""
    base = tmp_path_factory.mktemp("third_party")
    source = base / "src"
    # Build from a copy so the build leaves nothing (build/, *.egg-info) in the repository.
    shutil.copytree(EXAMPLES / "third_party_backend", source,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "test_*.py"))
    site = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert (site / "castore_sqlite" / "__init__.py").is_file()
    return site


def _run_with(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


_USE_FROM_YAML = """
import asyncio, sys
import castore_di

async def main() -> None:
    async with castore_di.load_container(sys.argv[1]) as container:
        blobs = container.blob_service()
        digest = await blobs.put(b"stored by a third-party backend")
        print(type(blobs).__module__, digest)
    async with castore_di.load_container(sys.argv[1]) as container:
        print(await container.blob_service().read_bytes(digest))

asyncio.run(main())
"""


def test_installed_backend_is_usable_from_yaml(installed_backend: Path, tmp_path: Path) -> None:
    config = tmp_path / "castore.yaml"
    config.write_text(f"blobservices:\n  default: {{type: sqlite, path: {tmp_path / 'blobs.sqlite3'}}}\n")
    result = _run_with(installed_backend, [sys.executable, "-c", _USE_FROM_YAML, str(config)], tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("castore_sqlite b3:")
    assert second == "b'stored by a third-party backend'"


def test_installed_backend_in_castore_schema_and_check(installed_backend: Path, tmp_path: Path) -> None:
    castore = [sys.executable, "-m", "castore_di.cli"]
    schema = _run_with(installed_backend, [*castore, "schema"], tmp_path)
    assert schema.returncode == 0, schema.stderr
    defs = json.loads(schema.stdout)["$defs"]
    assert defs["blobservices.sqlite"]["properties"]["path"]["default"] == ":memory:"
    config = tmp_path / "castore.yaml"
    config.write_text("blobservices:\n  default: 'sqlite://'\n")
    check = _run_with(installed_backend, [*castore, "check", str(config)], tmp_path)
    assert check.returncode == 0, check.stderr
    assert "default (sqlite)" in check.stdout


def test_without_the_package_the_type_is_unknown(tmp_path: Path) -> None:
    """The control: this environment does not have the backend unless installed as above."""
    config = tmp_path / "castore.yaml"
    config.write_text("blobservices:\n  default: {type: sqlite}\n")
    check = subprocess.run([sys.executable, "-m", "castore_di.cli", "check", str(config)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 2
    assert "unknown type 'sqlite'" in check.stderr


def test_programmatic_main_runs() -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "programmatic" / "programmatic.py")],
                            capture_output=True, text=True, timeout=120, check=True)
    assert "from URLs:   {'docs/hello.txt': b'from URLs\\n'}" in result.stdout


@pytest.mark.slow
def test_examples_type_check() -> None:
    """The examples pass mypy in strict mode (settings in setup.cfg) with no casts needed."""
    result = subprocess.run([sys.executable, "-m", "mypy", "examples"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "cast(" not in "".join(p.read_text() for p in EXAMPLES.rglob("*.py"))
