"""The server's tables: inodes by ``O_PATH`` fd, and open file handles.

An inode is held by an ``O_PATH | O_NOFOLLOW`` fd, never by a path: a rename on the
host or in the guest never breaks it.  Inodes are keyed by ``(st_dev, st_ino)``, so
two hard links share one node id.  Each LOOKUP (and each entry READDIRPLUS or a
creating request returns) adds one to the node's lookup count; FORGET takes it
back, and a node whose count reaches zero closes its fd (FUSE protocol: "forget"
tells the server the kernel dropped ``nlookup`` references).

Both tables are bounded (:attr:`InodeTable.limit`, :attr:`HandleTable.limit`): a
guest that never sends FORGET, or never closes its files, gets ``ENFILE``/``EMFILE``
once the table is full instead of using up the daemon's memory and fds.

Worker threads use the tables at the same time as the event loop (FORGET), so each
entry is reference-counted while a request uses it: :meth:`InodeTable.get` and
:meth:`HandleTable.get` return it held, and :meth:`release` lets it go.  An fd is
closed only when nothing refers to it any more, so no request ever works on an fd
number that was closed and reused.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
from dataclasses import dataclass, field

from pyvirtio.spec.fuse import FUSE_ROOT_ID

__all__ = ["Handle", "HandleTable", "Inode", "InodeTable"]


@dataclass(slots=True, eq=False)
class Inode:
    """One node the guest knows: its node id, its ``O_PATH`` fd and counts."""

    nodeid: int
    fd: int
    dev: int
    ino: int
    #: The file type bits (``S_IFMT``): an inode never changes type.
    kind: int
    nlookup: int = 0
    #: Requests using :attr:`fd` right now.
    users: int = 0
    #: Forgotten: closed as soon as :attr:`users` drops to zero.
    dead: bool = False

    @property
    def is_dir(self) -> bool:
        """A directory."""
        return stat_mod.S_ISDIR(self.kind)


class InodeTable:
    """Node ids to :class:`Inode`, bounded by ``limit`` (the root does not count).

    Args:
        root_fd: an ``O_PATH`` fd of the shared directory (the table owns it).
        limit: how many inodes besides the root the guest may hold at once.
    """

    def __init__(self, root_fd: int, limit: int) -> None:
        st = os.fstat(root_fd)
        self.limit = limit
        self._lock = threading.Lock()
        self.root = Inode(FUSE_ROOT_ID, root_fd, st.st_dev, st.st_ino, stat_mod.S_IFDIR,
                          nlookup=1)
        self._by_id: dict[int, Inode] = {FUSE_ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(st.st_dev, st.st_ino): self.root}
        self._next_id = FUSE_ROOT_ID + 1
        #: Lookups refused because the table was full.
        self.refused = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> Inode:
        """The inode ``nodeid``, held (call :meth:`release`).

        Raises:
            OSError: ``ESTALE`` for a node id the guest does not hold.
        """
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode.dead:
                raise OSError(errno.ESTALE, f"unknown node id {nodeid}")
            inode.users += 1
            return inode

    def dev_of(self, nodeid: int) -> int:
        """``st_dev`` of a held node, -1 for an unknown one (a lock-free peek: one dict
        lookup is atomic, and a stale answer only picks the loop or a worker)."""
        inode = self._by_id.get(nodeid)
        return -1 if inode is None else inode.dev

    def release(self, inode: Inode) -> None:
        """A request is done with ``inode``."""
        with self._lock:
            inode.users -= 1
            close = inode.dead and inode.users == 0
        if close:
            os.close(inode.fd)

    def add(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the object ``fd`` (an ``O_PATH`` fd the table takes over,
        whose ``fstat`` is ``st``): a known inode gets one more lookup and ``fd`` is
        closed, a new one gets a node id.  Returned held (call :meth:`release`).

        Raises:
            OSError: ``ENFILE`` when the table is full (``fd`` is closed).
        """
        key = (st.st_dev, st.st_ino)
        with self._lock:
            inode = self._by_key.get(key)
            if inode is not None and not inode.dead:
                inode.nlookup += 1
                inode.users += 1
                duplicate = True
            else:
                duplicate = False
                if len(self._by_id) - 1 >= self.limit:
                    self.refused += 1
                    inode = None
                else:
                    inode = Inode(self._next_id, fd, st.st_dev, st.st_ino,
                                  stat_mod.S_IFMT(st.st_mode), nlookup=1, users=1)
                    self._next_id += 1
                    self._by_id[inode.nodeid] = inode
                    self._by_key[key] = inode
        if inode is None:
            os.close(fd)
            raise OSError(errno.ENFILE, f"inode table full ({self.limit} inodes)")
        if duplicate:
            os.close(fd)
        return inode

    def hold_known(self, st: os.stat_result) -> Inode | None:
        """Count one lookup of the known inode whose ``stat`` is ``st`` and return it
        held (call :meth:`release`); None when the table has no such live inode of
        that file type."""
        with self._lock:
            inode = self._by_key.get((st.st_dev, st.st_ino))
            if inode is None or inode.dead or inode.kind != stat_mod.S_IFMT(st.st_mode):
                return None
            inode.nlookup += 1
            inode.users += 1
            return inode

    def forget(self, nodeid: int, count: int) -> bool:
        """Take back ``count`` lookups of ``nodeid``; drop it at zero.  Returns whether
        the node id was known (the root is never dropped)."""
        close = -1
        with self._lock:
            inode = self._by_id.get(nodeid)
            if inode is None or inode.dead:
                return False
            if inode is self.root:
                return True
            inode.nlookup -= min(count, inode.nlookup)
            if inode.nlookup == 0:
                inode.dead = True
                del self._by_id[nodeid]
                if self._by_key.get((inode.dev, inode.ino)) is inode:
                    del self._by_key[(inode.dev, inode.ino)]
                if inode.users == 0:
                    close = inode.fd
        if close >= 0:
            os.close(close)
        return True

    def clear(self) -> None:
        """Forget every node but the root (a new mount, or the guest went away)."""
        with self._lock:
            doomed = [i for i in self._by_id.values() if i is not self.root]
            self._by_id = {FUSE_ROOT_ID: self.root}
            self._by_key = {(self.root.dev, self.root.ino): self.root}
            self.root.nlookup = 1
            closing = []
            for inode in doomed:
                inode.dead = True
                if inode.users == 0:
                    closing.append(inode.fd)
        for fd in closing:
            os.close(fd)

    def close(self) -> None:
        """Close every fd, the root's too."""
        self.clear()
        os.close(self.root.fd)


