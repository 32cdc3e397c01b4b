"""Generated hostile configs; every one must load or raise ConfigError, nothing else.

Run by tests/test_config_limits.py in a child process with 2 GiB of address space (a
document that makes the loader grow without bound dies there with MemoryError, which
fails the run); each example has a deadline. Prints a JSON summary as its last line.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import reprlib
import sys
import tempfile
from collections import Counter
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from castore_di import ConfigError, load_graph

TAGS = ["memory", "combined", "grpc", "embedded", "objectstore", "cache", "bigtable"]
FIELDS = ["type", "local", "remote", "near", "far", "url", "path", "timeout", "map_size", "object_store_url",
          "object_store_options", "avg_chunk_size", "retries", "max_readers"]

huge_text = st.builds(lambda n, c: c * n, st.sampled_from([1000, 100_000, 1_000_000]),
                      st.sampled_from(["a", "$", "${A}", "\0", "é", "memory://"]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**100), max_value=10**100),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**4000]), st.floats(), st.text(max_size=12),
    st.sampled_from(TAGS + ["memory://", "grpc+http://h:1", "embedded:///tmp/x", "${NOPE}", "$${x}", "a\0b"]),
    st.binary(max_size=8), st.dates(), huge_text,
)
keys = st.one_of(st.sampled_from(FIELDS + ["default", "blobservices", "directoryservices", "provided", "wire"]),
                 st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.floats(), st.tuples(st.integers()))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


@st.composite
def shared(draw: st.DrawFn) -> Any:
    """A value whose parts are shared: nested fan-out (YAML aliases when dumped), maybe deep."""
    node: Any = draw(scalars)
    for _ in range(draw(st.integers(1, 12))):
        fan = draw(st.integers(1, 12))
        node = [node] * fan if draw(st.booleans()) else {f"k{i}": node for i in range(fan)}
    return node


def _fanned(leaf: Any, fan: int, levels: int) -> list[Any]:
    node: Any = leaf
    for _ in range(levels):
        node = [node] * fan
    return node  # type: ignore[no-any-return]


def deep(depth: int, mapping: bool) -> Any:
    node: Any = {}
    for _ in range(depth):
        node = {"x": node} if mapping else [node]
    return node


payloads = st.one_of(values, shared(), st.builds(deep, st.sampled_from([31, 33, 200, 5000]), st.booleans()))


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A config with the payload at the root, a section, an instance or a field."""
    payload = draw(payloads)
    where = draw(st.sampled_from(["root", "section", "instance", "field", "key"]))
    kind = draw(st.sampled_from(["blobservices", "directoryservices"]))
    if where == "root":
        return payload
    if where == "section":
        return {kind: payload}
    if where == "instance":
        return {kind: {draw(st.sampled_from(["default", "a"])): payload}}
    if where == "key":
        return {kind: {"default": {"type": "memory", draw(keys): payload}}}
    tag = draw(st.sampled_from(TAGS))
    return {kind: {"default": {"type": tag, draw(st.sampled_from(FIELDS)): payload}}}


