"""FUSE operations on names and attributes: LOOKUP, GETATTR, SETATTR, READLINK,
SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME(2), LINK, STATFS, ACCESS and the
extended attributes.

Every name is checked (:func:`~pyvirtio.devices.fs.safe.check_name`) and used only
relative to its parent's ``O_PATH`` fd, with the ``*at`` calls, which never follow a
symbolic link in the last component when they create or remove; objects are
changed through their own fds (``AT_EMPTY_PATH``), never through a path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from collections.abc import Iterator

from pyvirtio.devices.fs.inodes import Inode
from pyvirtio.devices.fs.safe import (
    MAX_SYMLINK,
    UTIME_NOW,
    UTIME_OMIT,
    check_name,
    fchown_empty,
    renameat2,
    utimens_empty,
)
from pyvirtio.devices.fs.server import FsServer, Operation, Reply, Request, split_names
from pyvirtio.spec.fuse import (
    ACCESS_IN,
    GETXATTR_IN,
    GETXATTR_OUT,
    KSTATFS,
    LINK_IN,
    MKDIR_IN,
    MKNOD_IN,
    RENAME2_IN,
    RENAME_EXCHANGE,
    RENAME_IN,
    RENAME_NOREPLACE,
    SETATTR_IN,
    SETXATTR_IN,
    FattrValid,
    Opcode,
)

__all__ = ["ENTRY_OPS", "lookup_loop", "node"]

#: The largest extended attribute value (``XATTR_SIZE_MAX``).
XATTR_SIZE_MAX = 1 << 16


class node:  # noqa: N801 - used like a function: ``with node(srv, nodeid) as inode``
    """The inode ``nodeid``, held while the block runs (a class, not a generator: this
    runs for most requests)."""

    __slots__ = ("inode", "inodes")

    def __init__(self, srv: FsServer, nodeid: int) -> None:
        self.inodes = srv.inodes
        self.inode = self.inodes.get(nodeid)

    def __enter__(self) -> Inode:
        return self.inode

    def __exit__(self, *exc: object) -> None:
        self.inodes.release(self.inode)


def _created(srv: FsServer, req: Request, parent: Inode, name: bytes) -> bytes:
    """After creating ``name``: give it to the caller and return its entry."""
    inode, st = srv.lookup(parent, name)
    try:
        if (st.st_uid, st.st_gid) != (req.uid, req.gid):
            fchown_empty(inode.fd, req.uid, req.gid)
            st = os.fstat(inode.fd)
        return srv.entry_out(inode, st)
    finally:
        srv.inodes.release(inode)


def op_lookup(srv: FsServer, req: Request) -> Reply:
    """LOOKUP: ``name`` in the directory ``nodeid``."""
    (name,) = split_names(req.body, 1)
    inodes = srv.inodes
    parent = inodes.get(req.nodeid)
    try:
        return srv.entry(parent, name)
    finally:
        inodes.release(parent)


def lookup_loop(srv: FsServer, req: Request) -> Reply:
    """LOOKUP on the event loop (the share's local file system): None for a mount
    point, whose file system may be remote (a worker looks it up then)."""
    (name,) = split_names(req.body, 1)
    inodes = srv.inodes
    parent = inodes.get(req.nodeid)
    try:
        return srv.entry(parent, name, loop=True)
    except BlockingIOError:
        return None
    finally:
        inodes.release(parent)


def op_getattr(srv: FsServer, req: Request) -> Reply:
    """GETATTR (the fh, when given, names the same inode: fstat of the O_PATH fd)."""
    inodes = srv.inodes
    inode = inodes.get(req.nodeid)
    try:
        st = os.fstat(inode.fd)
    finally:
        inodes.release(inode)
    return srv.attr_out(st)


def op_setattr(srv: FsServer, req: Request) -> Reply:
    """SETATTR: mode, owner, size, times (``*_NOW`` included), each as ``valid`` says."""
    (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid,
     _), _ = req.unpack(SETATTR_IN.unpack, SETATTR_IN.size)
    srv.check_writable()
    with node(srv, req.nodeid) as inode:
        if valid & FattrValid.MODE:
            if stat_mod.S_ISLNK(inode.kind):
                raise OSError(errno.EOPNOTSUPP, "symbolic links have no mode")
            os.chmod(str(inode.fd), stat_mod.S_IMODE(mode), dir_fd=srv.proc_fd)
        if valid & (FattrValid.UID | FattrValid.GID):
            fchown_empty(inode.fd, uid if valid & FattrValid.UID else -1,
                         gid if valid & FattrValid.GID else -1)
        if valid & FattrValid.SIZE:
            if not stat_mod.S_ISREG(inode.kind):
                raise OSError(errno.EINVAL if inode.is_dir else errno.EPERM,
                              "truncate of a non-file")
            if valid & FattrValid.FH:
                handle = srv.handles.get(fh, is_dir=False)
                try:
                    os.ftruncate(handle.fd, size)
                finally:
                    srv.handles.release(handle)
            else:
                fd = srv.reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if valid & (FattrValid.ATIME | FattrValid.MTIME | FattrValid.ATIME_NOW
                    | FattrValid.MTIME_NOW):
            utimens_empty(inode.fd, _time(valid, FattrValid.ATIME, FattrValid.ATIME_NOW,
                                          atime, atimensec),
                          _time(valid, FattrValid.MTIME, FattrValid.MTIME_NOW, mtime,
                                mtimensec))
        return srv.attr_out(os.fstat(inode.fd))


def _time(valid: int, set_bit: int, now_bit: int, sec: int, nsec: int) -> tuple[int, int]:
    if valid & now_bit:
        return (0, UTIME_NOW)
    if valid & set_bit:
        if nsec >= 1_000_000_000:
            raise OSError(errno.EINVAL, "nanoseconds out of range")
        return (sec - (1 << 64) if sec >= 1 << 63 else sec, nsec)
    return (0, UTIME_OMIT)


def op_readlink(srv: FsServer, req: Request) -> Reply:
    """READLINK: the target of a symbolic link (read, never followed)."""
    with node(srv, req.nodeid) as inode:
        if not stat_mod.S_ISLNK(inode.kind):
            raise OSError(errno.EINVAL, "not a symbolic link")
        return os.readlink(b"", dir_fd=inode.fd)


def op_symlink(srv: FsServer, req: Request) -> Reply:
    """SYMLINK: ``name`` then ``target`` (FUSE order: the new name first)."""
    name, target = split_names(req.body, 2)
    check_name(name)
    if not target or len(target) > MAX_SYMLINK:
        raise OSError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symlink target")
    srv.check_writable()
    with node(srv, req.nodeid) as parent:
        os.symlink(target, name, dir_fd=parent.fd)
        return _created(srv, req, parent, name)


def op_mknod(srv: FsServer, req: Request) -> Reply:
    """MKNOD: regular files, FIFOs and sockets; devices only with ``allow_devices``."""
    (mode, rdev, umask, _), rest = req.unpack(MKNOD_IN.unpack, MKNOD_IN.size)
    (name,) = split_names(rest, 1)
    check_name(name)
    srv.check_writable()
    kind = stat_mod.S_IFMT(mode)
    if kind in (stat_mod.S_IFCHR, stat_mod.S_IFBLK) and not srv.config.allow_devices:
        raise OSError(errno.EPERM, "device nodes are not created (no --allow-devices)")
    if kind not in (stat_mod.S_IFREG, stat_mod.S_IFIFO, stat_mod.S_IFSOCK, stat_mod.S_IFCHR,
                    stat_mod.S_IFBLK):
        raise OSError(errno.EINVAL, "mknod of an unknown file type")
    with node(srv, req.nodeid) as parent:
        major = (rdev >> 8) & 0xFFF
        minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
        os.mknod(name, kind | (stat_mod.S_IMODE(mode) & ~umask), os.makedev(major, minor),
                 dir_fd=parent.fd)
        return _created(srv, req, parent, name)


def op_mkdir(srv: FsServer, req: Request) -> Reply:
    """MKDIR."""
    (mode, umask), rest = req.unpack(MKDIR_IN.unpack, MKDIR_IN.size)
    (name,) = split_names(rest, 1)
    check_name(name)
    srv.check_writable()
    with node(srv, req.nodeid) as parent:
        os.mkdir(name, stat_mod.S_IMODE(mode) & ~umask, dir_fd=parent.fd)
        return _created(srv, req, parent, name)


def op_unlink(srv: FsServer, req: Request) -> Reply:
    """UNLINK (the inode lives on while the guest holds it)."""
    (name,) = split_names(req.body, 1)
    check_name(name)
    srv.check_writable()
    with node(srv, req.nodeid) as parent:
        os.unlink(name, dir_fd=parent.fd)
    return b""


def op_rmdir(srv: FsServer, req: Request) -> Reply:
    """RMDIR (``ENOTEMPTY`` for a directory with entries)."""
    (name,) = split_names(req.body, 1)
    check_name(name)
    srv.check_writable()
    with node(srv, req.nodeid) as parent:
        os.rmdir(name, dir_fd=parent.fd)
    return b""


def _rename(srv: FsServer, req: Request, newdir: int, flags: int, rest: bytes) -> Reply:
    old, new = split_names(rest, 2)
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise OSError(errno.EINVAL, f"rename flags {flags:#x}")
    srv.check_writable()
    with node(srv, req.nodeid) as src, node(srv, newdir) as dst:
        renameat2(src.fd, old, dst.fd, new, flags)
    return b""


def op_rename(srv: FsServer, req: Request) -> Reply:
    """RENAME."""
    (newdir,), rest = req.unpack(RENAME_IN.unpack, RENAME_IN.size)
    return _rename(srv, req, newdir, 0, rest)


def op_rename2(srv: FsServer, req: Request) -> Reply:
    """RENAME2: NOREPLACE and EXCHANGE (``renameat2``)."""
    (newdir, flags, _), rest = req.unpack(RENAME2_IN.unpack, RENAME2_IN.size)
    return _rename(srv, req, newdir, flags, rest)


def op_link(srv: FsServer, req: Request) -> Reply:
    """LINK: a new name for ``oldnodeid`` in the directory ``nodeid``; both names
    share one node id."""
    (oldnodeid,), rest = req.unpack(LINK_IN.unpack, LINK_IN.size)
    (name,) = split_names(rest, 1)
    check_name(name)
    srv.check_writable()
    with node(srv, oldnodeid) as inode, node(srv, req.nodeid) as parent:
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        os.link(str(inode.fd), name, src_dir_fd=srv.proc_fd, dst_dir_fd=parent.fd,
                follow_symlinks=True)
        return srv.entry(parent, name)


def op_statfs(srv: FsServer, req: Request) -> Reply:
    """STATFS: the host file system of the inode."""
    with node(srv, req.nodeid) as inode:
        st = os.fstatvfs(inode.fd)
    return KSTATFS.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                        st.f_bsize, st.f_namemax, st.f_frsize, 0)


def op_access(srv: FsServer, req: Request) -> Reply:
    """ACCESS: the caller's permission by the mode bits (root: all but execute
    without any execute bit)."""
    (mask, _), _ = req.unpack(ACCESS_IN.unpack, ACCESS_IN.size)
    with node(srv, req.nodeid) as inode:
        st = os.fstat(inode.fd)
    if mask & os.W_OK:
        srv.check_writable()
    mode = st.st_mode
    if req.uid == 0:
        if mask & os.X_OK and not stat_mod.S_ISDIR(mode) and not mode & 0o111:
            raise OSError(errno.EACCES, "no execute bit")
        return b""
    shift = 6 if req.uid == st.st_uid else 3 if req.gid == st.st_gid else 0
    if (mask & 7) & ~((mode >> shift) & 7):
        raise OSError(errno.EACCES, "permission denied")
    return b""


# -- extended attributes -------------------------------------------------------------------


@contextlib.contextmanager
def _xattr_fd(srv: FsServer, nodeid: int) -> Iterator[int]:
    if not srv.config.xattr:
        raise OSError(errno.ENOSYS, "extended attributes are off (no --xattr)")
    with node(srv, nodeid) as inode:
        if not (stat_mod.S_ISREG(inode.kind) or inode.is_dir):
            raise OSError(errno.EPERM, "extended attributes of special files")
        fd = srv.reopen(inode, os.O_RDONLY)
        try:
            yield fd
        finally:
            os.close(fd)


def _sized(data: bytes, size: int) -> bytes:
    if size == 0:
        return GETXATTR_OUT.pack(len(data), 0)
    if len(data) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return data


def op_getxattr(srv: FsServer, req: Request) -> Reply:
    """GETXATTR (size 0: only the value's size)."""
    (size, _), rest = req.unpack(GETXATTR_IN.unpack, GETXATTR_IN.size)
    (name,) = split_names(rest, 1)
    with _xattr_fd(srv, req.nodeid) as fd:
        return _sized(os.getxattr(fd, name), size)


def op_listxattr(srv: FsServer, req: Request) -> Reply:
    """LISTXATTR: NUL-terminated names (size 0: only their size)."""
    (size, _), _ = req.unpack(GETXATTR_IN.unpack, GETXATTR_IN.size)
    with _xattr_fd(srv, req.nodeid) as fd:
        data = b"".join(n.encode("utf-8", "surrogateescape") + b"\0"
                        for n in os.listxattr(fd))
    return _sized(data, size)


def op_setxattr(srv: FsServer, req: Request) -> Reply:
    """SETXATTR (``struct fuse_setxattr_in`` without SETXATTR_EXT)."""
    (size, flags), rest = req.unpack(SETXATTR_IN.unpack, SETXATTR_IN.size)
    (name,) = split_names(rest, 1)
    value = rest[len(name) + 1 :]
    if size > XATTR_SIZE_MAX or size > len(value):
        raise OSError(errno.E2BIG if size > XATTR_SIZE_MAX else errno.EINVAL,
                      "bad xattr size")
    srv.check_writable()
    with _xattr_fd(srv, req.nodeid) as fd:
        os.setxattr(fd, name, value[:size], flags & 3)
    return b""


def op_removexattr(srv: FsServer, req: Request) -> Reply:
    """REMOVEXATTR."""
    (name,) = split_names(req.body, 1)
    srv.check_writable()
    with _xattr_fd(srv, req.nodeid) as fd:
        os.removexattr(fd, name)
    return b""


#: The operations of this module by opcode.
ENTRY_OPS: dict[int, Operation] = {
    Opcode.LOOKUP: op_lookup,
    Opcode.GETATTR: op_getattr,
    Opcode.SETATTR: op_setattr,
    Opcode.READLINK: op_readlink,
    Opcode.SYMLINK: op_symlink,
    Opcode.MKNOD: op_mknod,
    Opcode.MKDIR: op_mkdir,
    Opcode.UNLINK: op_unlink,
    Opcode.RMDIR: op_rmdir,
    Opcode.RENAME: op_rename,
    Opcode.RENAME2: op_rename2,
    Opcode.LINK: op_link,
    Opcode.STATFS: op_statfs,
    Opcode.ACCESS: op_access,
    Opcode.GETXATTR: op_getxattr,
    Opcode.LISTXATTR: op_listxattr,
    Opcode.SETXATTR: op_setxattr,
    Opcode.REMOVEXATTR: op_removexattr,
}
