"""Shared fixtures of the unit tests: real guest memory, queue pairs, an in-process front-end.

Everything here is real: guest RAM is memfds mapped with ``mmap`` (as a
vhost-user front-end shares it), rings are built in that memory by
:class:`~pyvirtio.virtqueue.DriverSplitQueue`, notifications are eventfds.
Nothing of pyvirtio's own layers is mocked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import avail_ring_size, desc_table_size
from pyvirtio.vhost_user.backend import Reply, VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue
from pyvirtio.virtqueue.words import Words

#: Size of each region of the default test memories (256 KiB).
REGION_SIZE = 0x40000
#: The front-end's virtual address of region 0; region i is ``USER_STRIDE`` further.
USER_BASE = 0x7F12_0000_0000
#: Regions are far apart in the front-end's address space even when their GPAs touch.
USER_STRIDE = 0x1_0000_0000
#: Where :func:`make_queue_pair` puts its rings and its buffers by default.
RING_GPA = 0x1000
DATA_GPA = 0x10000

Layout = Sequence[tuple[int, int]]


@dataclass
class Guest:
    """Guest memory built from memfds, with the fds and region descriptions behind it."""

    memory: GuestMemory
    fds: list[int]
    specs: list[RegionSpec]

    def user_addr(self, gpa: int) -> int:
        """The front-end's virtual address of ``gpa``."""
        for spec in self.specs:
            if spec.guest_addr <= gpa < spec.guest_addr + spec.size:
                return spec.user_addr + gpa - spec.guest_addr
        raise ValueError(f"GPA {gpa:#x} is not in any test region")

    def close(self) -> None:
        """Unmap the memory and close the memfds."""
        self.memory.clear()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


@contextlib.contextmanager
def guest_memory(layout: Layout = ((0, REGION_SIZE),)) -> Iterator[Guest]:
    """Guest memory with one memfd region per ``(gpa, size)`` of ``layout``.

    Region ``i`` has user address ``USER_BASE + i * USER_STRIDE`` and mmap offset 0.
    Usable inside hypothesis tests, where function-scoped fixtures are not reset.
    """
    guest = Guest(GuestMemory(), [], [])
    try:
        for i, (gpa, size) in enumerate(layout):
            guest.fds.append(create_memfd(size, f"unit-region-{i}"))
            guest.specs.append(RegionSpec(gpa, size, USER_BASE + i * USER_STRIDE, 0))
        guest.memory.set_table(zip(guest.specs, guest.fds, strict=True))
        yield guest
    finally:
        guest.close()


GuestFactory = Callable[..., Guest]


@pytest.fixture
def make_guest() -> Iterator[GuestFactory]:
    """Factory of :class:`Guest` objects (``make_guest(layout)``), closed at teardown."""
    with contextlib.ExitStack() as stack:

        def make(layout: Layout = ((0, REGION_SIZE),)) -> Guest:
            return stack.enter_context(guest_memory(layout))

        yield make


@pytest.fixture
def guest(make_guest: GuestFactory) -> Guest:
    """One 256 KiB region at GPA 0."""
    return make_guest()


@pytest.fixture
def memory(guest: Guest) -> GuestMemory:
    """The memory of :func:`guest`."""
    return guest.memory


@pytest.fixture
def two_regions(make_guest: GuestFactory) -> Guest:
    """Two 256 KiB regions adjacent in guest physical space (GPA 0 and 0x40000),
    from two different memfds, far apart in the front-end's address space."""
    return make_guest(((0, REGION_SIZE), (REGION_SIZE, REGION_SIZE)))


@pytest.fixture
def memfds() -> Iterator[Callable[[int], int]]:
    """Factory of memfds of a given size, closed at teardown."""
    fds: list[int] = []

    def make(size: int) -> int:
        fd = create_memfd(size, "unit-extra")
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- queue pairs ------------------------------------------------------------------------------


def ring_addresses(base: int, size: int) -> RingAddresses:
    """Consecutive ring parts at ``base``: descriptor table, available ring, used ring
    (4-aligned), as a driver lays out a split queue."""
    desc = base
    avail = desc + desc_table_size(size)
    used = (avail + avail_ring_size(size) + 3) & ~3
    return RingAddresses(desc, avail, used)


