"""The pyfuse3 operations behind ``castore mount`` (imported only once FUSE is known to work).

Inodes are numbered in the order paths are first looked up and never reused during a mount
(path -> inode is stable; the root is 1). Trees are immutable, so the kernel may cache
entries (absent names too), attributes and file pages for as long as it likes (long
timeouts, ``keep_cache``): after the first visit ``getattr`` and ``stat`` do not reach this
process.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from typing import Final

import pyfuse3

from castore_di.digests import B3Digest
from castore_di.errors import CastoreError
from castore_di.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from castore_di.treeview import FileReader, TreeView

__all__ = ["CastoreOperations"]

_log = logging.getLogger("castore_di.mount")
_TIMEOUT: Final = 24 * 3600.0  # a stored tree never changes


class CastoreOperations(pyfuse3.Operations):  # type: ignore[misc]  # untyped without pyfuse3 installed
    """A read-only view of one tree."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, view: TreeView, root: B3Digest) -> None:
        super().__init__()
        self._view = view
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: DirectoryNode(root, 0)}
        self._parents: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self._by_path: dict[tuple[int, bytes], int] = {}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._files: dict[int, FileReader] = {}
        self._next_fh = itertools.count(1)
        self._uid, self._gid = os.getuid(), os.getgid()
        self.fetched: list[B3Digest] = []  # every chunk fetched by reads, in order (for stats and tests)

    # -- inodes ----------------------------------------------------------------------------

    def _inode(self, parent: int, name: bytes, node: Node) -> int:
        key = (parent, name)
        inode = self._by_path.get(key)
        if inode is None:
            inode = next(self._next_inode)
            self._by_path[key] = inode
            self._nodes[inode] = node
            self._parents[inode] = parent
        return inode

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, inode: int, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        attrs.entry_timeout = attrs.attr_timeout = _TIMEOUT
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_nlink = 1
        attrs.st_blksize = 1 << 16
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = 0
        if type(node) is DirectoryNode:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_size = 0
        elif type(node) is FileNode:
            attrs.st_mode = stat.S_IFREG | (0o555 if node.executable else 0o444)
            attrs.st_size = node.size
        else:
            assert type(node) is SymlinkNode
            attrs.st_mode = stat.S_IFLNK | 0o777
            attrs.st_size = len(node.target)
        attrs.st_blocks = (attrs.st_size + 511) // 512
        return attrs

    async def _directory_of(self, inode: int) -> DirectoryNode:
        node = self._node(inode)
        if type(node) is not DirectoryNode:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    async def _directory(self, node: DirectoryNode) -> Directory:
        try:
            return await self._view.directory(node.digest)
        except CastoreError as e:
            _log.error("castore mount: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from e

    # -- operations ------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = await self._directory_of(parent_inode)
        if name == b".":
            return self._attrs(parent_inode, parent)
        if name == b"..":
            up = self._parents[parent_inode]
            return self._attrs(up, self._node(up))
        child = (await self._directory(parent)).get(name)
        if child is None:
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
            negative.entry_timeout = _TIMEOUT
            return negative
        return self._attrs(self._inode(parent_inode, name, child), child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, self._node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if type(node) is not SymlinkNode:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._directory_of(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = (await self._directory(await self._directory_of(fh))).items()
        for index in range(start_id, len(entries)):
            name, child = entries[index]
            inode = self._inode(fh, name, child)
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode, child), index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        if type(node) is not FileNode:
            raise pyfuse3.FUSEError(errno.EISDIR if type(node) is DirectoryNode else errno.ELOOP)
        try:
            reader = await self._view.open_file(node)
        except CastoreError as e:
            _log.error("castore mount: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from e
        reader.fetched = self.fetched
        fh = next(self._next_fh)
        self._files[fh] = reader
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return await self._files[fh].read(off, size)
        except CastoreError as e:
            _log.error("castore mount: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from e

    async def release(self, fh: int) -> None:
        reader = self._files.pop(fh, None)
        if reader is not None:
            await reader.close()

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 1 << 16
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return not mode & os.W_OK

    async def close_all(self) -> None:
        """Release the readers of files still open at unmount."""
        for fh in list(self._files):
            await self.release(fh)