class Boxed:
    """A generated value with a bounded repr (a shared structure's full repr is exponential)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        short = reprlib.Repr()
        short.maxlevel, short.maxstring, short.maxlong, short.maxother = 4, 60, 60, 60
        return f"Boxed({short.repr(self.value)})"


TEXTS = st.one_of(
    st.builds(lambda levels, fan: "a0: &a0 [lol]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]\n" for i in range(1, levels)),
        st.integers(2, 12), st.integers(1, 12)),
    st.builds(lambda d: "blobservices: " + "[" * d + "]" * d + "\n", st.sampled_from([33, 1000, 50_000])),
    st.builds(lambda d: "blobservices: " + "{a: " * d + "1" + "}" * d + "\n", st.sampled_from([33, 1000, 50_000])),
    st.sampled_from([
        "a: &a [*a]\n", "blobservices: &b {x: *b}\n", "blobservices: {default: !!python/object/apply:os.getcwd []}\n",
        "blobservices: !!set {a, b}\n", "blobservices: {default: !!binary aGk=}\n", "? [a]\n: b\n",
        "base: &b {type: memory}\nblobservices: {default: {<<: *b, x: 1}}\n", "--- 1\n--- 2\n", "\0", "%YAML 9.9\n---\n",
        "blobservices: {default: {type: memory}, default: {type: memory}}\n",
    ]),
)


def _expanded(value: Any, memo: dict[int, int]) -> int:
    """About the bytes JSON would write for ``value``: shared parts counted each time, long
    strings by their length (a few strings of megabytes under shared lists of a dozen
    entries would expand to gigabytes)."""
    if isinstance(value, (str, bytes)):
        return len(value) + 2
    if not isinstance(value, (dict, list)):
        return 24  # a number (a float's repr is about this long), a date, ...
    if len(memo) > 100_000:
        return _JSON_LIMIT  # too many containers to count: as good as too large
    if id(value) not in memo:
        memo[id(value)] = 2  # a cycle counts once
        total = 2
        for k, v in (value.items() if isinstance(value, dict) else ((None, v) for v in value)):
            total += _expanded(v, memo) + (len(k) + 4 if isinstance(k, str) else 24)
            if total >= _JSON_LIMIT:
                break
        memo[id(value)] = total
    return memo[id(value)]


def _written_once(value: Any, seen: set[int]) -> int:
    """About the bytes YAML would write for ``value``: a shared list or mapping once (an
    alias after that), every string where it appears."""
    if isinstance(value, (str, bytes)):
        return len(value) + 2
    if not isinstance(value, (dict, list)) or id(value) in seen:
        return 24
    seen.add(id(value))
    total = 2
    for k, v in (value.items() if isinstance(value, dict) else ((None, v) for v in value)):
        total += _written_once(v, seen) + (len(k) + 4 if isinstance(k, str) else 24)
        if total >= _TEXT_LIMIT:
            break
    return total


# A larger text is refused by its size alone (MAX_CONFIG_BYTES, tested on its own), while
# writing it costs the harness: JSON could exhaust the child's 2 GiB, and PyYAML's Python
# emitter takes about a second per MB (a few strings of 9 MB once took the run past its
# 120 s of CPU). Such a document is tried as a mapping only.
_TEXT_LIMIT = 2 << 20
_JSON_LIMIT = _TEXT_LIMIT
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _dump(doc: Any, fmt: str) -> str | None:
    try:
        if fmt == ".json" and _expanded(doc, {}) >= _JSON_LIMIT:
            return None  # JSON has no aliases: such a document is only tried as a mapping and as YAML
        if fmt == ".yaml":
            if _written_once(doc, set()) >= _TEXT_LIMIT:
                return None
            return yaml.dump(doc, Dumper=_YAML_DUMPER)
        if fmt == ".json":
            return json.dumps(doc)
    except (TypeError, ValueError, yaml.YAMLError, RecursionError):
        return None  # not representable in this format: try the mapping itself
    return None


# Shrinking documents of megabytes takes minutes: report the failing example as generated.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
outcomes: Counter[str] = Counter()
workdir = pathlib.Path(tempfile.mkdtemp())


def _load(source: Any) -> None:
    try:
        load_graph(source)
    except ConfigError:
        outcomes["config_errors"] += 1
    except BaseException as e:
        print(f"not a ConfigError: {type(e).__name__}: {str(e)[:300]} for {Boxed(source)!r}", file=sys.stderr)
        raise
    else:
        outcomes["loaded"] += 1
    outcomes["examples"] += 1


@settings(max_examples=150, deadline=datetime.timedelta(seconds=60), database=None,
          suppress_health_check=list(HealthCheck), phases=PHASES)
@given(st.composite(lambda draw: Boxed(draw(documents())))(), st.sampled_from(["mapping", ".yaml", ".json"]))
# A long string under shared lists: few containers, but gigabytes as JSON (it once exhausted
# this child's memory in json.dumps, before the loader saw anything).
@example(Boxed({"blobservices": {"a": _fanned("x" * 100_000, 5, 7)}}), ".json")
# Strings of 9 MB, each written out: over 100 s in PyYAML's Python emitter.
@example(Boxed({"blobservices": {"a": ["memory://" * 1_000_000] * 4}}), ".yaml")
def hostile_structures(boxed: Boxed, fmt: str) -> None:
    doc = boxed.value
    text = None if fmt == "mapping" else _dump(doc, fmt)
    if text is None:
        _load(doc if isinstance(doc, dict) else {"blobservices": doc})
        return
    path = workdir / f"c{fmt}"
    path.write_text(text, errors="surrogatepass")
    _load(path)


@settings(max_examples=60, deadline=datetime.timedelta(seconds=60), database=None,
          suppress_health_check=list(HealthCheck), phases=PHASES)
@given(st.composite(lambda draw: Boxed(draw(TEXTS)))(), st.sampled_from([".yaml", ".json", ".toml"]))
def hostile_texts(boxed: Boxed, fmt: str) -> None:
    text = boxed.value
    if fmt == ".json":
        text = text.replace("blobservices: ", '{"blobservices": ').rstrip("\n") + "}" if "[" in text[:20] else text
    elif fmt == ".toml":
        text = text.replace("blobservices: ", "blobservices = ")
    path = workdir / f"t{fmt}"
    path.write_text(text)
    _load(path)


if __name__ == "__main__":
    hostile_structures()
    hostile_texts()
    print(json.dumps(dict(outcomes)))
    sys.exit(0)
