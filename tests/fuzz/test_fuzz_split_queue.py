"""Fuzz target: the device side of a split virtqueue against a hostile, racing driver.

A case is a queue (size, EVENT_IDX, INDIRECT_DESC, where its rings lie, the base the
device starts from) and a sequence of operations that mixes the driver's writes (whole
descriptor tables, indirect tables, available-ring entries and index, raw bytes
anywhere in the rings, valid chains) with the device's calls (pop, push, notification
suppression, remap) and changes of the memory table.  Some pops race: the driver
rewrites ring memory while the device is walking the chain.

The device is driven the way :class:`~pyvirtio.vhost_user.backend.VhostUserBackend`
drives it: :class:`~pyvirtio.errors.VirtqueueError` is caught (a chain with a known
head goes back with length 0); anything else escaping is a finding.

Invariants, checked against an independent model of VIRTIO 1.4 §2.7 that reads the
rings from the driver's own mapping of the memfds:

- only ``VirtqueueError`` escapes, and a pop fails exactly when the model says the
  chain breaks a rule, with the same head and the same effect on the queue (broken or not);
- a popped chain's buffers are exactly the model's, and every view lies inside a
  region of guest memory (checked by the host address of each view);
- each pop reads at most queue-size (+1) descriptors per table: it cannot loop;
- push, enable/disable notifications and needs_notification write and answer what
  §2.7.7-§2.7.10 say.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from hypothesis import event
from hypothesis import strategies as st

from pyvirtio.errors import AvailIndexJump, RingOutOfMemory, VirtqueueError
from pyvirtio.memory import GuestMemory, RegionSpec, create_memfd
from pyvirtio.spec.virtqueue import (
    DESC,
    DESC_SIZE,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from pyvirtio.virtqueue import split
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue

from .conftest import address_of, fuzz_target

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT

#: Guest RAM: A and B touch (a buffer may cross from one into the other), C lies after a gap.
REGIONS = ((0x0, 0x10000), (0x10000, 0x10000), (0x100000, 0x4000))
#: Where the rings may start: inside A, at A's end (a big ring spills into B), in C,
#: at C's very end (only a tiny ring fits), misaligned, and outside memory.
RING_GPAS = (0x1000, 0x1000, 0x1000, 0xE000, 0x100000, 0x103F00, 0x1001, 0x30000)
#: Where indirect tables are written: A, across the A/B boundary, B, C, C's end.
INDIRECT_SLOTS = (0x8000, 0xFFF0, 0x10100, 0x100800, 0x103FF0)
#: Buffers of valid chains live here (B): 64 bytes per descriptor index.
DATA_GPA = 0x14000
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF


# -- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desc:
    addr: int
    length: int
    flags: int
    next: int


@dataclass(frozen=True)
class WriteTable:
    """The driver writes descriptors ``first``, ``first + 1``... of the ring's table."""

    first: int
    descs: tuple[Desc, ...]


@dataclass(frozen=True)
class WriteIndirect:
    """The driver writes an indirect table at ``INDIRECT_SLOTS[slot]``."""

    slot: int
    descs: tuple[Desc, ...]


@dataclass(frozen=True)
class Publish:
    """Available ring entry for ``head``, then the index moves by ``advance`` (§2.7.13)."""

    head: int
    advance: int


@dataclass(frozen=True)
class AddChain:
    """A valid chain of ``count`` descriptors from ``head`` (writable from ``write_from``),
    direct or through an indirect table at slot 0, published."""

    head: int
    count: int
    write_from: int
    indirect: bool


@dataclass(frozen=True)
class SetAvail:
    """The driver writes an available-ring header field: 0 flags, 1 idx, 2 used_event."""

    field: int
    value: int


