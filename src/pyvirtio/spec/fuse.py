"""FUSE wire definitions, protocol 7.38 (Linux ``include/uapi/linux/fuse.h``).

virtio-fs (VIRTIO 1.4 §5.11) carries FUSE requests on its virtqueues: the
device-readable part of a chain is ``struct fuse_in_header`` followed by the
operation's arguments, the device-writable part receives ``struct fuse_out_header``
followed by the reply (§5.11.6.1).  Every structure here is little-endian, as the
guests virtio-fs serves are (the header says host-endian; virtio-fs fixes it to the
guest's, and every Linux virtio-fs guest is little-endian in practice).

Each struct is one precompiled :class:`struct.Struct`; its size is checked against
``fuse.h`` in ``tests/unit/test_fs_spec.py``.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "ACCESS_IN",
    "ATTR",
    "ATTR_OUT",
    "BATCH_FORGET_IN",
    "COMPAT_INIT_IN_SIZE",
    "COPY_FILE_RANGE_IN",
    "CREATE_IN",
    "DIRENT",
    "ENTRY_OUT",
    "FALLOCATE_IN",
    "FILE_LOCK",
    "FLUSH_IN",
    "FORGET_IN",
    "FORGET_ONE",
    "FSYNC_IN",
    "FUSE_KERNEL_MINOR_VERSION",
    "FUSE_KERNEL_VERSION",
    "FUSE_MIN_READ_BUFFER",
    "FUSE_ROOT_ID",
    "GETATTR_IN",
    "GETXATTR_IN",
    "GETXATTR_OUT",
    "INIT_IN",
    "INIT_OUT",
    "INTERRUPT_IN",
    "IN_HEADER",
    "KSTATFS",
    "LINK_IN",
    "LK_IN",
    "LK_OUT",
    "LSEEK_IN",
    "LSEEK_OUT",
    "MKDIR_IN",
    "MKNOD_IN",
    "OPEN_IN",
    "OPEN_OUT",
    "OUT_HEADER",
    "READ_IN",
    "RELEASE_IN",
    "RENAME2_IN",
    "RENAME_IN",
    "SETATTR_IN",
    "SETXATTR_IN",
    "SYNCFS_IN",
    "WRITE_IN",
    "WRITE_OUT",
    "FattrValid",
    "InitFlag",
    "Opcode",
    "OpenOutFlag",
    "dirent_size",
]

#: The protocol this module describes (``FUSE_KERNEL_VERSION``.``FUSE_KERNEL_MINOR_VERSION``).
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 38
#: The node id of the root directory.
FUSE_ROOT_ID = 1
#: The smallest read buffer a FUSE server may offer (``FUSE_MIN_READ_BUFFER``).
FUSE_MIN_READ_BUFFER = 8192
#: ``struct fuse_init_in`` before 7.36 (``major, minor, max_readahead, flags``).
COMPAT_INIT_IN_SIZE = 16


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


class InitFlag(enum.IntFlag):
    """INIT ``flags`` (bits 0-31) and ``flags2`` (bits 32-63, as ``flags2 << 32``)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35


class FattrValid(enum.IntFlag):
    """SETATTR ``valid``: which fields of ``struct fuse_setattr_in`` to apply."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class OpenOutFlag(enum.IntFlag):
    """``open_flags`` of ``struct fuse_open_out`` (``FOPEN_*``)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6


#: GETATTR ``getattr_flags``: ``fh`` is valid.
GETATTR_FH = 1 << 0
#: LK ``lk_flags``: a BSD ``flock`` rather than a POSIX lock.
LK_FLOCK = 1 << 0
#: FSYNC ``fsync_flags``: data only.
FSYNC_FDATASYNC = 1 << 0
#: WRITE ``write_flags``: clear the set-user/group-id bits.
WRITE_KILL_SUIDGID = 1 << 2
#: RELEASE ``release_flags``: drop the ``flock`` locks of ``lock_owner`` too.
RELEASE_FLOCK_UNLOCK = 1 << 1
#: RENAME2 ``flags`` (``renameat2``).
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# -- headers -------------------------------------------------------------------------------

#: ``struct fuse_in_header``: len, opcode, unique, nodeid, uid, gid, pid, total_extlen,
#: padding (40 bytes).
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: ``struct fuse_out_header``: len, error (a negative errno), unique (16 bytes).
OUT_HEADER = struct.Struct("<IiQ")

# -- attributes and entries ----------------------------------------------------------------

#: ``struct fuse_attr``: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
#: ctimensec, mode, nlink, uid, gid, rdev, blksize, flags (88 bytes).
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
#: ``struct fuse_entry_out``: nodeid, generation, entry_valid, attr_valid,
#: entry_valid_nsec, attr_valid_nsec, then a ``fuse_attr`` (128 bytes).
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
#: ``struct fuse_attr_out``: attr_valid, attr_valid_nsec, dummy, then a ``fuse_attr``
#: (104 bytes).
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
#: ``struct fuse_getattr_in``: getattr_flags, dummy, fh.
GETATTR_IN = struct.Struct("<IIQ")
#: ``struct fuse_setattr_in``: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
#: atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5 (88 bytes).
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")

# -- life cycle ----------------------------------------------------------------------------

