"""FUSE operations on open files and directories: OPEN, CREATE, READ, WRITE, FLUSH,
RELEASE, FSYNC, OPENDIR, READDIR(PLUS), RELEASEDIR, FSYNCDIR, FALLOCATE, LSEEK,
COPY_FILE_RANGE, the locks (GETLK, SETLK, SETLKW) and SYNCFS.

READ and WRITE are zero-copy: ``os.preadv`` reads straight into the guest's
writable buffers and ``os.pwritev`` writes straight from its readable ones.  Locks
are open-file-description locks (``F_OFD_*``) on the handle's own fd, so guest
processes with different handles exclude each other as on a local file system; a
SETLKW whose lock is taken never blocks a worker: it answers :attr:`Later.RETRY`
and the device tries it again later (:mod:`.device`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat as stat_mod
import struct
import threading

from pyvirtio.devices.fs.inodes import Handle
from pyvirtio.devices.fs.ops_entry import node
from pyvirtio.devices.fs.safe import check_name, fallocate, open_beneath, syncfs
from pyvirtio.devices.fs.server import (
    FsServer,
    Later,
    Operation,
    Reply,
    Request,
    split_names,
)
from pyvirtio.spec.fuse import (
    COPY_FILE_RANGE_IN,
    CREATE_IN,
    DIRENT,
    ENTRY_OUT,
    FALLOCATE_IN,
    FSYNC_FDATASYNC,
    FSYNC_IN,
    LK_FLOCK,
    LK_IN,
    LK_OUT,
    LSEEK_IN,
    LSEEK_OUT,
    OPEN_IN,
    OPEN_OUT,
    OUT_HEADER,
    READ_IN,
    RELEASE_IN,
    WRITE_IN,
    WRITE_OUT,
    InitFlag,
    Opcode,
    OpenOutFlag,
    dirent_size,
)

__all__ = ["FAST_OPS", "FILE_OPS", "NOWAIT_READ_MAX", "OFFSET_MAX", "read_nowait"]

#: ``OFFSET_MAX``: a lock's end "to the end of the file".
OFFSET_MAX = (1 << 63) - 1
#: The largest READ tried on the event loop: bigger ones copy long enough that the
#: workers, in parallel and without the GIL, do better.
NOWAIT_READ_MAX = 1 << 20
#: Open flags a guest may pass on (others, O_DIRECT or O_NOATIME, are dropped).
_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
               | os.O_NONBLOCK | os.O_EXCL)
#: The head shared by ``fuse_read_in`` and ``fuse_write_in``: fh, offset, size.
_READ_HEAD = struct.Struct("<QQI")
#: ``struct flock`` of this machine: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("=hh4xqqi4x")
_DT = {stat_mod.S_IFDIR: 4, stat_mod.S_IFREG: 8, stat_mod.S_IFLNK: 10, stat_mod.S_IFCHR: 2,
       stat_mod.S_IFBLK: 6, stat_mod.S_IFIFO: 1, stat_mod.S_IFSOCK: 12}
#: One READDIR at a time reads a directory (``scandir`` shares the fd's position).
_listing_lock = threading.Lock()


class handle:  # noqa: N801 - used like a function: ``with handle(srv, fh) as h``
    """The handle ``fh``, held while the block runs."""

    __slots__ = ("h", "handles")

    def __init__(self, srv: FsServer, fh: int, *, is_dir: bool) -> None:
        self.handles = srv.handles
        self.h = self.handles.get(fh, is_dir=is_dir)

    def __enter__(self) -> Handle:
        return self.h

    def __exit__(self, *exc: object) -> None:
        self.handles.release(self.h)


def _host_flags(srv: FsServer, flags: int) -> int:
    if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
        srv.check_writable()
    flags &= _OPEN_FLAGS
    if srv.flags & InitFlag.WRITEBACK_CACHE:
        # The guest's page cache reads around writes and appends itself.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        flags &= ~os.O_APPEND
    return flags


def _open_out(srv: FsServer, fh: int, *, is_dir: bool) -> bytes:
    cache = srv.config.cache
    flags = 0
    if cache == "never" and not is_dir:
        flags |= OpenOutFlag.DIRECT_IO
    elif cache == "always":
        flags |= OpenOutFlag.CACHE_DIR if is_dir else OpenOutFlag.KEEP_CACHE
    return OPEN_OUT.pack(fh, flags, 0)


def op_open(srv: FsServer, req: Request) -> Reply:
    """OPEN: a regular file, re-opened from its inode."""
    (flags, _), _ = req.unpack(OPEN_IN.unpack, OPEN_IN.size)
    with node(srv, req.nodeid) as inode:
        if inode.is_dir:
            raise OSError(errno.EISDIR, "OPEN of a directory")
        fd = srv.reopen(inode, _host_flags(srv, flags) & ~os.O_EXCL)
        return _open_out(srv, srv.handles.add(fd, inode.nodeid, is_dir=False), is_dir=False)


def op_create(srv: FsServer, req: Request) -> Reply:
    """CREATE: open ``name`` in the directory, creating it; entry and open replies."""
    (flags, mode, umask, _), rest = req.unpack(CREATE_IN.unpack, CREATE_IN.size)
    (name,) = split_names(rest, 1)
    check_name(name)
    srv.check_writable()
    host = _host_flags(srv, flags)
    perm = stat_mod.S_IMODE(mode) & ~umask
    with node(srv, req.nodeid) as parent:
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "CREATE in a non-directory")
        try:
            fd = open_beneath(parent.fd, name, host | os.O_CREAT | os.O_EXCL, perm)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            try:
                fd = open_beneath(parent.fd, name, host & ~os.O_EXCL, same_mount=req.on_loop)
            except BlockingIOError:
                return None  # a mount point: a worker opens it
            created = False
        try:
            if created:
                os.fchown(fd, req.uid, req.gid)
            path_fd = os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=srv.proc_fd)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        inode = srv.inodes.add(path_fd, st)
        try:
            entry = srv.entry_out(inode, st)
            fh = srv.handles.add(fd, inode.nodeid, is_dir=False)
        except OSError:
            srv.inodes.release(inode)
            srv.inodes.forget(inode.nodeid, 1)
            raise
        srv.inodes.release(inode)
    return entry + _open_out(srv, fh, is_dir=False)


def op_read(srv: FsServer, req: Request) -> Reply:
    """READ into the guest's buffers (a short read at the end of the file)."""
    fh, offset, size = _READ_HEAD.unpack_from(req.body) if len(req.body) >= READ_IN.size \
        else req.unpack(READ_IN.unpack, READ_IN.size)[0][:3]
    if offset > OFFSET_MAX:
        raise OSError(errno.EINVAL, "offset out of range")
    writer = req.writer
    room = writer.remaining - OUT_HEADER.size
    if room < 0:
        raise OSError(errno.EINVAL, "no room for the reply header")
    size = min(size, room)
    handles = srv.handles
    h = handles.get(fh, is_dir=False)
    try:
        writer.skip(OUT_HEADER.size)
        return os.preadv(h.fd, writer.take(size), offset) if size else 0
    finally:
        handles.release(h)


