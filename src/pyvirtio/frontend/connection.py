"""A vhost-user front-end: what QEMU is to a back-end, in Python.

:class:`VhostUserFrontend` connects to a back-end's socket, negotiates
features and protocol features, shares guest memory from a memfd, sets up
virtqueues with kick and call eventfds, reads and writes the config space,
stops rings and disconnects.  Drivers (:mod:`pyvirtio.frontend.blk`,
:mod:`pyvirtio.frontend.rng`) build on it.

Every reply is checked: a back-end that answers with the wrong request code,
without the reply flag, with a payload of the wrong size, or with a REPLY_ACK
failure raises :class:`~pyvirtio.errors.BackendError` naming the message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import BackendError, GuestRamExhausted, PyVirtioError
from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.common import DeviceStatus, Feature
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS_SIZE,
    avail_ring_size,
    desc_table_size,
    packed_ring_size,
    used_ring_size,
)
from pyvirtio.vhost_user.protocol import (
    DEFAULT_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MAX_FDS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Message,
    MessageDecoder,
    ProtocolFeature,
    Request,
    VringAddr,
    close_fds,
    decode_config,
    decode_u64,
    decode_vring_state,
    encode,
    encode_config,
    encode_mem_table,
    encode_region,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from pyvirtio.virtqueue.driver_packed import DriverPackedQueue
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.packed import INITIAL_VRING_BASE, PackedRingAddresses
from pyvirtio.virtqueue.split import RingAddresses

__all__ = ["FrontendQueue", "GuestRam", "VhostUserFrontend"]

log = logging.getLogger(__name__)

#: Where the front-end pretends its guest RAM is mapped (user addresses are opaque
#: to the back-end: it only uses them to translate ring addresses).
USER_BASE = 0x7F00_0000_0000


class GuestRam:
    """The front-end's guest memory: one memfd region, with a bump allocator.

    Args:
        size: bytes of guest RAM (rounded up to 2 MiB).
    """

    def __init__(self, size: int) -> None:
        size = -(-size // (2 << 20)) * (2 << 20)
        self.fd = create_memfd(size, "pyvirtio-frontend")
        self.spec = RegionSpec(guest_addr=0, size=size, user_addr=USER_BASE, mmap_offset=0)
        self.memory = GuestMemory()
        self.memory.set_table([(self.spec, self.fd)])
        self.size = size
        self._next = 4096  # keep GPA 0 unused: a zero address is a classic driver bug

    def alloc(self, size: int, align: int = 64) -> int:
        """Reserve ``size`` bytes; return their guest physical address.

        Raises:
            GuestRamExhausted: guest RAM is exhausted.
        """
        start = -(-self._next // align) * align
        if start + size > self.size:
            raise GuestRamExhausted(size=self.size, wanted=size)
        self._next = start + size
        return start

    def view(self, gpa: int, length: int) -> memoryview:
        """A view of guest RAM (always inside the single region)."""
        return self.memory.view(gpa, length)

    def user_addr(self, gpa: int) -> int:
        """The user address the back-end is told for ``gpa``."""
        return USER_BASE + gpa

    def close(self) -> None:
        """Unmap and close the memfd."""
        self.memory.clear()
        close_fds([self.fd])
        self.fd = -1


@dataclass(slots=True)
class FrontendQueue:
    """A virtqueue the front-end set up: the driver ring (split or packed) and its eventfds."""

    index: int
    ring: DriverSplitQueue | DriverPackedQueue
    kick_fd: int
    call_fd: int

    def kick(self) -> None:
        """Notify the back-end (write the kick eventfd)."""
        os.eventfd_write(self.kick_fd, 1)

    def kick_if_needed(self) -> bool:
        """Notify the back-end unless it suppressed notifications; return whether it did."""
        if self.ring.should_kick():
            os.eventfd_write(self.kick_fd, 1)
            return True
        return False

    def submit(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        timeout: float,
        what: str,
    ) -> int:
        """Make one chain available, notify, and wait until it alone is used.

        Returns:
            The length the device wrote.

        Raises:
            BackendError: not completed within ``timeout`` seconds, or the device
                returned something else.
            DeviceRingError: the device broke the used ring.
        """
        head = self.ring.add(readable, writable)
        self.kick_if_needed()
        deadline = time.monotonic() + timeout
        used = self.ring.get_used()
        while not used:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"{what} not completed within {timeout} s",
                                   request="virtqueue")
            self.wait(left)
            used = self.ring.get_used()
        (done, length), *rest = used
        if done != head or rest:
            raise BackendError(f"used ring returned {used}, expected only chain {head}",
                               request="virtqueue")
        return length

    def wait(self, timeout: float) -> bool:
        """Wait for a used-buffer notification; return False on timeout."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)
        return True


