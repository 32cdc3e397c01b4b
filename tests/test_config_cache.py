"""The ``castore`` command's cache of parsed YAML configs (castore_di.composition.parsecache)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from castore_di.composition import parsecache
from castore_di.composition.loader import _yaml_load, read_config
from castore_di.composition.parsecache import cache_dir, cached_parse
from castore_di.errors import ConfigError


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> Any:
        self.calls += 1
        return _yaml_load(text)


def _files() -> list[str]:
    try:
        return sorted(os.listdir(cache_dir()))
    except FileNotFoundError:
        return []


def test_same_text_is_parsed_once() -> None:
    parse = _Counting()
    text = "blobservices:\n  default: {type: memory, max_bytes: 10}\nx: [1, 2.5, true, null, 'é']\n"
    first = cached_parse(text, parse)
    again = cached_parse(text, parse)
    assert parse.calls == 1 and again == first == _yaml_load(text)
    assert type(again["x"][2]) is bool and type(again["x"][1]) is float
    assert again is not first and again["blobservices"] is not first["blobservices"]  # a fresh value each time
    [name] = _files()
    assert os.stat(os.path.join(cache_dir(), name)).st_mode & 0o777 == 0o600  # a config may hold secrets
    cached_parse(text + "# edited\n", parse)  # another text: parsed again
    assert parse.calls == 2 and len(_files()) == 2


@pytest.mark.parametrize("text", [
    "a: &x {b: 1}\nc: *x\n",  # shared through an alias: the structural checks count it
    "when: 2024-01-01\n",  # a date
    "1: x\n",  # a key that is not a string
])
def test_documents_that_are_not_plain_are_not_kept(text: str) -> None:
    parse = _Counting()
    cached_parse(text, parse)
    cached_parse(text, parse)
    assert parse.calls == 2 and _files() == []


def test_a_refused_document_is_refused_each_time(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("blobservices: [unclosed\n")
    messages = []
    for _ in range(2):
        with pytest.raises(ConfigError) as e:
            read_config(path, cache=True)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and str(path) in messages[0] and _files() == []


def test_a_damaged_cache_file_is_ignored_and_replaced() -> None:
    text = "blobservices: {default: {type: memory}}\n"
    parse = _Counting()
    cached_parse(text, parse)
    [name] = _files()
    full = os.path.join(cache_dir(), name)
    good = pathlib.Path(full).read_bytes()
    for damaged in (good[:-3], good[:20], b"", good[:-1] + bytes([good[-1] ^ 1]), b"something else entirely"):
        pathlib.Path(full).write_bytes(damaged)
        assert cached_parse(text, parse) == {"blobservices": {"default": {"type": "memory"}}}
    assert parse.calls == 6 and pathlib.Path(full).read_bytes() == good


def test_an_unusable_cache_directory_changes_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    parse = _Counting()
    assert cached_parse("a: 1\n", parse) == {"a": 1} and cached_parse("a: 1\n", parse) == {"a": 1}
    assert parse.calls == 2


def test_the_oldest_files_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsecache, "MAX_FILES", 3)
    written = []
    for i in range(5):
        before = set(_files())
        cached_parse(f"n: {i}\n", _Counting())
        [new] = set(_files()) - before
        os.utime(os.path.join(cache_dir(), new), ns=(10**9 * (i + 1),) * 2)  # written in this order
        written.append(new)
    assert _files() == sorted(written[-3:])


def test_the_command_reuses_the_parse_and_words_errors_as_before(tmp_path: pathlib.Path) -> None:
    """Second run: PyYAML is not loaded; a validation error names the same path either way."""
    config = tmp_path / "castore.yaml"
    config.write_text("blobservices:\n  default: {type: memory}\n  other: {type: memory, max_bytes: 'ten'}\n"
                      "directoryservices:\n  default: {type: memory}\n")
    probe = ("import sys, json\nsys.argv = ['castore', *json.loads(sys.argv[1])]\nfrom castore_di.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(json.dumps({'code': code, 'yaml': 'yaml' in sys.modules}), file=sys.__stderr__)\n")
    env = dict(os.environ)
    env.pop("CASTORE_CONFIG", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", probe, json.dumps(["--config", str(config), "ls",
                                                                          "b3:" + "A" * 43 + "="])],
                              capture_output=True, env=env, timeout=120)
        *lines, last = proc.stderr.decode().strip().splitlines()
        runs.append((json.loads(last), lines))
    (first, first_err), (second, second_err) = runs
    assert first == {"code": 2, "yaml": True} and second == {"code": 2, "yaml": False}
    assert first_err == second_err and "blobservices.other.max_bytes" in first_err[0]
    config.write_text(config.read_text().replace("'ten'", "10"))  # edited: parsed again
    proc = subprocess.run([sys.executable, "-m", "castore_di.cli", "--config", str(config), "ls",
                           "b3:" + "A" * 43 + "="], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 1 and b"not found" in proc.stderr


def test_a_cache_file_far_larger_than_its_text_is_not_read() -> None:
    """What is read from the cache is bounded by the text's size (tiny list items give the
    largest marshal/text ratio, and stay within it); a larger file is not read."""
    import marshal

    parse = _Counting()
    text = "x: [" + ", ".join(["1"] * 2000) + "]\n"
    cached_parse(text, parse)
    assert cached_parse(text, parse) == _yaml_load(text) and parse.calls == 1  # within the bound
    [name] = _files()
    path = os.path.join(cache_dir(), name)
    raw = pathlib.Path(path).read_bytes()
    key, _data = marshal.loads(raw[len(parsecache._MAGIC) + parsecache._SUM_LEN:])
    assert parsecache._load(path, key, len(raw)) is not None
    assert parsecache._load(path, key, len(raw) - 1) is None
