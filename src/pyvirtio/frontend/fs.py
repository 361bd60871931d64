"""A minimal FUSE driver for virtio-fs on top of the vhost-user front-end (VIRTIO 1.4
§5.11), for tests that play a hostile guest: it sends any FUSE request, well-formed
or not, and reads the raw reply::

    with FuseDriver.open("/tmp/fs.sock") as fs:
        fs.init()
        entry = fs.lookup(FUSE_ROOT_ID, b"hello.txt")
        fh = fs.open_file(entry.nodeid)
        print(fs.read(fh, 0, 4096))

Requests may be left in flight (:meth:`FuseDriver.submit`, :meth:`FuseDriver.wait`):
a SETLKW that waits for a lock while other requests are answered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import BackendError, FuseError
from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.spec.common import Feature
from pyvirtio.spec.fs import CONFIG, HIPRIO_QUEUE
from pyvirtio.spec.fuse import (
    BATCH_FORGET_IN,
    CREATE_IN,
    ENTRY_OUT,
    FORGET_IN,
    FORGET_ONE,
    FUSE_KERNEL_MINOR_VERSION,
    FUSE_KERNEL_VERSION,
    IN_HEADER,
    INIT_IN,
    INIT_OUT,
    LK_IN,
    MKDIR_IN,
    OPEN_IN,
    OPEN_OUT,
    OUT_HEADER,
    READ_IN,
    RELEASE_IN,
    WRITE_IN,
    WRITE_OUT,
    InitFlag,
    Opcode,
)
from pyvirtio.vhost_user.protocol import ProtocolFeature

__all__ = ["Entry", "FuseDriver", "Reply"]

#: Room for one request's arguments, and for one reply (by default).
_IN_ROOM = 256 * 1024
#: Entries of a slot's indirect table (a request of more buffers is a direct chain).
_TABLE_ENTRIES = 512


@dataclass(frozen=True, slots=True)
class Reply:
    """A FUSE reply: ``error`` is the header's (0 or a negative errno)."""

    unique: int
    error: int
    payload: bytes
    length: int


@dataclass(frozen=True, slots=True)
class Entry:
    """The fields of ``fuse_entry_out`` a test needs."""

    nodeid: int
    ino: int
    size: int
    mode: int
    nlink: int

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """``struct fuse_entry_out``."""
        f = ENTRY_OUT.unpack_from(data)
        return cls(nodeid=f[0], ino=f[6], size=f[7], mode=f[15], nlink=f[16])


@dataclass(slots=True)
class _Slot:
    in_gpa: int
    out_gpa: int
    table_gpa: int
    unique: int = 0
    head: int = -1


