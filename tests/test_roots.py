"""Named roots and prune on the embedded store, through the ``castore`` CLI in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import time

import pytest

from castore_di.composition import load_container
from castore_di.digests import B3Digest
from castore_di.directoryservice.memory import MemoryDirectoryService
from castore_di.errors import UnsupportedOperationError
from castore_di.roots import named_roots
from tests.treecmp import assert_same_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
STDLIB = sysconfig.get_paths()["stdlib"]


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("CASTORE_CONFIG", None)
    return env


def _castore(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "castore_di.cli", *args], env=env, capture_output=True, text=True,
                          errors="replace", timeout=600)


def _ok(env: dict[str, str], *args: str) -> str:
    result = _castore(env, *args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def _tree(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _blob_of(env: dict[str, str], digest: str, path: str) -> str:
    listing = json.loads(_ok(env, "ls", "--json", digest, path))
    return str(listing["digest"] if isinstance(listing, dict) else listing[0]["digest"])


def test_forget_then_prune_keeps_the_other_tree(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    shared = os.urandom(3 << 20)  # a chunked blob both trees use
    a = _tree(tmp_path / "a", {"shared.bin": shared, "same.txt": b"same", "only-a.txt": b"only in a"})
    b = _tree(tmp_path / "b", {"shared.bin": shared, "same.txt": b"same", "sub/only-b.bin": os.urandom(2 << 20)})
    c = _tree(tmp_path / "c", {"unnamed.txt": b"nobody named me"})

    refused = _castore(env, "prune")
    assert refused.returncode == 1 and "no named roots" in refused.stderr and refused.stderr.count("\n") == 1

    digest_a = _ok(env, "import", "--name", "trees/a", str(a)).split()[2]
    digest_b = _ok(env, "import", "--name", "b@2026", str(b)).split()[2]
    digest_c = _ok(env, "import", str(c)).split()[2]
    roots = [json.loads(line) for line in _ok(env, "roots", "--json").splitlines()]
    assert [(r["name"], r["digest"]) for r in roots] == [("b@2026", digest_b), ("trees/a", digest_a)]
    assert roots[1]["size"] == len(shared) + 4 + 9 and roots[1]["entries"] == 3 and roots[1]["created"].endswith("Z")
    assert _ok(env, "roots").splitlines()[1].split()[:2] == ["trees/a", digest_a]

    only_a = _blob_of(env, digest_a, "only-a.txt")
    shared_blob = _blob_of(env, digest_a, "shared.bin")
    dry = _ok(env, "prune", "--dry-run")
    assert "would free 1 directories" in dry
    assert _ok(env, "cat", digest_c, "unnamed.txt") == "nobody named me"  # dry run deleted nothing

    assert _ok(env, "forget", "trees/a").split()[:3] == ["forgot", "trees/a", digest_a]
    missing = _castore(env, "forget", "trees/a")
    assert missing.returncode == 1 and "no root named 'trees/a'" in missing.stderr

    report = _ok(env, "prune")
    assert "kept 2 directories" in report and "freed 2 directories" in report
    freed = int(report.rsplit("(", 1)[1].split()[0])
    assert freed > 0

    out = tmp_path / "out-b"
    _ok(env, "export", digest_b, str(out))
    assert_same_tree(str(b), str(out))
    assert _castore(env, "cat", shared_blob).returncode == 0
    for gone in (only_a,):
        assert _castore(env, "cat", gone).returncode == 1
    for tree in (digest_a, digest_c):
        assert _castore(env, "ls", tree).returncode == 1
    fsck = _castore(env, "fsck")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "freed 0 directories and 0 blob records" in _ok(env, "prune")  # nothing left to free


def test_keep_and_all_unnamed(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    a = _tree(tmp_path / "a", {"a.txt": b"a"})
    b = _tree(tmp_path / "b", {"b.txt": b"b"})
    digest_a = _ok(env, "import", str(a)).split()[2]
    digest_b = _ok(env, "import", str(b)).split()[2]
    assert "kept 1 directories" in _ok(env, "prune", "--keep", digest_a)
    assert _castore(env, "ls", digest_a).returncode == 0 and _castore(env, "ls", digest_b).returncode == 1
    assert "freed 1 directories" in _ok(env, "prune", "--all-unnamed")
    assert _castore(env, "ls", digest_a).returncode == 1


def test_names_are_validated_and_replacing_one_is_reported(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    a = _tree(tmp_path / "a", {"a.txt": b"a"})
    b = _tree(tmp_path / "b", {"b.txt": b"b"})
    bad = _castore(env, "import", "--name", "has space", str(a))
    assert bad.returncode == 2 and "invalid root name" in bad.stderr
    two = _castore(env, "import", "--name", "x", str(a), str(b))
    assert two.returncode == 2 and "exactly one PATH" in two.stderr
    _ok(env, "import", "--name", "x", str(a))
    replaced = _castore(env, "import", "--name", "x", str(b))
    assert replaced.returncode == 0 and "now names" in replaced.stderr
    assert len(_ok(env, "roots").splitlines()) == 1


def test_other_backends_refuse_names_clearly(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UnsupportedOperationError, match="named roots"):
        named_roots(MemoryDirectoryService())
    env = _env(tmp_path)
    result = _castore(env, "--blob-service-addr", "memory://", "--directory-service-addr", "memory://", "roots")
    assert result.returncode == 1 and "named roots are kept only by the embedded" in result.stderr


def _holds_flock(path: pathlib.Path) -> bool:
    inode = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return any(line.split()[1] == "FLOCK" and line.split()[5].endswith(f":{inode}") for line in f)


@pytest.mark.slow
def test_an_import_running_during_prune_completes_intact(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    kept = _tree(tmp_path / "kept", {"k.txt": b"kept"})
    digest_kept = _ok(env, "import", "--name", "kept", str(kept)).split()[2]
    _ok(env, "import", str(_tree(tmp_path / "junk", {"j.txt": b"junk"})))
    users = tmp_path / "data" / "castore" / "users.lock"
    importing = subprocess.Popen([sys.executable, "-m", "castore_di.cli", "import", "--name", "stdlib", STDLIB],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _holds_flock(users):  # the import has the store open
            assert importing.poll() is None, importing.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pruning = _castore(env, "prune")  # runs while the import is writing
        out, err = importing.communicate(timeout=600)
    finally:
        if importing.poll() is None:
            importing.kill()
    assert importing.returncode == 0, err
    assert pruning.returncode == 0, pruning.stderr
    assert "waiting for other processes to close the store" in pruning.stderr  # it ran during the import
    digest = out.split()[2]
    assert {r.split()[0] for r in _ok(env, "roots").splitlines()} == {"kept", "stdlib"}
    export = tmp_path / "stdlib-out"
    _ok(env, "export", digest, str(export))
    assert_same_tree(STDLIB, str(export))
    assert _ok(env, "cat", digest_kept, "k.txt") == "kept"


def test_prune_gives_up_after_wait_while_the_store_is_in_use(tmp_path: pathlib.Path) -> None:
    env = _env(tmp_path)
    digest = _ok(env, "import", "--name", "a", str(_tree(tmp_path / "a", {"a.txt": b"a"}))).split()[2]
    config = {"blobservices": {"default": {"type": "embedded", "path": str(tmp_path / "data" / "castore")}},
              "directoryservices": {"default": {"type": "embedded", "path": str(tmp_path / "data" / "castore")}}}

    async def hold_and_prune() -> subprocess.CompletedProcess[str]:
        container = load_container(config)
        try:
            assert await container.directory_service("default").get(B3Digest.parse(digest)) is not None  # opened
            return await asyncio.to_thread(_castore, env, "prune", "--wait", "0.2")
        finally:
            await container.aclose()

    busy = asyncio.run(hold_and_prune())
    assert busy.returncode == 1 and "in use by other processes" in busy.stderr.splitlines()[-1]
    assert "freed 0 directories" in _ok(env, "prune", "--wait", "0")  # closed: runs at once
