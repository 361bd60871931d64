"""The FUSE file server behind virtio-fs, apart from virtqueues: its configuration,
tables, requests and the helpers every operation uses.

A :class:`Request` is one decoded FUSE message (``struct fuse_in_header`` and the
operation's arguments); an operation (:mod:`.ops_entry`, :mod:`.ops_file`) takes the
:class:`FsServer` and the request and returns the reply's payload.  An operation
reports failure by raising :class:`OSError`: the reply is then only a
``fuse_out_header`` with ``-errno``.
"""

from __future__ import annotations

import enum
import errno
import os
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyvirtio.devices.fs.inodes import HandleTable, Inode, InodeTable
from pyvirtio.devices.fs.safe import check_name, is_local_fs, is_openable, open_beneath
from pyvirtio.spec.fuse import ATTR_OUT, ENTRY_OUT
from pyvirtio.virtqueue.chain import ChainReader, ChainWriter

__all__ = [
    "CACHE_MODES",
    "SANDBOXES",
    "CacheMode",
    "FsConfig",
    "FsServer",
    "Later",
    "Operation",
    "Reply",
    "Request",
    "Sandbox",
    "split_names",
]

CacheMode = Literal["never", "auto", "always"]
CACHE_MODES: tuple[CacheMode, ...] = ("never", "auto", "always")
Sandbox = Literal["chroot", "namespace", "none"]
SANDBOXES: tuple[Sandbox, ...] = ("chroot", "namespace", "none")
#: ``FUSE_ATTR_SUBMOUNT``: the directory is the root of another file system.
ATTR_SUBMOUNT = 1 << 0
#: Entry and attribute validity per cache mode, in seconds.
_VALIDITY = {"never": 0, "auto": 1, "always": 86400}


@dataclass(frozen=True, slots=True)
class FsConfig:
    """What ``pyvirtio serve fs`` serves and how.

    Attributes:
        shared_dir: the host directory the guest sees as its root.
        tag: the mount tag (config space, at most 36 bytes of UTF-8).
        cache: ``never`` (no guest caching, direct I/O), ``auto`` (1 s validity) or
            ``always`` (a day, and the page cache kept across opens).
        readonly: refuse every change (``EROFS``).
        xattr: serve extended attributes (else ``ENOSYS``: the guest stops asking).
        writeback: negotiate FUSE_WRITEBACK_CACHE (the guest caches writes).
        announce_submounts: mark directories on another host file system
            (FUSE_ATTR_SUBMOUNT): the guest gives each its own ``st_dev``.
        thread_pool_size: worker threads running requests.
        sandbox: how the daemon confines itself once serving (see ``docs/devices/fs.md``).
        request_queues: virtio-fs request queues (QEMU's ``num-request-queues``).
        queue_size: the largest queue size accepted.
        max_inodes: inodes the guest may hold (besides the root).
        max_handles: files and directories the guest may hold open.
        allow_devices: MKNOD may create character and block devices.
    """

    shared_dir: Path
    tag: str
    cache: CacheMode = "auto"
    readonly: bool = False
    xattr: bool = False
    writeback: bool = False
    announce_submounts: bool = False
    thread_pool_size: int = 4
    sandbox: Sandbox = "none"
    request_queues: int = 1
    queue_size: int = 1024
    max_inodes: int = 16384
    max_handles: int = 4096
    allow_devices: bool = False


class Later(enum.Enum):
    """An operation's answer "not yet": a SETLKW whose lock is taken waits."""

    RETRY = "retry"


#: An operation's result: the payload after ``fuse_out_header`` (bytes), how many
#: payload bytes it wrote itself after the header (int: READ), no reply at all
#: (None: FORGET), or :attr:`Later.RETRY`.
Reply = bytes | int | None | Later


@dataclass(slots=True, eq=False)
class Request:
    """One FUSE request (``struct fuse_in_header`` and the arguments after it).

    Attributes:
        body: the arguments, copied (without WRITE's data, left in :attr:`reader`).
        reader: the chain's readable bytes, after :attr:`body` for WRITE.
        writer: the chain's writable bytes (the reply).
    """

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes
    reader: ChainReader
    writer: ChainWriter
    interrupted: bool = False
    #: Run on the event loop: an operation must not enter another mount (it answers
    #: None instead, and a worker runs it again).
    on_loop: bool = False

    def unpack(self, layout: Callable[[bytes], tuple[int, ...]], size: int
               ) -> tuple[tuple[int, ...], bytes]:
        """The fixed arguments (``size`` bytes) and what follows them.

        Raises:
            OSError: ``EINVAL``: the request is shorter.
        """
        if len(self.body) < size:
            raise OSError(errno.EINVAL, f"opcode {self.opcode}: {len(self.body)} bytes of "
                          f"arguments, {size} needed")
        return layout(self.body[:size]), self.body[size:]


#: An operation: the server and the request in, the reply out.
Operation = Callable[["FsServer", Request], Reply]


