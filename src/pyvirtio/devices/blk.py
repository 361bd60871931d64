"""virtio-blk over a raw image file (VIRTIO 1.4 §5.2 Block Device).

Data moves with ``os.preadv``/``os.pwritev`` straight between the image file
and memoryviews of guest memory: no copy through Python objects.  Requests
that a driver gets wrong are answered with VIRTIO_BLK_S_IOERR or
VIRTIO_BLK_S_UNSUPP as §5.2.6.2 requires, and logged.

Two ways to execute requests (:attr:`BlockConfig.aio`):

- ``sync`` (the default): in the event loop, one at a time.  Fastest when the
  data is in the host's page cache.
- ``threads``: the loop parses and checks each request and returns
  :data:`~pyvirtio.devices.base.DEFERRED`; a worker thread does the I/O and
  completes the chain (:meth:`~pyvirtio.devices.base.DeviceHost.complete`).
  Requests of one queue then run concurrently and complete out of order
  (VIRTIO 1.4 §5.2.6: the driver matches completions by descriptor; with
  VIRTIO_F_IN_ORDER the queue engine restores the order).  For storage that
  does not answer at once: ``O_DIRECT`` (:attr:`BlockConfig.direct`), a slow or
  networked disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from pyvirtio.devices.base import (
    DEFERRED,
    ControlCommand,
    ControlReply,
    Deferred,
    DeviceHost,
    QueueStats,
    Tally,
    VirtioDevice,
)
from pyvirtio.devices.blkio import (
    DirectFile,
    WorkerPool,
    on_tmpfs,
    punch_hole,
    transfer,
    zero_range,
)
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

__all__ = [
    "AIO_MODES",
    "DEFAULT_AIO_WORKERS",
    "UNALIGNED_KIND",
    "AioMode",
    "BlockConfig",
    "BlockDevice",
]

log = logging.getLogger(__name__)

#: How requests are executed (:attr:`BlockConfig.aio`).
AioMode = Literal["sync", "threads"]
AIO_MODES: tuple[AioMode, ...] = ("sync", "threads")
#: Worker threads of ``--aio threads`` unless told (docs/benchmarks.md: qd32 on O_DIRECT).
DEFAULT_AIO_WORKERS = 16
#: The stat kind counting requests that could not go straight to an O_DIRECT image.
UNALIGNED_KIND = "unaligned"
#: Largest single discard / write-zeroes range (sectors) and segment count we accept.
_MAX_DISCARD_SECTORS = (1 << 32) - 1
_MAX_DISCARD_SEG = 128
_KIND = {t.value: t.name.lower() for t in RequestType}


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
        aio: ``"sync"``: requests run in the event loop, one at a time;
            ``"threads"``: in :attr:`aio_workers` worker threads, completing in
            any order.
        aio_workers: worker threads with ``aio="threads"``.
        direct: open the image with ``O_DIRECT`` (no host page cache); refused at
            start-up on a file system without direct I/O.
    """

    image: Path | None = None
    size: int = 1 << 30
    readonly: bool = False
    serial: str = "pyvirtio"
    queues: int = 1
    queue_size: int = 1024
    aio: AioMode = "sync"
    aio_workers: int = DEFAULT_AIO_WORKERS
    direct: bool = False

    def __post_init__(self) -> None:
        if self.aio not in AIO_MODES:
            raise ValueError(f"aio must be one of {', '.join(AIO_MODES)}, not {self.aio!r}")
        if not 1 <= self.aio_workers <= 256:
            raise ValueError(f"aio_workers must be 1..256, not {self.aio_workers}")
        if len(self.serial.encode()) > GET_ID_BYTES:
            raise ValueError(f"serial {self.serial!r} is longer than {GET_ID_BYTES} bytes")
        if not 1 <= self.queues <= 64:
            raise ValueError(f"queues must be 1..64, not {self.queues}")
        if self.image is None and (self.size <= 0 or self.size % SECTOR_SIZE):
            raise ValueError(f"size {self.size} is not a positive multiple of {SECTOR_SIZE}")


class _Outcome(NamedTuple):
    """What executing one request gave: its status and what the counters get."""

    status: Status
    #: Bytes written into the chain before the status byte.
    written: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: Not aligned for O_DIRECT: it went through a bounce buffer or the page cache.
    unaligned: bool = False


