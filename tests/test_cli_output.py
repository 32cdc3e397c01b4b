"""What the CLI prints (issue 13): names, pipes, progress, stat, messages, README, set-up."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from castore_di.blobservice.memory import MemoryBlobService
from castore_di.cli.output import quote_name
from castore_di.cli.transfer import Progress
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.importer import SMALL_FILE, ingest_path

ROOT = pathlib.Path(__file__).resolve().parent.parent
ODD = [b"caf\xe9", b"new\nline", b"esc\x1b[31mred", b"tab\there", b'q"uote', "été".encode()]


def castore(tmp: pathlib.Path, *args: str, env: dict[str, str] | None = None, expect: int = 0,
            stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    store = f"embedded://{tmp / 'store'}"
    full = {**{k: v for k, v in os.environ.items() if k != "CASTORE_CONFIG"}, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "castore_di.cli", "--blob-service-addr", store,
                           "--directory-service-addr", store, *args], stdout=stdout, stderr=subprocess.PIPE,
                          env=full, timeout=300)
    assert proc.returncode == expect, proc.stderr.decode(errors="replace")
    return proc


@pytest.fixture
def odd_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ODD:
        (src / os.fsdecode(name)).write_bytes(name)
    os.symlink(os.fsdecode(b"tar\xffget"), os.path.join(os.fsencode(src), b"link"))
    return src


@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "latin-1"])
def test_odd_names_survive_any_output_encoding(tmp_path: pathlib.Path, odd_tree: pathlib.Path, encoding: str) -> None:
    env = {"PYTHONIOENCODING": encoding}
    [line] = castore(tmp_path, "import", str(odd_tree), env=env).stdout.decode(encoding).splitlines()
    digest = line.split()[2]
    assert digest.startswith("b3:")
    listing = castore(tmp_path, "ls", digest, env=env).stdout.decode(encoding).splitlines()
    assert len(listing) == len(ODD) + 1  # one line per entry: no name splits a line
    text = "\n".join(listing)
    assert '"caf\\351"' in text and '"new\\nline"' in text and '"esc\\033[31mred"' in text
    assert '"tab\\there"' in text and '"q\\"uote"' in text and 'link -> "tar\\377get"' in text
    assert "\x1b" not in text
    assert ("été" in text) == (encoding != "ascii")


def test_json_names_are_lossless(tmp_path: pathlib.Path, odd_tree: pathlib.Path) -> None:
    env = {"PYTHONIOENCODING": "utf-8"}
    [root] = [json.loads(line) for line in castore(tmp_path, "import", "--json", str(odd_tree), env=env).stdout.splitlines()]
    out = castore(tmp_path, "ls", "--json", str(root["digest"]), env=env).stdout
    out.decode("ascii")  # valid UTF-8, and in fact ASCII
    names = set()
    for entry in map(json.loads, out.splitlines()):
        raw = base64.b64decode(entry["name_b64"]) if "name_b64" in entry else entry["name"].encode()
        assert "\udcff" not in json.dumps(entry, ensure_ascii=False)  # no lone surrogates
        names.add(raw)
        if entry["type"] == "symlink":
            assert base64.b64decode(entry["target_b64"]) == b"tar\xffget"
    assert names == set(ODD) | {b"link"}


def test_quote_name() -> None:
    assert quote_name(b"plain name.txt") == "plain name.txt"
    assert quote_name(b"caf\xc3\xa9", "utf-8") == "café"
    assert quote_name(b"caf\xc3\xa9", "ascii") == '"caf\\303\\251"'
    assert quote_name(b"a\x7fb\x9b") == '"a\\177b\\233"'
    assert quote_name("x\u202ey".encode()) == '"x\\342\\200\\256y"'  # bidi override: not printable


def _closed_reader(tmp: pathlib.Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    store = f"embedded://{tmp / 'store'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "castore_di.cli", "--blob-service-addr", store,
                             "--directory-service-addr", store, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)  # the command has started writing; then the reader goes away
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


def test_closed_stdout_ends_quietly(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3000):
        (src / "sub" / f"file-with-a-long-name-{i:05}").write_text(str(i))
    (src / "big").write_bytes(os.urandom(4 << 20))
    [root] = [json.loads(line) for line in castore(tmp_path, "import", "--json", str(src)).stdout.splitlines()]
    big = castore(tmp_path, "ls", "--json", str(root["digest"]), "big").stdout
    for args in (("cat", json.loads(big)["digest"]), ("ls", "-R", str(root["digest"])),
                 ("ls", "-R", "--json", str(root["digest"]))):
        result = _closed_reader(tmp_path, *args)
        assert (result.returncode, result.stderr) == (141, b""), args
    # import --json: the reader is gone before the one line comes.
    store = f"embedded://{tmp_path / 'store'}"
    proc = subprocess.Popen([sys.executable, "-m", "castore_di.cli", "--blob-service-addr", store,
                             "--directory-service-addr", store, "import", "--json", str(src), str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err) == (141, b"")
    assert "141" in subprocess.run([sys.executable, "-m", "castore_di.cli", "--help"], capture_output=True,
                                   text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout


class _Recorder:
    """A real progress consumer that keeps what it was told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, files: int, nbytes: int) -> None:
        self.events.append(("start", nbytes))

    def partial(self, key: object, nbytes: int) -> None:
        self.events.append(("partial", nbytes))

    def advance(self, nbytes: int) -> None:
        self.events.append(("advance", nbytes))


