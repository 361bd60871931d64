"""The virtio-fs device (VIRTIO 1.4 §5.11): FUSE requests on virtqueues, served by
worker threads.

Queues (§5.11.2): ``hiprio`` (0) carries FORGET and BATCH_FORGET, which have no
reply (§5.11.6.2); the request queues (1..N) carry everything else.  The event loop
decodes each request's ``fuse_in_header`` and arguments, answers INIT, DESTROY,
FORGET and INTERRUPT itself, and hands the rest to a bounded pool of worker threads
(:data:`~pyvirtio.devices.base.DEFERRED`, then ``host.complete``): a slow READ never
stalls the others.  A SETLKW whose lock is taken goes to the lock waiter, which
retries it without holding a worker until it succeeds, fails or is interrupted.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import threading
import time
from collections.abc import Callable

from pyvirtio.devices.base import DEFERRED, Deferred, QueueStats, Tally, VirtioDevice
from pyvirtio.devices.blkio import WorkerPool
from pyvirtio.devices.fs.ops_entry import ENTRY_OPS, lookup_loop
from pyvirtio.devices.fs.ops_file import FAST_OPS, FILE_OPS
from pyvirtio.devices.fs.server import FsConfig, FsServer, Later, Operation, Reply, Request
from pyvirtio.errors import RequestTooShort
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.fs import CONFIG, TAG_SIZE
from pyvirtio.spec.fuse import (
    BATCH_FORGET_IN,
    FORGET_IN,
    FORGET_ONE,
    FUSE_KERNEL_MINOR_VERSION,
    FUSE_KERNEL_VERSION,
    IN_HEADER,
    INIT_IN,
    INIT_OUT,
    INTERRUPT_IN,
    OUT_HEADER,
    WRITE_IN,
    InitFlag,
    Opcode,
)
from pyvirtio.virtqueue.chain import ChainReader, DescriptorChain, scatter

__all__ = [
    "MAX_ARGS",
    "FsDevice",
    "decode_request",
    "enter_sandbox",
    "opcode_name",
    "unshare_mounts",
]

log = logging.getLogger(__name__)

#: The longest arguments a request other than WRITE may carry: SETXATTR's name and a
#: 64 KiB value, with room to spare.  A longer one is answered EINVAL unread.
MAX_ARGS = (1 << 16) + 4096
#: Every operation the worker threads run, by opcode.
OPERATIONS: dict[int, Operation] = {**ENTRY_OPS, **FILE_OPS}
#: Operations tried on the loop first on any file system (they never wait: a READ
#: from the page cache, FLUSH); None from one sends the request to a worker.
FAST: dict[int, Operation] = dict(FAST_OPS)
#: Operations run whole on the event loop when their object lies on the share's own
#: local file system (:meth:`FsDevice._on_loop`): metadata calls, opens, closes and
#: buffered writes there finish in microseconds, and the hand-over to a worker and
#: back (two thread wake-ups and an eventfd) costs more than the call.  None from one
#: (a LOOKUP or CREATE meeting a mount point) sends it to a worker.  Not here: what
#: waits by nature (FSYNC, SYNCFS, SETLKW, FALLOCATE, COPY_FILE_RANGE, READDIR's
#: listing), and READ, whose ``RWF_NOWAIT`` tells for sure whether it would wait.
LOCAL: dict[int, Operation] = {
    **{op: OPERATIONS[op] for op in (
        Opcode.GETATTR, Opcode.SETATTR, Opcode.READLINK, Opcode.SYMLINK, Opcode.MKNOD,
        Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2,
        Opcode.LINK, Opcode.OPEN, Opcode.CREATE, Opcode.WRITE, Opcode.STATFS,
        Opcode.ACCESS, Opcode.GETXATTR, Opcode.LISTXATTR, Opcode.SETXATTR,
        Opcode.REMOVEXATTR, Opcode.GETLK, Opcode.SETLK, Opcode.OPENDIR, Opcode.RELEASE,
        Opcode.RELEASEDIR)},
    Opcode.LOOKUP: lookup_loop,
}
#: LOCAL operations whose object is named by the file handle first in their arguments.
_BY_FH = frozenset({Opcode.WRITE, Opcode.GETLK, Opcode.SETLK, Opcode.RELEASE,
                    Opcode.RELEASEDIR})
#: The largest WRITE run on the loop (bigger ones copy long enough for the workers).
LOOP_WRITE_MAX = 1 << 20
#: A LOCAL operation slower than this (seconds: the disk, or a host under memory
#: pressure throttling writers) sends them all to the workers for LOOP_PAUSE seconds:
#: the loop stalls at most that long, once per pause.
LOOP_SLOW = 0.01
LOOP_PAUSE = 1.0
#: INIT flags the server takes when the guest offers them.
_WANTED = (InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS
           | InitFlag.ATOMIC_O_TRUNC | InitFlag.BIG_WRITES | InitFlag.DO_READDIRPLUS
           | InitFlag.READDIRPLUS_AUTO | InitFlag.PARALLEL_DIROPS | InitFlag.MAX_PAGES
           | InitFlag.ASYNC_DIO | InitFlag.INIT_EXT)
_NAMES = {int(op): op.name.lower() for op in Opcode}
#: How often the lock waiter retries a SETLKW, at first and at most (seconds).
_RETRY_FIRST, _RETRY_MAX = 0.002, 0.05


def opcode_name(opcode: int) -> str:
    """``lookup``, ``read``... or ``unknown`` (stats keys: a guest sending every number
    must not grow the counters without bound)."""
    return _NAMES.get(opcode, "unknown")


def decode_request(chain: DescriptorChain) -> Request:
    """Decode a chain's ``fuse_in_header`` and arguments (WRITE's data stays in the
    reader, unread).

    Raises:
        RequestTooShort: shorter than a ``fuse_in_header``.
        OSError: ``EINVAL``: arguments longer than :data:`MAX_ARGS`.
    """
    views = chain.readable
    first = views[0] if views else b""
    if len(first) >= IN_HEADER.size:  # the header in one descriptor, as Linux sends it
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(first)
        reader = ChainReader(views, chain.readable_len)
        reader.offset = IN_HEADER.size
    else:
        reader = chain.reader()
        _, opcode, unique, nodeid, uid, gid, pid, _, _ = reader.read_obj(IN_HEADER)
    remaining = reader.size - reader.offset
    if opcode == Opcode.WRITE:
        body = reader.read(min(WRITE_IN.size, remaining))
    else:
        if remaining > MAX_ARGS:
            raise OSError(errno.EINVAL, f"{remaining} bytes of arguments")
        if len(views) == 2 and len(first) == IN_HEADER.size:  # header, then arguments
            body = views[1].tobytes()
            reader.offset = reader.size
        else:
            body = reader.read()
    return Request(opcode, unique, nodeid, uid, gid, pid, body, reader, chain.writer())


class FsDevice(VirtioDevice):
    """virtio-fs serving :attr:`FsConfig.shared_dir` to one guest at a time.

    Raises:
        OSError: the shared directory cannot be opened.
    """

    device_id = DeviceId.FS

    def __init__(self, config: FsConfig) -> None:
        super().__init__()
        tag = config.tag.encode()
        if not tag or len(tag) > TAG_SIZE:
            raise ValueError(f"the tag must be 1 to {TAG_SIZE} bytes of UTF-8")
        self.config = config
        self.tag = tag
        self.num_queues = 1 + config.request_queues
        self.max_queue_size = config.queue_size
        _raise_fd_limit(config.max_inodes + config.max_handles + 256)
        if config.sandbox == "namespace":
            unshare_mounts()  # before any thread of ours: CLONE_NEWNS needs a lone thread
        root = os.open(config.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        proc = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.server = FsServer(config, root, proc)
        self.pool = WorkerPool(config.thread_pool_size, "fs")
        self._waiting: list[tuple[int, DescriptorChain, Request, Operation]] = []
        self._waiting_lock = threading.Condition()
        #: SETLKW requests not answered yet, by unique (INTERRUPT finds them here).
        self._lock_requests: dict[int, Request] = {}
        self._sandboxed = False
        self._closed = False
        #: Until when :data:`LOCAL` operations go to the workers (one was slow).
        self._loop_paused_until = 0.0
        self._inline: dict[int, Callable[[int, DescriptorChain, Request], int]] = {
            Opcode.INIT: self._init, Opcode.DESTROY: self._destroy,
            Opcode.FORGET: self._forget, Opcode.BATCH_FORGET: self._batch_forget,
            Opcode.INTERRUPT: self._interrupt}
        self._waiter = threading.Thread(target=self._wait_locks, name="fs-locks", daemon=True)
        self._waiter.start()

    # -- VirtioDevice ----------------------------------------------------------------------

    def config_space(self) -> bytes:
        """``struct virtio_fs_config`` (§5.11.4): the tag and the request queues."""
        return CONFIG.pack(self.tag, self.config.request_queues, 0)

    def start(self) -> None:
        """A front-end connected: a new guest, nothing of the last one's is kept."""
        super().start()
        self.server.reset()

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """Decode one FUSE request; answer it here or in a worker thread.  The first
        request enters the sandbox (the daemon's sockets are open by then)."""
        if not self._sandboxed:
            self._sandboxed = True
            enter_sandbox(self.config)
        stats = self.stats[queue]
        try:
            req = decode_request(chain)
        except RequestTooShort:
            stats.violations += 1
            log.warning("queue %d: request %d shorter than a fuse_in_header", queue,
                        chain.head)
            return 0
        except OSError as exc:
            stats.errors += 1
            return _answer_error(chain, _unique(chain), exc.errno or errno.EIO)
        opcode = req.opcode
        stats.kinds[_NAMES.get(opcode, "unknown")] += 1
        stats.bytes_out += chain.readable_len
        inline = self._inline.get(opcode)
        if inline is not None:
            return inline(queue, chain, req)
        op = OPERATIONS.get(opcode)
        if op is None or not self.server.initialized:
            stats.errors += 1
            return _answer_error(chain, req.unique,
                                 errno.ENOSYS if op is None else errno.EIO)
        local = LOCAL.get(opcode)
        here = local if local is not None and self._on_loop(req) else FAST.get(opcode)
        if here is not None:
            written = self._run_here(stats, chain, req, here, timed=here is local)
            if written is not None:
                return written
        if opcode == Opcode.SETLKW:
            with self._waiting_lock:
                self._lock_requests[req.unique] = req
        self.pool.submit(lambda: self._run(queue, chain, req, op))
        return DEFERRED

    def _on_loop(self, req: Request) -> bool:
        """Whether a :data:`LOCAL` request runs on the event loop: the share is on a
        local file system, the object it names is on the share's own device (not a
        mount of something else inside it), no such operation was slow lately, and a
        WRITE is at most :data:`LOOP_WRITE_MAX` bytes."""
        srv = self.server
        if not srv.local or time.monotonic() < self._loop_paused_until:
            return False
        nodeid = req.nodeid
        if req.opcode in _BY_FH:
            body = req.body
            if len(body) < 24:
                return False
            if req.opcode == Opcode.WRITE and _size(body) > LOOP_WRITE_MAX:
                return False
            nodeid = srv.handles.nodeid_of(int.from_bytes(body[:8], "little"))
        return srv.inodes.dev_of(nodeid) == srv.inodes.root.dev

    def _run_here(self, stats: QueueStats, chain: DescriptorChain, req: Request,
                  op: Operation, *, timed: bool) -> int | None:
        """Run ``op`` on the loop: the used length, or None (a worker starts over).
        ``timed``: a LOCAL operation, whose slowness pauses them all (LOOP_SLOW)."""
        req.on_loop = True
        started = time.monotonic()
        result = _execute(op, self.server, req)
        took = time.monotonic() - started
        if timed and took > LOOP_SLOW:
            self._loop_paused_until = started + took + LOOP_PAUSE
            log.info("%s took %.1f ms on the event loop: short operations go to the "
                     "workers for %.0f s", _NAMES.get(req.opcode), took * 1000, LOOP_PAUSE)
        if result is None:
            req.writer = chain.writer()
            req.on_loop = False
            return None
        written, error = _reply(chain, req, result)
        stats.errors += error
        stats.bytes_in += max(written - OUT_HEADER.size, 0)
        return written

    def stop_queue(self, queue: int) -> None:
        """Waiting SETLKWs of the stopping ring are answered EINTR now."""
        with self._waiting_lock:
            doomed = [w for w in self._waiting if w[0] == queue]
            self._waiting = [w for w in self._waiting if w[0] != queue]
        for q, chain, req, _ in doomed:
            self._complete(q, chain, req, OSError(errno.EINTR, "ring stopped"))

    def close(self) -> None:
        """Finish the workers' requests, stop the lock waiter, close every fd."""
        if self._closed:
            return
        self._closed = True
        with self._waiting_lock:
            self._waiting_lock.notify_all()
        self.pool.close()
        self._waiter.join(5)
        self.server.close()

    # -- requests answered on the loop -----------------------------------------------------

    def _init(self, queue: int, chain: DescriptorChain, req: Request) -> int:
        """INIT: agree on the protocol version and flags (FUSE 7.38)."""
        if len(req.body) < 16:
            return _answer_error(chain, req.unique, errno.EINVAL)
        body = req.body + bytes(max(0, INIT_IN.size - len(req.body)))
        major, minor, max_readahead, flags, flags2 = INIT_IN.unpack(body[: INIT_IN.size])
        srv = self.server
        if major < FUSE_KERNEL_VERSION:
            return _answer_error(chain, req.unique, errno.EPROTO)
        if srv.initialized:
            srv.reset()
        offered = flags | (flags2 << 32 if flags & InitFlag.INIT_EXT else 0)
        wanted = int(_WANTED)
        if self.config.writeback:
            wanted |= InitFlag.WRITEBACK_CACHE
        if self.config.announce_submounts:
            wanted |= InitFlag.SUBMOUNTS
        agreed = offered & wanted if major == FUSE_KERNEL_VERSION else 0
        srv.flags = agreed
        srv.initialized = major == FUSE_KERNEL_VERSION
        log.info("FUSE INIT: guest %d.%d, flags %#x, agreed %#x", major, minor, offered, agreed)
        reply = INIT_OUT.pack(FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION, max_readahead,
                              agreed & 0xFFFFFFFF, 64, 48, srv.max_write, 1,
                              srv.max_write // 4096, 0, agreed >> 32)
        return _answer(chain, req.unique, reply)

    def _destroy(self, queue: int, chain: DescriptorChain, req: Request) -> int:
        """DESTROY: the guest unmounted; every inode and handle goes."""
        self.server.reset()
        return _answer(chain, req.unique, b"")

    def _forget(self, queue: int, chain: DescriptorChain, req: Request) -> int:
        """FORGET: no reply (§5.11.6.2)."""
        if len(req.body) >= FORGET_IN.size:
            (count,) = FORGET_IN.unpack_from(req.body)
            if not self.server.inodes.forget(req.nodeid, count):
                self.stats[queue].errors += 1
        return 0

    def _batch_forget(self, queue: int, chain: DescriptorChain, req: Request) -> int:
        """BATCH_FORGET: as many ``fuse_forget_one`` as were sent (never more than
        ``count``)."""
        if len(req.body) >= BATCH_FORGET_IN.size:
            count, _ = BATCH_FORGET_IN.unpack_from(req.body)
            count = min(count, (len(req.body) - BATCH_FORGET_IN.size) // FORGET_ONE.size)
            for nodeid, nlookup in FORGET_ONE.iter_unpack(
                    req.body[BATCH_FORGET_IN.size : BATCH_FORGET_IN.size
                             + count * FORGET_ONE.size]):
                if not self.server.inodes.forget(nodeid, nlookup):
                    self.stats[queue].errors += 1
        return 0

    def _interrupt(self, queue: int, chain: DescriptorChain, req: Request) -> int:
        """INTERRUPT: a waiting SETLKW with that unique gives up (EINTR); no reply."""
        if len(req.body) >= INTERRUPT_IN.size:
            (unique,) = INTERRUPT_IN.unpack_from(req.body)
            with self._waiting_lock:
                waiting = self._lock_requests.get(unique)
                if waiting is not None:
                    waiting.interrupted = True
                self._waiting_lock.notify_all()
        return 0

    # -- worker threads --------------------------------------------------------------------

    def _run(self, queue: int, chain: DescriptorChain, req: Request, op: Operation) -> None:
        """A worker's job: run the operation, answer, complete the chain."""
        result = _execute(op, self.server, req)
        if result is Later.RETRY:
            with self._waiting_lock:
                self._waiting.append((queue, chain, req, op))
                self._waiting_lock.notify_all()
            return
        self._complete(queue, chain, req, result)

    def _complete(self, queue: int, chain: DescriptorChain, req: Request,
                  result: Reply | OSError) -> None:
        if req.opcode == Opcode.SETLKW:
            with self._waiting_lock:
                self._lock_requests.pop(req.unique, None)
        written, error = _reply(chain, req, result)
        host = self.host
        if host is not None:
            host.complete(queue, chain, written, Tally(
                errors=int(error), bytes_in=max(written - OUT_HEADER.size, 0)))

    def _wait_locks(self) -> None:
        """The lock waiter: retries waiting SETLKWs, backing off while nothing moves."""
        delay = _RETRY_FIRST
        while not self._closed:
            with self._waiting_lock:
                if not self._waiting:
                    self._waiting_lock.wait()
                    delay = _RETRY_FIRST
                    continue
                waiting, self._waiting = self._waiting, []
            progress = False
            for queue, chain, req, op in waiting:
                before = len(self._waiting)
                self._run(queue, chain, req, op)
                progress = progress or len(self._waiting) == before
            delay = _RETRY_FIRST if progress else min(delay * 2, _RETRY_MAX)
            with self._waiting_lock:
                self._waiting_lock.wait(delay)
        with self._waiting_lock:
            waiting, self._waiting = self._waiting, []
        for queue, chain, req, _ in waiting:
            self._complete(queue, chain, req, OSError(errno.EINTR, "closing"))


# -- replies ---------------------------------------------------------------------------------


def _execute(op: Operation, srv: FsServer, req: Request) -> Reply | OSError:
    """Run ``op``; what it raises for the guest's input becomes an errno."""
    try:
        return op(srv, req)
    except OSError as exc:
        return exc
    except (RequestTooShort, ValueError, OverflowError) as exc:
        return OSError(errno.EINVAL, str(exc))


def _reply(chain: DescriptorChain, req: Request, result: Reply | OSError) -> tuple[int, bool]:
    """Write the reply for ``result``; the used length and whether it is an error."""
    if isinstance(result, OSError):
        return _answer_error(chain, req.unique, result.errno or errno.EIO), True
    if isinstance(result, int):
        return _answer_header(chain, req.unique, result), False
    if isinstance(result, bytes):
        written = _answer(chain, req.unique, result)
        return written, written == OUT_HEADER.size and bool(result)
    return 0, False


def _size(write_in: bytes) -> int:
    return int.from_bytes(write_in[16:20], "little")


def _unique(chain: DescriptorChain) -> int:
    try:
        return int(chain.reader().read_obj(IN_HEADER)[2])
    except RequestTooShort:
        return 0


def _answer(chain: DescriptorChain, unique: int, payload: bytes) -> int:
    """Write ``fuse_out_header`` and ``payload``; a payload without room becomes
    ``ERANGE``."""
    total = OUT_HEADER.size + len(payload)
    if total > chain.writable_len:
        return _answer_error(chain, unique, errno.ERANGE)
    first = chain.writable[0]
    if len(first) >= total:  # the whole reply in the first buffer
        OUT_HEADER.pack_into(first, 0, total, 0, unique)
        first[OUT_HEADER.size : total] = payload
        return total
    return scatter(chain.writable, 0, OUT_HEADER.pack(total, 0, unique) + payload)


def _answer_header(chain: DescriptorChain, unique: int, payload_len: int) -> int:
    """The header of a reply whose payload the operation wrote itself (READ)."""
    total = OUT_HEADER.size + payload_len
    scatter(chain.writable, 0, OUT_HEADER.pack(total, 0, unique))
    return total


def _answer_error(chain: DescriptorChain, unique: int, err: int) -> int:
    """A header-only reply with ``-err`` (nothing when there is no room for it)."""
    if chain.writable_len < OUT_HEADER.size:
        return 0
    return scatter(chain.writable, 0, OUT_HEADER.pack(OUT_HEADER.size, -err, unique))


# -- process set-up --------------------------------------------------------------------------


def _raise_fd_limit(want: int) -> None:
    """Raise the soft fd limit towards the hard one (the tables' bounds need fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    if soft < min(want, target):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, target), hard))


_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18


def unshare_mounts() -> None:
    """``--sandbox namespace``, first step: a private mount namespace of the daemon's
    own (no mount of the host reaches the daemon any more, none of its own leaks out).
    The process must have one thread yet.

    Raises:
        OSError: ``unshare`` or the remount refused (``EPERM`` without root,
            ``EINVAL`` with threads).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"making mounts private: {os.strerror(err)}")


def enter_sandbox(config: FsConfig) -> None:
    """Confine the daemon to the shared directory (``--sandbox``).

    ``chroot``: ``chroot`` into the shared directory (root only).  ``namespace``: the
    private mount namespace :func:`unshare_mounts` made, then the same ``chroot``.
    ``none``: only the per-request rules (every open beneath a directory fd, no link
    followed).

    Raises:
        OSError: the sandbox cannot be entered.
    """
    if config.sandbox == "none":
        return
    started = time.monotonic()
    os.chroot(config.shared_dir)
    os.chdir("/")
    log.info("sandbox %s: confined to %s (%.1f ms)", config.sandbox, config.shared_dir,
             (time.monotonic() - started) * 1000)
