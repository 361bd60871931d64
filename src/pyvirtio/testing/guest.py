"""Guest memory for tests: memfd regions mapped with ``mmap``, and split queue pairs in it.

Everything is real: guest RAM is memfds mapped as a vhost-user front-end shares
them, and :func:`make_queue_pair` lays out a split queue there with a driver
(:class:`~pyvirtio.virtqueue.driver_split.DriverSplitQueue`) and a device
(:class:`~pyvirtio.virtqueue.split.SplitQueue`) attached to the same ring.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.virtqueue import avail_ring_size, desc_table_size
from pyvirtio.virtqueue.driver_split import DriverSplitQueue
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

__all__ = [
    "DATA_GPA",
    "REGION_SIZE",
    "RING_GPA",
    "USER_BASE",
    "USER_STRIDE",
    "Guest",
    "GuestFactory",
    "Layout",
    "QueuePair",
    "guest_memory",
    "make_queue_pair",
    "ring_addresses",
]

#: Size of each region of the default test memories (256 KiB).
REGION_SIZE = 0x40000
#: The front-end's virtual address of region 0; region i is ``USER_STRIDE`` further.
USER_BASE = 0x7F12_0000_0000
#: Regions are far apart in the front-end's address space even when their GPAs touch.
USER_STRIDE = 0x1_0000_0000
#: Where :func:`make_queue_pair` puts its rings and its buffers by default.
RING_GPA = 0x1000
DATA_GPA = 0x10000

#: Regions of a test memory, as ``(gpa, size)`` pairs.
Layout = Sequence[tuple[int, int]]


@dataclass
class Guest:
    """Guest memory built from memfds, with the fds and region descriptions behind it.

    Attributes:
        memory: the mapped regions.
        fds: one memfd per region (what ``SET_MEM_TABLE`` shares).
        specs: the regions: GPA, size, the front-end's user address, mmap offset.
    """

    memory: GuestMemory
    fds: list[int]
    specs: list[RegionSpec]

    def user_addr(self, gpa: int) -> int:
        """The front-end's virtual address of ``gpa``.

        Raises:
            ValueError: ``gpa`` is in no region.
        """
        for spec in self.specs:
            if spec.guest_addr <= gpa < spec.guest_addr + spec.size:
                return spec.user_addr + gpa - spec.guest_addr
        raise ValueError(f"GPA {gpa:#x} is not in any test region")

    def region_end(self, gpa: int) -> int:
        """The GPA just past the region holding ``gpa``.

        Raises:
            ValueError: ``gpa`` is in no region.
        """
        for spec in self.specs:
            if spec.guest_addr <= gpa < spec.guest_addr + spec.size:
                end: int = spec.guest_addr + spec.size
                return end
        raise ValueError(f"GPA {gpa:#x} is not in any test region")

    def close(self) -> None:
        """Unmap the memory and close the memfds."""
        self.memory.clear()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


#: Makes a :class:`Guest` from a :data:`Layout` (the unit tests' ``make_guest`` fixture).
GuestFactory = Callable[..., Guest]


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
        """Reserve ``length`` bytes (16-aligned) of buffer space; return its GPA.

        Raises:
            ValueError: past :attr:`end` (when set).
        """
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