def read_nowait(srv: FsServer, req: Request) -> Reply:
    """READ on the event loop when the page cache holds all of it (``RWF_NOWAIT``) and it
    is at most :data:`NOWAIT_READ_MAX` bytes; None when the read would wait for the
    disk, or is bigger (a worker does it then, from scratch)."""
    if len(req.body) < READ_IN.size:
        return None  # the worker answers EINVAL
    fh, offset, size = _READ_HEAD.unpack_from(req.body)
    writer = req.writer
    size = min(size, writer.remaining - OUT_HEADER.size)
    if offset > OFFSET_MAX or not 0 < size <= NOWAIT_READ_MAX:
        return None
    handles = srv.handles
    h = handles.get(fh, is_dir=False)
    try:
        writer.skip(OUT_HEADER.size)
        try:
            done = os.preadv(h.fd, writer.take(size), offset, os.RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # no RWF_NOWAIT (NFS...): a worker reads
                return None
            raise
        if done < size and offset + done < os.fstat(h.fd).st_size:
            return None  # a short read inside the file: the rest is not cached
        return done
    finally:
        handles.release(h)


def op_write(srv: FsServer, req: Request) -> Reply:
    """WRITE from the guest's buffers."""
    fh, offset, size = _READ_HEAD.unpack_from(req.body) if len(req.body) >= WRITE_IN.size \
        else req.unpack(WRITE_IN.unpack, WRITE_IN.size)[0][:3]
    if offset > OFFSET_MAX:
        raise OSError(errno.EINVAL, "offset out of range")
    reader = req.reader
    if size > reader.remaining or size > srv.max_write:
        raise OSError(errno.EINVAL, f"WRITE of {size} bytes, {reader.remaining} sent "
                      f"(max_write {srv.max_write})")
    srv.check_writable()
    handles = srv.handles
    h = handles.get(fh, is_dir=False)
    try:
        done = os.pwritev(h.fd, reader.take(size), offset) if size else 0
    finally:
        handles.release(h)
    return WRITE_OUT.pack(done, 0)


def op_flush(srv: FsServer, req: Request) -> Reply:
    """FLUSH (each close of a guest fd): nothing is buffered here."""
    with handle(srv, _fh(req), is_dir=False):
        return b""


def _fh(req: Request) -> int:
    if len(req.body) < 8:
        raise OSError(errno.EINVAL, "no file handle")
    return int.from_bytes(req.body[:8], "little")


def op_release(srv: FsServer, req: Request) -> Reply:
    """RELEASE: the last close; the handle's fd closes (and its locks go with it)."""
    (fh, _, _, _), _ = req.unpack(RELEASE_IN.unpack, RELEASE_IN.size)
    srv.handles.remove(fh, is_dir=False)
    return b""


def op_releasedir(srv: FsServer, req: Request) -> Reply:
    """RELEASEDIR."""
    (fh, _, _, _), _ = req.unpack(RELEASE_IN.unpack, RELEASE_IN.size)
    srv.handles.remove(fh, is_dir=True)
    return b""


def _fsync(srv: FsServer, req: Request, *, is_dir: bool) -> Reply:
    (fh, flags, _), _ = req.unpack(FSYNC_IN.unpack, FSYNC_IN.size)
    with handle(srv, fh, is_dir=is_dir) as h:
        if flags & FSYNC_FDATASYNC:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)
    return b""


