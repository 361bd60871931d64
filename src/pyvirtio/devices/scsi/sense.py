"""SCSI status codes and sense data (SPC-5 §4.4 fixed and descriptor formats).

A :class:`Sense` is what a CHECK CONDITION carries: a sense key, an additional
sense code and qualifier, and, for ILLEGAL REQUEST, where in the CDB or parameter
list the fault is (the sense-key specific field pointer, SPC-5 §4.4.2.4.2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "FIXED_SENSE_LEN",
    "INVALID_FIELD_IN_CDB",
    "INVALID_FIELD_IN_PARAMETER_LIST",
    "INVALID_OPCODE",
    "LBA_OUT_OF_RANGE",
    "LUN_NOT_SUPPORTED",
    "MEDIUM_NOT_PRESENT",
    "NO_SENSE",
    "PARAMETER_LIST_LENGTH_ERROR",
    "POWER_ON_RESET",
    "READ_ERROR",
    "WRITE_ERROR",
    "WRITE_PROTECTED",
    "Sense",
    "SenseKey",
    "Status",
]

#: Bytes of fixed-format sense data with no additional bytes beyond the standard ones.
FIXED_SENSE_LEN = 18


class Status(enum.IntEnum):
    """SAM-5 status codes (the ``status`` field of a virtio-scsi response)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    """SPC-5 Table 49: sense keys."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


@dataclass(frozen=True, slots=True)
class Sense:
    """Sense data: key, additional sense code and qualifier, and optionally the
    field pointer of an ILLEGAL REQUEST (byte ``field`` of the CDB, or of the
    parameter list when ``in_cdb`` is false; ``bit`` the bit, or None)."""

    key: SenseKey
    asc: int
    ascq: int
    field: int | None = None
    bit: int | None = None
    in_cdb: bool = True

    def at(self, field: int, bit: int | None = None) -> Sense:
        """The same sense, pointing at byte ``field`` (bit ``bit``)."""
        return Sense(self.key, self.asc, self.ascq, field, bit, self.in_cdb)

    def fixed(self) -> bytes:
        """Fixed-format sense data (response code 70h, SPC-5 §4.4.3), 18 bytes."""
        data = bytearray(FIXED_SENSE_LEN)
        data[0] = 0x70
        data[2] = self.key & 0x0F
        data[7] = FIXED_SENSE_LEN - 8
        data[12] = self.asc
        data[13] = self.ascq
        if self.field is not None:
            sksv = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                sksv |= 0x08 | (self.bit & 7)
            data[15] = sksv
            data[16:18] = (self.field & 0xFFFF).to_bytes(2, "big")
        return bytes(data)

    def descriptor(self) -> bytes:
        """Descriptor-format sense data (response code 72h, SPC-5 §4.4.2)."""
        data = bytearray(8)
        data[0] = 0x72
        data[1] = self.key & 0x0F
        data[2] = self.asc
        data[3] = self.ascq
        if self.field is not None:
            sksv = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                sksv |= 0x08 | (self.bit & 7)
            data += bytes((0x02, 0x06, 0, 0, sksv)) + (self.field & 0xFFFF).to_bytes(2, "big")
            data += b"\0"
        data[7] = len(data) - 8
        return bytes(data)

    @classmethod
    def parse(cls, raw: bytes) -> Sense | None:
        """Key, ASC and ASCQ of fixed or descriptor sense data (None: neither)."""
        if len(raw) >= 14 and raw[0] & 0x7F in (0x70, 0x71):
            return cls(SenseKey(raw[2] & 0x0F), raw[12], raw[13])
        if len(raw) >= 4 and raw[0] & 0x7F in (0x72, 0x73):
            return cls(SenseKey(raw[1] & 0x0F), raw[2], raw[3])
        return None


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00, 0x00)
INVALID_OPCODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, 0)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00, in_cdb=False)
PARAMETER_LIST_LENGTH_ERROR = Sense(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
LUN_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x00)
MEDIUM_NOT_PRESENT = Sense(SenseKey.NOT_READY, 0x3A, 0x00)
POWER_ON_RESET = Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
#: What every logical unit reports once after an I_T NEXUS RESET (SAM-5: the unit
#: attention I_T NEXUS LOSS OCCURRED).
I_T_NEXUS_LOSS = Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x07)
READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