@dataclass
class QueuePair:
    """A driver and a device sharing one split queue in real guest memory.

    Buffers come from a bump allocator starting at ``next_data``.  Tests that
    write rule-breaking descriptors by hand use low descriptor indices: the
    driver's free list hands out the highest indices first.
    """

    memory: GuestMemory
    driver: DriverSplitQueue
    device: SplitQueue
    addrs: RingAddresses
    next_data: int
    end: int = field(default=0)

    def alloc(self, length: int) -> int:
        """Reserve ``length`` bytes (16-aligned) of buffer space; return its GPA."""
        gpa = self.next_data
        self.next_data = (gpa + max(length, 1) + 15) & ~15
        if self.end and self.next_data > self.end:
            raise ValueError("test queue pair ran out of buffer space")
        return gpa

    def put(self, data: bytes) -> int:
        """Allocate a buffer holding ``data``; return its GPA."""
        gpa = self.alloc(len(data))
        self.memory.write(gpa, data)
        return gpa


def make_queue_pair(
    memory: GuestMemory,
    size: int = 16,
    *,
    ring_gpa: int = RING_GPA,
    data_gpa: int = DATA_GPA,
    data_end: int = 0,
    event_idx: bool = False,
    indirect: bool = False,
    index: int = 0,
    start_idx: int = 0,
) -> QueuePair:
    """Lay out a split queue at ``ring_gpa`` and attach a driver and a device to it.

    ``start_idx`` starts both indices (available and used) there, as after a
    ``SET_VRING_BASE``, so tests reach the 16-bit wrap quickly.
    """
    addrs = ring_addresses(ring_gpa, size)
    driver = DriverSplitQueue(memory, size, addrs, event_idx=event_idx)
    if start_idx:
        driver.set_avail_idx(start_idx)
        driver.last_used_idx = start_idx & 0xFFFF
        memory.write(addrs.used + 2, (start_idx & 0xFFFF).to_bytes(2, "little"))
        driver.should_kick()  # the driver's "last kick" bookkeeping starts here too
    device = SplitQueue(
        memory,
        index,
        size,
        addrs,
        event_idx=event_idx,
        indirect=indirect,
        last_avail_idx=start_idx,
    )
    return QueuePair(memory, driver, device, addrs, data_gpa, data_end)


@pytest.fixture
def pair(memory: GuestMemory) -> QueuePair:
    """A 16-entry queue (index 3, INDIRECT_DESC negotiated) over :func:`memory`."""
    return make_queue_pair(memory, 16, indirect=True, index=3, data_end=REGION_SIZE)


#: Ring features the in-process front-end never accepts: it drives split rings
#: (not VIRTIO_F_RING_PACKED) and hands out descriptors in any order (not IN_ORDER).
NOT_SPLIT_FEATURES = (1 << Feature.RING_PACKED) | (1 << Feature.IN_ORDER)


# -- an in-process vhost-user front-end -------------------------------------------------------

#: Where the front-end's guest RAM lives: high GPA, unrelated user address.
FRONTEND_GPA = 0x1_0000_0000
FRONTEND_RAM = 0x100000
FRONTEND_QUEUE_STRIDE = 0x8000
FRONTEND_DATA = FRONTEND_GPA + 0x40000