@dataclass(frozen=True)
class WriteRing:
    """Raw bytes at ``offset`` into the ring area (any part, the used ring included)."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class Pop:
    """The device pops; with ``race_after`` set, the driver writes ``data`` at ``offset``
    of the ring area once the device has read that many descriptors."""

    race_after: int | None = None
    offset: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class Push:
    head: int
    length: int


@dataclass(frozen=True)
class Notify:
    """0 disable_notifications, 1 enable_notifications, 2 needs_notification, 3 remap."""

    what: int


@dataclass(frozen=True)
class SetRegions:
    """The front-end replaces the memory table with the regions whose bits are set."""

    mask: int


Op = (
    WriteTable | WriteIndirect | Publish | AddChain | SetAvail | WriteRing | Pop | Push | Notify
    | SetRegions
)


@dataclass(frozen=True)
class SplitCase:
    size: int
    event_idx: bool
    indirect: bool
    ring_gpa: int
    base: int
    ops: tuple[Op, ...]


TYPES = (
    SplitCase,
    Desc,
    WriteTable,
    WriteIndirect,
    Publish,
    AddChain,
    SetAvail,
    WriteRing,
    Pop,
    Push,
    Notify,
    SetRegions,
)


def _interesting_addrs() -> list[int]:
    addrs = [DATA_GPA, DATA_GPA + 0x100, *INDIRECT_SLOTS, 0x20000, 0x80000, 1 << 40]
    for start, size in REGIONS:
        addrs += [start, start + 1, start + size - 16, start + size - 1, start + size]
    return [*addrs, (1 << 64) - 1, (1 << 64) - 16]


def descs(size: int) -> st.SearchStrategy[Desc]:
    return st.builds(
        Desc,
        addr=st.one_of(st.sampled_from(_interesting_addrs()), st.integers(0, (1 << 64) - 1)),
        length=st.one_of(
            st.sampled_from([0, 1, 15, 16, 32, 48, 64, 0x1000, 0x10000, 0x20000, U32_MAX]),
            st.integers(0, 16 * (size + 1)).map(lambda n: n & ~15),
            st.integers(0, U32_MAX),
        ),
        flags=st.one_of(st.integers(0, 7), st.integers(0, U16_MAX)),
        next=st.one_of(st.integers(0, size + 1), st.integers(0, U16_MAX)),
    )


@st.composite
def split_cases(draw: st.DrawFn) -> SplitCase:
    size = draw(st.sampled_from(SIZES))
    desc = descs(size)
    head = st.one_of(st.integers(0, size - 1), st.integers(0, U16_MAX))
    ring_len = desc_table_size(size) + avail_ring_size(size) + 3 + used_ring_size(size)
    # Weighted: valid chains and pops most, so that cases get deep into the queue.
    pop = st.builds(Pop)
    add_chain = st.builds(
        AddChain, head, st.integers(1, size + 1), st.integers(0, size + 1), st.booleans()
    )
    op = st.one_of(
        add_chain,
        pop,
        add_chain,
        st.builds(WriteTable, st.integers(0, size - 1), st.lists(desc, max_size=8).map(tuple)),
        pop,
        add_chain,
        st.builds(Pop, st.integers(0, size + 1), st.integers(0, ring_len),
                  st.binary(min_size=1, max_size=16)),
        st.builds(Publish, head, st.sampled_from([1, 1, 1, 1, 1, 0, 2, size + 1, U16_MAX])),
        st.builds(Push, st.one_of(head, st.integers(0, U32_MAX)), st.integers(0, U32_MAX)),
        st.builds(Notify, st.integers(0, 3)),
        st.builds(WriteIndirect, st.integers(0, len(INDIRECT_SLOTS) - 1),
                  st.lists(desc, max_size=8).map(tuple)),
        st.builds(SetAvail, st.integers(0, 2), st.integers(0, U16_MAX)),
        st.builds(WriteRing, st.integers(0, ring_len), st.binary(min_size=1, max_size=16)),
        st.builds(SetRegions, st.sampled_from([0b111, 0b111, 0b011, 0b101, 0b110, 0b001])),
    )
    count = draw(st.integers(4, 40))  # hypothesis' own list lengths stay short
    return SplitCase(
        size=size,
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
        ring_gpa=draw(st.sampled_from(RING_GPAS)),
        base=draw(st.one_of(st.just(0), st.integers(0, U16_MAX))),
        ops=tuple(draw(st.lists(op, min_size=count, max_size=count))),
    )


# -- the driver's side: its own mapping of guest RAM -------------------------------------------


class DriverRam:
    """The memfds of guest RAM, mapped by the "driver" independently of pyvirtio."""

    def __init__(self) -> None:
        self.fds = [create_memfd(size, f"fuzz-split-{i}") for i, (_, size) in enumerate(REGIONS)]
        self.maps = [mmap.mmap(fd, size) for fd, (_, size) in zip(self.fds, REGIONS, strict=True)]
        self.active = [True] * len(REGIONS)

    def specs(self, mask: int) -> list[tuple[RegionSpec, int]]:
        return [
            (RegionSpec(gpa, size, 0x7000_0000_0000 + gpa, 0), self.fds[i])
            for i, (gpa, size) in enumerate(REGIONS)
            if mask >> i & 1
        ]

    def _where(self, gpa: int) -> tuple[int, int] | None:
        for i, (start, size) in enumerate(REGIONS):
            if start <= gpa < start + size:
                return i, gpa - start
        return None

    def in_one_region(self, gpa: int, length: int) -> bool:
        """The device can take ``gpa``..+``length`` as one view (rings, indirect tables)."""
        where = self._where(gpa)
        if where is None or not self.active[where[0]]:
            return False
        i, off = where
        return off + length <= REGIONS[i][1]

    def backed(self, gpa: int, length: int) -> bool:
        """Every byte of the range is in an active region (regions may be adjacent)."""
        while length > 0:
            where = self._where(gpa)
            if where is None or not self.active[where[0]]:
                return False
            i, off = where
            take = min(length, REGIONS[i][1] - off)
            gpa += take
            length -= take
        return True

    def write(self, gpa: int, data: bytes) -> None:
        """Write wherever the bytes fall in (any) region; bytes outside RAM are dropped."""
        for i, (start, size) in enumerate(REGIONS):
            lo, hi = max(gpa, start), min(gpa + len(data), start + size)
            if lo < hi:
                self.maps[i][lo - start : hi - start] = data[lo - gpa : hi - gpa]

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of RAM (zeros where there is none: the model checks backing first)."""
        out = bytearray(length)
        for i, (start, size) in enumerate(REGIONS):
            lo, hi = max(gpa, start), min(gpa + length, start + size)
            if lo < hi:
                out[lo - gpa : hi - gpa] = self.maps[i][lo - start : hi - start]
        return bytes(out)

    def u16(self, gpa: int) -> int:
        value: int = U16.unpack(self.read(gpa, 2))[0]
        return value

    def close(self) -> None:
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)


