"""virtio-scsi wire definitions (VIRTIO 1.4 §5.6 SCSI Host Device).

Queues (§5.6.2): 0 is the control queue, 1 the event queue, 2 and up the request
queues.  A request is ``struct virtio_scsi_req_cmd`` (§5.6.6.1): a header the driver
writes (LUN, tag, task attribute, CDB of ``cdb_size`` bytes, then data-out) and a
response the device writes (status, sense of ``sense_size`` bytes, then data-in).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CDB_SIZE",
    "CONFIG",
    "CONTROL_QUEUE",
    "CTRL_AN_REQ",
    "CTRL_AN_RESP",
    "CTRL_TMF_REQ",
    "CTRL_TMF_RESP",
    "CTRL_TYPE",
    "EVENT",
    "EVENTS_MISSED",
    "EVENT_QUEUE",
    "FIRST_REQUEST_QUEUE",
    "MAX_LUN",
    "REQ_HEADER",
    "RESP_HEADER",
    "SENSE_SIZE",
    "ControlType",
    "Event",
    "EventReason",
    "Response",
    "ScsiConfig",
    "ScsiFeature",
    "TmfSubtype",
    "decode_lun",
    "encode_lun",
]

CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2
#: Default sizes of the sense and CDB fields (§5.6.4: VIRTIO_SCSI_SENSE_SIZE, _CDB_SIZE).
SENSE_SIZE = 96
CDB_SIZE = 32
#: The largest LUN the single-level flat format of the ``lun`` field carries (§5.6.6).
MAX_LUN = 16383
#: Flag of ``event``: the device dropped events for want of buffers (§5.6.6.3).
EVENTS_MISSED = 0x80000000


class ScsiFeature(enum.IntEnum):
    """Device-specific feature bits of virtio-scsi (§5.6.3)."""

    INOUT = 0
    HOTPLUG = 1
    CHANGE = 2
    T10_PI = 3


class Response(enum.IntEnum):
    """``response`` of a request or task management function (§5.6.6.1, §5.6.6.2)."""

    OK = 0
    OVERRUN = 1
    ABORTED = 2
    BAD_TARGET = 3
    RESET = 4
    BUSY = 5
    TRANSPORT_FAILURE = 6
    TARGET_FAILURE = 7
    NEXUS_FAILURE = 8
    FAILURE = 9
    FUNCTION_SUCCEEDED = 10
    FUNCTION_REJECTED = 11
    INCORRECT_LUN = 12


class ControlType(enum.IntEnum):
    """``type`` of a control queue request (§5.6.6.2)."""

    TMF = 0
    AN_QUERY = 1
    AN_SUBSCRIBE = 2


class TmfSubtype(enum.IntEnum):
    """``subtype`` of a task management function (§5.6.6.2)."""

    ABORT_TASK = 0
    ABORT_TASK_SET = 1
    CLEAR_ACA = 2
    CLEAR_TASK_SET = 3
    I_T_NEXUS_RESET = 4
    LOGICAL_UNIT_RESET = 5
    QUERY_TASK = 6
    QUERY_TASK_SET = 7


class Event(enum.IntEnum):
    """``event`` of an event queue buffer (§5.6.6.3)."""

    NO_EVENT = 0
    TRANSPORT_RESET = 1
    ASYNC_NOTIFY = 2
    PARAM_CHANGE = 3


class EventReason(enum.IntEnum):
    """``reason`` of a TRANSPORT_RESET event (§5.6.6.3.1)."""

    HARD = 0
    RESCAN = 1
    REMOVED = 2


#: ``struct virtio_scsi_config`` (§5.6.4): num_queues, seg_max, max_sectors,
#: cmd_per_lun, event_info_size, sense_size, cdb_size, max_channel, max_target, max_lun.
CONFIG = struct.Struct("<IIIIIIIHHI")
#: ``struct virtio_scsi_req_cmd`` up to the CDB: lun[8], id, task_attr, prio, crn.
REQ_HEADER = struct.Struct("<8sQBBB")
#: ``struct virtio_scsi_req_cmd`` response up to the sense: sense_len, residual,
#: status_qualifier, status, response.
RESP_HEADER = struct.Struct("<IIHBB")
#: The first field of every control request: its type.
CTRL_TYPE = struct.Struct("<I")
#: ``struct virtio_scsi_ctrl_tmf`` driver part: type, subtype, lun[8], id.
CTRL_TMF_REQ = struct.Struct("<II8sQ")
#: Its device part: response.
CTRL_TMF_RESP = struct.Struct("<B")
#: ``struct virtio_scsi_ctrl_an`` driver part: type, lun[8], event_requested.
CTRL_AN_REQ = struct.Struct("<I8sI")
#: Its device part: event_actual, response.
CTRL_AN_RESP = struct.Struct("<IB")
#: ``struct virtio_scsi_event``: event, lun[8], reason.
EVENT = struct.Struct("<I8sI")


class ScsiConfig:
    """``struct virtio_scsi_config`` (§5.6.4), packed with :data:`CONFIG`."""

    __slots__ = ("cdb_size", "cmd_per_lun", "event_info_size", "max_channel", "max_lun",
                 "max_sectors", "max_target", "num_queues", "seg_max", "sense_size")

    def __init__(self, *, num_queues: int, seg_max: int, max_sectors: int, cmd_per_lun: int,
                 event_info_size: int = EVENT.size, sense_size: int = SENSE_SIZE,
                 cdb_size: int = CDB_SIZE, max_channel: int = 0, max_target: int = 0,
                 max_lun: int = MAX_LUN) -> None:
        self.num_queues = num_queues
        self.seg_max = seg_max
        self.max_sectors = max_sectors
        self.cmd_per_lun = cmd_per_lun
        self.event_info_size = event_info_size
        self.sense_size = sense_size
        self.cdb_size = cdb_size
        self.max_channel = max_channel
        self.max_target = max_target
        self.max_lun = max_lun

    def pack(self) -> bytes:
        """The little-endian config space."""
        return CONFIG.pack(self.num_queues, self.seg_max, self.max_sectors, self.cmd_per_lun,
                           self.event_info_size, self.sense_size, self.cdb_size,
                           self.max_channel, self.max_target, self.max_lun)

    @classmethod
    def unpack(cls, raw: bytes) -> ScsiConfig:
        """Decode :data:`CONFIG` bytes (short input is padded with zeroes)."""
        (num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size,
         cdb_size, max_channel, max_target, max_lun) = CONFIG.unpack(
            raw[: CONFIG.size].ljust(CONFIG.size, b"\0"))
        return cls(num_queues=num_queues, seg_max=seg_max, max_sectors=max_sectors,
                   cmd_per_lun=cmd_per_lun, event_info_size=event_info_size,
                   sense_size=sense_size, cdb_size=cdb_size, max_channel=max_channel,
                   max_target=max_target, max_lun=max_lun)


def encode_lun(target: int, lun: int) -> bytes:
    """The 8-byte ``lun`` field (§5.6.6.1): 1, the target, then the LUN as REPORT LUNS
    gives it: peripheral format below 256, flat format (40h) from 256 on.

    The driver's own requests carry the flat format for every LUN; an event's LUN
    must be the REPORT LUNS form, which Linux takes as it is (flat-format LUN 3
    would be its LUN 16387).

    Raises:
        ValueError: target above 255 or LUN above :data:`MAX_LUN`.
    """
    if not 0 <= target <= 255 or not 0 <= lun <= MAX_LUN:
        raise ValueError(f"target {target} / LUN {lun} out of range")
    high = 0x40 | lun >> 8 if lun >= 256 else 0
    return bytes((1, target, high, lun & 0xFF, 0, 0, 0, 0))


def decode_lun(raw: bytes) -> tuple[int, int] | None:
    """``(target, lun)`` of an 8-byte ``lun`` field; None when it is not in the
    format §5.6.6.1 gives (first byte 1, single-level LUN, bytes 4-7 zero).

    Bytes 2-3 are the LUN with or without the flat-format marker 0x40 (a LUN below
    256 in peripheral format, as Linux sends for the well-known REPORT LUNS W-LUN
    too, has 0 there).
    """
    if len(raw) != 8 or raw[0] != 1 or any(raw[4:]):
        return None
    method = raw[2] >> 6
    if method > 1 or (method == 0 and raw[2]):
        return None
    return raw[1], (raw[2] << 8 | raw[3]) & 0x3FFF