def op_fsync(srv: FsServer, req: Request) -> Reply:
    """FSYNC (FDATASYNC when asked)."""
    return _fsync(srv, req, is_dir=False)


def op_fsyncdir(srv: FsServer, req: Request) -> Reply:
    """FSYNCDIR."""
    return _fsync(srv, req, is_dir=True)


def op_opendir(srv: FsServer, req: Request) -> Reply:
    """OPENDIR."""
    with node(srv, req.nodeid) as inode:
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "OPENDIR of a non-directory")
        fd = srv.reopen(inode, os.O_RDONLY)
        return _open_out(srv, srv.handles.add(fd, inode.nodeid, is_dir=True), is_dir=True)


def _listing(h: Handle, offset: int) -> list[tuple[bytes, int, int]]:
    """The directory's entries, read afresh at offset 0 (``rewinddir`` sees changes)."""
    if offset == 0 or not h.listing:
        st = os.fstat(h.fd)
        # ".." gets the directory's own number: the server never looks above the share.
        entries = [(b".", st.st_ino, 4), (b"..", st.st_ino, 4)]
        with _listing_lock, os.scandir(h.fd) as it:
            for e in it:
                try:
                    kind = (4 if e.is_dir(follow_symlinks=False) else
                            10 if e.is_symlink() else
                            8 if e.is_file(follow_symlinks=False) else
                            _DT.get(stat_mod.S_IFMT(e.stat(follow_symlinks=False).st_mode), 0))
                except OSError:
                    kind = 0
                entries.append((os.fsencode(e.name), e.inode(), kind))
        h.listing = entries
    return h.listing


