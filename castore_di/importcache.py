"""A stat cache for re-imports: files whose metadata did not change are not read again.

Like git's index, restic's parent snapshot and rsync's quick check, the cache maps a
file's identity and metadata (device, inode, size, ``mtime_ns``, ``ctime_ns`` and the
owner-execute bit) to the digest its contents had when they were last imported. An
import looks every walked file up; the digests found are checked with one ``has_many``
(the cache knows no store: a blob missing from the store means the file is read again).
When the whole walk (names, kinds, symlink targets and every file's metadata) matches
the last import, its root directory's digest is reused too, once the directory service
confirms it holds that root (a directory service stores closures whole).

Trade-off: a file rewritten without changing its size, inode, ``mtime`` *and* ``ctime``
is not noticed (``ctime`` cannot be set back by a user program, so this takes a clock
set backwards or a raw disk edit). ``castore import --rehash`` reads everything.

Racy timestamps: a file whose ``mtime`` or ``ctime`` is within :data:`RACY_NS` of the
moment the import began could still change in the same timestamp tick after it is read,
without its metadata changing; such a file is never recorded, so the next import reads
it again (git's "racy git" rule).

One file per import root (its real path), under ``$XDG_CACHE_HOME/castore_di/import/``
(default ``~/.cache``), written only after an import succeeds, atomically (temporary
file, ``rename``; not ``fsync``ed: a cache lost or torn by a crash fails its checksum or
is simply absent, and the next import reads everything, so the save costs no disk flush). The format is a magic, a version, a BLAKE3 checksum and a
``marshal`` payload: a truncated, corrupt or foreign file is ignored with a warning. At
most :data:`MAX_ENTRIES` files per root and :data:`MAX_FILES` roots are kept (the least
recently written go first).
"""

from __future__ import annotations

import logging
import marshal
import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import Final

import attrs
import blake3

__all__ = ["ImportCache", "CacheState", "KEY", "RACY_NS", "MAX_ENTRIES", "MAX_FILES", "default_cache_dir"]

KEY: Final = struct.Struct("<QQQqqB")  # dev, ino, size, mtime_ns, ctime_ns, owner-execute bit
RACY_NS: Final = 2_000_000_000  # coarser than any common filesystem's timestamp granularity (FAT: 2 s)
MAX_ENTRIES: Final = 2_000_000
MAX_FILES: Final = 64
_MAGIC: Final = b"CASTIMPC"
_VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sI32s")
_log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/castore_di/import`` (``~/.cache/castore_di/import`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "castore_di", "import")


@attrs.define
class CacheState:
    """What the last import of one root left: its walk's fingerprint, root node and file digests."""

    tree: bytes = b""  # fingerprint of the whole walk; empty when the last import had racy files
    root_digest: bytes = b""
    root_size: int = 0
    digests: bytes = b""  # the tree's distinct file digests, concatenated
    files_raw: bytes = b""  # marshal'd {key: digest}, unpacked on first use
    _files: dict[bytes, bytes] | None = None

    @property
    def files(self) -> dict[bytes, bytes]:
        if self._files is None:
            try:
                files = marshal.loads(self.files_raw) if self.files_raw else {}
            except (EOFError, ValueError, TypeError):  # pragma: no cover - the checksum matched
                files = {}
            self._files = files if isinstance(files, dict) else {}
        return self._files


class ImportCache:
    """Where import caches live (``directory``), how recent a file may be (``racy_ns``),
    and whether an import may take digests from it (``reuse``; with ``False`` it reads every
    file and records the result, as ``castore import --rehash`` does).

    Methods do blocking file I/O: call them in a thread.
    """

    def __init__(self, directory: str | None = None, *, racy_ns: int = RACY_NS, reuse: bool = True) -> None:
        self.directory = directory if directory is not None else default_cache_dir()
        self.racy_ns = racy_ns
        self.reuse = reuse  # False: nothing is taken from the cache (every file is read), it is only written

    def path_for(self, root: str) -> str:
        """The cache file of the import root ``root`` (any path: its real path is the key)."""
        real = os.fsencode(os.path.realpath(root))
        return os.path.join(self.directory, blake3.blake3(real).hexdigest()[:32] + ".cache")

    def load(self, root: str, warn: Callable[[str], None] | None = None) -> CacheState:
        """The state recorded for ``root``; empty when there is none or it is unusable (warned)."""
        if not self.reuse:
            return CacheState()
        path = self.path_for(root)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return CacheState()
        except OSError as e:
            _warn(warn, f"ignoring import cache {path}: {e.strerror or e}")
            return CacheState()
        try:
            magic, version, checksum = _HEADER.unpack_from(raw)
            if magic != _MAGIC:
                raise ValueError("not an import cache")
            if version != _VERSION:
                raise ValueError(f"version {version}, expected {_VERSION}")
            body = memoryview(raw)[_HEADER.size :]
            if blake3.blake3(body).digest() != checksum:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            payload = marshal.loads(body)
            real, tree, root_digest, root_size, digests, files_raw = payload
            if not (isinstance(tree, bytes) and isinstance(root_digest, bytes) and isinstance(root_size, int)
                    and isinstance(digests, bytes) and isinstance(files_raw, bytes) and len(digests) % 32 == 0):
                raise ValueError("malformed payload")
        except (struct.error, ValueError, EOFError, TypeError) as e:
            _warn(warn, f"ignoring import cache {path}: {e}")
            return CacheState()
        if real != os.fsencode(os.path.realpath(root)):
            return CacheState()  # a hash collision of two roots' paths: start afresh
        return CacheState(tree, root_digest, root_size, digests, files_raw)

    def save(self, root: str, tree: bytes, root_digest: bytes, root_size: int, files: Iterable[tuple[bytes, bytes]]) -> None:
        """Record an import of ``root`` atomically (``tree`` empty: no reuse of the root)."""
        entries: dict[bytes, bytes] = {}
        for key, digest in files:
            if len(entries) >= MAX_ENTRIES:
                tree = b""  # the tree is no longer described completely
                break
            entries[key] = digest
        digests = b"".join(set(entries.values())) if tree else b""
        body = marshal.dumps((os.fsencode(os.path.realpath(root)), tree, root_digest if tree else b"",
                              root_size if tree else 0, digests, marshal.dumps(entries)))
        import tempfile

        path = self.path_for(root)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, _VERSION, blake3.blake3(body).digest()))
                f.write(body)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._trim(path)

    def touch(self, root: str) -> None:
        """Mark ``root``'s cache as just used (trimming removes the least recently written)."""
        try:
            os.utime(self.path_for(root))
        except OSError:
            pass

    def _trim(self, keep: str) -> None:
        """Remove the least recently written cache files beyond :data:`MAX_FILES`, and
        temporary files an interrupted save left (older than an hour)."""
        try:
            listed = os.listdir(self.directory)
            for n in listed:
                if n.startswith(".tmp-"):
                    p = os.path.join(self.directory, n)
                    if os.stat(p).st_mtime < time.time() - 3600:
                        os.unlink(p)
            names = [n for n in listed if n.endswith(".cache")]
            if len(names) <= MAX_FILES:
                return
            paths = [os.path.join(self.directory, n) for n in names]
            paths.sort(key=lambda p: os.stat(p).st_mtime_ns)
            for p in paths[: len(paths) - MAX_FILES]:
                if p != keep:
                    os.unlink(p)
        except OSError as e:  # another process trimming at the same time
            _log.debug("import cache trim: %s", e)


def _warn(warn: Callable[[str], None] | None, message: str) -> None:
    if warn is not None:
        warn(message)
    else:
        _log.warning("%s", message)
