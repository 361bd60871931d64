"""Image file I/O for virtio-blk: vectored transfers, O_DIRECT, worker threads.

What :mod:`pyvirtio.devices.blk` needs below the request level:

- :func:`transfer`: ``os.preadv``/``os.pwritev`` straight between the image and
  memoryviews of guest memory, resumed after short transfers.
- :class:`DirectFile`: an image opened with ``O_DIRECT`` (``--direct``), which
  bypasses the host's page cache.  Direct I/O wants buffer addresses, lengths
  and file offsets aligned (:class:`DirectAlignment`, asked of the kernel at
  start-up).  A request that is not aligned still works: its data goes through
  an aligned bounce buffer, or through a second, buffered descriptor of the same
  file when its offset or length is the problem; :meth:`DirectFile.transfer`
  says so, and the device counts it.
- :class:`WorkerPool`: the threads of ``--aio threads``.  The syscalls release
  the GIL, so requests of one queue run concurrently and complete in whatever
  order the storage finishes them.

Why threads and not io_uring: the one maintained binding on PyPI, ``liburing``
(a Zig-built wrapper of C liburing), is marked alpha and requires Linux 6.14 or
later, and every other one found (``aiouring``, ``async-fs``, ``kloop``) is
abandoned or a stub; pyvirtio has no run-time dependencies at all.  Threads need
nothing and run on any Linux kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.virtqueue.chain import take_views

__all__ = [
    "DirectAlignment",
    "DirectFile",
    "WorkerPool",
    "direct_alignment",
    "on_tmpfs",
    "punch_hole",
    "transfer",
    "zero_range",
]

log = logging.getLogger(__name__)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: ioctl: logical sector size of a block device (<linux/fs.h>).
_BLKSSZGET = 0x1268
#: statx(2): ask for the direct I/O alignment (Linux 6.1); the flag to name an fd.
_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000
#: Where ``stx_dio_mem_align`` and ``stx_dio_offset_align`` sit in ``struct statx``.
_STATX_DIO = struct.Struct("=II")
_STATX_DIO_OFFSET = 152
_STATX_SIZE = 256
_TMPFS_MAGIC = 0x01021994
#: Smallest alignment assumed: the 512-byte sector every Linux block device has.
_SECTOR = 512

_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.c_void_p]
    _statx.restype = ctypes.c_int


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) keeping the file size; False if the file system cannot do ``mode``."""
    if _libc.fallocate(fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` (they read as zeros after): a
    discard that frees the host's blocks.  False if the file system cannot punch
    holes (nothing was done).

    Raises:
        OSError: any other failure of fallocate(2).
    """
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE, offset, length)


def zero_range(fd: int, offset: int, length: int, write_fd: int | None = None) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros: FALLOC_FL_ZERO_RANGE, or
    zeros written (through ``write_fd`` if given: a buffered twin of an O_DIRECT
    ``fd``) where the file system cannot.

    Raises:
        OSError: the image refused it.
    """
    if _fallocate(fd, _FALLOC_FL_ZERO_RANGE, offset, length):
        return
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd if write_fd is None else write_fd,
                            _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - offset)], offset)


def transfer(fd: int, views: list[memoryview], offset: int, *, write: bool) -> int:
    """``os.pwritev`` (``write``) or ``os.preadv`` ``views`` until done or EOF.

    Splits at IOV_MAX and resumes after short transfers; returns bytes moved.

    Raises:
        OSError: the syscall failed.
    """
    total = 0
    pending = views
    while pending:
        batch = pending[:_IOV_MAX]
        at = offset + total
        n = os.pwritev(fd, batch, at) if write else os.preadv(fd, batch, at)
        if n <= 0:
            break
        total += n
        want = sum(len(v) for v in batch)
        if n == want:
            pending = pending[len(batch) :]
        else:
            pending = take_views(pending, n, sum(len(v) for v in pending) - n)
    return total


@dataclass(frozen=True, slots=True)
class DirectAlignment:
    """What direct I/O on one file requires, in bytes (powers of two).

    Attributes:
        memory: alignment of every buffer's address.
        offset: alignment of the file offset, the length, and of every buffer's
            length (the kernel checks each iovec segment).
        source: where the figures came from, for the log.
    """

    memory: int
    offset: int
    source: str

    def fits(self, views: list[memoryview], offset: int, length: int) -> bool:
        """Whether a transfer of ``views`` at ``offset`` can go straight to an
        ``O_DIRECT`` descriptor."""
        mask = self.offset - 1
        if (offset | length) & mask:
            return False
        memory_mask = self.memory - 1
        for view in views:
            if len(view) & mask:
                return False
            try:
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            except TypeError:  # a read-only view: its address is not to be had; bounce
                return False
            if address & memory_mask:
                return False
        return True


def direct_alignment(fd: int) -> DirectAlignment:
    """The alignment direct I/O on ``fd`` needs.

    A block device: its logical sector size (``BLKSSZGET``).  A file: what
    ``statx(STATX_DIOALIGN)`` reports (Linux 6.1 and later, on file systems that
    know); otherwise, as a safe guess, its ``st_blksize`` (4096 on most file
    systems, more than the sector size they need).

    Raises:
        OSError: ``EINVAL``: ``statx`` says the file does not support direct I/O.
    """
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
        size = max(size, _SECTOR)
        return DirectAlignment(size, size, "BLKSSZGET")
    if _statx is not None:
        buf = ctypes.create_string_buffer(_STATX_SIZE)
        if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) == 0:
            mask = struct.unpack_from("=I", buf, 0)[0]
            if mask & _STATX_DIOALIGN:
                memory, offset = _STATX_DIO.unpack_from(buf, _STATX_DIO_OFFSET)
                if not memory or not offset:
                    raise OSError(errno.EINVAL,
                                  "the file system does not support direct I/O (statx)")
                return DirectAlignment(memory, max(offset, _SECTOR), "statx")
    size = max(st.st_blksize, _SECTOR)
    return DirectAlignment(size, size, "st_blksize")


def on_tmpfs(fd: int) -> bool:
    """Whether ``fd`` is a file on tmpfs (``fstatfs``' ``f_type``)."""
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
    if _libc.fstatfs(fd, buf) != 0:
        return False
    f_type: int = struct.unpack_from("=l", buf, 0)[0]
    return f_type == _TMPFS_MAGIC


def _page_round(length: int) -> int:
    return (length + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)


class DirectFile:
    """An image opened with ``O_DIRECT``, plus a buffered descriptor for the requests
    direct I/O cannot take.

    Args:
        path: the image.
        flags: ``os.O_RDONLY`` or ``os.O_RDWR`` (``O_DIRECT`` and ``O_CLOEXEC`` are added).

    Raises:
        OSError: the image cannot be opened; ``EINVAL``, with a message that says
            so, when its file system refuses ``O_DIRECT`` (at ``open``, through
            ``statx``, or on an aligned test read): tmpfs before Linux 6.6, procfs,
            some FUSE file systems.
    """

    def __init__(self, path: Path, flags: int) -> None:
        self.path = path
        try:
            self.fd = os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise OSError(
                    errno.EINVAL, f"{path}: its file system does not support O_DIRECT "
                    "(--direct); serve it without --direct, or move the image to a file "
                    "system that does (ext4, xfs, btrfs, a block device)") from exc
            raise
        try:
            self.alignment = direct_alignment(self.fd)
            self._probe()
            #: The same file without O_DIRECT: requests whose offset or length is
            #: not aligned (possible only when the alignment is above 512 bytes).
            self.buffered_fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno == errno.EINVAL:
                raise OSError(errno.EINVAL,
                              f"{path}: {exc.strerror}; serve it without --direct") from exc
            raise
        except BaseException:
            os.close(self.fd)
            raise
        self._warned_einval = False

    def _probe(self) -> None:
        """One aligned read at offset 0: some file systems accept ``O_DIRECT`` at
        ``open`` and refuse the I/O."""
        size = self.alignment.offset
        if os.fstat(self.fd).st_size < size:
            return
        buf = mmap.mmap(-1, _page_round(max(size, self.alignment.memory)))
        data = memoryview(buf)[:size]
        try:
            os.preadv(self.fd, [data], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise OSError(errno.EINVAL,
                          "the file system refused an aligned direct read") from exc
        finally:
            data.release()
            buf.close()

    def transfer(self, views: list[memoryview], offset: int, *, write: bool) -> tuple[int, bool]:
        """Move ``views`` to or from the image at ``offset``.

        Returns the bytes moved and whether the request was not aligned for
        direct I/O (it then went through a bounce buffer or the buffered fd).

        Raises:
            OSError: the I/O failed.
        """
        length = sum(len(v) for v in views)
        alignment = self.alignment
        if alignment.fits(views, offset, length):
            try:
                return transfer(self.fd, views, offset, write=write), False
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The file system wants more than it said: serve this request anyway.
                if not self._warned_einval:
                    self._warned_einval = True
                    log.warning("%s: a direct transfer that looked aligned (%s) was refused "
                                "(EINVAL); such requests go through the page cache",
                                self.path, alignment)
                return transfer(self.buffered_fd, views, offset, write=write), True
        mask = alignment.offset - 1
        if (offset | length) & mask:
            return transfer(self.buffered_fd, views, offset, write=write), True
        return self._bounce(views, offset, length, write=write), True

    def _bounce(self, views: list[memoryview], offset: int, length: int, *, write: bool) -> int:
        """Direct I/O through a page-aligned buffer of our own (anonymous mmap)."""
        buf = mmap.mmap(-1, _page_round(length))
        data = memoryview(buf)[:length]
        try:
            if write:
                _copy(views, data, to_views=False)
                return transfer(self.fd, [data], offset, write=True)
            done = transfer(self.fd, [data], offset, write=False)
            _copy(take_views(views, 0, done), data, to_views=True)
            return done
        finally:
            data.release()
            buf.close()

    def close(self) -> None:
        """Close both descriptors."""
        for fd in (self.fd, self.buffered_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _copy(views: list[memoryview], data: memoryview, *, to_views: bool) -> None:
    """Copy between ``views`` and the contiguous ``data`` (as long as they are together)."""
    pos = 0
    for view in views:
        n = len(view)
        if to_views:
            view[:] = data[pos : pos + n]
        else:
            data[pos : pos + n] = view
        pos += n


class WorkerPool:
    """Threads that run jobs from one queue (``--aio threads``).

    A job is a callable that handles its own errors; one that raises anyway is
    logged and the thread goes on.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        """How many threads run jobs."""
        return len(self._threads)

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in a worker thread, after the jobs submitted before it started."""
        self._jobs.put(job)

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("a worker job failed")

    def close(self, timeout: float = 30.0) -> None:
        """Run the jobs already submitted, then stop the threads (waits at most
        ``timeout`` seconds for each)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._threads.clear()