def _readdir(srv: FsServer, req: Request, *, plus: bool) -> Reply:
    (fh, offset, size, _, _, _, _), _ = req.unpack(READ_IN.unpack, READ_IN.size)
    size = min(size, max(req.writer.remaining - OUT_HEADER.size, 0))
    out = bytearray()
    with handle(srv, fh, is_dir=True) as h:
        entries = _listing(h, offset)
        for index in range(min(offset, len(entries)), len(entries)):
            name, ino, kind = entries[index]
            need = dirent_size(len(name)) + (ENTRY_OUT.size if plus else 0)
            if len(out) + need > size:
                break
            if plus:
                out += _plus_entry(srv, h, name)
            out += DIRENT.pack(ino, index + 1, len(name), kind) + name
            out += bytes(-len(out) % 8)
    return bytes(out)


def _plus_entry(srv: FsServer, h: Handle, name: bytes) -> bytes:
    """READDIRPLUS's entry: a counted lookup, or node id 0 (the guest skips it)."""
    if name not in (b".", b".."):
        try:
            with node(srv, h.nodeid) as parent:
                return srv.entry(parent, name)
        except OSError:
            pass
    return bytes(ENTRY_OUT.size)


def op_readdir(srv: FsServer, req: Request) -> Reply:
    """READDIR: ``fuse_dirent`` records; ``off`` is the index of the next entry."""
    return _readdir(srv, req, plus=False)


def op_readdirplus(srv: FsServer, req: Request) -> Reply:
    """READDIRPLUS: each entry with its ``fuse_entry_out`` (a lookup the guest counts)."""
    return _readdir(srv, req, plus=True)


def op_fallocate(srv: FsServer, req: Request) -> Reply:
    """FALLOCATE (``fallocate(2)`` with the guest's mode: KEEP_SIZE, PUNCH_HOLE...)."""
    (fh, offset, length, mode, _), _ = req.unpack(FALLOCATE_IN.unpack, FALLOCATE_IN.size)
    if offset > OFFSET_MAX or length > OFFSET_MAX or length == 0:
        raise OSError(errno.EINVAL, "range out of bounds")
    srv.check_writable()
    with handle(srv, fh, is_dir=False) as h:
        fallocate(h.fd, mode, offset, length)
    return b""


def op_lseek(srv: FsServer, req: Request) -> Reply:
    """LSEEK with SEEK_DATA / SEEK_HOLE."""
    (fh, offset, whence, _), _ = req.unpack(LSEEK_IN.unpack, LSEEK_IN.size)
    if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
        raise OSError(errno.EINVAL, f"whence {whence}")
    if offset > OFFSET_MAX:
        raise OSError(errno.EINVAL, "offset out of range")
    with handle(srv, fh, is_dir=False) as h:
        return LSEEK_OUT.pack(os.lseek(h.fd, offset, whence))


def op_copy_file_range(srv: FsServer, req: Request) -> Reply:
    """COPY_FILE_RANGE between two handles (at most 1 GiB per request)."""
    (fh_in, off_in, nodeid_out, fh_out, off_out, length, flags), _ = req.unpack(
        COPY_FILE_RANGE_IN.unpack, COPY_FILE_RANGE_IN.size)
    if flags or off_in > OFFSET_MAX or off_out > OFFSET_MAX:
        raise OSError(errno.EINVAL, "bad copy_file_range arguments")
    srv.check_writable()
    with handle(srv, fh_in, is_dir=False) as src, handle(srv, fh_out, is_dir=False) as dst:
        if dst.nodeid != nodeid_out:
            raise OSError(errno.EBADF, "fh_out is not nodeid_out's")
        done = os.copy_file_range(src.fd, dst.fd, min(length, 1 << 30), off_in, off_out)
    return WRITE_OUT.pack(done, 0)


# -- locks ---------------------------------------------------------------------------------