class Frontend:
    """The front-end side of a vhost-user connection (what QEMU does), in-process.

    It owns the guest RAM (a memfd it shares with ``SET_MEM_TABLE``), builds the
    rings with :class:`DriverSplitQueue`, passes real eventfds for kick and call,
    and hands :class:`Message` objects straight to the back-end.
    """

    def __init__(self, backend: VhostUserBackend, guest: Guest) -> None:
        self.backend = backend
        self.guest = guest
        self.memory = guest.memory
        self.features = 0
        #: What the back-end answered the last message :meth:`send` handed it.
        self.last_reply = Reply()
        self.drivers: dict[int, DriverSplitQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self._next_data = FRONTEND_DATA

    # -- messages -----------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> bytes | None:
        """Hand one message to the back-end; return its raw reply."""
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        reply = self.backend.handle(Message(request, flags, payload, list(fds)))
        self.last_reply = reply
        if reply.error is not None:
            raise reply.error
        return reply.data

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a request that has a reply; check the reply header and return its payload."""
        reply = self.send(request, payload, fds)
        return parse_reply(reply, request)

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with VHOST_USER_NEED_REPLY; return the REPLY_ACK status (0 is success)."""
        reply = self.send(request, payload, fds, need_reply=True)
        value: int = U64.unpack(parse_reply(reply, request))[0]
        return value

    # -- set-up -------------------------------------------------------------------------------

    def negotiate(
        self, features: int | None = None, *, protocol_features: int | None = None
    ) -> None:
        """GET/SET_FEATURES and GET/SET_PROTOCOL_FEATURES, as QEMU starts a connection.

        ``features`` defaults to everything offered except what this split-ring,
        any-order driver does not do (:data:`NOT_SPLIT_FEATURES`);
        ``protocol_features`` to everything offered (REPLY_ACK included).
        """
        offered: int = U64.unpack(self.call(Request.GET_FEATURES))[0]
        self.features = offered & ~NOT_SPLIT_FEATURES if features is None else features
        if self.features & (1 << 30):
            proto_offered: int = U64.unpack(self.call(Request.GET_PROTOCOL_FEATURES))[0]
            proto = proto_offered if protocol_features is None else protocol_features
            assert self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(proto)) is None
        assert self.send(Request.SET_OWNER) is None
        status = self.ack_or_none(Request.SET_FEATURES, encode_u64(self.features))
        assert status in (None, 0)

    def ack_or_none(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> int | None:
        """Send with NEED_REPLY; the status if an ack came (REPLY_ACK negotiated), else None."""
        reply = self.send(request, payload, fds, need_reply=True)
        if reply is None:
            return None
        value: int = U64.unpack(parse_reply(reply, request))[0]
        return value

    def set_mem_table(self) -> None:
        """Share every region of the guest RAM (the back-end gets dups of the memfds)."""
        payload = encode_mem_table(self.guest.specs)
        fds = [os.dup(fd) for fd in self.guest.fds]
        assert self.ack_or_none(Request.SET_MEM_TABLE, payload, fds) in (None, 0)

    def setup_queue(
        self, index: int, size: int = 16, *, base: int = 0, enable: bool = True
    ) -> DriverSplitQueue:
        """Lay out queue ``index`` and send NUM, BASE, ADDR (user addresses), CALL, KICK, ENABLE."""
        addrs = ring_addresses(FRONTEND_GPA + 0x1000 + index * FRONTEND_QUEUE_STRIDE, size)
        driver = DriverSplitQueue(
            self.memory, size, addrs, event_idx=bool(self.features >> Feature.EVENT_IDX & 1)
        )
        if base:
            driver.set_avail_idx(base)
            driver.last_used_idx = base
            self.memory.write(addrs.used + 2, base.to_bytes(2, "little"))
            driver.should_kick()
        self.drivers[index] = driver
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, size))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(Request.SET_VRING_ADDR, encode_vring_addr(self.vring_addr(index, addrs)))
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for old in (self.call_fds.get(index), self.kick_fds.get(index)):
            if old is not None:
                os.close(old)
        self.call_fds[index] = call_fd
        self.kick_fds[index] = kick_fd
        self.send(Request.SET_VRING_CALL, encode_u64(index), [os.dup(call_fd)])
        self.send(Request.SET_VRING_KICK, encode_u64(index), [os.dup(kick_fd)])
        if enable and self.features & (1 << 30):
            self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, 1))
        return driver

    def vring_addr(self, index: int, addrs: RingAddresses) -> VringAddr:
        """The SET_VRING_ADDR payload for ``addrs``: user addresses, not GPAs."""
        return VringAddr(
            index=index,
            flags=0,
            desc_user_addr=self.guest.user_addr(addrs.desc),
            used_user_addr=self.guest.user_addr(addrs.used),
            avail_user_addr=self.guest.user_addr(addrs.avail),
            log_guest_addr=0,
        )

    def start(self, queues: int = 1, size: int = 16, features: int | None = None) -> None:
        """The whole handshake and ``queues`` running queues."""
        self.negotiate(features)
        self.set_mem_table()
        for index in range(queues):
            self.setup_queue(index, size)

    # -- buffers and notifications ------------------------------------------------------------

    def alloc(self, length: int) -> int:
        """Reserve ``length`` bytes of buffer space in guest RAM; return the GPA."""
        gpa = self._next_data
        self._next_data = (gpa + max(length, 1) + 15) & ~15
        assert self._next_data <= FRONTEND_GPA + FRONTEND_RAM, "test ran out of guest RAM"
        return gpa

    def put(self, data: bytes) -> int:
        """Allocate a buffer holding ``data``; return its GPA."""
        gpa = self.alloc(len(data))
        self.memory.write(gpa, data)
        return gpa

    def kick(self, index: int = 0) -> list[tuple[int, int]]:
        """Notify queue ``index`` (eventfd write and the back-end's kick); collect used elements."""
        os.eventfd_write(self.kick_fds[index], 1)
        self.backend.kick(index)
        return self.drivers[index].get_used()

    def calls(self, index: int = 0) -> int:
        """How many times the back-end signalled the call eventfd since the last look."""
        try:
            return os.eventfd_read(self.call_fds[index])
        except BlockingIOError:  # counter 0: never signalled
            return 0

    def close(self) -> None:
        """Close the front-end's own eventfds."""
        for fd in [*self.kick_fds.values(), *self.call_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kick_fds.clear()
        self.call_fds.clear()


def parse_reply(reply: bytes | None, request: int) -> bytes:
    """Check ``reply`` is a well-formed reply to ``request``; return its payload."""
    assert reply is not None, f"{Request(request).name} got no reply"
    code, flags, size = HEADER.unpack_from(reply)
    assert code == request
    assert flags & FLAG_REPLY
    assert flags & 0x3 == VERSION
    assert len(reply) == HEADER.size + size
    return reply[HEADER.size :]


FrontendFactory = Callable[[VirtioDevice], Frontend]


@pytest.fixture
def make_frontend(make_guest: GuestFactory) -> Iterator[FrontendFactory]:
    """Factory: a back-end (no watcher) for ``device`` and a front-end with 1 MiB of RAM.

    At teardown the back-end disconnects, the device closes and the eventfds go.
    """
    made: list[Frontend] = []

    def make(device: VirtioDevice) -> Frontend:
        backend = VhostUserBackend(device)
        frontend = Frontend(backend, make_guest(((FRONTEND_GPA, FRONTEND_RAM),)))
        made.append(frontend)
        return frontend

    yield make
    for frontend in made:
        frontend.backend.disconnect()
        frontend.backend.device.close()
        frontend.close()


#: Protocol features a typical QEMU negotiates with a block back-end.
QEMU_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
)


class StoreSpy:
    """Stands in for one word view of a ring part (:class:`Words`) and logs every store.

    Tests use it to check the order and number of ring stores, e.g. that a batch
    moves the used index once.  Loads and stores still reach the ring.
    """

    def __init__(self, real: memoryview, before: Callable[[int, int], None] | None) -> None:
        self.real = real
        self.before = before
        self.stores: list[tuple[int, int]] = []

    def __getitem__(self, index: int) -> int:
        return int(self.real[index])

    def __setitem__(self, index: int, value: int) -> None:
        if self.before is not None:
            self.before(index, value)
        self.stores.append((index, value))
        self.real[index] = value


def spy_on_stores(
    words: Words, width: str = "u16", before: Callable[[int, int], None] | None = None
) -> StoreSpy:
    """Replace ``words``' ``u16``/``u32``/``u64`` view by a :class:`StoreSpy`.

    ``before(word, value)``, if given, runs before each store reaches the ring.
    """
    spy = StoreSpy(getattr(words, width), before)
    setattr(words, width, spy)
    return spy
