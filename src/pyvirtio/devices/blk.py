"""virtio-blk over a raw image file (VIRTIO 1.4 §5.2 Block Device).

Data moves with ``os.preadv``/``os.pwritev`` straight between the image file
and memoryviews of guest memory: no copy through Python objects.  Requests
that a driver gets wrong are answered with VIRTIO_BLK_S_IOERR or
VIRTIO_BLK_S_UNSUPP as §5.2.6.2 requires, and logged.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.devices.base import ControlCommand, ControlReply, VirtioDevice
from pyvirtio.errors import BackendChannelError, NoBackendChannel, NoFrontend
from pyvirtio.spec.blk import (
    DISCARD_SEGMENT,
    GET_ID_BYTES,
    REQUEST_HEADER,
    SECTOR_SIZE,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkConfig,
    BlkFeature,
    RequestType,
    Status,
)
from pyvirtio.spec.common import DeviceId
from pyvirtio.virtqueue.chain import DescriptorChain, gather, take_views

__all__ = ["BlockConfig", "BlockDevice"]

log = logging.getLogger(__name__)

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
#: Largest single discard / write-zeroes range (sectors) and segment count we accept.
_MAX_DISCARD_SECTORS = (1 << 32) - 1
_MAX_DISCARD_SEG = 128
_ZERO_CHUNK = bytes(1 << 20)
_KIND = {t.value: t.name.lower() for t in RequestType}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class BlockConfig:
    """Validated settings of ``pyvirtio serve blk``.

    Attributes:
        image: raw image file; ``None`` makes a sparse temporary image of ``size`` bytes.
        size: size of the temporary image (ignored with ``image``).
        readonly: offer VIRTIO_BLK_F_RO; writes fail with IOERR.
        serial: the GET_ID answer (at most 20 bytes).
        queues: number of request queues (VIRTIO_BLK_F_MQ when > 1).
        queue_size: largest queue size accepted.
    """

    image: Path | None = None
    size: int = 1 << 30
    readonly: bool = False
    serial: str = "pyvirtio"
    queues: int = 1
    queue_size: int = 1024

    def __post_init__(self) -> None:
        if len(self.serial.encode()) > GET_ID_BYTES:
            raise ValueError(f"serial {self.serial!r} is longer than {GET_ID_BYTES} bytes")
        if not 1 <= self.queues <= 64:
            raise ValueError(f"queues must be 1..64, not {self.queues}")
        if self.image is None and (self.size <= 0 or self.size % SECTOR_SIZE):
            raise ValueError(f"size {self.size} is not a positive multiple of {SECTOR_SIZE}")


class BlockDevice(VirtioDevice):
    """A virtio-blk device backed by a raw image file.

    Raises:
        OSError: the image cannot be opened.
    """

    device_id = DeviceId.BLOCK
    #: Re-executing a read, write, flush, discard or write-zeroes gives the same
    #: result, so a new back-end can resubmit what a crashed one left in flight.
    supports_inflight = True

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        self.config = config
        self.num_queues = config.queues
        self.max_queue_size = config.queue_size
        self._tempdir: str | None = None
        path = config.image
        if path is None:
            self._tempdir = tempfile.mkdtemp(prefix="pyvirtio-blk-")
            path = Path(self._tempdir) / "disk.img"
            with open(path, "wb") as f:
                f.truncate(config.size)
        self.path = path
        flags = os.O_RDONLY if config.readonly else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        if size % SECTOR_SIZE:
            log.warning("%s: size %d is not a multiple of %d; the tail is not exposed",
                        path, size, SECTOR_SIZE)
        self.capacity = size // SECTOR_SIZE
        self._limit = self.capacity * SECTOR_SIZE
        self.serial = config.serial.encode()[:GET_ID_BYTES].ljust(GET_ID_BYTES, b"\0")
        self.seg_max = max(1, min(config.queue_size, 128) - 2)

    def device_features(self) -> int:
        """§5.2.3: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, MQ, RO."""
        bits = [
            BlkFeature.SIZE_MAX,
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.FLUSH,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
            BlkFeature.MQ,
        ]
        if self.config.readonly:
            bits.append(BlkFeature.RO)
        return sum(1 << b for b in bits)

    def config_space(self) -> bytes:
        """``struct virtio_blk_config`` (§5.2.4)."""
        return BlkConfig(
            capacity=self.capacity,
            size_max=1 << 20,
            seg_max=self.seg_max,
            blk_size=SECTOR_SIZE,
            num_queues=self.num_queues,
            max_discard_sectors=_MAX_DISCARD_SECTORS,
            max_discard_seg=_MAX_DISCARD_SEG,
            discard_sector_alignment=1,
            max_write_zeroes_sectors=_MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=_MAX_DISCARD_SEG,
            write_zeroes_may_unmap=True,
            writeback=False,
        ).pack()

    def resize(self, size: int) -> None:
        """Grow the image file to ``size`` bytes and the capacity with it.

        The new space is sparse (``ftruncate``).  The caller tells the driver:
        the capacity is a config field, and a change of it is announced with a
        configuration change notification (VIRTIO 1.4 §5.2.4, §2.5.1; over
        vhost-user, CONFIG_CHANGE_MSG).

        Raises:
            ValueError: the disk is read-only, the image is not a regular file,
                or ``size`` is smaller than the disk or not a whole number of
                sectors.
            OSError: the file cannot be grown.
        """
        if self.config.readonly:
            raise ValueError("the disk is read-only (--readonly): it cannot be resized")
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            raise ValueError(f"{self.path} is not a regular file: it cannot be resized")
        if size % SECTOR_SIZE:
            raise ValueError(f"size {size} is not a multiple of {SECTOR_SIZE} bytes")
        current = self.capacity * SECTOR_SIZE
        if size < current:
            raise ValueError(f"size {size} is smaller than the disk ({current} bytes): "
                             "shrinking is not supported")
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        self.capacity = size // SECTOR_SIZE
        self._limit = size
        log.info("%s resized to %d bytes (%d sectors)", self.path, size, self.capacity)

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``resize BYTES`` (``pyvirtio resize``)."""
        return {"resize": self._resize_command}

    def _resize_command(self, args: list[str], reply: ControlReply) -> None:
        """``resize BYTES``: grow the image, tell the front-end (CONFIG_CHANGE_MSG).

        The answer is one JSON object: ``ok``, ``error`` or the new ``size``,
        ``sectors``, ``previous_size`` and ``notified``: how the front-end took
        the news (``acked``, ``sent`` without REPLY_ACK, ``failed``, ``no answer``,
        ``no channel``).  With REPLY_ACK the answer waits for the front-end's (the
        loop goes on serving meanwhile: QEMU re-reads the config space before it
        answers).
        """
        if len(args) != 1 or not args[0].isdigit():
            reply({"ok": False, "error": f"usage: resize BYTES, not {args!r}"})
            return
        previous = self.capacity * SECTOR_SIZE
        try:
            self.resize(int(args[0]))
        except (ValueError, OSError) as exc:
            reply({"ok": False, "error": str(exc)})
            return
        result: dict[str, object] = {
            "ok": True, "size": self.capacity * SECTOR_SIZE, "sectors": self.capacity,
            "previous_size": previous,
        }
        started = time.monotonic()

        def on_ack(status: int | None) -> None:
            result["notified"] = (
                "no answer" if status is None else "acked" if status == 0 else "failed"
            )
            result["ack_seconds"] = round(time.monotonic() - started, 3)
            reply(result)

        host = self.host
        try:
            if host is None:
                raise NoFrontend("no daemon serves the device")
            awaited = host.config_changed(on_ack)
        except NoFrontend:
            result["notified"] = "no front-end"
            reply(result)
            return
        except NoBackendChannel as exc:
            result["notified"] = "no channel"
            result["detail"] = str(exc)
            reply(result)
            return
        except BackendChannelError as exc:
            result["notified"] = "failed"
            result["detail"] = str(exc)
            reply(result)
            return
        log.info("config change sent to the front-end%s",
                 ", awaiting its answer" if awaited else "")
        if not awaited:
            result["notified"] = "sent"
            reply(result)

    # -- requests --------------------------------------------------------------------

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """Execute one request (§5.2.6); return the bytes written to the chain."""
        stats = self.stats[queue]
        if chain.writable_len < 1:
            stats.violations += 1
            log.error("queue %d: request %d has no writable status byte; not executed "
                      "(VIRTIO 1.4 §5.2.6)", queue, chain.head)
            return 0
        status_view = take_views(chain.writable, chain.writable_len - 1, 1)[0]
        if chain.readable_len < REQUEST_HEADER.size:
            stats.violations += 1
            log.error("queue %d: request %d has a %d-byte header, expected %d "
                      "(VIRTIO 1.4 §5.2.6)", queue, chain.head, chain.readable_len,
                      REQUEST_HEADER.size)
            status_view[0] = Status.IOERR
            return 1
        type_, _reserved, sector = REQUEST_HEADER.unpack(
            gather(chain.readable, 0, REQUEST_HEADER.size)
        )
        stats.kinds[_KIND.get(type_, "unknown")] += 1
        written = 0
        try:
            if type_ == RequestType.IN:
                status, written = self._read(queue, chain, sector)
            elif type_ == RequestType.OUT:
                status = self._write(queue, chain, sector)
            elif type_ == RequestType.FLUSH and self.has_feature(BlkFeature.FLUSH):
                os.fdatasync(self.fd)
                status = Status.OK
            elif type_ == RequestType.GET_ID:
                written = min(GET_ID_BYTES, chain.writable_len - 1)
                out = take_views(chain.writable, 0, written)
                pos = 0
                for v in out:
                    v[:] = self.serial[pos : pos + len(v)]
                    pos += len(v)
                status = Status.OK
            elif type_ == RequestType.DISCARD and self.has_feature(BlkFeature.DISCARD):
                status = self._discard(queue, chain, zeroes=False)
            elif type_ == RequestType.WRITE_ZEROES and self.has_feature(BlkFeature.WRITE_ZEROES):
                status = self._discard(queue, chain, zeroes=True)
            else:
                status = Status.UNSUPP
        except OSError as exc:
            log.error("queue %d: request %d (type %d, sector %d) failed: %s",
                      queue, chain.head, type_, sector, exc)
            status = Status.IOERR
            written = 0
        if status != Status.OK:
            stats.errors += 1
        status_view[0] = status
        return written + 1

    def _range_ok(self, queue: int, what: str, sector: int, length: int) -> bool:
        if length % SECTOR_SIZE:
            log.error("queue %d: %s of %d bytes is not a multiple of %d (VIRTIO 1.4 §5.2.6.1)",
                      queue, what, length, SECTOR_SIZE)
            return False
        if sector * SECTOR_SIZE + length > self._limit:
            log.error("queue %d: %s of %d bytes at sector %d is beyond the capacity of %d "
                      "sectors", queue, what, length, sector, self.capacity)
            return False
        return True

    def _read(self, queue: int, chain: DescriptorChain, sector: int) -> tuple[Status, int]:
        length = chain.writable_len - 1
        if not self._range_ok(queue, "read", sector, length):
            return Status.IOERR, 0
        views = take_views(chain.writable, 0, length)
        done = _transfer(self.fd, views, sector * SECTOR_SIZE, write=False)
        if done != length:
            log.error("queue %d: short read at sector %d (%d of %d bytes)",
                      queue, sector, done, length)
            return Status.IOERR, done
        self.stats[queue].bytes_in += length
        return Status.OK, length

    def _write(self, queue: int, chain: DescriptorChain, sector: int) -> Status:
        if self.config.readonly:
            return Status.IOERR
        length = chain.readable_len - REQUEST_HEADER.size
        if not self._range_ok(queue, "write", sector, length):
            return Status.IOERR
        views = take_views(chain.readable, REQUEST_HEADER.size, length)
        done = _transfer(self.fd, views, sector * SECTOR_SIZE, write=True)
        if done != length:
            log.error("queue %d: short write at sector %d (%d of %d bytes)",
                      queue, sector, done, length)
            return Status.IOERR
        if not self.has_feature(BlkFeature.FLUSH):
            # §5.2.6.2: FLUSH offered but not negotiated makes every completed write
            # stable, so it must be on disk before its completion is reported.
            os.fdatasync(self.fd)
        self.stats[queue].bytes_out += length
        return Status.OK

    def _discard(self, queue: int, chain: DescriptorChain, *, zeroes: bool) -> Status:
        """DISCARD and WRITE_ZEROES: a list of 16-byte segments (§5.2.6)."""
        name = "write-zeroes" if zeroes else "discard"
        if self.config.readonly:
            return Status.IOERR
        length = chain.readable_len - REQUEST_HEADER.size
        count = length // DISCARD_SEGMENT.size
        if length % DISCARD_SEGMENT.size or not 0 < count <= _MAX_DISCARD_SEG:
            log.error("queue %d: %s data of %d bytes is not 1..%d segments of 16 bytes "
                      "(VIRTIO 1.4 §5.2.6.1)", queue, name, length, _MAX_DISCARD_SEG)
            return Status.IOERR
        data = gather(chain.readable, REQUEST_HEADER.size, length)
        segments = [DISCARD_SEGMENT.unpack_from(data, i * 16) for i in range(count)]
        for sector, num, flags in segments:
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (flags and not zeroes):
                log.error("queue %d: %s segment has flags %#x (VIRTIO 1.4 §5.2.6.2)",
                          queue, name, flags)
                return Status.UNSUPP
            if not self._range_ok(queue, name, sector, num * SECTOR_SIZE):
                return Status.IOERR
        for sector, num, flags in segments:
            offset, size = sector * SECTOR_SIZE, num * SECTOR_SIZE
            if not size:
                # An empty range has nothing to do; fallocate() would refuse it (EINVAL)
                # and fail the request after the segments before it were executed.
                continue
            if not zeroes or flags & WRITE_ZEROES_FLAG_UNMAP:
                self._punch(offset, size, must_zero=zeroes)
            else:
                self._zero(offset, size)
        return Status.OK

    def _punch(self, offset: int, size: int, *, must_zero: bool) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if must_zero:
                self._zero(offset, size)

    def _zero(self, offset: int, size: int) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        end = offset + size
        while offset < end:
            n = os.pwrite(self.fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - offset)], offset)
            offset += n

    def close(self) -> None:
        """Flush the image to stable storage and close it (and remove a temporary one)."""
        if self.fd >= 0:
            if not self.config.readonly:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def _transfer(fd: int, views: list[memoryview], offset: int, *, write: bool) -> int:
    """``os.pwritev`` (``write``) or ``os.preadv`` ``views`` until done or EOF.

    Splits at IOV_MAX and resumes after short transfers; returns bytes moved.
    """
    total = 0
    pending = views
    while pending:
        batch = pending[:_IOV_MAX]
        at = offset + total
        n = os.pwritev(fd, batch, at) if write else os.preadv(fd, batch, at)
        if n <= 0:
            break
        total += n
        want = sum(len(v) for v in batch)
        if n == want:
            pending = pending[len(batch) :]
        else:
            pending = take_views(pending, n, sum(len(v) for v in pending) - n)
    return total