def test_import_reports_bytes_within_a_file(tmp_path: pathlib.Path) -> None:
    size = 16 * SMALL_FILE + 123
    (tmp_path / "big").write_bytes(os.urandom(size))
    recorder = _Recorder()
    asyncio.run(ingest_path(MemoryBlobService(), MemoryDirectoryService(), tmp_path / "big", progress=recorder))
    inside = [n for kind, n in recorder.events if kind == "partial" and n]
    assert len(inside) >= 4 and inside == sorted(inside) and 0 < inside[0] and inside[-1] < size
    assert recorder.events[0] == ("start", size) and recorder.events[-1] == ("advance", size)


def test_progress_bar_counts_partial_bytes_and_ends_at_100() -> None:
    stream = io.StringIO()
    bar = Progress("importing x", stream=stream, enabled=True)
    bar.start(7, 7 << 20)
    bar.partial("a", 1 << 20)
    assert bar._bar.n == 1 << 20
    for _ in range(7):
        bar.advance(1 << 20, "a")
    bar.finish()
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert "100%" in last and "7/7 files" in last and "ETA" not in last


def test_stat_counts_chunks_like_fsck(tmp_path: pathlib.Path) -> None:
    (tmp_path / "small").write_bytes(b"small blob")
    (tmp_path / "big").write_bytes(os.urandom(3 << 20))
    small = castore(tmp_path, "import", str(tmp_path / "small")).stdout.split()[2].decode()
    big = castore(tmp_path, "import", str(tmp_path / "big")).stdout.split()[2].decode()
    out = castore(tmp_path, "stat", small).stdout.decode()
    assert "  chunks: 1\n" in out and len(out.splitlines()) == 3
    out = castore(tmp_path, "stat", big).stdout.decode()
    count = int(re.search(r"chunks: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert count > 1 and len(out.splitlines()) == 3
    listed = castore(tmp_path, "stat", "--chunks", big).stdout.decode().splitlines()
    assert len(listed) == 3 + count
    info = json.loads(castore(tmp_path, "stat", "--json", "--chunks", big).stdout)
    assert info["chunks"] == count == len(info["chunk_list"])
    fsck = castore(tmp_path, "fsck", "--no-directories").stdout.decode()
    assert f"{count + 1} chunks" in fsck  # the big blob's chunks and the small blob's one


def test_bad_digest_and_bad_addr_messages(tmp_path: pathlib.Path) -> None:
    err = castore(tmp_path, "export", "foo", str(tmp_path / "x"), expect=2).stderr.decode()
    assert "'foo' is not a digest" in err and "b3:" in err and "64 hex digits" in err and "length" not in err
    proc = subprocess.run([sys.executable, "-m", "castore_di.cli", "--blob-service-addr", "http://x", "cat",
                           "b3:" + "A" * 43 + "="], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("castore: --blob-service-addr: unknown URL scheme in 'http://x' (known schemes: ")
    assert "blobservices.default" not in proc.stderr and "grpc" in proc.stderr and "memory" in proc.stderr


def test_readme_main_command_prints_the_export_path_and_digest(tmp_path: pathlib.Path) -> None:
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0].strip().strip("`").strip()
    command = command.removeprefix("sh\n")
    setup = "python3 -m venv .venv && . .venv/bin/activate && pip install . && "
    assert command.startswith(setup)  # the rest runs here with this checkout's castore on PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "castore").write_text(f"#!/bin/sh\nexec {sys.executable} -m castore_di.cli \"$@\"\n")
    (bindir / "castore").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "XDG_DATA_HOME": str(tmp_path / "data"), "TMPDIR": str(tmp_path)}
    env.pop("CASTORE_CONFIG", None)
    out = subprocess.run(["sh", "-c", command.removeprefix(setup)], capture_output=True, text=True, env=env,
                         timeout=600, check=True).stdout
    digest = re.search(r"^digest: (b3:\S+)$", out, re.M)
    where = re.search(r"^exported to: (\S+)$", out, re.M)
    assert digest and where and pathlib.Path(where.group(1), "__init__.py").is_file()


def test_setup_script_installs_azurite_with_the_machines_npm_config(tmp_path: pathlib.Path) -> None:
    """The script runs in a copy of the checkout; a recording `npm` stands in on PATH."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "tests" / "support" / "bttest", copy / "tests" / "support" / "bttest")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "npm.log"
    (bindir / "npm").write_text(f"#!/bin/sh\necho \"$PWD|$*\" >> {log}\n")
    (bindir / "npm").chmod(0o755)
    emulator = bindir / "cbtemulator-present"
    emulator.write_text("#!/bin/sh\n")
    emulator.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CBTEMULATOR": str(emulator)}
    subprocess.run(["bash", str(copy / "scripts" / "setup-test-servers")], env=env, check=True, timeout=120,
                   capture_output=True)
    [call] = log.read_text().splitlines()
    cwd, args = call.split("|")
    assert cwd == str(copy / ".cache" / "npm") and "--prefix" not in args and args.startswith("install")
    package = json.loads((copy / ".cache" / "npm" / "package.json").read_text())
    assert package["dependencies"]["azurite"]
    readme = (ROOT / "README.md").read_text()
    assert "Node ≥ 20" in readme and "golang-go" in readme
