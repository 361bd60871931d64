"""Disk and CD-ROM logical units over image files: the medium side of an :class:`Io`.

A :class:`Lun` pairs the target's :class:`~pyvirtio.devices.scsi.target.LogicalUnit`
(what commands see) with the open image and the worker threads that move its data.
Each unit has threads of its own, so a slow unit never holds up another's requests.
Data moves with ``os.preadv``/``os.pwritev`` straight between the image and guest
memory; a discard punches a hole (``fallocate``), so the image stays sparse.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyvirtio.devices.blkio import WorkerPool, punch_hole, transfer, zero_range
from pyvirtio.devices.scsi.answers import Io, LogicalUnit
from pyvirtio.spec.scsi import MAX_LUN

__all__ = ["CDROM_BLOCK", "DISK_BLOCK", "Lun", "LunSpec", "ScsiOptions", "open_lun"]

log = logging.getLogger(__name__)

DISK_BLOCK = 512
CDROM_BLOCK = 2048


@dataclass(frozen=True, slots=True)
class LunSpec:
    """What a logical unit is made of: an image, a kind, read-only or not."""

    path: Path
    cdrom: bool = False
    readonly: bool = False


@dataclass(frozen=True, slots=True)
class ScsiOptions:
    """Validated settings of ``pyvirtio serve scsi``.

    Attributes:
        disks: the disk images, LUN 0, 1... in order.
        cdrom: an ISO image for a CD-ROM, the LUN after the disks.
        readonly: every disk is read-only.
        queues: request queues.
        queue_size: the largest queue size accepted.
        workers: I/O threads per logical unit.
        aio: ``threads``: medium I/O in the LUN's threads (requests never wait on
            each other); ``sync``: in the event loop, one request after the other
            (less CPU per request when the image is in the page cache, as blk's
            default).
    """

    disks: tuple[Path, ...] = ()
    cdrom: Path | None = None
    readonly: bool = False
    queues: int = 1
    queue_size: int = 1024
    workers: int = 4
    aio: Literal["threads", "sync"] = "threads"

    def __post_init__(self) -> None:
        if not 1 <= self.queues <= 64:
            raise ValueError(f"queues must be 1..64, not {self.queues}")
        if self.aio not in ("threads", "sync"):
            raise ValueError(f"aio must be threads or sync, not {self.aio!r}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64, not {self.workers}")
        if len(self.disks) + (self.cdrom is not None) > MAX_LUN + 1:
            raise ValueError("too many logical units")

    def specs(self) -> list[LunSpec]:
        """The units in LUN order."""
        specs = [LunSpec(path, readonly=self.readonly) for path in self.disks]
        if self.cdrom is not None:
            specs.append(LunSpec(self.cdrom, cdrom=True, readonly=True))
        return specs


class Lun:
    """An open logical unit: its target-side description, its image, its threads.

    Raises:
        OSError: the image cannot be opened.
        ValueError: the image is smaller than one block.
    """

    def __init__(self, spec: LunSpec, number: int, workers: int) -> None:
        self.spec = spec
        self.number = number
        readonly = spec.readonly or spec.cdrom
        self.fd = os.open(spec.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            block = CDROM_BLOCK if spec.cdrom else DISK_BLOCK
            if size < block:
                raise ValueError(f"{spec.path}: {size} bytes, less than one {block}-byte block")
            if size % block:
                log.warning("%s: size %d is not a multiple of %d; the tail is not exposed",
                            spec.path, size, block)
        except BaseException:
            os.close(self.fd)
            raise
        self.unit = LogicalUnit(
            kind="cdrom" if spec.cdrom else "disk", blocks=size // block, block_size=block,
            readonly=readonly, serial=f"pyvirtio-lun{number}")
        self.pool = WorkerPool(workers, f"scsi-lun{number}")
        self._closed = threading.Event()

    def describe(self) -> dict[str, object]:
        """The unit for ``pyvirtio scsi SOCK list``."""
        return {"lun": self.number, "path": str(self.spec.path), "kind": self.unit.kind,
                "readonly": self.unit.readonly, "size": self.unit.size,
                "block_size": self.unit.block_size, "write_cache": self.unit.wce}

    def run(self, io: Io, views: list[memoryview]) -> int:
        """Execute ``io`` (in a worker thread); return the bytes moved to or from ``views``.

        Raises:
            OSError: the I/O failed (a short read past the end is not a failure:
                the rest of ``views`` is zero-filled).
        """
        fd = self.fd
        if io.op == "read":
            done = transfer(fd, views, io.offset, write=False)
            if done < io.length:  # the file shrank behind our back: zeroes, as a hole
                pos = 0
                for view in views:
                    end = pos + len(view)
                    if end > done:
                        start = max(done - pos, 0)
                        view[start:] = bytes(len(view) - start)
                    pos = end
            return io.length
        if io.op == "write":
            done = transfer(fd, views, io.offset, write=True)
            if done < io.length:
                raise OSError(errno.ENOSPC, "short write")
        elif io.op == "sync":
            os.fdatasync(fd)
            return 0
        elif io.op == "discard":
            for offset, length in io.ranges:
                if not punch_hole(fd, offset, length):
                    zero_range(fd, offset, length)
        elif io.op == "zero":
            for offset, length in io.ranges:
                zero_range(fd, offset, length)
        else:  # fill
            self._fill(io)
        if io.durable:
            os.fdatasync(fd)
        return io.length

    def _fill(self, io: Io) -> None:
        chunk = io.pattern * max(1, (1 << 20) // len(io.pattern))
        for start, length in io.ranges:
            offset, end = start, start + length
            while offset < end:
                offset += os.pwrite(self.fd, chunk[: min(len(chunk), end - offset)], offset)

    def close(self) -> None:
        """Finish the queued I/O, then flush and close the image (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.pool.close()
        if not self.unit.readonly:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                log.error("%s: final fsync failed: %s", self.spec.path, exc)
        os.close(self.fd)


def open_lun(spec: LunSpec, number: int, workers: int = 8) -> Lun:
    """Open ``spec`` as LUN ``number`` with ``workers`` I/O threads.

    Raises:
        OSError: the image cannot be opened.
        ValueError: it is smaller than one block.
    """
    return Lun(spec, number, workers)