def device_gpa(memory: GuestMemory, view: memoryview) -> int:
    """The GPA of a non-empty view the device produced; fails unless it lies in a region."""
    addr = address_of(view)
    for region in memory.regions:
        base = address_of(region.view)
        if base <= addr and addr + len(view) <= base + region.size:
            return region.guest_addr + addr - base
    raise AssertionError(f"view of {len(view)} bytes at {addr:#x} is outside guest memory")


Segments = list[tuple[int, int]]


def merged(segments: Segments) -> Segments:
    """Drop empty ranges and join ranges that continue each other."""
    out: Segments = []
    for gpa, length in segments:
        if not length:
            continue
        if out and out[-1][0] + out[-1][1] == gpa:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((gpa, length))
    return out


# -- the model: what VIRTIO 1.4 §2.7 says pop must do ------------------------------------------


@dataclass
class Expected:
    """A pop's outcome: nothing, a chain (head, readable, writable) or a violation."""

    kind: str  # "none", "chain", "error"
    head: int | None = None
    readable: Segments | None = None
    writable: Segments | None = None
    breaks: bool = False


class Model:
    """The device-side state a correct split queue keeps, computed from the driver's RAM."""

    def __init__(self, ram: DriverRam, case: SplitCase, addrs: RingAddresses) -> None:
        self.ram = ram
        self.size = case.size
        self.event_idx = case.event_idx
        self.indirect = case.indirect
        self.addrs = addrs
        self.last_avail = case.base
        self.used_idx = ram.u16(addrs.used + 2)
        self.signalled = self.used_idx
        self.pushed = False
        self.broken = False

    def ring_mapped(self) -> bool:
        """Each ring part lies in one region, aligned as §2.7 requires (16, 2, 4)."""
        size, a = self.size, self.addrs
        return (
            a.desc % 16 == 0 and a.avail % 2 == 0 and a.used % 4 == 0
            and self.ram.in_one_region(a.desc, desc_table_size(size))
            and self.ram.in_one_region(a.avail, avail_ring_size(size))
            and self.ram.in_one_region(a.used, used_ring_size(size))
        )

    def pop(self) -> Expected:
        if self.broken:
            return Expected("none")
        avail_idx = self.ram.u16(self.addrs.avail + 2)
        pending = (avail_idx - self.last_avail) & U16_MAX
        if pending == 0:
            return Expected("none")
        if pending > self.size:
            self.broken = True
            return Expected("error", breaks=True)
        slot = self.last_avail % self.size
        self.last_avail = (self.last_avail + 1) & U16_MAX
        head = self.ram.u16(self.addrs.avail + 4 + 2 * slot)
        if head >= self.size:
            return Expected("error")
        return self.walk(head)

    def walk(self, head: int) -> Expected:
        table, table_len, idx, hops = self.addrs.desc, self.size, head, 0
        in_indirect, seen_writable, total = False, False, 0
        readable: Segments = []
        writable: Segments = []
        bad = Expected("error", head=head)
        while True:
            addr, length, flags, nxt = DESC.unpack(self.ram.read(table + idx * DESC_SIZE, 16))
            if flags & INDIRECT:
                entries = length // DESC_SIZE
                if (
                    not self.indirect
                    or in_indirect
                    or flags & NEXT
                    or length == 0
                    or length % DESC_SIZE
                    or entries > self.size
                    or not self.ram.in_one_region(addr, length)
                ):
                    return bad
                table, table_len, idx, hops, in_indirect = addr, entries, 0, 0, True
                continue
            hops += 1
            if hops > table_len:
                return bad  # the chain loops (§2.7.5.2)
            if flags & WRITE:
                seen_writable = True
            elif seen_writable:
                return bad  # §2.7.4.2
            if length and not self.ram.backed(addr, length):
                return bad
            (writable if flags & WRITE else readable).append((addr, length))
            total += length
            if total > 1 << 32:
                return bad
            if not flags & NEXT:
                return Expected("chain", head, merged(readable), merged(writable))
            if nxt >= table_len:
                return bad
            idx = nxt


