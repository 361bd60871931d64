"""The host side of virtio-fs's safety: guest names, ``openat2`` and a few syscalls
``os`` lacks, through ctypes.

Every path the server opens is one guest-supplied name, checked by :func:`check_name`,
resolved relative to an ``O_PATH`` directory fd with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)`` and ``O_NOFOLLOW``: the kernel refuses
anything that would leave the directory, follow a symbolic link of the host or cross
a ``/proc`` magic link.  Where the kernel has no ``openat2`` (before 5.6), the same
single-name open with ``O_NOFOLLOW`` is an equivalent safe walk: one checked name
cannot contain ``/`` or ``..``, so it names a child of the directory or fails.

An inode already held is re-opened (for I/O) through this process's own
``/proc/self/fd`` directory, opened once before any sandbox, and only for regular
files: that magic link is our own fd, never a path from the guest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import stat as stat_mod
import struct

__all__ = [
    "MAX_NAME",
    "MAX_SYMLINK",
    "check_name",
    "fallocate",
    "fchown_empty",
    "fs_type",
    "is_local_fs",
    "is_openable",
    "open_beneath",
    "openat2_available",
    "renameat2",
    "syncfs",
    "utimens_empty",
]

#: ``NAME_MAX``: the longest file name.
MAX_NAME = 255
#: The longest symbolic-link target the server creates (``PATH_MAX - 1``).
MAX_SYMLINK = 4095

#: ``openat2`` on x86_64 and aarch64 (one number for every architecture since 5.6).
SYS_OPENAT2 = 437
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine(), -1)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: Fail with ``EAGAIN`` unless every component is in the dentry cache (Linux 5.12+).
RESOLVE_CACHED = 0x20
#: What every open of a guest name asks of the kernel.
RESOLVE_SAFE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
#: ``struct open_how``: flags, mode, resolve.
_OPEN_HOW = struct.Struct("=QQQ")

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_fchownat.restype = ctypes.c_int
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_utimensat.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def check_name(name: bytes) -> bytes:
    """A guest's file name, checked: not empty, not ``.`` or ``..``, no ``/`` and no
    NUL, at most :data:`MAX_NAME` bytes.

    Raises:
        OSError: ``EINVAL`` (``ENAMETOOLONG`` when too long) for anything else.
    """
    if len(name) > MAX_NAME:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, f"refused name {name[:64]!r}")
    return name


def _raw_openat2(dirfd: int, name: bytes, flags: int, mode: int, resolve: int) -> int:
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags, mode, resolve), _OPEN_HOW.size)
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(name),
                  how, ctypes.c_size_t(_OPEN_HOW.size))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _probe_openat2() -> bool:
    try:
        os.close(_raw_openat2(-100, b"/", os.O_PATH | os.O_CLOEXEC, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    return True


_HAVE_OPENAT2 = _probe_openat2()


def openat2_available() -> bool:
    """Whether this kernel has ``openat2`` (Linux 5.6+); else the safe walk is used."""
    return _HAVE_OPENAT2


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0, *,
                 cached: bool = False, same_mount: bool = False) -> int:
    """Open the checked ``name`` in the directory ``dirfd`` without following any
    symbolic link, magic link or ``..`` (module docstring).  ``O_NOFOLLOW`` and
    ``O_CLOEXEC`` are always added.  ``cached``: only from the dentry cache
    (``RESOLVE_CACHED``), never waiting for the disk.  ``same_mount``: never into
    another mount (``RESOLVE_NO_XDEV``: a mount point inside the share may be a
    network or FUSE file system, which may take any time to answer).

    Raises:
        OSError: the kernel's answer (``ELOOP`` for a symbolic link not opened with
            ``O_PATH``, ``EXDEV`` for an escape); ``BlockingIOError`` when ``cached``
            and the name is not in the cache, when ``same_mount`` and it is a mount
            point, or when the kernel cannot tell.
    """
    check_name(name)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _HAVE_OPENAT2:
        resolve = (RESOLVE_SAFE | (RESOLVE_CACHED if cached else 0)
                   | (RESOLVE_NO_XDEV if same_mount else 0))
        try:
            return _raw_openat2(dirfd, name, flags, mode if flags & (os.O_CREAT | os.O_TMPFILE)
                                else 0, resolve)
        except OSError as exc:
            if cached and exc.errno == errno.EINVAL:  # a kernel before 5.12
                raise BlockingIOError(errno.EAGAIN, "no RESOLVE_CACHED") from exc
            if same_mount and exc.errno == errno.EXDEV:
                raise BlockingIOError(errno.EAGAIN, "a mount point") from exc
            raise
    if cached or same_mount:
        raise BlockingIOError(errno.EAGAIN, "no openat2")
    return os.open(name, flags, mode, dir_fd=dirfd)


def _check(result: int) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", uid, gid, AT_EMPTY_PATH)``: works on ``O_PATH`` fds and
    symbolic links (-1 leaves an id unchanged)."""
    _check(_fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                     AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


def utimens_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """``utimensat(fd, "", times, AT_EMPTY_PATH)`` (Linux 5.8+): each time is
    ``(seconds, nanoseconds)`` or ``(0, UTIME_NOW / UTIME_OMIT)``."""
    times = (ctypes.c_long * 4)(atime[0], atime[1], mtime[0], mtime[1])
    _check(_utimensat(fd, b"", ctypes.cast(times, ctypes.c_void_p),
                      AT_EMPTY_PATH))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with its ``mode`` (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE...)."""
    _check(_fallocate(fd, mode, offset, length))


#: ``statfs.f_type`` of file systems on a local disk or in memory, whose metadata
#: calls and buffered writes finish in microseconds unless the disk is needed
#: (``statfs(2)``): ext2/3/4, XFS, Btrfs, tmpfs, F2FS, overlayfs, ramfs, ZFS, bcachefs.
LOCAL_FS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010,
                            0x794C7630, 0x858458F6, 0x2FC12FC1, 0xCA451A4E})


def fs_type(fd: int) -> int:
    """``fstatfs(fd).f_type``: the magic number of the file system holding ``fd``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    _check(_fstatfs(fd, buf))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def is_local_fs(fd: int) -> bool:
    """Whether ``fd`` lies on a local file system (:data:`LOCAL_FS_TYPES`): not NFS,
    not FUSE, nothing that may wait on a network or another process."""
    try:
        return fs_type(fd) in LOCAL_FS_TYPES
    except OSError:
        return False


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write back the file system holding ``fd``."""
    _check(_syncfs(fd))


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """``renameat2`` (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``) on checked names."""
    check_name(old)
    check_name(new)
    if flags == 0:
        os.rename(old, new, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    if SYS_RENAMEAT2 < 0:
        raise OSError(errno.EINVAL, "renameat2 flags on an unknown architecture")
    _check(int(_syscall(ctypes.c_long(SYS_RENAMEAT2), ctypes.c_long(olddirfd),
                        ctypes.c_char_p(old), ctypes.c_long(newdirfd), ctypes.c_char_p(new),
                        ctypes.c_uint(flags))))


def is_openable(mode: int) -> bool:
    """A regular file or a directory: what the server opens for I/O (never a FIFO that
    would block a worker, a device node or a socket)."""
    return stat_mod.S_ISREG(mode) or stat_mod.S_ISDIR(mode)
