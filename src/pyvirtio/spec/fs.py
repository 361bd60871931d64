"""virtio-fs definitions (VIRTIO 1.4 §5.11 File System Device).

Queues (§5.11.2): ``hiprio`` 0, then (with VIRTIO_FS_F_NOTIFICATION, which pyvirtio
does not offer) the notification queue, then ``request`` queues.  The requests
themselves are FUSE messages: :mod:`pyvirtio.spec.fuse`.
"""

from __future__ import annotations

import enum
import struct

__all__ = ["CONFIG", "HIPRIO_QUEUE", "TAG_SIZE", "FsFeature"]

#: ``tag`` bytes of the config space: UTF-8, NUL-padded, not NUL-terminated when full.
TAG_SIZE = 36
#: The high-priority queue: FORGET, BATCH_FORGET (and INTERRUPT) (§5.11.6.2).
HIPRIO_QUEUE = 0


class FsFeature(enum.IntEnum):
    """Device-specific feature bits (§5.11.3)."""

    NOTIFICATION = 0


#: ``struct virtio_fs_config`` (§5.11.4): tag[36], le32 num_request_queues,
#: le32 notify_buf_size.
CONFIG = struct.Struct("<36sII")
