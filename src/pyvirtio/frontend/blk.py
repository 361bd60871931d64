"""A virtio-blk driver on top of the vhost-user front-end (VIRTIO 1.4 §5.2).

Synchronous, one request at a time per queue: the API a test author wants::

    with BlkDriver.open("/tmp/blk.sock") as disk:
        disk.write(0, b"x" * 512)
        assert disk.read(0, 512) == b"x" * 512
        disk.flush()
        print(disk.get_id(), disk.info.capacity)

:mod:`pyvirtio.frontend.bench` drives many requests in flight instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import BackendError, BlkError
from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.spec.blk import (
    DISCARD_SEGMENT,
    GET_ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import avail_ring_size, desc_table_size, used_ring_size

__all__ = ["BLK_CONFIG_READ", "BlkDriver", "BlkInfo", "wanted_blk_features"]

#: Bytes of config space read: up to ``write_zeroes_may_unmap`` and its padding
#: (§5.2.4), which every back-end's ``struct virtio_blk_config`` covers.
BLK_CONFIG_READ = 60
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")


@dataclass(frozen=True, slots=True)
class BlkInfo:
    """The decoded ``struct virtio_blk_config`` (fields whose feature is negotiated)."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: bool
    writeback: bool

    @classmethod
    def decode(cls, data: bytes) -> BlkInfo:
        """Decode the first :data:`BLK_CONFIG_READ` bytes of the config space."""
        f = _CONFIG.unpack(data[: _CONFIG.size])
        return cls(
            capacity=f[0], size_max=f[1], seg_max=f[2], blk_size=f[6], num_queues=f[13],
            max_discard_sectors=f[14], max_discard_seg=f[15], discard_sector_alignment=f[16],
            max_write_zeroes_sectors=f[17], max_write_zeroes_seg=f[18],
            write_zeroes_may_unmap=bool(f[19]), writeback=bool(f[11]),
        )


def wanted_blk_features(*, event_idx: bool = True, packed: bool = False) -> int:
    """The features the driver accepts when the device offers them."""
    bits = [
        BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
        BlkFeature.RO, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES, BlkFeature.MQ,
        Feature.VERSION_1,
    ]
    if event_idx:
        bits.append(Feature.EVENT_IDX)
    if packed:
        bits.append(Feature.RING_PACKED)
    return sum(1 << b for b in bits)


@dataclass(slots=True)
class _Scratch:
    """Per-queue buffers for synchronous requests."""

    header: int
    data: int
    status: int


