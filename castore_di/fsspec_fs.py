"""A read-only fsspec filesystem over stored trees: ``castore://<root digest>/path/in/tree``.

Registered through fsspec's ``fsspec.specs`` entry point as protocol ``castore``::

    import fsspec
    with fsspec.open("castore://<64 hex digits>/data/table.csv", "rb") as f:
        f.seek(100)
        f.read(10)

Storage options choose the services as the CLI does: ``config=`` (a config path or mapping,
as :func:`~castore_di.composition.load_container` takes; ``blob_service=`` /
``directory_service=`` name the instances) or ``blob_service_addr=`` /
``directory_service_addr=`` URLs; with none, the embedded default store. The first path
component is the root directory's digest (64 hex digits); paths below it resolve inside the
tree, relative symlinks included (see :class:`~castore_di.treeview.TreeView`). Every byte
returned was verified against its chunk's digest.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Mapping
from typing import Any

from fsspec.asyn import AsyncFileSystem, sync
from fsspec.spec import AbstractBufferedFile

from castore_di.cli.context import CliContext
from castore_di.digests import B3Digest
from castore_di.errors import DigestError
from castore_di.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from castore_di.treeview import FileReader, PathError, TreeView

__all__ = ["CastoreFileSystem", "CastoreFile"]

_COPY_BLOCK = 1 << 20


def _split(path: str) -> tuple[B3Digest, str]:
    root, _, rest = path.partition("/")
    if not root:
        raise FileNotFoundError(errno.ENOENT, "a castore path starts with a root directory digest", path)
    try:
        return B3Digest.parse(root), rest
    except DigestError as e:
        raise ValueError(f"castore path {path!r}: the first component is not a digest ({e})") from e


class CastoreFileSystem(AsyncFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """Read-only access to stored trees (see the module docstring)."""

    protocol = "castore"
    root_marker = ""
    cachable = True

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        blob_service_addr: str | None = None,
        directory_service_addr: str | None = None,
        blob_service: str = "default",
        directory_service: str = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        path = None if config is None or isinstance(config, Mapping) else os.fspath(config)
        self._ctx = CliContext(config_path=path, blob_name=blob_service, directory_name=directory_service,
                               blob_addr=blob_service_addr, directory_addr=directory_service_addr,
                               config=config if isinstance(config, Mapping) else None)
        self._view: TreeView | None = None

    def _tree(self) -> TreeView:
        if self._view is None:
            self._view = TreeView(self._ctx.blob_service(), self._ctx.directory_service())
        return self._view

    async def _aclose(self) -> None:
        await self._ctx.aclose()
        self._view = None

    def close(self) -> None:
        """Close the services this filesystem opened."""
        sync(self.loop, self._aclose)

    # -- lookups -------------------------------------------------------------------------

    async def _node(self, path: str, follow: bool = True) -> Node:
        root, rest = _split(path)
        try:
            return await self._tree().resolve(root, rest, follow=follow)
        except PathError as e:
            if e.errno == errno.ENOTDIR:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
            raise FileNotFoundError(e.errno, e.strerror, path) from None

    async def _describe(self, path: str, node: Node) -> dict[str, Any]:
        """The info dict of ``node`` at ``path``; a symlink is described by what it points to."""
        out: dict[str, Any] = {"name": path}
        if type(node) is SymlinkNode:
            out["islink"] = True
            out["destination"] = os.fsdecode(node.target)
            try:
                node = await self._node(path)
            except (FileNotFoundError, NotADirectoryError):
                out.update(type="other", size=0)  # dangling, absolute, or leaving the tree
                return out
        if type(node) is DirectoryNode:
            out.update(type="directory", size=0, digest=str(node.digest), entries=node.size)
        else:
            assert type(node) is FileNode
            out.update(type="file", size=node.size, digest=str(node.digest), executable=node.executable)
        out.setdefault("islink", False)
        return out

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return await self._describe(path, await self._node(path, follow=False))

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        node = await self._node(path)
        if type(node) is not DirectoryNode:
            info = await self._info(path)
            return [info] if detail else [path]
        directory = await self._tree().directory(node.digest)
        names = [f"{path}/{os.fsdecode(name)}" for name, _ in directory.items()]
        if not detail:
            return names
        return [await self._describe(name, child) for name, (_, child) in zip(names, directory.items())]

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        reader = await self._reader(path)
        try:
            size = reader.size
            begin = 0 if start is None else (max(size + start, 0) if start < 0 else start)
            stop = size if end is None else (max(size + end, 0) if end < 0 else min(end, size))
            return await reader.read(begin, stop - begin)
        finally:
            await reader.close()

    async def _reader(self, path: str) -> FileReader:
        node = await self._node(path)
        if type(node) is DirectoryNode:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        assert type(node) is FileNode
        return await self._tree().open_file(node)

    async def _get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        """Copy one file to the local ``lpath``, block by block (writes in a thread)."""
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            return
        reader = await self._reader(rpath)
        try:
            with open(lpath, "wb") as out:
                for offset in range(0, reader.size, _COPY_BLOCK):
                    await asyncio.to_thread(out.write, await reader.read(offset, _COPY_BLOCK))
            if reader.node.executable:
                await asyncio.to_thread(os.chmod, lpath, 0o755)
        finally:
            await reader.close()

    # -- refused writes ------------------------------------------------------------------

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EROFS, "castore filesystems are read-only")

    async def _aread_only(self, *args: Any, **kwargs: Any) -> Any:
        self._read_only()

    _pipe_file = _put_file = _rm_file = _rm = _cp_file = _mkdir = _makedirs = _aread_only
    mkdir = makedirs = rm = rm_file = rmdir = touch = mv = cp_file = _read_only

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> "CastoreFile":
        if mode != "rb":
            self._read_only()
        path = self._strip_protocol(path)
        info = self.info(path)
        if info["type"] == "directory":
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if info["type"] != "file":
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return CastoreFile(self, path, mode, block_size=block_size, cache_options=cache_options,
                           size=info["size"], **kwargs)


class CastoreFile(AbstractBufferedFile):  # type: ignore[misc]  # fsspec is untyped
    """A seekable, read-only file; each block read is fetched by chunk and verified."""

    DEFAULT_BLOCK_SIZE = 1 << 20

    def __init__(self, fs: CastoreFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        super().__init__(fs, path, mode, **kwargs)
        self._reader: FileReader | None = None

    async def _async_fetch(self, start: int, end: int) -> bytes:
        if self._reader is None:
            self._reader = await self.fs._reader(self.path)
        return await self._reader.read(start, end - start)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return bytes(sync(self.fs.loop, self._async_fetch, start, end))

    def close(self) -> None:
        if self._reader is not None and not self.closed:
            reader, self._reader = self._reader, None
            sync(self.fs.loop, reader.close)
        super().close()
