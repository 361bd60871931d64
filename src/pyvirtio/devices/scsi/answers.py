"""What the SCSI target answers: logical units, replies and the medium I/O they need."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pyvirtio.devices.scsi import cdb as c
from pyvirtio.devices.scsi.sense import Sense, Status

__all__ = ["GOOD", "Io", "IoOp", "LogicalUnit", "ParamReader", "Reply", "answer", "check"]


@dataclass(slots=True)
class LogicalUnit:
    """One logical unit as the target sees it (its medium is the device's business).

    Attributes:
        kind: ``disk`` (SBC-4 direct access) or ``cdrom`` (MMC-6).
        blocks: logical blocks of the medium.
        block_size: bytes per block (512 for a disk, 2048 for a CD-ROM).
        readonly: writes fail with DATA PROTECT / WRITE PROTECTED.
        serial: the unit serial number (VPD page 80h).
        wce: the write cache is on (caching mode page); off, every write is
            made durable before it completes.
        medium: a medium is loaded (a CD-ROM's tray can be ejected).
        prevent: PREVENT ALLOW MEDIUM REMOVAL's state.
        unit_attention: a condition reported (and cleared) by the next command.
        media_event: GET EVENT STATUS NOTIFICATION's pending media event code.
    """

    kind: c.Kind
    blocks: int
    block_size: int
    readonly: bool = False
    serial: str = ""
    wce: bool = True
    medium: bool = True
    prevent: int = 0
    unit_attention: Sense | None = None
    media_event: int = 0

    @property
    def size(self) -> int:
        """The medium's bytes."""
        return self.blocks * self.block_size


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's answer without medium I/O: status, sense data (CHECK CONDITION)
    and data-in bytes (already cut to the allocation length)."""

    status: Status
    sense: Sense | None = None
    data: bytes = b""


IoOp = Literal["read", "write", "sync", "discard", "zero", "fill"]


@dataclass(frozen=True, slots=True)
class Io:
    """Medium I/O a command needs (byte offsets into the unit's medium).

    ``read``/``write``: ``length`` bytes at ``offset`` to/from the data buffers;
    ``sync``: make writes durable; ``discard``: deallocate ``ranges`` (reads give
    zeroes after); ``zero``: write zeroes over ``ranges``; ``fill``: write
    ``pattern`` (one block) over ``ranges``.  ``durable``: sync after writing
    (FUA, or the write cache is off).
    """

    op: IoOp
    offset: int = 0
    length: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    durable: bool = False
    pattern: bytes = b""


GOOD = Reply(Status.GOOD)


def check(sense: Sense) -> Reply:
    """CHECK CONDITION with ``sense``."""
    return Reply(Status.CHECK_CONDITION, sense)


def answer(data: bytes | bytearray, alloc: int) -> Reply:
    """GOOD with ``data`` cut to the allocation length ``alloc``."""
    return Reply(Status.GOOD, None, bytes(data[:alloc]))


#: Reads up to n bytes of the command's data-out (its parameter list).
ParamReader = Callable[[int], bytes]


