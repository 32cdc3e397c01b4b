"""The ``castore`` command end to end: separate processes sharing an on-disk store."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

from castore_di.cli.transfer import Progress
from castore_di.composition import default_registry
from castore_di.digests import blake3_digest
from tests.treecmp import assert_same_tree, make_sample_tree

STDLIB = sysconfig.get_paths()["stdlib"]


def _store_config(tmp: pathlib.Path) -> pathlib.Path:
    """A config on disk: the embedded default when registered, else objectstore on file://."""
    data = tmp / "data"
    reg = default_registry()
    if "embedded" in reg.tags("blobservices") and "embedded" in reg.tags("directoryservices"):
        text = (f"blobservices:\n  default: {{type: embedded, path: '{data}'}}\n"
                f"directoryservices:\n  default: {{type: embedded, path: '{data}'}}\n")
    else:
        text = (f"blobservices:\n  default: 'objectstore+file://{data}/blobs'\n"
                f"directoryservices:\n  default: 'objectstore+file://{data}/dirs'\n")
    path = tmp / "castore.yaml"
    path.write_text(text)
    return path


class Castore:
    def __init__(self, config: pathlib.Path) -> None:
        self.config = config

    def __call__(self, *args: str, expect: int = 0, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}
        proc = subprocess.run(
            [sys.executable, "-m", "castore_di.cli", "--config", str(self.config), *args],
            capture_output=True, env=env, input=stdin, timeout=300,
        )
        assert proc.returncode == expect, (
            f"castore {' '.join(args)}: exit {proc.returncode}, want {expect}\n"
            f"stdout: {proc.stdout[-2000:]!r}\nstderr: {proc.stderr[-2000:]!r}"
        )
        return proc

    def json(self, *args: str) -> list[dict[str, object]]:
        out = self(*args).stdout.decode()
        return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def castore(tmp_path: pathlib.Path) -> Castore:
    return Castore(_store_config(tmp_path))


def test_stdlib_round_trip_across_processes(tmp_path: pathlib.Path, castore: Castore) -> None:
    [root] = castore.json("import", "--json", STDLIB)
    assert root["path"] == STDLIB and root["type"] == "directory"
    assert str(root["digest"]).startswith("b3:")
    castore("export", str(root["digest"]), str(tmp_path / "out"))
    assert assert_same_tree(STDLIB, str(tmp_path / "out")) > 1000
    # Importing again (another process) gives the same digest.
    [again] = castore.json("import", "--json", STDLIB)
    assert again == root


def test_import_prints_root_nodes(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    make_sample_tree(str(src))
    out = castore("import", str(src), str(src / "hello.txt"), str(src / "sub" / "run.sh"), str(src / "sub" / "link"))
    lines = out.stdout.decode().splitlines()
    assert lines[0].startswith(f"{src} directory b3:")
    assert lines[1] == f"{src / 'hello.txt'} file {blake3_digest(b'Hello World')} 11"
    assert lines[2].startswith(f"{src / 'sub' / 'run.sh'} executable b3:")
    assert lines[3] == f"{src / 'sub' / 'link'} symlink ../hello.txt"
    assert out.stderr == b""  # no progress bar when stderr is not a terminal

    records = castore.json("import", "--json", str(src / "hello.txt"), str(src / "sub" / "link"))
    assert records == [
        {"path": str(src / "hello.txt"), "type": "file", "digest": str(blake3_digest(b"Hello World")),
         "size": 11, "executable": False},
        {"path": str(src / "sub" / "link"), "type": "symlink", "target": "../hello.txt"},
    ]


def test_inspect_commands(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    make_sample_tree(str(src))
    [root] = castore.json("import", "--json", str(src))
    digest = str(root["digest"])

    listing = castore("ls", digest).stdout.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing]
    assert names == ["dangling", "empty.bin", "hello.txt", "empty/", "sub/"] or sorted(names) == sorted(
        ["dangling", "empty.bin", "hello.txt", "empty/", "sub/"])
    hello = next(line for line in listing if line.endswith(" hello.txt"))
    assert hello.split()[:3] == ["-r--r--r--", "11", str(blake3_digest(b"Hello World"))]
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("dangling -> /nonexistent/absolute") for line in listing)

    sub = castore("ls", digest, "sub").stdout.decode()
    assert "-r-xr-xr-x" in sub and "run.sh" in sub and "link -> ../hello.txt" in sub
    recursive = castore("ls", "-R", digest).stdout.decode()
    assert "sub/deeper:" in recursive and "big.bin" in recursive
    entries = castore.json("ls", "-R", "--json", digest)
    assert {e["path"] for e in entries} >= {"sub/deeper/big.bin", "sub/run.sh", "hello.txt"}
    castore("ls", digest, "no/such", expect=1)

    big = (src / "sub" / "deeper" / "big.bin").read_bytes()
    assert castore("cat", digest, "sub/deeper/big.bin").stdout == big
    assert castore("cat", str(blake3_digest(b"Hello World"))).stdout == b"Hello World"

    [blob_info] = castore.json("stat", "--json", "--chunks", str(blake3_digest(big)))
    assert blob_info["type"] == "blob" and blob_info["size"] == len(big)
    chunks = blob_info["chunk_list"]
    assert isinstance(chunks, list) and sum(c["size"] for c in chunks) == len(big)
    assert blob_info["chunks"] == len(chunks)
    [dir_info] = castore.json("stat", "--json", digest)
    assert dir_info["type"] == "directory" and dir_info["entries"] == 5 and dir_info["size"] == root["size"]
    assert "directory" in castore("stat", digest).stdout.decode()
    missing = castore("stat", str(blake3_digest(b"absent")), expect=1)
    assert missing.stderr.decode().count("\n") == 1