def split_names(data: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings at the start of ``data`` (names, an xattr
    name and value, a symlink's target).

    Raises:
        OSError: ``EINVAL`` when a terminator is missing.
    """
    names = []
    pos = 0
    for _ in range(count):
        end = data.find(b"\0", pos)
        if end < 0:
            raise OSError(errno.EINVAL, "a string without its NUL terminator")
        names.append(data[pos:end])
        pos = end + 1
    return names


@dataclass(slots=True)
class FsServer:
    """The file server's state: configuration, tables, negotiated INIT flags.

    Args:
        config: what to serve.
        root_fd: ``O_PATH`` fd of the shared directory.
        proc_fd: ``/proc/self/fd``, opened before any sandbox (re-opening held inodes).
    """

    config: FsConfig
    root_fd: int
    proc_fd: int
    inodes: InodeTable = field(init=False)
    handles: HandleTable = field(init=False)
    #: INIT flags both sides agreed on (0 until INIT).
    flags: int = 0
    initialized: bool = False
    max_write: int = 1 << 20
    #: The share lies on a local file system (:func:`~.safe.is_local_fs`): short
    #: operations on it may run on the event loop (:mod:`.device`).
    local: bool = field(init=False)

    def __post_init__(self) -> None:
        self.inodes = InodeTable(self.root_fd, self.config.max_inodes)
        self.handles = HandleTable(self.config.max_handles)
        self.local = is_local_fs(self.root_fd)

    @property
    def validity(self) -> int:
        """Entry and attribute validity in seconds (by the cache mode)."""
        return _VALIDITY[self.config.cache]

    def reset(self) -> None:
        """Forget everything the guest held: a new mount or a new front-end."""
        self.handles.clear()
        self.inodes.clear()
        self.flags = 0
        self.initialized = False

    def close(self) -> None:
        """Close every fd."""
        self.handles.clear()
        self.inodes.close()
        os.close(self.proc_fd)

    def check_writable(self) -> None:
        """Refuse a change on a ``--readonly`` share.

        Raises:
            OSError: ``EROFS``.
        """
        if self.config.readonly:
            raise OSError(errno.EROFS, "read-only share")

    # -- attributes ----------------------------------------------------------------------

    def attr(self, st: os.stat_result) -> tuple[int, ...]:
        """``struct fuse_attr`` fields for ``st``."""
        a_s, a_ns = divmod(st.st_atime_ns, 1_000_000_000)
        m_s, m_ns = divmod(st.st_mtime_ns, 1_000_000_000)
        c_s, c_ns = divmod(st.st_ctime_ns, 1_000_000_000)
        rdev = st.st_rdev
        dev32 = 0
        if rdev:  # device nodes only
            major, minor = os.major(rdev), os.minor(rdev)
            dev32 = (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)
        flags = 0
        if (self.config.announce_submounts and stat_mod.S_ISDIR(st.st_mode)
                and st.st_dev != self.inodes.root.dev):
            flags |= ATTR_SUBMOUNT
        return (st.st_ino, st.st_size, st.st_blocks, a_s & 0xFFFFFFFFFFFFFFFF,
                m_s & 0xFFFFFFFFFFFFFFFF, c_s & 0xFFFFFFFFFFFFFFFF, a_ns, m_ns, c_ns,
                st.st_mode, min(st.st_nlink, 0xFFFFFFFF), st.st_uid, st.st_gid,
                dev32 & 0xFFFFFFFF, st.st_blksize, flags)

    def attr_out(self, st: os.stat_result) -> bytes:
        """``struct fuse_attr_out`` for ``st``."""
        return ATTR_OUT.pack(self.validity, 0, 0, *self.attr(st))

    def entry_out(self, inode: Inode, st: os.stat_result) -> bytes:
        """``struct fuse_entry_out`` for the inode just counted."""
        v = self.validity
        return ENTRY_OUT.pack(inode.nodeid, 0, v, v, 0, 0, *self.attr(st))

    # -- inodes --------------------------------------------------------------------------

    def lookup(self, parent: Inode, name: bytes, *, loop: bool = False
               ) -> tuple[Inode, os.stat_result]:
        """Open ``name`` in ``parent`` (``O_PATH``, never following a link) and count a
        lookup of it.  Returned held.  ``loop``: on the event loop, which never
        enters another mount (it may be remote: :func:`~.safe.open_beneath`'s
        ``same_mount``).

        Raises:
            OSError: ``ENOTDIR``, the kernel's answer, or a full table;
                ``BlockingIOError`` for a ``loop`` lookup of a mount point.
        """
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "lookup in a non-directory")
        check_name(name)
        if not loop:
            # An object the guest holds already needs no new fd: ``fstatat`` of the one
            # checked name (no link followed) finds it by (st_dev, st_ino).
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            inode = self.inodes.hold_known(st)
            if inode is not None:
                return inode, st
        fd = open_beneath(parent.fd, name, os.O_PATH, same_mount=loop)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.inodes.add(fd, st), st

    def entry(self, parent: Inode, name: bytes, *, loop: bool = False) -> bytes:
        """LOOKUP's reply for ``name`` in ``parent`` (counting the lookup)."""
        inode, st = self.lookup(parent, name, loop=loop)
        try:
            return self.entry_out(inode, st)
        finally:
            self.inodes.release(inode)

    def reopen(self, inode: Inode, flags: int) -> int:
        """An fd of ``inode`` for I/O, through our own ``/proc/self/fd`` entry (regular
        files) or ``openat(fd, ".")`` (directories).

        Raises:
            OSError: ``ELOOP``/``ENXIO`` for symbolic links and special files, or the
                kernel's answer.
        """
        if stat_mod.S_ISLNK(inode.kind):
            raise OSError(errno.ELOOP, "a symbolic link is not opened")
        if not is_openable(inode.kind):
            raise OSError(errno.ENXIO, "special files are not opened by the server")
        flags |= os.O_CLOEXEC
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if inode.is_dir:
            return os.open(".", flags | os.O_DIRECTORY, dir_fd=inode.fd)
        return os.open(str(inode.fd), flags, dir_fd=self.proc_fd)