class BlkDriver(Closing):
    """A virtio-blk device driven through a vhost-user back-end.

    Args:
        frontend: a connected front-end, not yet negotiated.
        queues: how many request queues to use (``None``: all the device has).
        queue_size: ring size of each queue.
        max_transfer: largest read/write one call may do (the scratch buffer).
        extra_ram: guest RAM to reserve for the caller (``self.ram.alloc``).
        event_idx: negotiate VIRTIO_F_EVENT_IDX when offered.
        packed: use packed rings (VIRTIO_F_RING_PACKED).

    Raises:
        BackendError: the back-end refused the set-up or is not a blk device.
    """

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        queues: int | None = None,
        queue_size: int = 128,
        max_transfer: int = 1 << 20,
        extra_ram: int = 0,
        event_idx: bool = True,
        packed: bool = False,
    ) -> None:
        self.frontend = frontend
        frontend.probe()
        frontend.negotiate(wanted_blk_features(event_idx=event_idx, packed=packed))
        if packed and not frontend.has_feature(Feature.RING_PACKED):
            raise BackendError("the back-end does not offer VIRTIO_F_RING_PACKED",
                               request="GET_FEATURES")
        self.info = BlkInfo.decode(frontend.get_config(BLK_CONFIG_READ))
        available = self.info.num_queues if frontend.has_feature(BlkFeature.MQ) else 1
        if frontend.queue_num is not None:
            available = min(available, frontend.queue_num) if available else frontend.queue_num
        available = max(available, 1)
        count = available if queues is None else queues
        if not 1 <= count <= available:
            raise BackendError(f"{count} queues wanted, the device has {available}",
                               request="GET_QUEUE_NUM")
        ring_bytes = desc_table_size(queue_size) + avail_ring_size(queue_size)
        ring_bytes += used_ring_size(queue_size) + 64  # covers a packed ring too
        per_queue = ring_bytes + max_transfer + 4096
        self.ram = GuestRam(count * per_queue + extra_ram + (1 << 20))
        frontend.share_memory(self.ram)
        self.max_transfer = max_transfer
        self.queues: list[FrontendQueue] = []
        self._scratch: list[_Scratch] = []
        for index in range(count):
            self.queues.append(frontend.setup_queue(index, queue_size))
            self._scratch.append(
                _Scratch(self.ram.alloc(16), self.ram.alloc(max_transfer, 4096), self.ram.alloc(1))
            )
        frontend.driver_ok()
        self.timeout = 10.0

    @classmethod
    def open(cls, socket_path: Path | str, **kwargs: int | bool | None) -> BlkDriver:
        """Connect to ``socket_path`` and set the device up (options of :class:`BlkDriver`)."""
        frontend = VhostUserFrontend.connect(socket_path)
        try:
            return cls(frontend, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            frontend.close()
            raise

    @property
    def readonly(self) -> bool:
        """The device offered VIRTIO_BLK_F_RO."""
        return self.frontend.has_feature(BlkFeature.RO)

    @property
    def capacity_bytes(self) -> int:
        """Disk size in bytes."""
        return self.info.capacity * SECTOR_SIZE

    # -- requests --------------------------------------------------------------------

    def _request(
        self,
        queue: int,
        type_: int,
        sector: int,
        *,
        out: bytes = b"",
        in_len: int = 0,
    ) -> bytes:
        if len(out) > self.max_transfer or in_len > self.max_transfer:
            raise ValueError(f"transfer larger than max_transfer={self.max_transfer}")
        q = self.queues[queue]
        s = self._scratch[queue]
        ram = self.ram
        REQUEST_HEADER.pack_into(ram.view(s.header, 16), 0, type_, 0, sector)
        ram.view(s.status, 1)[0] = 0xFF
        readable = [(s.header, REQUEST_HEADER.size)]
        writable = []
        if out:
            ram.view(s.data, len(out))[:] = out
            readable.append((s.data, len(out)))
        if in_len:
            writable.append((s.data, in_len))
        writable.append((s.status, 1))
        length = q.submit(readable, writable, timeout=self.timeout,
                          what=f"request type {type_} on queue {queue}")
        status = ram.view(s.status, 1)[0]
        if status != Status.OK:
            name = Status(status).name if status in {s.value for s in Status} else str(status)
            raise BlkError(f"request type {type_} at sector {sector} failed: {name}", status)
        expected = in_len + 1
        if length < expected:
            raise BackendError(f"used length {length}, expected at least {expected}",
                               request="virtqueue")
        return bytes(ram.view(s.data, in_len)) if in_len else b""

    def read(self, sector: int, length: int, *, queue: int = 0) -> bytes:
        """Read ``length`` bytes (a multiple of 512) from ``sector``.

        Raises:
            BlkError: the device answered IOERR or UNSUPP.
        """
        return self._request(queue, RequestType.IN, sector, in_len=length)

    def write(self, sector: int, data: bytes, *, queue: int = 0) -> None:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        self._request(queue, RequestType.OUT, sector, out=data)

    def flush(self, *, queue: int = 0) -> None:
        """Make completed writes stable (VIRTIO_BLK_T_FLUSH)."""
        self._request(queue, RequestType.FLUSH, 0)

    def get_id(self, *, queue: int = 0) -> bytes:
        """The device ID string (VIRTIO_BLK_T_GET_ID), up to its NUL terminator (§5.2.6)."""
        data = self._request(queue, RequestType.GET_ID, 0, in_len=GET_ID_BYTES)
        return data.split(b"\0", 1)[0]

    def discard(self, sector: int, count: int, *, queue: int = 0) -> None:
        """Discard ``count`` sectors from ``sector``."""
        segment = DISCARD_SEGMENT.pack(sector, count, 0)
        self._request(queue, RequestType.DISCARD, 0, out=segment)

    def write_zeroes(self, sector: int, count: int, *, unmap: bool = False,
                     queue: int = 0) -> None:
        """Zero ``count`` sectors from ``sector`` (optionally allowing deallocation)."""
        segment = DISCARD_SEGMENT.pack(sector, count, WRITE_ZEROES_FLAG_UNMAP if unmap else 0)
        self._request(queue, RequestType.WRITE_ZEROES, 0, out=segment)

    def request(self, type_: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0,
                queue: int = 0) -> bytes:
        """Any request type, for probing a device's answers to odd requests."""
        return self._request(queue, type_, sector, out=out, in_len=in_len)

    def close(self) -> None:
        """Stop the rings and disconnect."""
        self.frontend.close()

