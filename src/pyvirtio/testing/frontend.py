"""An in-process vhost-user front-end: what QEMU does, without a socket.

:class:`Frontend` owns guest RAM (memfds it shares with ``SET_MEM_TABLE``),
builds split rings with :class:`~pyvirtio.virtqueue.driver_split.DriverSplitQueue`
or packed ones with :class:`~pyvirtio.virtqueue.driver_packed.DriverPackedQueue`,
passes real eventfds for kick and call, and hands
:class:`~pyvirtio.vhost_user.protocol.Message` objects straight to a
:class:`~pyvirtio.vhost_user.backend.VhostUserBackend`.

Its checks of the back-end's answers raise ``AssertionError``: it is a test tool,
and a wrong answer is a failed test.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.errors import GuestRamExhausted
from pyvirtio.spec.common import Feature
from pyvirtio.testing.guest import Guest, ring_addresses
from pyvirtio.vhost_user.backend import Reply, VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import INITIAL_VRING_BASE, PackedRingAddresses
from pyvirtio.virtqueue.split import RingAddresses

__all__ = [
    "FRONTEND_DATA",
    "FRONTEND_GPA",
    "FRONTEND_QUEUE_STRIDE",
    "FRONTEND_RAM",
    "NOT_SPLIT_FEATURES",
    "QEMU_PROTOCOL_FEATURES",
    "Frontend",
    "FrontendFactory",
    "packed_ring_addresses",
    "parse_reply",
]

#: Ring features the in-process front-end does not accept unless asked: by default it
#: drives split rings (not VIRTIO_F_RING_PACKED) and hands out descriptors in any order
#: (not IN_ORDER).
NOT_SPLIT_FEATURES = (1 << Feature.RING_PACKED) | (1 << Feature.IN_ORDER)

#: Where the front-end's guest RAM lives: high GPA, unrelated user address.
FRONTEND_GPA = 0x1_0000_0000
#: Size of the front-end's guest RAM in the unit tests (1 MiB).
FRONTEND_RAM = 0x100000
#: Queue ``i``'s ring is at ``FRONTEND_GPA + 0x1000 + i * FRONTEND_QUEUE_STRIDE``.
FRONTEND_QUEUE_STRIDE = 0x8000
#: Where buffers start by default.
FRONTEND_DATA = FRONTEND_GPA + 0x40000

#: Protocol features a typical QEMU negotiates with a block back-end.
QEMU_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
)


def packed_ring_addresses(base: int, size: int) -> PackedRingAddresses:
    """A packed ring at ``base``: the descriptor ring, then the driver and the device
    event suppression structures (4 bytes each, §2.8.10)."""
    return PackedRingAddresses(base, base + 16 * size, base + 16 * size + 4)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Frontend:
    """The front-end side of a vhost-user connection (what QEMU does), in-process.

    It owns the guest RAM (a memfd it shares with ``SET_MEM_TABLE``), builds the
    rings, passes real eventfds for kick and call, and hands :class:`Message`
    objects straight to the back-end.

    Args:
        backend: the back-end to drive.
        guest: the guest RAM (see :func:`~pyvirtio.testing.guest.guest_memory`); its
            region holding ``data_gpa`` is where buffers are allocated.
        data_gpa: where buffers start; rings go below it.

    Attributes:
        drivers: the split rings set up, by queue index.
        packed_drivers: the packed rings set up, by queue index.
        kick_fds / call_fds: the eventfds of each queue (the front-end's copies).
        last_reply: what the back-end answered the last message :meth:`send` handed it.
    """

    def __init__(
        self, backend: VhostUserBackend, guest: Guest, *, data_gpa: int = FRONTEND_DATA
    ) -> None:
        self.backend = backend
        self.guest = guest
        self.memory = guest.memory
        self.features = 0
        self.last_reply = Reply()
        self.drivers: dict[int, DriverSplitQueue] = {}
        self.packed_drivers: dict[int, DriverPackedQueue] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int] = {}
        self.data_gpa = data_gpa
        self._next_data = data_gpa
        try:
            self._data_end = guest.region_end(data_gpa)
        except ValueError:  # no RAM there: allocating buffers fails (GuestRamExhausted)
            self._data_end = data_gpa

    # -- messages -----------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> bytes | None:
        """Hand one message to the back-end; return its raw reply.

        Raises:
            PyVirtioError: the back-end's reply carries an error (the message broke
                the protocol): it is raised here.
        """
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

    def ack_or_none(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = ()
    ) -> int | None:
        """Send with NEED_REPLY; the status if an ack came (REPLY_ACK negotiated), else None."""
        reply = self.send(request, payload, fds, need_reply=True)
        if reply is None:
            return None
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
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            proto_offered: int = U64.unpack(self.call(Request.GET_PROTOCOL_FEATURES))[0]
            proto = proto_offered if protocol_features is None else protocol_features
            reply = self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(proto))
            _expect(reply is None, "SET_PROTOCOL_FEATURES got a reply")
        _expect(self.send(Request.SET_OWNER) is None, "SET_OWNER got a reply")
        status = self.ack_or_none(Request.SET_FEATURES, encode_u64(self.features))
        _expect(status in (None, 0), f"SET_FEATURES failed: status {status}")

    def set_mem_table(self) -> None:
        """Share every region of the guest RAM (the back-end gets dups of the memfds)."""
        payload = encode_mem_table(self.guest.specs)
        fds = [os.dup(fd) for fd in self.guest.fds]
        status = self.ack_or_none(Request.SET_MEM_TABLE, payload, fds)
        _expect(status in (None, 0), f"SET_MEM_TABLE failed: status {status}")

    def ring_gpa(self, index: int) -> int:
        """Where queue ``index``'s ring goes by default."""
        return FRONTEND_GPA + 0x1000 + index * FRONTEND_QUEUE_STRIDE

    def setup_queue(
        self,
        index: int,
        size: int = 16,
        *,
        base: int = 0,
        enable: bool = True,
        ring_gpa: int | None = None,
    ) -> DriverSplitQueue:
        """Lay out split queue ``index`` (at :meth:`ring_gpa` unless ``ring_gpa``) and
        send NUM, BASE, ADDR (user addresses), CALL, KICK, ENABLE."""
        addrs = ring_addresses(self.ring_gpa(index) if ring_gpa is None else ring_gpa, size)
        driver = DriverSplitQueue(
            self.memory, size, addrs, event_idx=bool(self.features >> Feature.EVENT_IDX & 1)
        )
        if base:
            driver.set_avail_idx(base)
            driver.last_used_idx = base
            self.memory.write(addrs.used + 2, base.to_bytes(2, "little"))
            driver.should_kick()
        self.packed_drivers.pop(index, None)
        self.drivers[index] = driver
        self._start_ring(index, size, base, self.vring_addr(index, addrs), enable=enable)
        return driver

    def setup_packed_queue(
        self, index: int, size: int = 16, *, enable: bool = True, ring_gpa: int | None = None
    ) -> DriverPackedQueue:
        """Lay out packed queue ``index`` (VIRTIO_F_RING_PACKED negotiated) and send NUM,
        BASE (both wrap counters 1, §2.8.1), ADDR, CALL, KICK, ENABLE."""
        base = self.ring_gpa(index) if ring_gpa is None else ring_gpa
        addrs = packed_ring_addresses(base, size)
        driver = DriverPackedQueue(
            self.memory, size, addrs,
            event_idx=bool(self.features >> Feature.EVENT_IDX & 1),
            in_order=bool(self.features >> Feature.IN_ORDER & 1),
        )
        self.drivers.pop(index, None)
        self.packed_drivers[index] = driver
        addr = VringAddr(
            index=index,
            flags=0,
            desc_user_addr=self.guest.user_addr(addrs.desc),
            used_user_addr=self.guest.user_addr(addrs.device),
            avail_user_addr=self.guest.user_addr(addrs.driver),
            log_guest_addr=0,
        )
        self._start_ring(index, size, INITIAL_VRING_BASE, addr, enable=enable)
        return driver

    def _start_ring(
        self, index: int, size: int, base: int, addr: VringAddr, *, enable: bool
    ) -> None:
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, size))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(Request.SET_VRING_ADDR, encode_vring_addr(addr))
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for old in (self.call_fds.get(index), self.kick_fds.get(index)):
            if old is not None:
                os.close(old)
        self.call_fds[index] = call_fd
        self.kick_fds[index] = kick_fd
        self.send(Request.SET_VRING_CALL, encode_u64(index), [os.dup(call_fd)])
        self.send(Request.SET_VRING_KICK, encode_u64(index), [os.dup(kick_fd)])
        if enable and self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, 1))

    def vring_addr(self, index: int, addrs: RingAddresses) -> VringAddr:
        """The SET_VRING_ADDR payload for split ring ``addrs``: user addresses, not GPAs."""
        return VringAddr(
            index=index,
            flags=0,
            desc_user_addr=self.guest.user_addr(addrs.desc),
            used_user_addr=self.guest.user_addr(addrs.used),
            avail_user_addr=self.guest.user_addr(addrs.avail),
            log_guest_addr=0,
        )

    def start(self, queues: int = 1, size: int = 16, features: int | None = None) -> None:
        """The whole handshake and ``queues`` running split queues."""
        self.negotiate(features)
        self.set_mem_table()
        for index in range(queues):
            self.setup_queue(index, size)

    # -- buffers and notifications ------------------------------------------------------------

    def alloc(self, length: int) -> int:
        """Reserve ``length`` bytes of buffer space in guest RAM; return the GPA.

        Raises:
            GuestRamExhausted: the region holding the buffers is full
                (:meth:`reset_buffers` starts over).
        """
        gpa = self._next_data
        end = (gpa + max(length, 1) + 15) & ~15
        if end > self._data_end:
            raise GuestRamExhausted(size=self._data_end - self.data_gpa, wanted=length)
        self._next_data = end
        return gpa

    def put(self, data: bytes) -> int:
        """Allocate a buffer holding ``data``; return its GPA."""
        gpa = self.alloc(len(data))
        self.memory.write(gpa, data)
        return gpa

    def reset_buffers(self) -> None:
        """Allocate from the start again (no buffer may be in use by the device)."""
        self._next_data = self.data_gpa

    def kick(self, index: int = 0) -> list[tuple[int, int]]:
        """Notify queue ``index`` (eventfd write and the back-end's kick); collect used
        elements as ``(id, length)``."""
        os.eventfd_write(self.kick_fds[index], 1)
        self.backend.kick(index)
        return self.get_used(index)

    def get_used(self, index: int = 0) -> list[tuple[int, int]]:
        """The used elements of queue ``index`` not collected yet, as ``(id, length)``."""
        packed = self.packed_drivers.get(index)
        if packed is not None:
            return packed.get_used()
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
    """Check ``reply`` is a well-formed reply to ``request``; return its payload.

    Raises:
        AssertionError: no reply, or a malformed one.
    """
    _expect(reply is not None, f"{Request(request).name} got no reply")
    assert reply is not None
    code, flags, size = HEADER.unpack_from(reply)
    _expect(code == request, f"reply to {code}, not to {Request(request).name}")
    _expect(bool(flags & FLAG_REPLY), "the reply flag is not set")
    _expect(flags & 0x3 == VERSION, f"reply version {flags & 0x3}")
    _expect(len(reply) == HEADER.size + size, "the reply's size field does not match")
    return reply[HEADER.size :]


#: Makes a :class:`Frontend` for a device (the unit tests' ``make_frontend`` fixture).
FrontendFactory = Callable[[VirtioDevice], Frontend]
