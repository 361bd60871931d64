"""``pyvirtio bench blk``: a load generator for vhost-user-blk back-ends.

Built so the load generator is not the bottleneck.  Every in-flight slot has
its descriptor chain built once (header, data, status at fixed guest
addresses).  Resubmitting a request rewrites the 16-byte header, and the data
descriptor's flags only when the direction changes.  Completions are reaped in
batches, the available index moves once per batch, and the back-end is kicked
at most once per batch (only when it asked for it, with EVENT_IDX).

``--verify`` first writes a pattern over the span, then checks every read of
the workload against what was last written there, then reads the whole span
back at the end.  The pattern names the block and the generation, so a
misplaced or stale block is caught too.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from pyvirtio.errors import BackendError, DeviceRingError
from pyvirtio.frontend.blk import BlkDriver
from pyvirtio.spec.blk import REQUEST_HEADER, SECTOR_SIZE, RequestType, Status
from pyvirtio.spec.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

__all__ = [
    "WORKLOADS", "BenchConfig", "BenchResult", "latency_summary", "run_bench"]

WORKLOADS = ("randread", "randwrite", "read", "write", "randrw")
_VERIFY_SPAN = 64 << 20
_PATTERN = struct.Struct("<QQ")
_pack_header = REQUEST_HEADER.pack_into


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run.

    Attributes:
        rw: one of :data:`WORKLOADS`.
        bs: bytes per request (multiple of 512).
        iodepth: requests in flight per queue.
        queues: request queues to drive.
        seconds: how long the timed workload runs.
        verify: check data (see the module docstring).
        span: bytes of the disk to use from offset 0 (default: the whole disk,
            or 64 MiB with ``verify``).
        rwmixread: percentage of reads in ``randrw``.
        seed: random seed (offsets and patterns).
        packed: use packed rings (VIRTIO_F_RING_PACKED) instead of split ones.
    """

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    queues: int = 1
    seconds: float = 5.0
    verify: bool = False
    span: int | None = None
    rwmixread: int = 50
    seed: int = 1
    packed: bool = False

    def __post_init__(self) -> None:
        if self.rw not in WORKLOADS:
            raise ValueError(f"--rw must be one of {', '.join(WORKLOADS)}")
        if self.bs <= 0 or self.bs % SECTOR_SIZE:
            raise ValueError(f"--bs {self.bs} is not a positive multiple of {SECTOR_SIZE}")
        if not 1 <= self.iodepth <= 256:
            raise ValueError("--iodepth must be 1..256")
        if self.seconds <= 0:
            raise ValueError("--time must be positive")
        if not 0 <= self.rwmixread <= 100:
            raise ValueError("--rwmixread must be 0..100")


