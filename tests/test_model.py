"""Digests, nodes and Directory validation (reference sections 2 and 3)."""

from __future__ import annotations

import pytest

from castore_di import B3Digest, Directory
from castore_di.digests import EMPTY_DIGEST, blake3_digest
from castore_di.errors import (
    DigestError,
    DuplicateNameError,
    InvalidNameError,
    InvalidNodeError,
    SizeOverflowError,
    ValidationError,
    WrongSortingError,
)
from castore_di.nodes import U64_MAX, DirectoryNode, FileNode, SymlinkNode, node_from_proto, node_to_proto
from castore_di.proto import castore_pb2
from castore_di.testing.fixtures import BLOB_A_DIGEST, DIRECTORY_A, DIRECTORY_B, DIRECTORY_C, DIRECTORY_D, DIRECTORY_WITH_KEEP

D = bytes(range(32))


class TestDigest:
    def test_forms(self) -> None:
        d = B3Digest(D)
        assert B3Digest.from_hex(d.hex()) == d
        assert B3Digest.parse(str(d)) == d
        assert B3Digest.parse(d.hex()) == d
        assert str(EMPTY_DIGEST) == "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="
        assert EMPTY_DIGEST.hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

    def test_hashable_and_ordered(self) -> None:
        a, b = B3Digest(b"\x00" * 32), B3Digest(b"\x01" + b"\x00" * 31)
        assert a < b and sorted([b, a]) == [a, b]
        assert len({a, B3Digest(bytes(a)), b}) == 2

    @pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
    def test_wrong_length(self, n: int) -> None:
        with pytest.raises(DigestError, match=f"invalid digest length: {n}"):
            B3Digest(b"x" * n)

    @pytest.mark.parametrize("text", ["b3:!!!", "zz" * 32, "b3:AAAA"])
    def test_bad_text(self, text: str) -> None:
        with pytest.raises(DigestError):
            B3Digest.parse(text)

    def test_hello_world(self) -> None:
        assert blake3_digest(b"Hello World").hex() == "41f8394111eb713a22165c46c90ab8f0fd9399c92028fd6d288944b23ff5bf76"


class TestNames:
    @pytest.mark.parametrize(
        ("name", "code"),
        [(b"", "empty"), (b"..", "parent"), (b".", "curdir"), (b"X" * 256, "too_long"), (b"foo\0", "null"),
         (b"a/b", "slashes"), (b"/", "slashes")],
    )
    def test_invalid(self, name: bytes, code: str) -> None:
        with pytest.raises(InvalidNameError) as e:
            Directory({name: SymlinkNode(b"t")})
        assert e.value.code == code

    def test_valid_odd_names(self) -> None:
        d = Directory({b"aa": SymlinkNode(b"t"), b"\xc5\xc4": SymlinkNode(b"t"), b"X" * 255: SymlinkNode(b"t")})
        assert len(d) == 3


class TestSymlinkTargets:
    @pytest.mark.parametrize("target", [b"aa", b".", b"./..", b"..", b"a/b", b"/a/b", b"\xc5\xc4\xd6", b"x" * 4095])
    def test_valid(self, target: bytes) -> None:
        assert SymlinkNode(target).target == target

    @pytest.mark.parametrize(("target", "code"), [(b"", "empty"), (b"x" * 4096, "too_long"), (b"a\0b", "null")])
    def test_invalid(self, target: bytes, code: str) -> None:
        with pytest.raises(ValidationError) as e:
            SymlinkNode(target)
        assert getattr(e.value, "code") == code


