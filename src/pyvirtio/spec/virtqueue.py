"""Virtqueue wire layouts: split (VIRTIO 1.4 §2.7) and packed (§2.8).

All fields are little-endian (VIRTIO 1.4 §2.7.3: modern devices use little-endian
rings).  Layout of a split queue of size N:

- descriptor table: N x ``struct virtq_desc`` (16 bytes, alignment 16);
- available ring: ``flags``, ``idx``, ``ring[N]``, ``used_event`` (2 bytes each, alignment 2);
- used ring: ``flags``, ``idx``, ``ring[N]`` of ``struct virtq_used_elem`` (8 bytes),
  ``avail_event`` (alignment 4).

Layout of a packed queue of size N (§2.8.10.1; N need not be a power of 2):

- descriptor ring (Descriptor Area): N x ``struct pvirtq_desc`` (16 bytes, alignment 16);
- driver event suppression (Driver Area): ``struct pvirtq_event_suppress`` (4 bytes,
  alignment 4), written by the driver, read by the device;
- device event suppression (Device Area): the same structure, written by the device.
"""

from __future__ import annotations

import struct

__all__ = [
    "AVAIL_HEADER",
    "DESC",
    "DESC_SIZE",
    "EVENT_SUPPRESS",
    "EVENT_SUPPRESS_SIZE",
    "MAX_PACKED_QUEUE_SIZE",
    "MAX_QUEUE_SIZE",
    "PACKED_DESC",
    "PACKED_DESC_SIZE",
    "PACKED_EVENT_WRAP",
    "PACKED_USED",
    "PACKED_USED_OFFSET",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "U16",
    "USED_ELEM",
    "USED_ELEM_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_USED",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "avail_ring_size",
    "desc_table_size",
    "packed_ring_size",
    "used_ring_size",
]

#: Largest queue size a split virtqueue may have (VIRTIO 1.4 §2.7: Queue Size <= 32768).
MAX_QUEUE_SIZE = 32768

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: ``struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }``
DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
#: ``struct virtq_used_elem { le32 id; le32 len; }``
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = 8
#: ``flags`` and ``idx`` at the start of both rings.
AVAIL_HEADER = struct.Struct("<HH")
U16 = struct.Struct("<H")


def desc_table_size(queue_size: int) -> int:
    """Bytes of the descriptor table (VIRTIO 1.4 §2.7, Queue Part Sizes)."""
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of the available ring including ``used_event``."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """Bytes of the used ring including ``avail_event``."""
    return 6 + USED_ELEM_SIZE * queue_size


# -- packed virtqueues (VIRTIO 1.4 §2.8) ------------------------------------------------

#: Largest packed queue size (§2.8: "up to 2^15 entries"); any size 1..2^15 is allowed.
MAX_PACKED_QUEUE_SIZE = 32768

#: §2.8.1: the driver sets AVAIL to its wrap counter and USED to the inverse; the
#: device marks a descriptor used by setting both to its own wrap counter.
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15

#: ``desc_event_flags`` values of ``struct pvirtq_event_suppress`` (§2.8.10); 0x3 is reserved.
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
#: Events for one descriptor position only; valid only with VIRTIO_F_EVENT_IDX.
RING_EVENT_FLAGS_DESC = 0x2
#: ``desc_event_wrap``: bit 15 of the ``desc`` field; bits 0-14 are ``desc_event_off``.
PACKED_EVENT_WRAP = 1 << 15

#: ``struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }`` (§2.8.13)
PACKED_DESC = struct.Struct("<QIHH")
PACKED_DESC_SIZE = 16
#: The ``len`` and ``id`` of a used descriptor, written before its ``flags``.
PACKED_USED = struct.Struct("<IH")
PACKED_USED_OFFSET = 8
#: ``struct pvirtq_event_suppress { le16 desc (off:15, wrap:1); le16 flags; }`` (§2.8.14)
EVENT_SUPPRESS = struct.Struct("<HH")
EVENT_SUPPRESS_SIZE = 4


def packed_ring_size(queue_size: int) -> int:
    """Bytes of a packed queue's descriptor ring (§2.8.10.1)."""
    return PACKED_DESC_SIZE * queue_size