def _lock_args(req: Request) -> tuple[int, int, int, int, int]:
    (fh, _, start, end, type_, _, lk_flags, _), _ = req.unpack(LK_IN.unpack, LK_IN.size)
    if type_ not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK):
        raise OSError(errno.EINVAL, f"lock type {type_}")
    if start > OFFSET_MAX or end > OFFSET_MAX or end < start:
        raise OSError(errno.EINVAL, "lock range")
    return fh, start, end, type_, lk_flags


def _flock(type_: int, start: int, end: int) -> bytes:
    return _FLOCK.pack(type_, os.SEEK_SET, start, 0 if end == OFFSET_MAX else end - start + 1,
                       0)


def op_getlk(srv: FsServer, req: Request) -> Reply:
    """GETLK: the lock that would conflict, or F_UNLCK."""
    fh, start, end, type_, _ = _lock_args(req)
    with handle(srv, fh, is_dir=False) as h:
        got = fcntl.fcntl(h.fd, fcntl.F_OFD_GETLK, _flock(type_, start, end))
    l_type, _, l_start, l_len, _ = _FLOCK.unpack(got)
    l_end = OFFSET_MAX if l_len == 0 else l_start + l_len - 1
    return LK_OUT.pack(l_start, l_end, l_type, 0)


def _setlk(srv: FsServer, req: Request, *, wait: bool) -> Reply:
    fh, start, end, type_, lk_flags = _lock_args(req)
    if wait and req.interrupted:
        raise OSError(errno.EINTR, "interrupted")
    with handle(srv, fh, is_dir=False) as h:
        try:
            if lk_flags & LK_FLOCK:
                op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(
                    type_, fcntl.LOCK_UN)
                fcntl.flock(h.fd, op | fcntl.LOCK_NB)
            else:
                fcntl.fcntl(h.fd, fcntl.F_OFD_SETLK, _flock(type_, start, end))
        except OSError as exc:
            if wait and exc.errno in (errno.EAGAIN, errno.EACCES):
                return Later.RETRY
            raise
    return b""


def op_setlk(srv: FsServer, req: Request) -> Reply:
    """SETLK: take or drop a lock now (``EAGAIN`` when taken)."""
    return _setlk(srv, req, wait=False)


def op_setlkw(srv: FsServer, req: Request) -> Reply:
    """SETLKW: take a lock, waiting (without a worker) while it is taken."""
    return _setlk(srv, req, wait=True)


def op_syncfs(srv: FsServer, req: Request) -> Reply:
    """SYNCFS: write back the host file system of the share."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=srv.root_fd)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
    return b""


#: Operations tried on the event loop first on any file system, because they cannot
#: wait: a READ the page cache holds (``RWF_NOWAIT``), FLUSH (nothing buffered).  None
#: from one: not now, a worker runs the full operation.
FAST_OPS: dict[int, Operation] = {
    Opcode.READ: read_nowait,
    Opcode.FLUSH: op_flush,
}

#: The operations of this module by opcode.
FILE_OPS: dict[int, Operation] = {
    Opcode.OPEN: op_open,
    Opcode.CREATE: op_create,
    Opcode.READ: op_read,
    Opcode.WRITE: op_write,
    Opcode.FLUSH: op_flush,
    Opcode.RELEASE: op_release,
    Opcode.FSYNC: op_fsync,
    Opcode.OPENDIR: op_opendir,
    Opcode.READDIR: op_readdir,
    Opcode.READDIRPLUS: op_readdirplus,
    Opcode.RELEASEDIR: op_releasedir,
    Opcode.FSYNCDIR: op_fsyncdir,
    Opcode.FALLOCATE: op_fallocate,
    Opcode.LSEEK: op_lseek,
    Opcode.COPY_FILE_RANGE: op_copy_file_range,
    Opcode.GETLK: op_getlk,
    Opcode.SETLK: op_setlk,
    Opcode.SETLKW: op_setlkw,
    Opcode.SYNCFS: op_syncfs,
}