#: ``struct fuse_init_in`` (7.36+): major, minor, max_readahead, flags, flags2,
#: unused[11] (64 bytes; older kernels send the first :data:`COMPAT_INIT_IN_SIZE`).
INIT_IN = struct.Struct("<IIIII44x")
#: ``struct fuse_init_out``: major, minor, max_readahead, flags, max_background,
#: congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2,
#: unused[7] (64 bytes).
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
#: ``struct fuse_forget_in``: nlookup.
FORGET_IN = struct.Struct("<Q")
#: ``struct fuse_batch_forget_in``: count, dummy; ``count`` :data:`FORGET_ONE` follow.
BATCH_FORGET_IN = struct.Struct("<II")
#: ``struct fuse_forget_one``: nodeid, nlookup.
FORGET_ONE = struct.Struct("<QQ")
#: ``struct fuse_interrupt_in``: unique.
INTERRUPT_IN = struct.Struct("<Q")

# -- names ---------------------------------------------------------------------------------

#: ``struct fuse_mknod_in``: mode, rdev, umask, padding (then the name).
MKNOD_IN = struct.Struct("<IIII")
#: ``struct fuse_mkdir_in``: mode, umask (then the name).
MKDIR_IN = struct.Struct("<II")
#: ``struct fuse_rename_in``: newdir (then the old and new names).
RENAME_IN = struct.Struct("<Q")
#: ``struct fuse_rename2_in``: newdir, flags, padding (then the old and new names).
RENAME2_IN = struct.Struct("<QII")
#: ``struct fuse_link_in``: oldnodeid (then the new name).
LINK_IN = struct.Struct("<Q")
#: ``struct fuse_access_in``: mask, padding.
ACCESS_IN = struct.Struct("<II")

# -- files ---------------------------------------------------------------------------------

#: ``struct fuse_open_in``: flags, open_flags.
OPEN_IN = struct.Struct("<II")
#: ``struct fuse_create_in``: flags, mode, umask, open_flags (then the name).
CREATE_IN = struct.Struct("<IIII")
#: ``struct fuse_open_out``: fh, open_flags, padding.
OPEN_OUT = struct.Struct("<QII")
#: ``struct fuse_release_in``: fh, flags, release_flags, lock_owner.
RELEASE_IN = struct.Struct("<QIIQ")
#: ``struct fuse_flush_in``: fh, unused, padding, lock_owner.
FLUSH_IN = struct.Struct("<QIIQ")
#: ``struct fuse_read_in``: fh, offset, size, read_flags, lock_owner, flags, padding.
READ_IN = struct.Struct("<QQIIQII")
#: ``struct fuse_write_in``: fh, offset, size, write_flags, lock_owner, flags, padding
#: (then the data).
WRITE_IN = struct.Struct("<QQIIQII")
#: ``struct fuse_write_out``: size, padding.
WRITE_OUT = struct.Struct("<II")
#: ``struct fuse_fsync_in``: fh, fsync_flags, padding.
FSYNC_IN = struct.Struct("<QII")
#: ``struct fuse_fallocate_in``: fh, offset, length, mode, padding.
FALLOCATE_IN = struct.Struct("<QQQII")
#: ``struct fuse_lseek_in``: fh, offset, whence, padding.
LSEEK_IN = struct.Struct("<QQII")
#: ``struct fuse_lseek_out``: offset.
LSEEK_OUT = struct.Struct("<Q")
#: ``struct fuse_copy_file_range_in``: fh_in, off_in, nodeid_out, fh_out, off_out, len,
#: flags.
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
#: ``struct fuse_syncfs_in``: padding.
SYNCFS_IN = struct.Struct("<Q")

# -- locks ---------------------------------------------------------------------------------

#: ``struct fuse_file_lock``: start, end, type, pid.
FILE_LOCK = struct.Struct("<QQII")
#: ``struct fuse_lk_in``: fh, owner, a ``fuse_file_lock``, lk_flags, padding.
LK_IN = struct.Struct("<QQQQIIII")
#: ``struct fuse_lk_out``: a ``fuse_file_lock``.
LK_OUT = FILE_LOCK

# -- extended attributes -------------------------------------------------------------------

#: ``struct fuse_setxattr_in`` without FUSE_SETXATTR_EXT: size, flags (then name, value).
SETXATTR_IN = struct.Struct("<II")
#: ``struct fuse_getxattr_in``: size, padding (then the name).
GETXATTR_IN = struct.Struct("<II")
#: ``struct fuse_getxattr_out``: size, padding.
GETXATTR_OUT = struct.Struct("<II")

# -- file system and directories -----------------------------------------------------------

#: ``struct fuse_kstatfs`` (= ``fuse_statfs_out``): blocks, bfree, bavail, files, ffree,
#: bsize, namelen, frsize, padding, spare[6] (80 bytes).
KSTATFS = struct.Struct("<QQQQQIIII24x")
#: ``struct fuse_dirent``: ino, off, namelen, type (then the name, padded to 8 bytes).
DIRENT = struct.Struct("<QQII")


def dirent_size(namelen: int) -> int:
    """``FUSE_DIRENT_SIZE``: a ``fuse_dirent`` with a name, rounded up to 8 bytes."""
    return (DIRENT.size + namelen + 7) & ~7
