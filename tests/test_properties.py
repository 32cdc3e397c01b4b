"""Property tests: Directory encoding round trips; invalid configs only ever raise ConfigError."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from castore_di import ConfigError, Directory, load_graph
from castore_di.nodes import DirectoryNode, FileNode, SymlinkNode
from castore_di.proto import castore_pb2

names = st.binary(min_size=1, max_size=40).filter(lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b)
digests = st.binary(min_size=32, max_size=32)
u64 = st.integers(min_value=0, max_value=2**40)
nodes = st.one_of(
    st.builds(FileNode, digests, u64, st.booleans()),
    st.builds(DirectoryNode, digests, u64),
    st.builds(SymlinkNode, st.binary(min_size=1, max_size=100).filter(lambda b: b"\0" not in b)),
)


@given(st.dictionaries(names, nodes, max_size=20))
def test_directory_roundtrip(entries: dict[bytes, Any]) -> None:
    d = Directory(entries)
    again = Directory.decode(d.encode())
    assert again == d
    assert again.digest == d.digest
    assert again.encode() == d.encode()
    assert Directory.from_proto(castore_pb2.Directory.FromString(d.to_proto().SerializeToString())) == d
    assert d.size == len(entries) + sum(n.size for n in entries.values() if isinstance(n, DirectoryNode))


@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_never_crashes(data: bytes) -> None:
    try:
        d = Directory.decode(data)
    except ValueError:
        return
    assert Directory.decode(d.encode()) == d


_tags = st.sampled_from(["memory", "combined", "cache", "objectstore", "grpc", "embedded", "bigtable", "nope", ""])
_keys = st.sampled_from(["type", "local", "remote", "near", "far", "url", "path", "populate_local",
                         "object_store_url", "avg_chunk_size", "project_id", "x"])
_inames = st.sampled_from(["default", "a", "b", "wire", "1x", "bad-name"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
                     _tags, _inames, st.sampled_from(["memory://", "memory://x", "cache://?near=memory://&far=a",
                                                      "grpc+http://127.0.0.1:1", "grpc+unix://h/p", "${NOPE}",
                                                      "objectstore+memory:///", "embedded:///tmp/x", "bigtable://i"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=8)
_instance = st.one_of(_values, st.fixed_dictionaries({"type": _tags}, optional={k: _values for k in
                                                                                ["local", "remote", "near", "far", "x"]}))
_section = st.one_of(st.dictionaries(_inames, _instance, max_size=4), _values)
_config = st.dictionaries(st.sampled_from(["blobservices", "directoryservices", "blobservice", "other"]),
                          _section, max_size=3)


@given(_config)
def test_random_configs_raise_only_config_errors(config: dict[str, Any]) -> None:
    try:
        load_graph(config)
    except ConfigError:
        pass


def _by_protobuf(data: bytes) -> Directory | None:
    """``data`` decoded by protobuf and the one-by-one checks (None when refused)."""
    try:
        return Directory.from_proto(castore_pb2.Directory.FromString(data))
    except Exception:
        return None


def _mutations(data: bytes, draw: Any) -> bytes:
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    op = draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
    if op == "flip":
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if op == "drop":
        return data[:i] + data[i + 1:]
    if op == "insert":
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i:]
    return data[:i]


@given(st.dictionaries(names, nodes, max_size=12), st.data())
def test_canonical_reading_agrees_with_protobuf(entries: dict[bytes, Any], data: Any) -> None:
    """Bytes read without protobuf are exactly a valid directory's encoding: whatever the
    reader accepts, protobuf decodes to the same directory, which encodes back to those bytes."""
    from castore_di.nodes import _canonical_index

    encoded = Directory(entries).encode()
    assert _canonical_index(encoded) is not None
    for raw in (encoded, _mutations(encoded, data.draw), _mutations(_mutations(encoded, data.draw), data.draw)):
        found = _canonical_index(raw)
        if found is None:
            continue
        fast = Directory._from_index(*found)
        slow = _by_protobuf(raw)
        assert slow is not None and fast == slow and fast.size == slow.size
        assert slow.encode() == raw
        assert Directory.decode(raw).digest == slow.digest


@given(st.binary(max_size=200))
def test_canonical_reading_of_arbitrary_bytes(raw: bytes) -> None:
    from castore_di.nodes import _canonical_index

    found = _canonical_index(raw)
    if found is not None:
        slow = _by_protobuf(raw)
        assert slow is not None and Directory._from_index(*found) == slow and slow.encode() == raw