# -- running a case -------------------------------------------------------------------------------


def ring_addresses(base: int, size: int) -> RingAddresses:
    desc = base
    avail = desc + desc_table_size(size)
    used = (avail + avail_ring_size(size) + 3) & ~3
    return RingAddresses(desc, avail, used)


class Runner:
    """Applies a case's operations to a real queue and to the model, comparing them."""

    def __init__(self, case: SplitCase, ram: DriverRam, memory: GuestMemory) -> None:
        self.case = case
        self.ram = ram
        self.memory = memory
        self.addrs = ring_addresses(case.ring_gpa, case.size)
        self.avail_idx = case.base  # the driver's own copy of its index
        self.queue: SplitQueue | None = None
        self.model = Model(ram, case, self.addrs)
        self.race: tuple[int, int, bytes] | None = None

    # driver side

    def publish(self, head: int, advance: int) -> None:
        a = self.addrs
        self.ram.write(a.avail + 4 + 2 * (self.avail_idx % self.case.size), U16.pack(head))
        self.avail_idx = (self.avail_idx + advance) & U16_MAX
        self.ram.write(a.avail + 2, U16.pack(self.avail_idx))

    def add_chain(self, op: AddChain) -> None:
        size = self.case.size
        head = op.head % size
        table = b""
        for i in range(op.count):
            last = i == op.count - 1
            flags = (0 if last else NEXT) | (WRITE if i >= op.write_from else 0)
            nxt = 0 if last else (i + 1 if op.indirect else (head + i + 1) % size)
            table += DESC.pack(DATA_GPA + 64 * ((head + i) % 64), 64, flags, nxt)
        if op.indirect:
            self.ram.write(INDIRECT_SLOTS[0], table)
            self.ram.write(self.addrs.desc + 16 * head, DESC.pack(INDIRECT_SLOTS[0],
                                                                   len(table), INDIRECT, 0))
        else:
            for i in range(op.count):
                at = self.addrs.desc + 16 * ((head + i) % size)
                self.ram.write(at, table[16 * i : 16 * i + 16])
        self.publish(head, 1)

    # device side

    def start(self) -> bool:
        """Build the device queue; False when the model agrees it cannot exist.

        Both indices start at the case's base, as after ``SET_VRING_BASE`` on a ring
        the driver has used before.
        """
        self.ram.write(self.addrs.avail + 2, U16.pack(self.case.base))
        self.ram.write(self.addrs.used + 2, U16.pack(self.case.base))
        self.model = Model(self.ram, self.case, self.addrs)
        try:
            self.queue = SplitQueue(
                self.memory,
                0,
                self.case.size,
                self.addrs,
                event_idx=self.case.event_idx,
                indirect=self.case.indirect,
                last_avail_idx=self.case.base,
            )
        except RingOutOfMemory:
            assert not self.model.ring_mapped(), "ring in memory refused"
            return False
        assert self.model.ring_mapped(), "ring outside memory accepted"
        return True

    def check_pop(self, reads: list[int], op: Pop) -> None:
        queue, model = self.queue, self.model
        assert queue is not None
        mapped = model.ring_mapped() or model.broken  # a broken queue reads nothing
        expected = model.pop() if mapped else Expected("error")
        if op.race_after is not None:
            self.race = (op.race_after, op.offset, op.data)
        reads[0] = 0
        try:
            chain = queue.pop()
        except VirtqueueError as exc:
            self.after_violation(exc, expected, mapped, op.race_after is not None)
            return
        finally:
            self.race = None
            # No loop: at most the queue size (+ the indirect descriptor) per table (§2.7.5.2).
            assert reads[0] <= 2 * (self.case.size + 1), f"pop read {reads[0]} descriptors"
        if not mapped:
            raise AssertionError("pop with the ring outside memory did not fail")
        if chain is None:
            assert expected.kind == "none", f"pop returned nothing, model expected {expected}"
            return
        event("pop returned a chain" + (" (raced)" if op.race_after is not None else ""))
        assert reads[0] >= 1, "split._unpack_desc is not counted any more: the bound is unchecked"
        self.check_chain(chain)
        if op.race_after is not None:  # the driver rewrote the chain while it was walked
            assert expected.kind in ("chain", "error"), expected
            assert chain.head == expected.head
            return
        assert expected.kind == "chain", f"pop returned {chain}, model expected {expected}"
        assert chain.head == expected.head
        got_r = merged([(device_gpa(self.memory, v), len(v)) for v in chain.readable if len(v)])
        got_w = merged([(device_gpa(self.memory, v), len(v)) for v in chain.writable if len(v)])
        assert (got_r, got_w) == (expected.readable, expected.writable)

    def check_chain(self, chain: DescriptorChain) -> None:
        assert 0 <= chain.head < self.case.size
        assert chain.readable_len == sum(len(v) for v in chain.readable)
        assert chain.writable_len == sum(len(v) for v in chain.writable)
        assert chain.readable_len + chain.writable_len <= 1 << 32
        for view in [*chain.readable, *chain.writable]:
            if len(view):
                device_gpa(self.memory, view)  # inside guest memory, or the check fails

    def after_violation(
        self, exc: VirtqueueError, expected: Expected, mapped: bool, raced: bool
    ) -> None:
        queue, model = self.queue, self.model
        assert queue is not None
        event(f"pop raised {type(exc).__name__}")
        assert exc.queue == 0
        assert exc.spec in str(exc)
        if not mapped:
            assert isinstance(exc, RingOutOfMemory), f"{exc!r} with the ring unmapped"
            return
        if raced and expected.kind == "chain":
            expected = Expected("error", head=expected.head)
        assert expected.kind == "error", f"pop raised {exc!r}, model expected {expected}"
        assert exc.head == expected.head, f"{exc!r} names head {exc.head}, model {expected}"
        assert isinstance(exc, AvailIndexJump) == expected.breaks
        assert (queue.broken is not None) == model.broken
        if exc.head is not None:  # as the back-end does: the driver is not left waiting
            self.push(exc.head, 0)

    def push(self, head: int, length: int) -> None:
        queue, model = self.queue, self.model
        assert queue is not None
        try:
            queue.push(head, length)
        except RingOutOfMemory:
            assert not model.ring_mapped()
            return
        assert model.ring_mapped()
        slot = model.used_idx % self.case.size
        model.used_idx = (model.used_idx + 1) & U16_MAX
        model.pushed = True
        elem = USED_ELEM.unpack(self.ram.read(self.addrs.used + 4 + 8 * slot, 8))
        assert elem == (head, length)
        assert self.ram.u16(self.addrs.used + 2) == model.used_idx
        assert queue.used_idx == model.used_idx

    def notify(self, what: int) -> None:
        queue, model, addrs, size = self.queue, self.model, self.addrs, self.case.size
        assert queue is not None
        mapped = model.ring_mapped()
        try:
            if what == 0:
                queue.disable_notifications()
                if not self.case.event_idx:
                    assert self.ram.u16(addrs.used) == VIRTQ_USED_F_NO_NOTIFY
            elif what == 1:
                more = queue.enable_notifications()
                avail = self.ram.u16(addrs.avail + 2)
                assert more == (not model.broken and avail != model.last_avail)
                if self.case.event_idx:
                    assert self.ram.u16(addrs.used + 4 + 8 * size) == model.last_avail
                else:
                    assert self.ram.u16(addrs.used) == 0
            elif what == 2:
                wants = queue.needs_notification()
                assert wants == self.model_needs_notification()
            else:
                queue.remap()
        except RingOutOfMemory:
            assert not mapped, "ring in memory refused"
            return
        if what != 2 and not (what == 0 and self.case.event_idx):
            assert mapped, "ring outside memory was used"

    def model_needs_notification(self) -> bool:
        model = self.model
        if not model.pushed:
            return False
        new = model.used_idx
        if self.case.event_idx:
            event = self.ram.u16(self.addrs.avail + 4 + 2 * self.case.size)
            wants = ((new - event - 1) & U16_MAX) < ((new - model.signalled) & U16_MAX)
        else:
            wants = not self.ram.u16(self.addrs.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT
        model.signalled = new
        model.pushed = False
        return wants

    def racing_hook(self, reads: int) -> None:
        if self.race is not None and reads >= self.race[0]:
            _, offset, data = self.race
            self.race = None
            self.ram.write(self.case.ring_gpa + offset, data)

    def run(self) -> None:
        """Build the queue and apply every operation, counting the descriptors the device
        reads (through ``split._unpack_desc``) and racing it when a pop asks for it."""
        if not self.start():
            return
        reads = [0]
        real = split._unpack_desc

        def counted(buffer: memoryview, offset: int) -> tuple[int, int, int, int]:
            result = real(buffer, offset)
            reads[0] += 1
            self.racing_hook(reads[0])
            return result

        split._unpack_desc = counted  # type: ignore[assignment]
        try:
            for op in self.case.ops:
                self.apply(op, reads)
        finally:
            split._unpack_desc = real

    def apply(self, op: Op, reads: list[int]) -> None:
        size = self.case.size
        if isinstance(op, WriteTable):
            for i, d in enumerate(op.descs):
                at = self.addrs.desc + 16 * ((op.first + i) % size)
                self.ram.write(at, DESC.pack(d.addr, d.length, d.flags, d.next))
        elif isinstance(op, WriteIndirect):
            raw = b"".join(DESC.pack(d.addr, d.length, d.flags, d.next) for d in op.descs)
            self.ram.write(INDIRECT_SLOTS[op.slot], raw)
        elif isinstance(op, Publish):
            self.publish(op.head, op.advance)
        elif isinstance(op, AddChain):
            self.add_chain(op)
        elif isinstance(op, SetAvail):
            offset = (0, 2, 4 + 2 * size)[op.field]
            if op.field == 1:
                self.avail_idx = op.value
            self.ram.write(self.addrs.avail + offset, U16.pack(op.value))
        elif isinstance(op, WriteRing):
            self.ram.write(self.case.ring_gpa + op.offset, op.data)
        elif isinstance(op, Pop):
            self.check_pop(reads, op)
        elif isinstance(op, Push):
            self.push(op.head, op.length)
        elif isinstance(op, Notify):
            self.notify(op.what)
        else:
            mask = op.mask | 1 if op.mask == 0 else op.mask  # never an empty table
            self.memory.set_table(self.ram.specs(mask))
            self.ram.active = [bool(mask >> i & 1) for i in range(len(REGIONS))]


@fuzz_target("split_queue", split_cases(), types=TYPES, quick_examples=400)
def test_split_queue_survives_a_hostile_racing_driver(case: SplitCase) -> None:
    """Whatever the driver writes, whenever it writes it, the split queue raises only
    VirtqueueError, hands out only guest memory, never loops, and agrees with the model."""
    ram = DriverRam()
    memory = GuestMemory()
    try:
        memory.set_table(ram.specs(0b111))
        Runner(case, ram, memory).run()
    finally:
        memory.clear()
        ram.close()