#: A request checked and ready to execute (on the loop or a worker thread).
_Operation = Callable[[], _Outcome]
_OK = _Outcome(Status.OK)
_IOERR = _Outcome(Status.IOERR)
_UNSUPP = _Outcome(Status.UNSUPP)
#: A whole read: the bytes are the request's writable length less the status byte
#: (whoever gets it counts them; one object, no allocation per read).
_READ_OK = _Outcome(Status.OK)


class BlockDevice(VirtioDevice):
    """A virtio-blk device backed by a raw image file.

    Raises:
        OSError: the image cannot be opened, or (``EINVAL``) ``direct`` on a file
            system that refuses ``O_DIRECT``.
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
        #: The image opened with O_DIRECT (``config.direct``), else None.
        self.direct: DirectFile | None = None
        if config.direct:
            try:
                self.direct = DirectFile(path, flags)
            except OSError:
                self._remove_tempdir()
                raise
            self.fd = self.direct.fd
            #: The image without O_DIRECT, for writes from buffers of our own (zeroes).
            self._buffered_fd = self.direct.buffered_fd
            log.info("%s: O_DIRECT, buffers aligned to %d bytes, offsets and lengths to %d "
                     "(%s)", path, self.direct.alignment.memory, self.direct.alignment.offset,
                     self.direct.alignment.source)
            if on_tmpfs(self.fd):
                log.warning("%s is on tmpfs: O_DIRECT bypasses no cache there (the pages are "
                            "the storage); --direct gains nothing", path)
        else:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
            self._buffered_fd = self.fd
        size = os.fstat(self.fd).st_size
        if size % SECTOR_SIZE:
            log.warning("%s: size %d is not a multiple of %d; the tail is not exposed",
                        path, size, SECTOR_SIZE)
        self.capacity = size // SECTOR_SIZE
        self._limit = self.capacity * SECTOR_SIZE
        self.serial = config.serial.encode()[:GET_ID_BYTES].ljust(GET_ID_BYTES, b"\0")
        self.seg_max = max(1, min(config.queue_size, 128) - 2)
        #: The threads of ``aio="threads"``, else None.
        self.workers = (
            WorkerPool(config.aio_workers, "blk-io") if config.aio == "threads" else None
        )

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

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """Execute one request (§5.2.6); return the bytes written to the chain.

        With ``aio="threads"`` (and a daemon to complete it), a request that does
        I/O is checked here and executed by a worker thread: :data:`DEFERRED`.
        """
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
        workers, host = self.workers, self.host
        if workers is None or host is None:
            # Inline (sync mode): reads and writes run at once, without an operation
            # object per request (the common case, on the hot path).
            try:
                if type_ == RequestType.IN:
                    outcome = self._read_request(queue, chain, sector)
                    if outcome is _READ_OK:  # the hottest path: nothing more to count
                        stats.bytes_in += chain.writable_len - 1
                        status_view[0] = Status.OK
                        return chain.writable_len
                elif type_ == RequestType.OUT:
                    outcome = self._write_request(queue, chain, sector)
                else:
                    planned = self._plan(queue, chain, type_, sector)
                    outcome = (planned if isinstance(planned, _Outcome)
                               else self._execute(queue, chain, planned, sector))
            except OSError as exc:
                log.error("queue %d: request %d (sector %d) failed: %s",
                          queue, chain.head, sector, exc)
                outcome = _IOERR
            except Exception:
                log.exception("queue %d: request %d (sector %d) failed", queue, chain.head,
                              sector)
                outcome = _IOERR
        else:
            planned = self._plan(queue, chain, type_, sector)
            if not isinstance(planned, _Outcome):
                workers.submit(
                    lambda: self._complete(host, queue, chain, status_view, planned, sector=sector)
                )
                return DEFERRED
            outcome = planned
        _count(stats, outcome)
        status_view[0] = outcome.status
        return outcome.written + 1

    def _execute(
        self, queue: int, chain: DescriptorChain, operation: _Operation, sector: int
    ) -> _Outcome:
        """Run a checked request; an I/O error is IOERR (§5.2.6), never an exception."""
        try:
            return operation()
        except OSError as exc:
            log.error("queue %d: request %d (sector %d) failed: %s",
                      queue, chain.head, sector, exc)
        except Exception:
            log.exception("queue %d: request %d (sector %d) failed", queue, chain.head, sector)
        return _IOERR

    def _complete(
        self,
        host: DeviceHost,
        queue: int,
        chain: DescriptorChain,
        status_view: memoryview,
        operation: _Operation,
        *,
        sector: int,
    ) -> None:
        """A worker thread's job: execute, write the status, hand the chain back to the
        daemon with what the counters get (counted on the loop's thread)."""
        outcome = self._execute(queue, chain, operation, sector)
        if outcome is _READ_OK:
            length = chain.writable_len - 1
            outcome = _Outcome(Status.OK, length, bytes_in=length)
        try:
            status_view[0] = outcome.status
        except (ValueError, TypeError) as exc:  # the memory went with the front-end
            log.debug("queue %d: status of request %d not written: %s", queue, chain.head, exc)
        host.complete(queue, chain, outcome.written + 1, Tally(
            errors=int(outcome.status != Status.OK), bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out, kind=UNALIGNED_KIND if outcome.unaligned else None))

    def _plan(
        self, queue: int, chain: DescriptorChain, type_: int, sector: int
    ) -> _Outcome | _Operation:
        """Check a request on the loop thread: the answer when there is no I/O to do
        (a bad request, GET_ID), else the operation that executes it."""
        if type_ == RequestType.IN:
            return self._plan_read(queue, chain, sector)
        if type_ == RequestType.OUT:
            return self._plan_write(queue, chain, sector)
        if type_ == RequestType.FLUSH and self.has_feature(BlkFeature.FLUSH):
            return self._flush
        if type_ == RequestType.GET_ID:
            written = min(GET_ID_BYTES, chain.writable_len - 1)
            out = take_views(chain.writable, 0, written)
            pos = 0
            for v in out:
                v[:] = self.serial[pos : pos + len(v)]
                pos += len(v)
            return _Outcome(Status.OK, written)
        if type_ == RequestType.DISCARD and self.has_feature(BlkFeature.DISCARD):
            return self._plan_discard(queue, chain, zeroes=False)
        if type_ == RequestType.WRITE_ZEROES and self.has_feature(BlkFeature.WRITE_ZEROES):
            return self._plan_discard(queue, chain, zeroes=True)
        return _UNSUPP

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

    def _plan_read(self, queue: int, chain: DescriptorChain, sector: int) -> _Outcome | _Operation:
        length = chain.writable_len - 1
        if not self._range_ok(queue, "read", sector, length):
            return _IOERR
        return partial(self._read, queue, take_views(chain.writable, 0, length), length, sector)

    def _read_request(self, queue: int, chain: DescriptorChain, sector: int) -> _Outcome:
        """A read, checked and done at once (sync mode)."""
        length = chain.writable_len - 1
        if not self._range_ok(queue, "read", sector, length):
            return _IOERR
        return self._read(queue, take_views(chain.writable, 0, length), length, sector)

    def _read(self, queue: int, views: list[memoryview], length: int, sector: int) -> _Outcome:
        """Read into ``views``; a whole, aligned read is :data:`_READ_OK` (its length
        is the request's: the caller counts it)."""
        direct = self.direct
        if direct is None:
            done, unaligned = transfer(self.fd, views, sector * SECTOR_SIZE, write=False), False
        else:
            done, unaligned = direct.transfer(views, sector * SECTOR_SIZE, write=False)
        if done != length:
            log.error("queue %d: short read at sector %d (%d of %d bytes)",
                      queue, sector, done, length)
            return _Outcome(Status.IOERR, done, unaligned=unaligned)
        if not unaligned:
            return _READ_OK
        return _Outcome(Status.OK, length, bytes_in=length, unaligned=True)

    def _writable_range(self, queue: int, chain: DescriptorChain,
                        sector: int) -> list[memoryview] | None:
        """A write's data views, or None when the write is refused (read-only, range)."""
        if self.config.readonly:
            return None
        length = chain.readable_len - REQUEST_HEADER.size
        if not self._range_ok(queue, "write", sector, length):
            return None
        return take_views(chain.readable, REQUEST_HEADER.size, length)

    def _plan_write(self, queue: int, chain: DescriptorChain, sector: int) -> _Outcome | _Operation:
        views = self._writable_range(queue, chain, sector)
        if views is None:
            return _IOERR
        return partial(self._write, queue, views, chain.readable_len - REQUEST_HEADER.size,
                       sector)

    def _write_request(self, queue: int, chain: DescriptorChain, sector: int) -> _Outcome:
        """A write, checked and done at once (sync mode)."""
        views = self._writable_range(queue, chain, sector)
        if views is None:
            return _IOERR
        return self._write(queue, views, chain.readable_len - REQUEST_HEADER.size, sector)

    def _write(self, queue: int, views: list[memoryview], length: int, sector: int) -> _Outcome:
        direct = self.direct
        if direct is None:
            done, unaligned = transfer(self.fd, views, sector * SECTOR_SIZE, write=True), False
        else:
            done, unaligned = direct.transfer(views, sector * SECTOR_SIZE, write=True)
        if done != length:
            log.error("queue %d: short write at sector %d (%d of %d bytes)",
                      queue, sector, done, length)
            return _Outcome(Status.IOERR, unaligned=unaligned)
        # §5.2.6.2: FLUSH offered but not negotiated makes every completed write
        # stable, so it must be on disk before its completion is reported.
        if not self.has_feature(BlkFeature.FLUSH):
            os.fdatasync(self.fd)
        return _Outcome(Status.OK, bytes_out=length, unaligned=unaligned)

    def _flush(self) -> _Outcome:
        """FLUSH: every write completed so far is on stable storage (§5.2.6.2)."""
        os.fdatasync(self.fd)
        return _OK

    def _plan_discard(
        self, queue: int, chain: DescriptorChain, *, zeroes: bool
    ) -> _Outcome | _Operation:
        """DISCARD and WRITE_ZEROES: a list of 16-byte segments (§5.2.6)."""
        name = "write-zeroes" if zeroes else "discard"
        if self.config.readonly:
            return _IOERR
        length = chain.readable_len - REQUEST_HEADER.size
        count = length // DISCARD_SEGMENT.size
        if length % DISCARD_SEGMENT.size or not 0 < count <= _MAX_DISCARD_SEG:
            log.error("queue %d: %s data of %d bytes is not 1..%d segments of 16 bytes "
                      "(VIRTIO 1.4 §5.2.6.1)", queue, name, length, _MAX_DISCARD_SEG)
            return _IOERR
        data = gather(chain.readable, REQUEST_HEADER.size, length)
        segments = [DISCARD_SEGMENT.unpack_from(data, i * 16) for i in range(count)]
        for sector, num, flags in segments:
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (flags and not zeroes):
                log.error("queue %d: %s segment has flags %#x (VIRTIO 1.4 §5.2.6.2)",
                          queue, name, flags)
                return _UNSUPP
            if not self._range_ok(queue, name, sector, num * SECTOR_SIZE):
                return _IOERR

        def discard() -> _Outcome:
            for sector, num, flags in segments:
                offset, size = sector * SECTOR_SIZE, num * SECTOR_SIZE
                if not size:
                    # An empty range has nothing to do; fallocate() would refuse it
                    # (EINVAL) and fail the request after the segments before it ran.
                    continue
                if not zeroes or flags & WRITE_ZEROES_FLAG_UNMAP:
                    self._punch(offset, size, must_zero=zeroes)
                else:
                    self._zero(offset, size)
            return _OK

        return discard

    def _punch(self, offset: int, size: int, *, must_zero: bool) -> None:
        if not punch_hole(self.fd, offset, size) and must_zero:
            self._zero(offset, size)

    def _zero(self, offset: int, size: int) -> None:
        zero_range(self.fd, offset, size, self._buffered_fd)

    def close(self) -> None:
        """Finish the requests the worker threads hold, flush the image to stable
        storage and close it (and remove a temporary one)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        if self.fd >= 0:
            if not self.config.readonly:
                try:
                    os.fsync(self.fd)
                except OSError as exc:
                    log.error("%s: final fsync failed: %s", self.path, exc)
            if self.direct is not None:
                self.direct.close()
            else:
                os.close(self.fd)
            self.fd = self._buffered_fd = -1
        self._remove_tempdir()

    def _remove_tempdir(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def _count(stats: QueueStats, outcome: _Outcome) -> None:
    """Count one executed request (on the loop thread)."""
    if outcome.status != Status.OK:
        stats.errors += 1
    if outcome.bytes_in:
        stats.bytes_in += outcome.bytes_in
    if outcome.bytes_out:
        stats.bytes_out += outcome.bytes_out
    if outcome.unaligned:
        stats.kinds[UNALIGNED_KIND] += 1

