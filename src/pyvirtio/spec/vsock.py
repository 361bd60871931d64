"""virtio-vsock definitions (VIRTIO 1.4 §5.10 Socket Device).

Queues (§5.10.2): ``rx`` 0 (device to driver), ``tx`` 1 (driver to device),
``event`` 2.  Every packet on rx and tx is a :data:`HEADER` followed by ``len``
payload bytes (§5.10.6).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CONFIG",
    "EVENT",
    "EVENTQ",
    "HEADER",
    "HOST_CID",
    "MAX_CID",
    "RESERVED_CIDS",
    "RXQ",
    "TXQ",
    "SeqFlag",
    "ShutdownFlag",
    "VsockFeature",
    "VsockOp",
    "VsockType",
]

#: The queues (§5.10.2).
RXQ, TXQ, EVENTQ = 0, 1, 2

#: The well-known CID of the host (§5.10.4).
HOST_CID = 2
#: CIDs that are never a guest's (§5.10.4): 0, 1, 2 (the host) and 0xffffffff.
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFFFFFF})
#: The upper 32 bits of a CID are reserved and zeroed (§5.10.4).
MAX_CID = 0xFFFFFFFE


class VsockFeature(enum.IntEnum):
    """Device-specific feature bits (§5.10.3)."""

    STREAM = 0
    SEQPACKET = 1
    NO_IMPLIED_STREAM = 2


class VsockType(enum.IntEnum):
    """``type`` of the header (§5.10.6.2)."""

    STREAM = 1
    SEQPACKET = 2


class VsockOp(enum.IntEnum):
    """``op`` of the header (§5.10.6)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ShutdownFlag(enum.IntFlag):
    """``flags`` of a SHUTDOWN packet (§5.10.6.5): the sender will not receive
    (RCV) / will not send (SEND) any more."""

    RCV = 1
    SEND = 2


class SeqFlag(enum.IntFlag):
    """``flags`` of a SEQPACKET RW packet (§5.10.6.6): end of message, end of record."""

    EOM = 1
    EOR = 2


#: ``struct virtio_vsock_hdr`` (§5.10.6): src_cid, dst_cid, src_port, dst_port, len,
#: type, op, flags, buf_alloc, fwd_cnt (44 bytes).
HEADER = struct.Struct("<QQIIIHHIII")
#: ``struct virtio_vsock_config`` (§5.10.4): guest_cid.
CONFIG = struct.Struct("<Q")
#: ``struct virtio_vsock_event`` (§5.10.6.7): id.
EVENT = struct.Struct("<I")