@dataclass(slots=True, eq=False)
class Handle:
    """An open file or directory of the guest (OPEN, CREATE, OPENDIR)."""

    fh: int
    fd: int
    nodeid: int
    is_dir: bool
    #: A directory's listing, taken at READDIR offset 0: ``(name, ino, d_type)``.
    listing: list[tuple[bytes, int, int]] = field(default_factory=list)
    users: int = 0
    dead: bool = False


class HandleTable:
    """File handles (``fh``) to :class:`Handle`, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_fh: dict[int, Handle] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._by_fh)

    def add(self, fd: int, nodeid: int, *, is_dir: bool) -> int:
        """Register the open ``fd``; return its ``fh``.

        Raises:
            OSError: ``EMFILE`` when the table is full (``fd`` is closed).
        """
        with self._lock:
            if len(self._by_fh) >= self.limit:
                full = True
            else:
                full = False
                fh = self._next
                self._next += 1
                self._by_fh[fh] = Handle(fh, fd, nodeid, is_dir)
        if full:
            os.close(fd)
            raise OSError(errno.EMFILE, f"handle table full ({self.limit} open files)")
        return fh

    def get(self, fh: int, *, is_dir: bool | None = None) -> Handle:
        """The handle ``fh``, held (call :meth:`release`).

        Raises:
            OSError: ``EBADF`` for an unknown handle or one of the other kind.
        """
        with self._lock:
            handle = self._by_fh.get(fh)
            if handle is None or (is_dir is not None and handle.is_dir != is_dir):
                raise OSError(errno.EBADF, f"unknown file handle {fh}")
            handle.users += 1
            return handle

    def nodeid_of(self, fh: int) -> int:
        """The node id of an open handle, 0 for an unknown one (a lock-free peek)."""
        handle = self._by_fh.get(fh)
        return 0 if handle is None else handle.nodeid

    def release(self, handle: Handle) -> None:
        """A request is done with ``handle``."""
        with self._lock:
            handle.users -= 1
            close = handle.dead and handle.users == 0
        if close:
            os.close(handle.fd)

    def remove(self, fh: int, *, is_dir: bool) -> None:
        """RELEASE / RELEASEDIR: forget ``fh``; its fd closes when unused.

        Raises:
            OSError: ``EBADF`` for an unknown handle.
        """
        with self._lock:
            handle = self._by_fh.get(fh)
            if handle is None or handle.is_dir != is_dir:
                raise OSError(errno.EBADF, f"unknown file handle {fh}")
            del self._by_fh[fh]
            handle.dead = True
            close = handle.users == 0
        if close:
            os.close(handle.fd)

    def clear(self) -> None:
        """Close every handle (a new mount, or the guest went away)."""
        with self._lock:
            handles = list(self._by_fh.values())
            self._by_fh.clear()
            closing = []
            for handle in handles:
                handle.dead = True
                if handle.users == 0:
                    closing.append(handle.fd)
        for fd in closing:
            os.close(fd)
