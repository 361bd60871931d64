"""virtio-blk wire definitions (VIRTIO 1.4 §5.2 Block Device)."""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CONFIG",
    "CONFIG_SIZE",
    "DISCARD_SEGMENT",
    "GET_ID_BYTES",
    "REQUEST_HEADER",
    "SECTOR_SIZE",
    "WRITEBACK_OFFSET",
    "WRITE_ZEROES_FLAG_UNMAP",
    "BlkConfig",
    "BlkFeature",
    "RequestType",
    "Status",
]

SECTOR_SIZE = 512
#: VIRTIO_BLK_ID_BYTES: length of the GET_ID answer (§5.2.6).
GET_ID_BYTES = 20
#: ``flags`` bit of a discard / write-zeroes segment (§5.2.6).
WRITE_ZEROES_FLAG_UNMAP = 1


class BlkFeature(enum.IntEnum):
    """Device-specific feature bits of virtio-blk (§5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class RequestType(enum.IntEnum):
    """``type`` field of a request header (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    """Last byte of every request: its completion status (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: ``struct virtio_blk_req`` header: ``le32 type; le32 reserved; le64 sector``.
REQUEST_HEADER = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes``: ``le64 sector; le32 num_sectors; le32 flags``.
DISCARD_SEGMENT = struct.Struct("<QII")

#: ``struct virtio_blk_config`` up to and including the zoned characteristics (§5.2.4).
CONFIG = struct.Struct(
    "<Q"  # capacity
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BBH"  # writeback, unused0, num_queues
    "III"  # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # write_zeroes_may_unmap, unused1[3]
    "III"  # max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
    "IIIIIB3x"  # zoned: zone_sectors .. write_granularity, model, unused2[3]
)
CONFIG_SIZE = 96
#: Offset of ``writeback``, the one field a driver may write (§5.2.4, CONFIG_WCE).
WRITEBACK_OFFSET = 32


class BlkConfig:
    """Values of ``struct virtio_blk_config`` that pyvirtio fills in."""

    __slots__ = (
        "blk_size",
        "capacity",
        "discard_sector_alignment",
        "max_discard_sectors",
        "max_discard_seg",
        "max_write_zeroes_sectors",
        "max_write_zeroes_seg",
        "num_queues",
        "seg_max",
        "size_max",
        "write_zeroes_may_unmap",
        "writeback",
    )

    def __init__(
        self,
        *,
        capacity: int,
        size_max: int,
        seg_max: int,
        blk_size: int,
        num_queues: int,
        max_discard_sectors: int,
        max_discard_seg: int,
        discard_sector_alignment: int,
        max_write_zeroes_sectors: int,
        max_write_zeroes_seg: int,
        write_zeroes_may_unmap: bool,
        writeback: bool,
    ) -> None:
        self.capacity = capacity
        self.size_max = size_max
        self.seg_max = seg_max
        self.blk_size = blk_size
        self.num_queues = num_queues
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.discard_sector_alignment = discard_sector_alignment
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.write_zeroes_may_unmap = write_zeroes_may_unmap
        self.writeback = writeback

    def pack(self) -> bytes:
        """Encode as the little-endian config space the driver reads."""
        return CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0,
            0,
            0,
            self.blk_size,
            0,
            0,
            0,
            0,
            int(self.writeback),
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            int(self.write_zeroes_may_unmap),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