class VhostUserFrontend(Closing):
    """One connection to a vhost-user back-end.

    Typical use::

        with VhostUserFrontend.connect(path) as fe:
            fe.negotiate(wanted_features)
            fe.share_memory(GuestRam(64 << 20))
            q = fe.setup_queue(0, size=128)

    Args:
        sock: a connected Unix stream socket.
        timeout: seconds to wait for any reply.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self._decoder = MessageDecoder()
        self.features_offered = 0
        self.features = 0
        self.protocol_features_offered = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.ram: GuestRam | None = None
        self.queues: dict[int, FrontendQueue] = {}

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = 10.0) -> VhostUserFrontend:
        """Connect to the back-end listening at ``path``.

        Raises:
            BackendError: nobody listens there.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot connect to {path}: {exc}", request="connect") from exc
        return cls(sock, timeout=timeout)

    # -- messaging ------------------------------------------------------------------

    def _send(self, request: Request, payload: bytes, fds: Sequence[int], flags: int) -> None:
        data = encode(request, payload, flags=flags)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise BackendError(f"cannot send: {exc}", request=request.name) from exc

    def _receive(self, request: Request) -> Message:
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                break
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, self._decoder.wanted, MAX_FDS
                )
            except TimeoutError as exc:
                raise BackendError("no reply in time", request=request.name) from exc
            except OSError as exc:
                raise BackendError(f"connection failed: {exc}", request=request.name) from exc
            if not data:
                close_fds(fds)
                raise BackendError("back-end closed the connection", request=request.name)
            self._decoder.feed(data, fds)
        msg.close_fds()
        if msg.request != request or not msg.flags & FLAG_REPLY:
            raise BackendError(
                f"expected a reply to {request.name}, got {msg.name} flags {msg.flags:#x}",
                request=request.name,
            )
        return msg

    def call(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        """Send a request that has a reply payload; return the reply.

        Raises:
            BackendError: the reply is missing or malformed.
        """
        self._send(request, payload, fds, 0)
        return self._receive(request)

    def send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request without a reply payload, checking REPLY_ACK when negotiated.

        Raises:
            BackendError: the back-end acknowledged with a failure.
        """
        ack = bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))
        self._send(request, payload, fds, FLAG_NEED_REPLY if ack else 0)
        if ack:
            status = self._u64(self._receive(request), request)
            if status != 0:
                raise BackendError(f"back-end refused it (status {status})", request=request.name)

    @staticmethod
    def _u64(msg: Message, request: Request) -> int:
        try:
            return decode_u64(msg)
        except PyVirtioError as exc:
            raise BackendError(f"bad reply: {exc}", request=request.name) from exc

    def get_u64(self, request: Request) -> int:
        """A request whose reply is one u64 (GET_FEATURES, GET_QUEUE_NUM...)."""
        return self._u64(self.call(request), request)

    # -- set-up ----------------------------------------------------------------------

    def probe(self) -> None:
        """Read what the back-end offers: features, protocol features, queues, slots.

        Acknowledges the protocol features we use (SET_PROTOCOL_FEATURES) and
        takes ownership (SET_OWNER), as QEMU does when it connects.
        """
        self.features_offered = self.get_u64(Request.GET_FEATURES)
        if self.features_offered & VHOST_USER_F_PROTOCOL_FEATURES:
            self.protocol_features_offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            wanted = self.protocol_features_offered & DEFAULT_PROTOCOL_FEATURES
            self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(wanted))
            self.protocol_features = wanted
        if self.has_protocol_feature(ProtocolFeature.MQ):
            self.queue_num = self.get_u64(Request.GET_QUEUE_NUM)
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self.get_u64(Request.GET_MAX_MEM_SLOTS)
        self.send(Request.SET_OWNER)

    def has_protocol_feature(self, bit: int) -> bool:
        """Whether protocol feature ``bit`` was negotiated."""
        return bool(self.protocol_features >> bit & 1)

    def negotiate(self, wanted: int) -> int:
        """Accept the offered features among ``wanted``; return the negotiated set.

        VIRTIO_F_VERSION_1 is required (VIRTIO 1.4 §6: modern devices only).

        Raises:
            BackendError: the back-end does not offer VERSION_1.
        """
        if not self.features_offered & (1 << Feature.VERSION_1):
            raise BackendError("back-end does not offer VIRTIO_F_VERSION_1",
                               request="GET_FEATURES")
        features = self.features_offered & (wanted | (1 << Feature.VERSION_1))
        features |= self.features_offered & VHOST_USER_F_PROTOCOL_FEATURES
        self.send(Request.SET_FEATURES, encode_u64(features))
        self.features = features
        return features

    def has_feature(self, bit: int) -> bool:
        """Whether virtio feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """Read ``size`` bytes of the device config space (needs the CONFIG protocol feature).

        Raises:
            BackendError: CONFIG was not negotiated, or the reply is malformed.
        """
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            raise BackendError("CONFIG protocol feature not negotiated",
                               request=Request.GET_CONFIG.name)
        reply = self.call(Request.GET_CONFIG, encode_config(offset, size, 0, bytes(size)))
        try:
            config = decode_config(reply)
        except PyVirtioError as exc:
            raise BackendError(f"bad reply: {exc}", request=Request.GET_CONFIG.name) from exc
        if config.offset != offset or config.size != size:
            raise BackendError(
                f"asked for {size} bytes at {offset}, got {config.size} at {config.offset}",
                request=Request.GET_CONFIG.name,
            )
        return config.data

    def set_config(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the config space at ``offset``."""
        self.send(Request.SET_CONFIG, encode_config(offset, len(data), 0, data))

    def get_status(self) -> int:
        """The device status byte (GET_STATUS; needs the STATUS protocol feature).

        A pyvirtio back-end serving with ``--strict`` reports DEVICE_NEEDS_RESET
        here after a driver violation.

        Raises:
            BackendError: STATUS was not negotiated, or the reply is malformed.
        """
        if not self.has_protocol_feature(ProtocolFeature.STATUS):
            raise BackendError("STATUS protocol feature not negotiated",
                               request=Request.GET_STATUS.name)
        return self.get_u64(Request.GET_STATUS)

    def set_status(self, status: int) -> None:
        """Write the device status byte (SET_STATUS); 0 resets the device."""
        self.send(Request.SET_STATUS, encode_u64(status))

    def driver_ok(self) -> None:
        """Tell the device the driver is set up (VIRTIO 1.4 §3.1.1, step 8: DRIVER_OK).

        With the STATUS protocol feature the status byte goes over SET_STATUS, and
        some back-ends (DPDK's ``net_vhost``) start the device only then; without it
        vhost-user has no status to send.  Call it once the queues are set up,
        before the first notification.
        """
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                            | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)

    def share_memory(self, ram: GuestRam) -> None:
        """Share guest RAM: ADD_MEM_REG when CONFIGURE_MEM_SLOTS is there, else SET_MEM_TABLE."""
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.send(Request.ADD_MEM_REG, encode_region(ram.spec), [ram.fd])
        else:
            self.send(Request.SET_MEM_TABLE, encode_mem_table([ram.spec]), [ram.fd])
        self.ram = ram

    def setup_queue(self, index: int, size: int) -> FrontendQueue:
        """Lay out a queue in guest RAM and hand it to the back-end, enabled.

        The ring is packed when VIRTIO_F_RING_PACKED was negotiated (VIRTIO 1.4
        §2.8), split otherwise (§2.7).

        Raises:
            BackendError: the back-end refused a step.
            GuestRamExhausted: guest RAM is exhausted.
        """
        ram = self.ram
        if ram is None:
            raise BackendError("share_memory() first", request=Request.SET_VRING_ADDR.name)
        event_idx = self.has_feature(Feature.EVENT_IDX)
        ring: DriverSplitQueue | DriverPackedQueue
        if self.has_feature(Feature.RING_PACKED):
            packed = PackedRingAddresses(
                desc=ram.alloc(packed_ring_size(size), 16),
                driver=ram.alloc(EVENT_SUPPRESS_SIZE, 4),
                device=ram.alloc(EVENT_SUPPRESS_SIZE, 4),
            )
            ring = DriverPackedQueue(ram.memory, size, packed, event_idx=event_idx,
                                     in_order=self.has_feature(Feature.IN_ORDER))
            base, desc, avail, used = INITIAL_VRING_BASE, packed.desc, packed.driver, packed.device
        else:
            split = RingAddresses(
                desc=ram.alloc(desc_table_size(size), 16),
                avail=ram.alloc(avail_ring_size(size), 2),
                used=ram.alloc(used_ring_size(size), 4),
            )
            ring = DriverSplitQueue(ram.memory, size, split, event_idx=event_idx)
            base, desc, avail, used = 0, split.desc, split.avail, split.used
        kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queue = FrontendQueue(index, ring, kick_fd, call_fd)
        self.queues[index] = queue
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, size))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(
            Request.SET_VRING_ADDR,
            encode_vring_addr(
                VringAddr(index, 0, ram.user_addr(desc), ram.user_addr(used),
                          ram.user_addr(avail), 0)
            ),
        )
        self.send(Request.SET_VRING_KICK, encode_u64(index), [kick_fd])
        self.send(Request.SET_VRING_CALL, encode_u64(index), [call_fd])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, 1))
        return queue

    def stop_queue(self, index: int) -> int:
        """Stop a ring (GET_VRING_BASE); return the back-end's next available index."""
        reply = self.call(Request.GET_VRING_BASE, encode_vring_state(index, 0))
        try:
            state = decode_vring_state(reply)
        except PyVirtioError as exc:
            raise BackendError(f"bad reply: {exc}",
                               request=Request.GET_VRING_BASE.name) from exc
        queue = self.queues.pop(index, None)
        if queue is not None:
            close_fds([queue.kick_fd, queue.call_fd])
        return state.num

    def reset(self) -> None:
        """Reset the device (RESET_DEVICE when negotiated, else RESET_OWNER)."""
        if self.has_protocol_feature(ProtocolFeature.RESET_DEVICE):
            self.send(Request.RESET_DEVICE)
        else:
            self.send(Request.RESET_OWNER)

    def close(self) -> None:
        """Stop every ring, then disconnect and release guest RAM."""
        try:
            for index in list(self.queues):
                self.stop_queue(index)
        except BackendError as exc:
            log.warning("while stopping rings: %s", exc)
        finally:
            for queue in self.queues.values():
                close_fds([queue.kick_fd, queue.call_fd])
            self.queues.clear()
            self.sock.close()
            self._decoder.discard()
            if self.ram is not None:
                self.ram.close()
                self.ram = None

