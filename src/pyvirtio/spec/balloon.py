"""virtio-balloon wire definitions (VIRTIO 1.4 §5.5 Traditional Memory Balloon Device).

The driver gives guest pages to the device (inflateq), takes them back
(deflateq), sends memory statistics when asked (statsq), hints free pages for a
migration (free_page_vq) and reports free pages (reporting_vq).  Page frame
numbers on the inflate and deflate queues are guest-physical addresses divided
by 4096, whatever the guest's page size (§5.5.6).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BALLOON_PAGE_SHIFT",
    "BALLOON_PAGE_SIZE",
    "CMD_ID",
    "CONFIG",
    "CONFIG_SIZE",
    "FIRST_HINT_CMD_ID",
    "PFN",
    "STAT",
    "BalloonConfig",
    "BalloonFeature",
    "BalloonQueue",
    "CmdId",
    "StatTag",
    "queue_roles",
]

#: §5.5.6: "These addresses are divided by 4096" (historical; not the guest's page size).
BALLOON_PAGE_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << BALLOON_PAGE_SHIFT

#: One page frame number of an inflate or deflate request: le32.
PFN = struct.Struct("<I")
#: ``struct virtio_balloon_stat`` (§5.5.6.3): le16 tag, le64 val, packed (10 bytes).
STAT = struct.Struct("<HQ")
#: A free page hinting command ID, the output buffer of free_page_vq (§5.5.6.4).
CMD_ID = struct.Struct("<I")
#: ``struct virtio_balloon_config`` (§5.5.4): num_pages, actual,
#: free_page_hint_cmd_id, poison_val.
CONFIG = struct.Struct("<IIII")
CONFIG_SIZE = CONFIG.size


class BalloonFeature(enum.IntEnum):
    """Device-specific feature bits of the balloon (§5.5.3)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    PAGE_REPORTING = 5


class BalloonQueue(enum.Enum):
    """What a balloon virtqueue is for (§5.5.2)."""

    INFLATE = "inflateq"
    DEFLATE = "deflateq"
    STATS = "statsq"
    FREE_PAGE = "free_page_vq"
    REPORTING = "reporting_vq"


def queue_roles(features: int) -> list[BalloonQueue]:
    """The balloon's virtqueues, by index, for the negotiated ``features``.

    §5.5.2 names them 0 inflateq, 1 deflateq, 2 statsq, 3 free_page_vq,
    4 reporting_vq, and says each of the last three exists only with its feature.
    Drivers (Linux's ``virtio_balloon`` over virtio-pci and ``virtio_uml``)
    number the queues that exist consecutively, as QEMU's balloon creates
    them: without STATS_VQ, reporting_vq is queue 2.
    """
    roles = [BalloonQueue.INFLATE, BalloonQueue.DEFLATE]
    for bit, role in ((BalloonFeature.STATS_VQ, BalloonQueue.STATS),
                      (BalloonFeature.FREE_PAGE_HINT, BalloonQueue.FREE_PAGE),
                      (BalloonFeature.PAGE_REPORTING, BalloonQueue.REPORTING)):
        if features >> bit & 1:
            roles.append(role)
    return roles


class StatTag(enum.IntEnum):
    """Memory statistics tags (§5.5.6.3.1)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


class CmdId(enum.IntEnum):
    """Reserved values of ``free_page_hint_cmd_id`` (§5.5.6.4)."""

    STOP = 0
    DONE = 1


#: The first command ID that starts a round of free page hinting (§5.5.6.4).
FIRST_HINT_CMD_ID = 2


class BalloonConfig:
    """Field offsets of ``struct virtio_balloon_config`` (§5.5.4)."""

    NUM_PAGES = 0
    ACTUAL = 4
    FREE_PAGE_HINT_CMD_ID = 8
    POISON_VAL = 12