class FuseDriver(Closing):
    """A virtio-fs device driven through a vhost-user back-end.

    Args:
        frontend: a connected front-end, not yet negotiated.
        queue_size: ring size of each queue.
        slots: requests that may be in flight at once.
        room: bytes of a request's arguments, and of its reply, each slot has room for.

    Raises:
        BackendError: the back-end refused the set-up.
    """

    def __init__(self, frontend: VhostUserFrontend, *, queue_size: int = 64,
                 slots: int = 8, room: int = _IN_ROOM) -> None:
        self.frontend = frontend
        self.room = room
        frontend.probe()
        frontend.negotiate(1 << Feature.VERSION_1 | 1 << Feature.INDIRECT_DESC)
        if frontend.has_protocol_feature(ProtocolFeature.CONFIG):
            tag, queues, _ = CONFIG.unpack(frontend.get_config(CONFIG.size))
            #: The device's tag; empty when the back-end does not serve its
            #: configuration space (QEMU's C virtiofsd: the VMM holds the tag).
            self.tag = tag.rstrip(b"\0").decode(errors="replace")
            self.request_queues = queues
        else:
            self.tag, self.request_queues = "", 1
        self.ram = GuestRam(slots * 2 * room + (4 << 20))
        frontend.share_memory(self.ram)
        self.hiprio = frontend.setup_queue(HIPRIO_QUEUE, queue_size)
        self.queue = frontend.setup_queue(1, queue_size)
        frontend.driver_ok()
        self._queue_size = queue_size
        self._indirect = frontend.has_feature(Feature.INDIRECT_DESC)
        self._free = [_Slot(self.ram.alloc(room, 4096), self.ram.alloc(room, 4096),
                            self.ram.alloc(_TABLE_ENTRIES * 16, 16))
                      for _ in range(slots)]
        self._busy: dict[int, _Slot] = {}
        self._done: dict[int, Reply] = {}
        self._unique = 0
        self.timeout = 10.0

    @classmethod
    def open(cls, socket_path: Path | str, **kwargs: int) -> FuseDriver:
        """Connect to ``socket_path`` and set the device up."""
        frontend = VhostUserFrontend.connect(socket_path)
        try:
            return cls(frontend, **kwargs)
        except BaseException:
            frontend.close()
            raise

    # -- raw requests -------------------------------------------------------------------

    def next_unique(self) -> int:
        """A fresh request id."""
        self._unique += 2
        return self._unique

    def submit(self, opcode: int, nodeid: int = 0, args: bytes = b"", *,
               out_len: int = -1, raw: bytes | None = None, hiprio: bool = False,
               uid: int = 0, gid: int = 0, segment: int = 0) -> int:
        """Post one request without waiting; return its unique.  ``raw`` replaces the
        whole readable part (header included) for malformed requests; ``out_len`` 0
        posts no writable buffer (FORGET); ``segment`` > 0 lays both parts out as Linux
        posts a direct I/O: the header in a descriptor of its own, then the arguments
        that precede the pages (as many bytes as do not fill a page), then the pages,
        ``segment`` bytes each."""
        if not self._free:
            raise BackendError("no free request slot", request="virtqueue")
        slot = self._free.pop()
        unique = self.next_unique()
        data = raw if raw is not None else IN_HEADER.pack(
            IN_HEADER.size + len(args), opcode, unique, nodeid, uid, gid, os.getpid(), 0, 0
        ) + args
        if raw is not None and len(raw) >= 16:  # the raw header's own unique
            unique = int.from_bytes(raw[8:16], "little")
        out_len = self.room if out_len < 0 else out_len
        if len(data) > self.room or out_len > self.room:
            self._free.append(slot)
            raise ValueError("request larger than the driver's buffers")
        self.ram.view(slot.in_gpa, len(data))[:] = data
        queue = self.hiprio if hiprio else self.queue
        slot.unique = unique
        readable = _split(slot.in_gpa, len(data), segment, IN_HEADER.size)
        writable = _split(slot.out_gpa, out_len, segment, OUT_HEADER.size)
        entries = len(readable) + len(writable)
        if self._indirect and 1 < entries <= min(_TABLE_ENTRIES, self._queue_size):
            # As Linux does with INDIRECT_DESC: one descriptor, the buffers in a table.
            slot.head = queue.ring.add_indirect(slot.table_gpa, readable, writable)
        else:
            slot.head = queue.ring.add(readable, writable)
        self._busy[slot.head + (1 << 32 if hiprio else 0)] = slot
        queue.kick()
        return unique

    def _collect(self, queue: FrontendQueue, offset: int) -> None:
        for head, length in queue.ring.get_used():
            slot = self._busy.pop(head + offset, None)
            if slot is None:
                raise BackendError(f"used id {head} was not in flight", request="virtqueue")
            if length >= OUT_HEADER.size:
                raw = bytes(self.ram.view(slot.out_gpa, length))
                _, error, unique = OUT_HEADER.unpack_from(raw)
                reply = Reply(unique, error, raw[OUT_HEADER.size:], length)
                if unique != slot.unique:
                    raise BackendError(f"reply unique {unique}, expected {slot.unique}",
                                       request="virtqueue")
            else:
                reply = Reply(slot.unique, 0, b"", length)
            self._done[slot.unique] = reply
            self._free.append(slot)

    def poll(self) -> None:
        """Collect whatever the device used (both queues)."""
        self._collect(self.queue, 0)
        self._collect(self.hiprio, 1 << 32)

    def wait(self, unique: int, timeout: float | None = None) -> Reply:
        """The reply to ``unique`` (waiting for it).

        Raises:
            BackendError: no reply within the timeout.
        """
        return self.wait_any((unique,), timeout)

    def wait_any(self, uniques: Collection[int], timeout: float | None = None) -> Reply:
        """The first reply to come among ``uniques`` (waiting for one).

        Raises:
            BackendError: no reply within the timeout.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        done = self._done
        while True:
            self.poll()
            for unique in uniques:
                if unique in done:
                    return done.pop(unique)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"no reply to request {', '.join(map(str, uniques))}",
                                   request="virtqueue")
            select.select([self.queue.call_fd, self.hiprio.call_fd], [], [], min(left, 0.05))
            for fd in (self.queue.call_fd, self.hiprio.call_fd):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)

    def answered(self, unique: int) -> bool:
        """Whether the reply to ``unique`` came (without waiting)."""
        self.poll()
        return unique in self._done

    def request(self, opcode: int, nodeid: int = 0, args: bytes = b"", **kwargs: int) -> Reply:
        """One request, waiting for its reply."""
        return self.wait(self.submit(opcode, nodeid, args, **kwargs))  # type: ignore[arg-type]

    def call(self, opcode: int, nodeid: int = 0, args: bytes = b"") -> bytes:
        """One request; its payload.

        Raises:
            FuseError: the reply carries an error.
        """
        reply = self.request(opcode, nodeid, args)
        if reply.error:
            raise FuseError(f"{Opcode(opcode).name} failed: "
                            f"{os.strerror(-reply.error)}", -reply.error)
        return reply.payload

    # -- operations -------------------------------------------------------------------

    def init(self, flags: int = int(InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS
                                    | InitFlag.DO_READDIRPLUS)) -> tuple[int, ...]:
        """INIT (7.38): the server's ``fuse_init_out`` fields."""
        out = self.call(Opcode.INIT, 0, INIT_IN.pack(FUSE_KERNEL_VERSION,
                                                      FUSE_KERNEL_MINOR_VERSION, 1 << 17,
                                                      flags, 0))
        return INIT_OUT.unpack_from(out.ljust(INIT_OUT.size, b"\0"))

    def lookup(self, parent: int, name: bytes) -> Entry:
        """LOOKUP."""
        return Entry.decode(self.call(Opcode.LOOKUP, parent, name + b"\0"))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> Entry:
        """MKDIR."""
        return Entry.decode(self.call(Opcode.MKDIR, parent, MKDIR_IN.pack(mode, 0) + name
                                      + b"\0"))

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR,
               mode: int = 0o644) -> tuple[Entry, int]:
        """CREATE: the entry and the file handle."""
        out = self.call(Opcode.CREATE, parent, CREATE_IN.pack(flags, mode, 0, 0) + name + b"\0")
        return Entry.decode(out), OPEN_OUT.unpack_from(out, ENTRY_OUT.size)[0]

    def open_file(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        """OPEN: the file handle."""
        return int(OPEN_OUT.unpack_from(self.call(Opcode.OPEN, nodeid,
                                                  OPEN_IN.pack(flags, 0)))[0])

    def read(self, fh: int, offset: int, size: int, nodeid: int = 0) -> bytes:
        """READ."""
        return self.call(Opcode.READ, nodeid, READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def write(self, fh: int, offset: int, data: bytes, nodeid: int = 0) -> int:
        """WRITE: the bytes written."""
        out = self.call(Opcode.WRITE, nodeid,
                        WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data)
        return int(WRITE_OUT.unpack_from(out)[0])

    def release(self, fh: int, nodeid: int = 0) -> None:
        """RELEASE."""
        self.call(Opcode.RELEASE, nodeid, RELEASE_IN.pack(fh, 0, 0, 0))

    def forget(self, nodeid: int, nlookup: int) -> None:
        """FORGET on the hiprio queue (no reply; the chain comes back empty)."""
        self.wait(self.submit(Opcode.FORGET, nodeid, FORGET_IN.pack(nlookup), out_len=0,
                              hiprio=True))

    def batch_forget(self, items: list[tuple[int, int]], count: int | None = None) -> None:
        """BATCH_FORGET with ``items`` and a ``count`` field (default: their number)."""
        args = BATCH_FORGET_IN.pack(len(items) if count is None else count, 0)
        args += b"".join(FORGET_ONE.pack(n, c) for n, c in items)
        self.wait(self.submit(Opcode.BATCH_FORGET, 0, args, out_len=0, hiprio=True))

    def setlk(self, fh: int, owner: int, type_: int, start: int = 0,
              end: int = (1 << 63) - 1, *, wait: bool = False) -> int:
        """SETLK or (``wait``) SETLKW, submitted: returns the unique to :meth:`wait`."""
        return self.submit(Opcode.SETLKW if wait else Opcode.SETLK, 0,
                           LK_IN.pack(fh, owner, start, end, type_, 0, 0, 0))

    def close(self) -> None:
        """Disconnect."""
        self.frontend.close()
        self.ram.close()


def _split(gpa: int, length: int, segment: int, header: int) -> list[tuple[int, int]]:
    """Descriptors for ``length`` bytes at ``gpa``: one; or with ``segment``, the
    ``header`` bytes, then what precedes the pages (the rest modulo ``segment``), then
    ``segment``-sized pages (Linux's virtio-fs: header, argument buffer, pages)."""
    if length <= 0:
        return []  # no buffer (FORGET's writable part)
    if segment <= 0 or length <= header:
        return [(gpa, length)]
    parts = [(gpa, header)]
    head = (length - header) % segment
    if head:
        parts.append((gpa + header, head))
    start = header + head
    parts += [(gpa + at, segment) for at in range(start, length, segment)]
    return parts


def errno_name(error: int) -> str:
    """``-ENOENT`` -> ``ENOENT`` (test messages)."""
    return errno.errorcode.get(-error, str(error))
