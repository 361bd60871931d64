"""Rings as the front-end describes them, and the running queues built from them.

:class:`Vring` holds what vhost-user messages set for one virtqueue (size,
addresses, base, fds, enable) and, while the ring runs, its
:class:`~pyvirtio.virtqueue.queue.Virtqueue` and the chains a device holds
(asynchronous completion).  :func:`make_queue` is the ring factory: it checks the
addresses against the layout's sizes and alignments and builds a split (§2.7) or
packed (§2.8) queue.  :class:`InflightBuffer` is the shared buffer of vhost-user
INFLIGHT_SHMFD.
"""

from __future__ import annotations

import logging

from pyvirtio.errors import BadMemoryRegion, BadRingState, PyVirtioError
from pyvirtio.memory import GuestMemory, MemoryRegion, RegionSpec
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC,
    VIRTQ_DESC_F_USED,
    avail_ring_size,
    desc_table_size,
    packed_ring_size,
    used_ring_size,
)
from pyvirtio.vhost_user.protocol import InflightInfo, VringAddr
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.inflight import InflightRegion, region_size
from pyvirtio.virtqueue.packed import (
    INITIAL_VRING_BASE,
    PackedQueue,
    PackedRingAddresses,
    complete_vring_base,
)
from pyvirtio.virtqueue.queue import Virtqueue
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

__all__ = ["InflightBuffer", "Outstanding", "Vring", "make_queue", "packed_base"]

log = logging.getLogger(__name__)


class Outstanding:
    """A chain a device took and has not completed (or completed out of order under
    IN_ORDER, waiting for the ones before it)."""

    __slots__ = ("chain", "written")

    def __init__(self, chain: DescriptorChain, written: int | None = None) -> None:
        self.chain = chain
        #: Bytes written once completed; ``None`` while the device still holds it.
        self.written = written


class Vring:
    """Front-end supplied state of one virtqueue."""

    __slots__ = (
        "addr",
        "base",
        "call_fd",
        "enabled",
        "err_fd",
        "index",
        "kick_fd",
        "outstanding",
        "queue",
        "size",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        #: The running queue while the ring is started.
        self.queue: Virtqueue | None = None
        #: Chains taken and not used yet, by head, in the order they were popped.
        self.outstanding: dict[int, Outstanding] = {}

    @property
    def started(self) -> bool:
        """The ring has a kick fd (or, with in-band kicks, runs) and was not stopped since."""
        return self.kick_fd is not None or self.queue is not None


class InflightBuffer:
    """The mapped inflight buffer: one :class:`InflightRegion` per queue."""

    def __init__(self, fd: int, info: InflightInfo) -> None:
        """Map ``info.mmap_size`` bytes of ``fd``.

        Raises:
            BadMemoryRegion: the fd is too small or cannot be mapped.
        """
        need = info.num_queues * region_size(info.queue_size)
        if info.mmap_size < need:
            raise BadMemoryRegion(f"inflight buffer of {info.mmap_size} bytes, {need} needed")
        self._region = MemoryRegion(RegionSpec(0, info.mmap_size, 0, info.mmap_offset), fd)
        self.info = info

    def region(self, queue: int, size: int) -> InflightRegion | None:
        """The region of ``queue`` if the buffer covers it and its size matches."""
        info = self.info
        if queue >= info.num_queues or size != info.queue_size:
            log.warning("queue %d (size %d) is not covered by the inflight buffer "
                        "(%d queues of %d)", queue, size, info.num_queues, info.queue_size)
            return None
        step = region_size(size)
        return InflightRegion(self._region.view[queue * step : (queue + 1) * step], size)

    def close(self) -> None:
        """Unmap the buffer (the front-end keeps its own mapping)."""
        self._region.release()


def packed_base(memory: GuestMemory, vring: Vring) -> int:
    """The base a packed ring starts from: ``vring.base``, read the way older
    front-ends meant it.

    A packed base carries both positions and both wrap counters (vhost-user.rst
    "indices for packed virtqueues"; a fresh ring is 0x80008000, §2.8.1), but:

    - DPDK 22.11 sends only the lower half (``0x8000`` for a fresh ring):
      :func:`complete_vring_base` takes the used half as the available one;
    - user-mode Linux sends 0, its split-ring value.  Base 0 (both positions 0,
      both counters 0) is also the state of a ring whose first lap was fully
      used, so descriptor 0 decides: after a used lap its flags have USED set
      (the device's used element, or the driver's next descriptor in wrap 0),
      while in a fresh ring USED is clear (zeroed memory, or the driver's first
      descriptor in wrap 1).
    """
    base = complete_vring_base(vring.base)
    if base != vring.base:
        log.info("queue %d: packed ring base %#x has no used half (an older front-end); "
                 "resuming with nothing in flight", vring.index, vring.base)
        return base
    if base != 0 or vring.addr is None:
        return base
    try:
        gpa = memory.user_to_guest(vring.addr.desc_user_addr, PACKED_DESC.size)
        flags = PACKED_DESC.unpack(memory.read(gpa, PACKED_DESC.size))[3]
    except PyVirtioError:
        return base  # make_queue reports the bad address
    if flags & VIRTQ_DESC_F_USED:
        return base
    log.info("queue %d: packed ring base 0 from the front-end taken as a fresh ring "
             "(wrap counters 1; descriptor 0 flags %#06x)", vring.index, flags)
    return INITIAL_VRING_BASE


def make_queue(
    memory: GuestMemory,
    vring: Vring,
    base: int,
    *,
    packed: bool,
    event_idx: bool,
    indirect: bool,
) -> Virtqueue:
    """Build the running queue of ``vring`` from its addresses, resuming at ``base``.

    Raises:
        BadRingState: a ring part is misaligned (§2.7 / §2.8.10 alignments), not
            in guest memory, or the size or base does not fit the layout.
    """
    addr = vring.addr
    if addr is None or vring.size == 0:
        raise BadRingState(f"queue {vring.index} started before its size and addresses")
    size = vring.size
    if packed:  # §2.8.10.1 sizes, §2.8.11 alignments
        parts = (
            ("descriptor ring", addr.desc_user_addr, packed_ring_size(size), 16),
            ("driver event suppression", addr.avail_user_addr, EVENT_SUPPRESS_SIZE, 4),
            ("device event suppression", addr.used_user_addr, EVENT_SUPPRESS_SIZE, 4),
        )
    else:
        parts = (
            ("descriptor table", addr.desc_user_addr, desc_table_size(size), 16),
            ("available ring", addr.avail_user_addr, avail_ring_size(size), 2),
            ("used ring", addr.used_user_addr, used_ring_size(size), 4),
        )
    gpas = []
    for name, user_addr, length, align in parts:
        if user_addr % align:
            raise BadRingState(
                f"queue {vring.index} {name} at {user_addr:#x} is not {align}-byte aligned"
            )
        try:
            gpas.append(memory.user_to_guest(user_addr, length))
        except PyVirtioError as exc:
            raise BadRingState(f"queue {vring.index} {name}: {exc}") from exc
    try:
        if packed:
            return PackedQueue(memory, vring.index, size, PackedRingAddresses(*gpas),
                               event_idx=event_idx, indirect=indirect, vring_base=base)
        return SplitQueue(memory, vring.index, size, RingAddresses(*gpas),
                          event_idx=event_idx, indirect=indirect, last_avail_idx=base)
    except ValueError as exc:  # e.g. a size set for packed rings, then split ones negotiated
        raise BadRingState(f"queue {vring.index}: {exc}") from exc