def test_export_forms(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    make_sample_tree(str(src))
    [root, tool] = castore.json("import", "--json", str(src), str(src / "sub" / "run.sh"))

    castore("export", str(root["digest"]), str(tmp_path / "tree"))
    assert_same_tree(str(src), str(tmp_path / "tree"))

    castore("export", "--file", "--executable", str(tool["digest"]), str(tmp_path / "run"))
    assert (tmp_path / "run").read_bytes() == (src / "sub" / "run.sh").read_bytes()
    assert os.stat(tmp_path / "run").st_mode & 0o100
    castore("export", str(tool["digest"]), str(tmp_path / "auto"))  # a blob digest: a file
    assert (tmp_path / "auto").read_bytes() == (src / "sub" / "run.sh").read_bytes()

    castore("export", "--symlink", "../somewhere", str(tmp_path / "ln"))
    assert os.readlink(tmp_path / "ln") == "../somewhere"

    err = castore("export", str(root["digest"]), str(tmp_path / "tree"), expect=1).stderr.decode()
    assert err.startswith("castore: ") and "not empty" in err and err.count("\n") == 1
    castore("export", "--force", str(root["digest"]), str(tmp_path / "tree"))
    castore("export", "--file", str(tool["digest"]), str(tmp_path / "run"), expect=1)

    castore("export", str(blake3_digest(b"absent")), str(tmp_path / "x"), expect=1)
    bad = castore("export", "not-a-digest", str(tmp_path / "x"), expect=2)
    assert b"digest" in bad.stderr


def test_special_file_is_refused(tmp_path: pathlib.Path, castore: Castore) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    proc = castore("import", str(src), expect=1)
    assert proc.stderr.decode() == f"castore: unsupported file type at {src / 'pipe'}: fifo\n"
    verbose = castore("--verbose", "import", str(src), expect=1)
    assert b"Traceback" in verbose.stderr


def test_progress_bar_draws_only_when_enabled() -> None:
    quiet = io.StringIO()
    p = Progress("importing x", stream=quiet)  # StringIO is not a terminal
    p.start(2, 10)
    p.advance(10)
    p.finish()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    p = Progress("importing x", stream=shown, enabled=True)
    p.start(2, 2048)
    p.advance(1024)
    p.advance(1024)
    p.finish()
    assert "2/2 files" in shown.getvalue() and "2.00kB/2.00kB" in shown.getvalue()


def test_help_documents_exit_codes() -> None:
    out = subprocess.run([sys.executable, "-m", "castore_di.cli", "--help"], capture_output=True, check=True).stdout
    text = out.decode()
    assert "Exit codes" in text
    for cmd in ("import", "export", "ls", "cat", "stat", "check", "graph", "schema"):
        assert f"  {cmd} " in text
