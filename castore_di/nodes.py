"""The castore data model: nodes and validated, immutable Directory messages.

A :class:`Directory` maps names (bytes) to nodes. Its digest is the BLAKE3 of the
canonical protobuf encoding of ``tvix.castore.v1.Directory``, so digests match every
other implementation of the protocol byte for byte.

``size`` follows the protocol's definition: the number of entries plus, for each child
directory, that child's size. (tvix at HEAD counts every entry twice; we do not.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Union

import attrs

from castore_di.digests import B3_LEN, B3Digest, blake3_digest
from castore_di.errors import (
    DuplicateNameError,
    InvalidNameError,
    InvalidNodeError,
    InvalidSymlinkTargetError,
    SizeOverflowError,
    ValidationError,
    WrongSortingError,
)
if TYPE_CHECKING:
    from castore_di.proto import castore_pb2

__all__ = [
    "FileNode",
    "DirectoryNode",
    "SymlinkNode",
    "Node",
    "Directory",
    "MAX_NAME_LEN",
    "MAX_TARGET_LEN",
    "U64_MAX",
    "validate_name",
    "validate_symlink_target",
    "node_to_proto",
    "node_from_proto",
]

MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
U64_MAX = 2**64 - 1


def validate_name(name: bytes | str) -> bytes:
    """Return ``name`` as bytes, or raise :class:`InvalidNameError` (rules checked in order)."""
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    if type(name) is bytes and 2 < len(name) <= MAX_NAME_LEN and b"\0" not in name and b"/" not in name:
        return name  # the common case, decided in one pass
    if not name:
        raise InvalidNameError(name, "empty", "cannot be empty")
    if name == b"..":
        raise InvalidNameError(name, "parent", "cannot be '..'")
    if name == b".":
        raise InvalidNameError(name, "curdir", "cannot be '.'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(name, "too_long", f"cannot be over {MAX_NAME_LEN} bytes long")
    if b"\0" in name:
        raise InvalidNameError(name, "null", "cannot contain null bytes")
    if b"/" in name:
        raise InvalidNameError(name, "slashes", "cannot contain slashes")
    return bytes(name)


def validate_symlink_target(target: bytes | str) -> bytes:
    """Return ``target`` as bytes, or raise :class:`InvalidSymlinkTargetError`."""
    if isinstance(target, str):
        target = target.encode("utf-8", "surrogateescape")
    if not target:
        raise InvalidSymlinkTargetError(target, "empty", "cannot be empty")
    if len(target) > MAX_TARGET_LEN:
        raise InvalidSymlinkTargetError(target, "too_long", f"cannot be over {MAX_TARGET_LEN} bytes long")
    if b"\0" in target:
        raise InvalidSymlinkTargetError(target, "null", "cannot contain null bytes")
    return bytes(target)


def _u64(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise ValidationError(f"{attribute.name} must be an integer in [0, 2**64), got {value!r}")


@attrs.frozen(slots=True)
class FileNode:
    """A regular file: the BLAKE3 digest of its contents, its size, its executable bit."""

    digest: B3Digest = attrs.field(converter=B3Digest)
    size: int = attrs.field(validator=_u64)
    executable: bool = False


@attrs.frozen(slots=True)
class DirectoryNode:
    """A child directory: the digest of its Directory message and its (spec) size."""

    digest: B3Digest = attrs.field(converter=B3Digest)
    size: int = attrs.field(validator=_u64)


@attrs.frozen(slots=True)
class SymlinkNode:
    """A symbolic link; the target is kept as given (absolute and ``..`` allowed)."""

    target: bytes = attrs.field(converter=validate_symlink_target)


Node = Union[FileNode, DirectoryNode, SymlinkNode]


class Directory:
    """An immutable, validated directory: a sorted map from names to nodes.

    Construct it from a mapping or from ``(name, node)`` pairs; names may be ``bytes`` or
    ``str``. Invalid names, duplicates and a size over ``2**64 - 1`` raise subclasses of
    :class:`~castore_di.errors.ValidationError`.
    """

    __slots__ = ("_entries", "_index", "_size", "_encoded", "_digest")

    _entries: tuple[tuple[bytes, Node], ...]
    _index: dict[bytes, Node]
    _size: int
    _encoded: bytes | None
    _digest: B3Digest | None

    def __init__(
        self, entries: Mapping[bytes, Node] | Mapping[str, Node] | Iterable[tuple[bytes | str, Node]] = ()
    ) -> None:
        items: Iterable[tuple[bytes | str, Node]] = entries.items() if isinstance(entries, Mapping) else entries
        index: dict[bytes, Node] = {}
        size = 0
        for raw_name, node in items:
            name = validate_name(raw_name)
            if not isinstance(node, (FileNode, DirectoryNode, SymlinkNode)):
                raise ValidationError(f"entry {name!r} is not a node: {node!r}")
            if name in index:
                raise DuplicateNameError(name)
            index[name] = node
            size += 1 + (node.size if type(node) is DirectoryNode else 0)
        if size > U64_MAX:
            raise SizeOverflowError()
        self._index = index
        self._entries = tuple(sorted(index.items(), key=lambda kv: kv[0]))
        self._size = size
        self._encoded = None
        self._digest = None

    # -- mapping-like access --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[bytes]:
        return (name for name, _ in self._entries)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogateescape")
        return name in self._index

    def __getitem__(self, name: bytes | str) -> Node:
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogateescape")
        return self._index[name]

    def get(self, name: bytes | str) -> Node | None:
        try:
            return self[name]
        except KeyError:
            return None

    def items(self) -> tuple[tuple[bytes, Node], ...]:
        """All ``(name, node)`` pairs in name order."""
        return self._entries

    def directories(self) -> list[tuple[bytes, DirectoryNode]]:
        return [(n, v) for n, v in self._entries if type(v) is DirectoryNode]

    def files(self) -> list[tuple[bytes, FileNode]]:
        return [(n, v) for n, v in self._entries if type(v) is FileNode]

    def symlinks(self) -> list[tuple[bytes, SymlinkNode]]:
        return [(n, v) for n, v in self._entries if type(v) is SymlinkNode]

    def with_entry(self, name: bytes | str, node: Node) -> "Directory":
        """A new Directory with ``name`` added (a duplicate name is an error)."""
        return Directory([*self._entries, (name, node)])

    @property
    def size(self) -> int:
        """Entries plus the sizes of child directories (the protocol's definition)."""
        return self._size

    # -- wire form --------------------------------------------------------------------

    def to_proto(self) -> castore_pb2.Directory:
        from castore_di.proto import castore_pb2

        msg = castore_pb2.Directory()
        for name, node in self._entries:
            if type(node) is DirectoryNode:
                msg.directories.add(name=name, digest=node.digest, size=node.size)
            elif type(node) is FileNode:
                msg.files.add(name=name, digest=node.digest, size=node.size, executable=node.executable)
            else:
                assert type(node) is SymlinkNode
                msg.symlinks.add(name=name, target=node.target)
        return msg

    def encode(self) -> bytes:
        """The canonical protobuf encoding (the bytes the digest is computed over)."""
        if self._encoded is None:
            self._encoded = self.to_proto().SerializeToString(deterministic=True)
        return self._encoded

    @property
    def digest(self) -> B3Digest:
        if self._digest is None:
            self._digest = blake3_digest(self.encode())
        return self._digest

    def as_node(self) -> DirectoryNode:
        """The node a parent uses to refer to this directory."""
        return DirectoryNode(self.digest, self._size)

    @classmethod
    def from_proto(cls, msg: castore_pb2.Directory) -> "Directory":
        """Validate a protobuf Directory; checks run in the reference's order."""
        fast = _valid_index(msg)
        if fast is not None:
            return cls._from_index(*fast)
        # Something is wrong (or unusual): the checks one by one, to raise the reference's error.
        # 1. per-list ordering and duplicates
        for lst in (msg.directories, msg.files, msg.symlinks):
            prev = b""
            for n in lst:
                if n.name < prev:
                    raise WrongSortingError(n.name)
                if n.name == prev:
                    validate_name(n.name)  # an empty first name is an invalid name
                    raise DuplicateNameError(n.name)
                prev = n.name
        # 2. per-node payload, then name
        pairs: list[tuple[bytes, Node]] = []
        for d in msg.directories:
            if len(d.digest) != B3_LEN:
                raise InvalidNodeError(d.name, "invalid_digest_length", f"invalid digest length: {len(d.digest)}")
            pairs.append((validate_name(d.name), DirectoryNode(d.digest, d.size)))
        for f in msg.files:
            if len(f.digest) != B3_LEN:
                raise InvalidNodeError(f.name, "invalid_digest_length", f"invalid digest length: {len(f.digest)}")
            pairs.append((validate_name(f.name), FileNode(f.digest, f.size, f.executable)))
        for s in msg.symlinks:
            try:
                target = validate_symlink_target(s.target)
            except InvalidSymlinkTargetError as e:
                raise InvalidNodeError(s.name, "invalid_symlink_target", f"invalid symlink target: {e.reason}") from e
            pairs.append((validate_name(s.name), SymlinkNode(target)))
        # 3. across lists (duplicates, size overflow); names are already valid
        index: dict[bytes, Node] = {}
        size = 0
        for name, node in pairs:
            if name in index:
                raise DuplicateNameError(name)
            index[name] = node
            size += 1 + (node.size if type(node) is DirectoryNode else 0)
        if size > U64_MAX:
            raise SizeOverflowError()
        return cls._from_index(index, size)

    @classmethod
    def _from_index(cls, index: dict[bytes, Node], size: int) -> "Directory":
        self = cls.__new__(cls)
        self._index = index
        self._entries = tuple(sorted(index.items(), key=lambda kv: kv[0]))
        self._size = size
        self._encoded = None
        self._digest = None
        return self

    @classmethod
    def _prebuilt(
        cls, entries: tuple[tuple[bytes, Node], ...], size: int, encoded: bytes, digest: B3Digest
    ) -> "Directory":
        """A directory whose caller already validated and sorted ``entries`` and encoded them
        canonically (the importer: names from the filesystem; its tests check the bytes)."""
        self = cls.__new__(cls)
        self._index = dict(entries)
        self._entries = entries
        self._size = size
        self._encoded = encoded
        self._digest = digest
        return self

    @classmethod
    def decode(cls, data: bytes) -> "Directory":
        """Parse and validate protobuf bytes (unknown fields are dropped).

        Bytes in the canonical encoding (what :meth:`encode` writes, so what stores hold) are
        read without protobuf and kept as the directory's encoding; anything else is parsed
        by protobuf and checked one rule at a time, for the reference's errors.
        """
        if type(data) is not bytes:
            data = bytes(data)
        found = _canonical_index(data)
        if found is not None:
            self = cls._from_index(*found)
            self._encoded = data
            return self
        from castore_di.proto import castore_pb2

        msg = castore_pb2.Directory()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError (a plain Exception subclass)
            raise ValidationError(f"cannot decode Directory message: {e}") from e
        return cls.from_proto(msg)

    # -- value semantics ----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directory):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Directory({dict(self._entries)!r})"


# Nodes built from values already checked (by _valid_index): attrs' __init__ would re-run the
# converter and validators; the slots are set directly (as attrs' own __init__ does).
_new = object.__new__
_new_digest = bytes.__new__
_file_digest = FileNode.__dict__["digest"].__set__
_file_size = FileNode.__dict__["size"].__set__
_file_executable = FileNode.__dict__["executable"].__set__
_dir_digest = DirectoryNode.__dict__["digest"].__set__
_dir_size = DirectoryNode.__dict__["size"].__set__
_DOTS = (b".", b"..")  # the empty name fails the order check (nothing sorts before it)


def _valid_index(msg: castore_pb2.Directory) -> tuple[dict[bytes, Node], int] | None:
    """The entries and size of a Directory message in one pass, or ``None`` as soon as any check
    fails or a name needs a closer look (then :meth:`Directory.from_proto` checks one by one)."""
    index: dict[bytes, Node] = {}
    size = 0
    prev = b""
    for d in msg.directories:
        name = d.name
        digest = d.digest
        if name <= prev or len(digest) != B3_LEN or len(name) > MAX_NAME_LEN or (len(name) < 3 and name in _DOTS) or b"/" in name or b"\0" in name:
            return None
        prev = name
        dnode = _new(DirectoryNode)
        _dir_digest(dnode, _new_digest(B3Digest, digest))
        _dir_size(dnode, d.size)
        index[name] = dnode
        size += 1 + d.size
    prev = b""
    for f in msg.files:
        name = f.name
        digest = f.digest
        if (name <= prev or len(digest) != B3_LEN or len(name) > MAX_NAME_LEN or (len(name) < 3 and name in _DOTS) or b"/" in name
                or b"\0" in name or name in index):
            return None
        prev = name
        fnode = _new(FileNode)
        _file_digest(fnode, _new_digest(B3Digest, digest))
        _file_size(fnode, f.size)
        _file_executable(fnode, f.executable)
        index[name] = fnode
        size += 1
    prev = b""
    for s in msg.symlinks:
        name = s.name
        target = s.target
        if (name <= prev or len(name) > MAX_NAME_LEN or (len(name) < 3 and name in _DOTS) or b"/" in name or b"\0" in name or name in index
                or not target or len(target) > MAX_TARGET_LEN or b"\0" in target):
            return None
        prev = name
        index[name] = SymlinkNode(target)
        size += 1
    if size > U64_MAX:
        return None
    return index, size


class _NotCanonical(Exception):
    """Inside :func:`_canonical_index`: the bytes are not a valid directory in canonical form."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A minimally encoded varint at ``pos`` (at most 10 bytes) and the position after it."""
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 or shift > 63:  # a padded or over-long encoding is not canonical
                raise _NotCanonical()
            return value, pos + 1
        shift += 7


_DIGEST_FIELD = bytes((0x12, B3_LEN))  # field 2, length-delimited, 32 bytes


def _canonical_index(data: bytes) -> tuple[dict[bytes, Node], int] | None:
    """The entries and size of ``data`` when it is a valid Directory in canonical encoding,
    read without protobuf; ``None`` for anything else.

    Canonical as :meth:`Directory.encode` writes it: the lists in field order, each node's
    fields in field order with default values left out, minimal varints, nothing unknown.
    What this accepts therefore encodes back to exactly ``data``; the checks are those of
    :func:`_valid_index`.
    """
    index: dict[bytes, Node] = {}
    size = 0
    pos = 0
    end = len(data)
    field = 0x0A
    prev = b""
    try:
        while pos < end:
            tag = data[pos]
            if tag != field:
                if tag not in (0x12, 0x1A) or tag < field:
                    return None
                field, prev = tag, b""
            length = data[pos + 1]
            if length < 0x80:
                pos += 2
            else:
                length, pos = _varint(data, pos + 1)
            stop = pos + length
            if stop > end or data[pos] != 0x0A:
                return None
            name_len = data[pos + 1]
            if name_len < 0x80:
                pos += 2
            else:
                name_len, pos = _varint(data, pos + 1)
            name = data[pos : pos + name_len]
            pos += name_len
            if (pos > stop or name <= prev or name_len > MAX_NAME_LEN or (name_len < 3 and name in _DOTS)
                    or b"/" in name or b"\0" in name or name in index):
                return None
            prev = name
            if field == 0x1A:  # SymlinkNode: name, target
                if data[pos] != 0x12:
                    return None
                target_len, pos = _varint(data, pos + 1)
                target = data[pos : pos + target_len]
                pos += target_len
                if not target_len or target_len > MAX_TARGET_LEN or b"\0" in target:
                    return None
                index[name] = SymlinkNode(target)
                size += 1
            else:  # DirectoryNode: name, digest, size; FileNode: name, digest, size, executable
                if data[pos : pos + 2] != _DIGEST_FIELD:
                    return None
                digest = data[pos + 2 : pos + 2 + B3_LEN]
                pos += 2 + B3_LEN
                node_size = 0
                if pos < stop and data[pos] == 0x18:
                    node_size, pos = _varint(data, pos + 1)
                    if node_size == 0 or node_size > U64_MAX:
                        return None
                if field == 0x0A:
                    dnode = _new(DirectoryNode)
                    _dir_digest(dnode, _new_digest(B3Digest, digest))
                    _dir_size(dnode, node_size)
                    index[name] = dnode
                    size += 1 + node_size
                else:
                    executable = pos < stop and data[pos] == 0x20
                    if executable:
                        if data[pos + 1] != 1:
                            return None
                        pos += 2
                    fnode = _new(FileNode)
                    _file_digest(fnode, _new_digest(B3Digest, digest))
                    _file_size(fnode, node_size)
                    _file_executable(fnode, executable)
                    index[name] = fnode
                    size += 1
            if pos != stop:
                return None
    except (IndexError, _NotCanonical):
        return None
    if size > U64_MAX:
        return None
    return index, size


def node_to_proto(name: bytes, node: Node) -> castore_pb2.Node:
    """A named ``Node`` message (the name may be empty for root nodes)."""
    from castore_di.proto import castore_pb2

    if type(node) is DirectoryNode:
        return castore_pb2.Node(directory=castore_pb2.DirectoryNode(name=name, digest=node.digest, size=node.size))
    if type(node) is FileNode:
        return castore_pb2.Node(
            file=castore_pb2.FileNode(name=name, digest=node.digest, size=node.size, executable=node.executable)
        )
    assert type(node) is SymlinkNode
    return castore_pb2.Node(symlink=castore_pb2.SymlinkNode(name=name, target=node.target))


def node_from_proto(msg: castore_pb2.Node) -> tuple[bytes, Node]:
    """Validate a ``Node`` message; returns its (possibly empty) name and the node."""
    kind = msg.WhichOneof("node")
    if kind is None:
        raise ValidationError("no node set")
    if kind == "symlink":
        s = msg.symlink
        try:
            return s.name, SymlinkNode(s.target)
        except InvalidSymlinkTargetError as e:
            raise InvalidNodeError(s.name, "invalid_symlink_target", f"invalid symlink target: {e.reason}") from e
    sub = msg.directory if kind == "directory" else msg.file
    if len(sub.digest) != B3_LEN:
        raise InvalidNodeError(sub.name, "invalid_digest_length", f"invalid digest length: {len(sub.digest)}")
    if kind == "directory":
        return sub.name, DirectoryNode(sub.digest, sub.size)
    return sub.name, FileNode(sub.digest, sub.size, msg.file.executable)