@dataclass(slots=True)
class BenchResult:
    """What a run measured (``--json`` prints it)."""

    socket: str
    rw: str
    bs: int
    iodepth: int
    queues: int
    packed: bool
    seconds: float
    ios: int
    reads: int
    writes: int
    iops: float
    mb_per_s: float
    lat_mean_us: float
    lat_p50_us: float
    lat_p99_us: float
    lat_max_us: float
    errors: int
    frontend_cpu_s: float
    frontend_cpu_per_io_us: float
    verify: bool = False
    verified_blocks: int = 0
    verify_failures: list[str] = field(default_factory=list)
    failure_count: int = 0

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly dict."""
        return asdict(self)

    @property
    def ok(self) -> bool:
        """No I/O error and no verification failure."""
        return self.errors == 0 and self.failure_count == 0


class _Slot:
    """One request slot: a pre-built 3-descriptor chain and its buffers."""

    __slots__ = ("block", "data", "data_gpa", "head", "header", "header_gpa", "is_read",
                 "start", "status", "status_gpa", "verifiable")

    def __init__(self, head: int, header: memoryview, data: memoryview, data_gpa: int,
                 status: memoryview) -> None:
        self.head = head
        self.header = header
        self.data = data
        self.data_gpa = data_gpa
        self.header_gpa = 0
        self.status_gpa = 0
        self.status = status
        self.is_read = True
        self.block = 0
        self.start = 0
        self.verifiable = False


def _pattern(block: int, generation: int, bs: int) -> bytes:
    return _PATTERN.pack(block, generation) * (bs // 16)


def _ring_size(iodepth: int) -> int:
    size = 16
    while size < 3 * iodepth:
        size *= 2
    return size


def run_bench(
    socket_path: Path | str,
    config: BenchConfig,
    progress: TextIO | None = sys.stderr,
) -> BenchResult:
    """Connect to a vhost-user-blk back-end and run ``config``; return the figures.

    Raises:
        BackendError: the back-end misbehaved or stalled.
        ValueError: the configuration does not fit the device.
    """
    bs, depth = config.bs, config.iodepth
    slots_ram = config.queues * depth * (bs + 4096 + 64)
    driver = BlkDriver.open(
        socket_path, queues=config.queues, queue_size=_ring_size(depth),
        max_transfer=1 << 20, extra_ram=slots_ram, packed=config.packed,
    )
    try:
        return _Bench(driver, config, str(socket_path), progress).run()
    finally:
        driver.close()


class _Bench:
    def __init__(self, driver: BlkDriver, config: BenchConfig, socket: str,
                 progress: TextIO | None) -> None:
        self.driver = driver
        self.config = config
        self.socket = socket
        self.progress = progress
        capacity = driver.capacity_bytes
        default_span = min(capacity, _VERIFY_SPAN) if config.verify else capacity
        span = config.span or default_span
        if span > capacity:
            raise ValueError(f"span {span} exceeds the disk ({capacity} bytes)")
        self.blocks = span // config.bs
        if self.blocks < 1:
            raise ValueError(f"the disk ({capacity} bytes) is smaller than one block")
        if driver.readonly and config.rw not in ("randread", "read"):
            raise ValueError("the device is read-only: only read workloads can run")
        self.rng = random.Random(config.seed)
        self.generation = [0] * self.blocks if config.verify else []
        #: Requests in flight per block, and writes among them (verify mode).
        self.busy: dict[int, int] = {}
        self.writing: dict[int, int] = {}
        self.failures: list[str] = []
        self.failure_count = 0
        self.next_block = 0
        self.slots: list[list[_Slot]] = [self._build_slots(q) for q in range(len(driver.queues))]
        # Split rings keep their chains, so a used id always names the same slot;
        # packed rings hand out buffer ids per submission (see _publish).
        self.by_head = [
            {s.head: s for s in slots} if not config.packed else {} for slots in self.slots
        ]

    def _build_slots(self, queue: int) -> list[_Slot]:
        """Allocate each slot's buffers; on a split ring, build its chain once too.

        A packed ring has no descriptor table to keep chains in (§2.8): there
        each submission writes its descriptors into the ring (:meth:`_publish`).
        """
        ring = self.driver.queues[queue].ring
        ram = self.driver.ram
        slots = []
        for i in range(self.config.iodepth):
            header, data = ram.alloc(16, 16), ram.alloc(self.config.bs, 4096)
            status = ram.alloc(1, 1)
            head = 3 * i
            if isinstance(ring, DriverSplitQueue):
                ring.write_desc(head, header, 16, VIRTQ_DESC_F_NEXT, head + 1)
                ring.write_desc(head + 1, data, self.config.bs,
                                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, head + 2)
                ring.write_desc(head + 2, status, 1, VIRTQ_DESC_F_WRITE, 0)
            slot = _Slot(head, ram.view(header, 16), ram.view(data, self.config.bs), data,
                         ram.view(status, 1))
            slot.header_gpa, slot.status_gpa = header, status
            slots.append(slot)
        return slots

    def _publish(self, queue: int, slots: list[_Slot]) -> None:
        """Make the prepared slots available, then kick once if the device wants it."""
        q = self.driver.queues[queue]
        ring = q.ring
        if isinstance(ring, DriverSplitQueue):
            ring.publish_many([s.head for s in slots])
        else:
            by_head = self.by_head[queue]
            bs = self.config.bs
            for slot in slots:
                data = [(slot.data_gpa, bs)]
                header = [(slot.header_gpa, 16)]
                status = [(slot.status_gpa, 1)]
                if slot.is_read:
                    slot.head = ring.add(header, data + status)
                else:
                    slot.head = ring.add(header + data, status)
                by_head[slot.head] = slot
        q.kick_if_needed()

    def _used(self, queue: int) -> list[tuple[int, int]]:
        ring = self.driver.queues[queue].ring
        try:
            return ring.reap() if isinstance(ring, DriverSplitQueue) else ring.get_used()
        except DeviceRingError as exc:  # the device broke the ring: nothing more to trust
            raise BackendError(f"queue {queue}: {exc}", request="virtqueue") from exc

    # -- workload ------------------------------------------------------------------------

    def _choose(self) -> tuple[bool, int]:
        rw = self.config.rw
        if rw == "randrw":
            is_read = self.rng.randrange(100) < self.config.rwmixread
        else:
            is_read = rw in ("randread", "read")
        if rw in ("read", "write"):
            block = self.next_block
            self.next_block = (block + 1) % self.blocks
        else:
            block = self.rng.randrange(self.blocks)
        return is_read, block

    def _prepare(self, queue: int, slot: _Slot, now: int) -> None:
        is_read, block = self._choose()
        verify = self.config.verify
        if verify and not is_read:
            for _ in range(8):  # a write must not race another request on its block
                if block not in self.busy:
                    break
                block = self.rng.randrange(self.blocks)
        ring = self.driver.queues[queue].ring
        if is_read != slot.is_read and isinstance(ring, DriverSplitQueue):
            flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if is_read else 0)
            ring.write_desc(slot.head + 1, slot.data_gpa, self.config.bs, flags, slot.head + 2)
        slot.is_read = is_read
        slot.block = block
        slot.status[0] = 0xFF
        if verify:
            if is_read:
                slot.verifiable = block not in self.writing
            else:
                if block in self.busy:
                    self.generation[block] = -1  # racing requests: contents now unknown
                else:
                    self.generation[block] += 1
                    slot.data[:] = _pattern(block, self.generation[block], self.config.bs)
                _count(self.writing, block, 1)
            _count(self.busy, block, 1)
        _pack_header(slot.header, 0, RequestType.IN if is_read else RequestType.OUT, 0,
                     block * (self.config.bs // SECTOR_SIZE))
        slot.start = now

    def _fail(self, text: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(text)

    def _complete(self, slot: _Slot, length: int) -> bool:
        ok = True
        status = slot.status[0]
        if status != Status.OK:
            self._fail(f"block {slot.block}: status {status}")
            ok = False
        elif slot.is_read and length < self.config.bs + 1:
            self._fail(f"block {slot.block}: used length {length}")
            ok = False
        if self.config.verify:
            block = slot.block
            _count(self.busy, block, -1)
            if not slot.is_read:
                _count(self.writing, block, -1)
            gen = self.generation[block]
            verifiable = ok and slot.is_read and slot.verifiable and gen >= 0
            if verifiable and slot.data != _pattern(block, gen, self.config.bs):
                self._mismatch(block, gen, bytes(slot.data))
        return ok

    def _mismatch(self, block: int, gen: int, data: bytes) -> None:
        found_block, found_gen = _PATTERN.unpack_from(data)
        self._fail(f"block {block}: expected generation {gen}, found block {found_block} "
                   f"generation {found_gen}")

    def _prefill(self) -> None:
        """Write generation 0 of the pattern over the whole span (1 MiB at a time)."""
        bs = self.config.bs
        per = max(1, (1 << 20) // bs)
        for first in range(0, self.blocks, per):
            count = min(per, self.blocks - first)
            data = b"".join(_pattern(b, 0, bs) for b in range(first, first + count))
            self.driver.write(first * (bs // SECTOR_SIZE), data)

    def _readback(self) -> int:
        bs = self.config.bs
        per = max(1, (1 << 20) // bs)
        checked = 0
        for first in range(0, self.blocks, per):
            count = min(per, self.blocks - first)
            data = self.driver.read(first * (bs // SECTOR_SIZE), count * bs)
            for i in range(count):
                block = first + i
                gen = self.generation[block]
                if gen < 0:
                    continue
                chunk = data[i * bs : (i + 1) * bs]
                if chunk != _pattern(block, gen, bs):
                    self._mismatch(block, gen, chunk)
                checked += 1
        return checked

    def run(self) -> BenchResult:
        config = self.config
        if config.verify:
            self._prefill()
        queues = self.driver.queues
        call_fds = [q.call_fd for q in queues]
        latencies: list[int] = []
        record = latencies.append
        errors = reads = writes = 0
        clock = time.perf_counter_ns
        cpu0 = time.process_time()
        start = clock()
        deadline = start + int(config.seconds * 1e9)
        inflight = 0
        for qi, slots in enumerate(self.slots):
            for slot in slots:
                self._prepare(qi, slot, clock())
            self._publish(qi, slots)
            queues[qi].kick()
            inflight += len(slots)
        next_report = start + 1_000_000_000
        last_ios, last_time, last_lat = 0, start, 0
        idle_since: int | None = None
        while inflight:
            reaped = 0
            now = clock()
            for qi in range(len(queues)):
                used = self._used(qi)
                if not used:
                    continue
                by_head = self.by_head[qi]
                batch = []
                now = clock()
                for head, length in used:
                    found = by_head.get(head)
                    if found is None or not found.start:
                        self._fail(f"queue {qi}: device returned id {head}, not in flight")
                        errors += 1
                        continue
                    slot = found
                    slot.start, started = 0, slot.start
                    record(now - started)
                    if slot.is_read:
                        reads += 1
                    else:
                        writes += 1
                    if not self._complete(slot, length):
                        errors += 1
                    if now < deadline:
                        self._prepare(qi, slot, now)
                        batch.append(slot)
                    else:
                        inflight -= 1
                reaped += len(used)
                if batch:
                    self._publish(qi, batch)
            if reaped:
                idle_since = None
            else:
                ready, _, _ = select.select(call_fds, [], [], 1.0)
                for fd in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                if not ready:
                    now = clock()
                    idle_since = idle_since or now
                    if now - idle_since > 10_000_000_000:
                        raise BackendError(f"{inflight} requests not completed for 10 s",
                                           request="virtqueue")
            if self.progress is not None and now >= next_report:
                ios = len(latencies)
                dt = (now - last_time) / 1e9
                n = ios - last_ios
                lat = sum(latencies[last_lat:]) / n / 1000 if n else 0.0
                self.progress.write(
                    f"\r{(now - start) / 1e9:6.1f}s {n / dt:10,.0f} IOPS "
                    f"{n * config.bs / dt / 1e6:9.1f} MB/s  lat {lat:8.1f} us "
                )
                self.progress.flush()
                last_ios, last_time, last_lat = ios, now, ios
                next_report = now + 1_000_000_000
        elapsed = (clock() - start) / 1e9
        cpu = time.process_time() - cpu0
        if self.progress is not None:
            self.progress.write("\n")
        verified = self._readback() if config.verify else 0
        ios = len(latencies)
        mean, p50, p99, worst = latency_summary(latencies)
        return BenchResult(
            socket=self.socket, rw=config.rw, bs=config.bs, iodepth=config.iodepth,
            queues=len(queues), packed=config.packed, seconds=round(elapsed, 3), ios=ios,
            reads=reads, writes=writes,
            iops=round(ios / elapsed, 1), mb_per_s=round(ios * config.bs / elapsed / 1e6, 2),
            lat_mean_us=mean, lat_p50_us=p50, lat_p99_us=p99, lat_max_us=worst,
            errors=errors, frontend_cpu_s=round(cpu, 3),
            frontend_cpu_per_io_us=round(cpu / ios * 1e6, 2) if ios else 0.0,
            verify=config.verify, verified_blocks=verified, verify_failures=self.failures,
            failure_count=self.failure_count,
        )


def latency_summary(latencies: list[int]) -> tuple[float, float, float, float]:
    """Mean, p50, p99 and max of latencies in ns, in µs to 0.01 (sorts the list)."""
    if not latencies:
        return 0.0, 0.0, 0.0, 0.0
    latencies.sort()
    count = len(latencies)

    def pct(p: float) -> float:
        return round(latencies[min(count - 1, int(p * count))] / 1000, 2)

    return (round(sum(latencies) / count / 1000, 2), pct(0.50), pct(0.99),
            round(latencies[-1] / 1000, 2))


def _count(counter: dict[int, int], key: int, delta: int) -> None:
    value = counter.get(key, 0) + delta
    if value:
        counter[key] = value
    else:
        del counter[key]
