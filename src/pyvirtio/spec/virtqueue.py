"""Split virtqueue wire layout (VIRTIO 1.4 §2.7).

All fields are little-endian (VIRTIO 1.4 §2.7.3: modern devices use little-endian
rings).  Layout of a queue of size N:

- descriptor table: N x ``struct virtq_desc`` (16 bytes, alignment 16);
- available ring: ``flags``, ``idx``, ``ring[N]``, ``used_event`` (2 bytes each, alignment 2);
- used ring: ``flags``, ``idx``, ``ring[N]`` of ``struct virtq_used_elem`` (8 bytes),
  ``avail_event`` (alignment 4).
"""

from __future__ import annotations

import struct

__all__ = [
    "AVAIL_HEADER",
    "DESC",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "U16",
    "USED_ELEM",
    "USED_ELEM_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "avail_ring_size",
    "desc_table_size",
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