class TestDirectory:
    def test_empty_digest_equals_empty_blob(self) -> None:
        assert Directory().digest == EMPTY_DIGEST
        assert Directory().encode() == b""
        assert Directory().size == 0

    def test_size_follows_the_protocol(self) -> None:
        # entries + sum of child directory sizes (tvix HEAD would double count)
        assert DIRECTORY_WITH_KEEP.size == 1
        assert DIRECTORY_A.size == 2
        assert DIRECTORY_C.size == 2 + 2 + 2
        assert DIRECTORY_B.size == 1 + 1
        assert DIRECTORY_D.size == 4 + DIRECTORY_A.size + DIRECTORY_B.size + DIRECTORY_C.size == 14
        assert DIRECTORY_D.to_proto().directories[2].size == DIRECTORY_C.size

    def test_known_digest(self) -> None:
        # Checked against an independent proto3 encoding: fields in order, defaults omitted.
        d = Directory({b"keep": FileNode(EMPTY_DIGEST, 0, False)})
        expected = b"\x12\x28" + b"\x0a\x04keep" + b"\x12\x20" + bytes(EMPTY_DIGEST)
        assert d.encode() == expected
        assert d.digest == blake3_digest(expected)

    def test_roundtrip_and_equality(self) -> None:
        again = Directory.decode(DIRECTORY_D.encode())
        assert again == DIRECTORY_D and again.digest == DIRECTORY_D.digest and hash(again) == hash(DIRECTORY_D)

    def test_duplicate_across_kinds(self) -> None:
        with pytest.raises(DuplicateNameError):
            Directory([(b"a", SymlinkNode(b"x")), (b"a", FileNode(BLOB_A_DIGEST, 1))])

    def test_size_overflow(self) -> None:
        with pytest.raises(SizeOverflowError):
            Directory({b"foo": DirectoryNode(D, U64_MAX)})
        with pytest.raises(SizeOverflowError):
            Directory({b"a": DirectoryNode(D, U64_MAX // 2), b"b": DirectoryNode(D, U64_MAX // 2)})

    def test_immutable_accessors(self) -> None:
        assert list(DIRECTORY_D) == [b"a", b"b", b"c", b"f"]
        assert "a" in DIRECTORY_D and DIRECTORY_D["f"] == FileNode(BLOB_A_DIGEST, 11)
        assert [n for n, _ in DIRECTORY_D.directories()] == [b"a", b"b", b"c"]
        bigger = DIRECTORY_A.with_entry("z", SymlinkNode(b"q"))
        assert len(bigger) == 3 and len(DIRECTORY_A) == 2


def _msg(**lists: list[object]) -> castore_pb2.Directory:
    return castore_pb2.Directory(**lists)  # type: ignore[arg-type]


class TestFromProtoValidationOrder:
    def test_wrong_sorting(self) -> None:
        m = _msg(symlinks=[castore_pb2.SymlinkNode(name=b"b", target=b"t"), castore_pb2.SymlinkNode(name=b"a", target=b"t")])
        with pytest.raises(WrongSortingError):
            Directory.from_proto(m)

    def test_sorting_is_per_list(self) -> None:
        m = _msg(
            directories=[castore_pb2.DirectoryNode(name=b"z", digest=D, size=0)],
            symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"t")],
        )
        assert [n for n, _ in Directory.from_proto(m).items()] == [b"a", b"z"]

    def test_duplicate_in_list(self) -> None:
        m = _msg(files=[castore_pb2.FileNode(name=b"a", digest=D), castore_pb2.FileNode(name=b"a", digest=D)])
        with pytest.raises(DuplicateNameError):
            Directory.from_proto(m)

    def test_empty_first_name_is_invalid_name(self) -> None:
        m = _msg(files=[castore_pb2.FileNode(name=b"", digest=D)])
        with pytest.raises(InvalidNameError):
            Directory.from_proto(m)

    def test_duplicate_across_lists(self) -> None:
        m = _msg(files=[castore_pb2.FileNode(name=b"a", digest=D)], symlinks=[castore_pb2.SymlinkNode(name=b"a", target=b"t")])
        with pytest.raises(DuplicateNameError):
            Directory.from_proto(m)

    @pytest.mark.parametrize("n", [0, 31, 33])
    def test_digest_length_checked_before_name(self, n: int) -> None:
        m = _msg(files=[castore_pb2.FileNode(name=b"..", digest=b"x" * n)])
        with pytest.raises(InvalidNodeError) as e:
            Directory.from_proto(m)
        assert e.value.code == "invalid_digest_length"
        m = _msg(directories=[castore_pb2.DirectoryNode(name=b"ok", digest=b"x" * n)])
        with pytest.raises(InvalidNodeError):
            Directory.from_proto(m)

    @pytest.mark.parametrize("target", [b"", b"a\0", b"x" * 4096])
    def test_bad_symlink_target(self, target: bytes) -> None:
        m = _msg(symlinks=[castore_pb2.SymlinkNode(name=b"s", target=target)])
        with pytest.raises(InvalidNodeError) as e:
            Directory.from_proto(m)
        assert e.value.code == "invalid_symlink_target"

    def test_garbage_bytes(self) -> None:
        with pytest.raises(ValidationError):
            Directory.decode(b"\xff\xff\xff\xff")

    def test_unknown_fields_are_dropped_from_digest(self) -> None:
        raw = DIRECTORY_A.encode() + b"\x20\x01"  # field 4 varint: unknown to Directory
        assert Directory.decode(raw).digest == DIRECTORY_A.digest


class TestNodeMessages:
    def test_roundtrip(self) -> None:
        for node in (FileNode(D, 3, True), DirectoryNode(D, 7), SymlinkNode(b"x")):
            assert node_from_proto(node_to_proto(b"n", node)) == (b"n", node)

    def test_no_node_set(self) -> None:
        with pytest.raises(ValidationError):
            node_from_proto(castore_pb2.Node())


class TestDecodeFastPath:
    """``from_proto`` checks a valid message in one pass and builds its nodes directly."""

    def test_same_nodes_as_construction(self) -> None:
        d = Directory({
            b"a": FileNode(D, 1, True), b"bb": FileNode(D, 2), b"ccc": DirectoryNode(D, 5),
            b"x.py": SymlinkNode(b"../t"), b"\xff\xfe": FileNode(EMPTY_DIGEST, 0),
        })
        back = Directory.decode(d.encode())
        assert back == d and back.size == d.size and back.digest == d.digest
        for name, node in back.items():
            assert type(node) is type(d[name]) and node == d[name] and hash(node) == hash(d[name])
            if not isinstance(node, SymlinkNode):
                assert type(node.digest) is B3Digest

    @pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
    def test_bad_names_still_raise_the_checks_error(self, name: bytes) -> None:
        m = castore_pb2.Directory()
        m.files.add(name=b"ok", digest=D, size=1)
        m.files.add(name=name, digest=D, size=1)
        with pytest.raises(ValidationError):
            Directory.from_proto(m)
