"""Typed SCSI CDBs: :func:`decode_cdb` turns the bytes of a command descriptor block
into a frozen dataclass, or the :class:`~pyvirtio.devices.scsi.sense.Sense` that
rejects it (SPC-5 §4.2: INVALID COMMAND OPERATION CODE, INVALID FIELD IN CDB with
the field pointer).

The subset is what a Linux ``sd`` and ``sr`` driver sends (SPC-5, SBC-4, MMC-6):
see :data:`COMMANDS`.  Decoding checks only the CDB's own fields (reserved
protection bits, NACA, a service action the command does not have); what depends
on the logical unit (ranges, read-only) is the target's business.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from pyvirtio.devices.scsi.sense import INVALID_FIELD_IN_CDB, INVALID_OPCODE, Sense

__all__ = [
    "COMMANDS",
    "Command",
    "GetConfiguration",
    "GetEventStatus",
    "Inquiry",
    "ModeSelect",
    "ModeSense",
    "Opcode",
    "PreventAllow",
    "ReadCapacity",
    "ReadDiscInfo",
    "ReadToc",
    "ReadWrite",
    "ReportLuns",
    "ReportOpcodes",
    "RequestSense",
    "StartStop",
    "SyncCache",
    "TestUnitReady",
    "Unmap",
    "Verify",
    "WriteSame",
    "cdb_length",
    "decode_cdb",
]


class Opcode(enum.IntEnum):
    """Operation codes of the commands the target knows."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    READ_TOC = 0x43
    GET_CONFIGURATION = 0x46
    GET_EVENT_STATUS = 0x4A
    READ_DISC_INFO = 0x51
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    WRITE_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA


#: SERVICE ACTION IN(16) service action: READ CAPACITY(16).
SA_READ_CAPACITY_16 = 0x10
#: MAINTENANCE IN service action: REPORT SUPPORTED OPERATION CODES.
SA_REPORT_OPCODES = 0x0C

Kind = Literal["disk", "cdrom"]
_BOTH: tuple[Kind, ...] = ("disk", "cdrom")
_DISK: tuple[Kind, ...] = ("disk",)
_CDROM: tuple[Kind, ...] = ("cdrom",)

#: The commands served: (opcode, service action or None) -> CDB length and the
#: kinds of logical unit that take it (REPORT SUPPORTED OPERATION CODES lists these).
COMMANDS: dict[tuple[int, int | None], tuple[int, tuple[Kind, ...]]] = {
    (Opcode.TEST_UNIT_READY, None): (6, _BOTH),
    (Opcode.REQUEST_SENSE, None): (6, _BOTH),
    (Opcode.READ_6, None): (6, _DISK),
    (Opcode.WRITE_6, None): (6, _DISK),
    (Opcode.INQUIRY, None): (6, _BOTH),
    (Opcode.MODE_SELECT_6, None): (6, _BOTH),
    (Opcode.MODE_SENSE_6, None): (6, _BOTH),
    (Opcode.START_STOP_UNIT, None): (6, _BOTH),
    (Opcode.PREVENT_ALLOW, None): (6, _BOTH),
    (Opcode.READ_CAPACITY_10, None): (10, _BOTH),
    (Opcode.READ_10, None): (10, _BOTH),
    (Opcode.WRITE_10, None): (10, _DISK),
    (Opcode.WRITE_VERIFY_10, None): (10, _DISK),
    (Opcode.VERIFY_10, None): (10, _DISK),
    (Opcode.SYNCHRONIZE_CACHE_10, None): (10, _DISK),
    (Opcode.WRITE_SAME_10, None): (10, _DISK),
    (Opcode.UNMAP, None): (10, _DISK),
    (Opcode.READ_TOC, None): (10, _CDROM),
    (Opcode.GET_CONFIGURATION, None): (10, _CDROM),
    (Opcode.GET_EVENT_STATUS, None): (10, _CDROM),
    (Opcode.READ_DISC_INFO, None): (10, _CDROM),
    (Opcode.MODE_SELECT_10, None): (10, _BOTH),
    (Opcode.MODE_SENSE_10, None): (10, _BOTH),
    (Opcode.READ_16, None): (16, _DISK),
    (Opcode.WRITE_16, None): (16, _DISK),
    (Opcode.WRITE_VERIFY_16, None): (16, _DISK),
    (Opcode.VERIFY_16, None): (16, _DISK),
    (Opcode.SYNCHRONIZE_CACHE_16, None): (16, _DISK),
    (Opcode.WRITE_SAME_16, None): (16, _DISK),
    (Opcode.SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16): (16, _BOTH),
    (Opcode.REPORT_LUNS, None): (12, _BOTH),
    (Opcode.MAINTENANCE_IN, SA_REPORT_OPCODES): (12, _BOTH),
    (Opcode.READ_12, None): (12, _BOTH),
    (Opcode.WRITE_12, None): (12, _DISK),
}


def cdb_length(opcode: int) -> int | None:
    """The CDB length its group code gives (SPC-5 §4.2.5.1); None for variable-length
    (7Fh) and vendor-specific groups."""
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(opcode >> 5)


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    """TEST UNIT READY (SPC-5 §6.47)."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True, slots=True)
class RequestSense:
    """REQUEST SENSE (SPC-5 §6.39): ``desc`` asks for descriptor format."""

    desc: bool
    alloc: int


@dataclass(frozen=True, slots=True)
class Inquiry:
    """INQUIRY (SPC-5 §6.6): standard data, or VPD page ``page`` with ``evpd``."""

    evpd: bool
    page: int
    alloc: int


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE(6)/(10) (SPC-5 §6.13, §6.14)."""

    ten: bool
    dbd: bool
    llbaa: bool
    pc: int
    page: int
    subpage: int
    alloc: int


@dataclass(frozen=True, slots=True)
class ModeSelect:
    """MODE SELECT(6)/(10) (SPC-5 §6.11, §6.12): ``length`` bytes of parameters follow."""

    ten: bool
    pf: bool
    sp: bool
    length: int


@dataclass(frozen=True, slots=True)
class ReadCapacity:
    """READ CAPACITY(10)/(16) (SBC-4 §5.20, §5.21)."""

    sixteen: bool
    alloc: int


@dataclass(frozen=True, slots=True)
class ReadWrite:
    """READ/WRITE(6/10/12/16) and WRITE AND VERIFY(10/16) (SBC-4 §5.14-§5.17, §5.40-§5.44).

    ``blocks`` is the transfer length in logical blocks (READ/WRITE(6): 0 means 256).
    """

    write: bool
    lba: int
    blocks: int
    fua: bool
    opcode: int


@dataclass(frozen=True, slots=True)
class Verify:
    """VERIFY(10)/(16) (SBC-4 §5.34): ``bytchk`` 0 checks only the medium."""

    lba: int
    blocks: int
    bytchk: int


@dataclass(frozen=True, slots=True)
class SyncCache:
    """SYNCHRONIZE CACHE(10)/(16) (SBC-4 §5.24): ``blocks`` 0 means to the end."""

    lba: int
    blocks: int
    immed: bool


@dataclass(frozen=True, slots=True)
class Unmap:
    """UNMAP (SBC-4 §5.32): a parameter list of ``length`` bytes follows."""

    anchor: bool
    length: int


@dataclass(frozen=True, slots=True)
class WriteSame:
    """WRITE SAME(10)/(16) (SBC-4 §5.47, §5.48): one block (none with ``ndob``)
    written to ``blocks`` blocks, or unmapped with ``unmap``."""

    lba: int
    blocks: int
    unmap: bool
    ndob: bool
    anchor: bool


@dataclass(frozen=True, slots=True)
class ReportLuns:
    """REPORT LUNS (SPC-5 §6.33)."""

    select: int
    alloc: int


@dataclass(frozen=True, slots=True)
class ReportOpcodes:
    """REPORT SUPPORTED OPERATION CODES (SPC-5 §6.35)."""

    options: int
    opcode: int
    service_action: int
    rctd: bool
    alloc: int


@dataclass(frozen=True, slots=True)
class StartStop:
    """START STOP UNIT (SBC-4 §5.25, MMC-6 §6.39): ``loej`` loads or ejects."""

    immed: bool
    power: int
    loej: bool
    start: bool


@dataclass(frozen=True, slots=True)
class PreventAllow:
    """PREVENT ALLOW MEDIUM REMOVAL (SPC-5 §6.17)."""

    prevent: int


@dataclass(frozen=True, slots=True)
class ReadToc:
    """READ TOC/PMA/ATIP (MMC-6 §6.35): ``format`` 0 (TOC) or 1 (session info)..."""

    msf: bool
    format: int
    track: int
    alloc: int


@dataclass(frozen=True, slots=True)
class GetConfiguration:
    """GET CONFIGURATION (MMC-6 §6.6)."""

    rt: int
    start: int
    alloc: int


@dataclass(frozen=True, slots=True)
class GetEventStatus:
    """GET EVENT STATUS NOTIFICATION (MMC-6 §6.7): only ``polled`` is served."""

    polled: bool
    classes: int
    alloc: int


@dataclass(frozen=True, slots=True)
class ReadDiscInfo:
    """READ DISC INFORMATION (MMC-6 §6.22)."""

    data_type: int
    alloc: int


Command = (
    TestUnitReady | RequestSense | Inquiry | ModeSense | ModeSelect | ReadCapacity | ReadWrite
    | Verify | SyncCache | Unmap | WriteSame | ReportLuns | ReportOpcodes | StartStop
    | PreventAllow | ReadToc | GetConfiguration | GetEventStatus | ReadDiscInfo
)


def _be(raw: bytes, start: int, length: int) -> int:
    return int.from_bytes(raw[start : start + length], "big")


def _bad(byte: int, bit: int | None = None) -> Sense:
    return INVALID_FIELD_IN_CDB.at(byte, bit)


def decode_cdb(raw: bytes) -> Command | Sense:
    """Decode a CDB (``raw`` may carry padding after it, as the virtio-scsi ``cdb``
    field does).  Never raises: a CDB the target does not serve, or one too short
    for its opcode, gives the sense data to answer it with."""
    if not raw:
        return INVALID_OPCODE
    opcode = raw[0]
    length = cdb_length(opcode)
    if length is None or len(raw) < length:
        return INVALID_OPCODE
    control = raw[length - 1]
    if control & 0x04:  # NACA: auto contingent allegiance is not supported
        return _bad(length - 1, 2)
    try:
        op = Opcode(opcode)
    except ValueError:
        return INVALID_OPCODE
    return _DECODERS[op](raw)


def _test_unit_ready(raw: bytes) -> Command | Sense:
    return TestUnitReady()


def _request_sense(raw: bytes) -> Command | Sense:
    return RequestSense(bool(raw[1] & 1), raw[4])


def _inquiry(raw: bytes) -> Command | Sense:
    if raw[1] & 0x02:  # CMDDT (obsolete)
        return _bad(1, 1)
    evpd = bool(raw[1] & 1)
    if not evpd and raw[2]:
        return _bad(2)
    return Inquiry(evpd, raw[2], _be(raw, 3, 2))


def _mode_sense(raw: bytes) -> Command | Sense:
    ten = raw[0] == Opcode.MODE_SENSE_10
    return ModeSense(ten=ten, dbd=bool(raw[1] & 0x08), llbaa=ten and bool(raw[1] & 0x10),
                     pc=raw[2] >> 6, page=raw[2] & 0x3F, subpage=raw[3],
                     alloc=_be(raw, 7, 2) if ten else raw[4])


def _mode_select(raw: bytes) -> Command | Sense:
    ten = raw[0] == Opcode.MODE_SELECT_10
    return ModeSelect(ten=ten, pf=bool(raw[1] & 0x10), sp=bool(raw[1] & 1),
                      length=_be(raw, 7, 2) if ten else raw[4])


def _read_capacity_10(raw: bytes) -> Command | Sense:
    if raw[8] & 1 or _be(raw, 2, 4):  # PMI and its LBA (obsolete): not served
        return _bad(8, 0) if raw[8] & 1 else _bad(2)
    return ReadCapacity(False, 8)


def _service_action_in(raw: bytes) -> Command | Sense:
    if raw[1] & 0x1F != SA_READ_CAPACITY_16:
        return _bad(1, 4)
    return ReadCapacity(True, _be(raw, 10, 4))


def _rw(raw: bytes) -> Command | Sense:
    op = raw[0]
    write = op in (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16,
                   Opcode.WRITE_VERIFY_10, Opcode.WRITE_VERIFY_16)
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        blocks = raw[4] or 256
        return ReadWrite(write, _be(raw, 1, 3) & 0x1FFFFF, blocks, False, op)
    if raw[1] >> 5:  # RDPROTECT / WRPROTECT: no protection information
        return _bad(1, 7)
    verify = op in (Opcode.WRITE_VERIFY_10, Opcode.WRITE_VERIFY_16)
    if verify and raw[1] & 0x06:  # BYTCHK: comparing is not served
        return _bad(1, 1)
    fua = not verify and bool(raw[1] & 0x08)
    if op in (Opcode.READ_10, Opcode.WRITE_10, Opcode.WRITE_VERIFY_10):
        return ReadWrite(write, _be(raw, 2, 4), _be(raw, 7, 2), fua, op)
    if op in (Opcode.READ_12, Opcode.WRITE_12):
        return ReadWrite(write, _be(raw, 2, 4), _be(raw, 6, 4), fua, op)
    return ReadWrite(write, _be(raw, 2, 8), _be(raw, 10, 4), fua, op)


def _verify(raw: bytes) -> Command | Sense:
    if raw[1] >> 5:
        return _bad(1, 7)
    bytchk = raw[1] >> 1 & 3
    if bytchk:
        return _bad(1, 2)
    if raw[0] == Opcode.VERIFY_10:
        return Verify(_be(raw, 2, 4), _be(raw, 7, 2), bytchk)
    return Verify(_be(raw, 2, 8), _be(raw, 10, 4), bytchk)


def _sync_cache(raw: bytes) -> Command | Sense:
    immed = bool(raw[1] & 0x02)
    if raw[0] == Opcode.SYNCHRONIZE_CACHE_10:
        return SyncCache(_be(raw, 2, 4), _be(raw, 7, 2), immed)
    return SyncCache(_be(raw, 2, 8), _be(raw, 10, 4), immed)


def _unmap(raw: bytes) -> Command | Sense:
    return Unmap(bool(raw[1] & 1), _be(raw, 7, 2))


def _write_same(raw: bytes) -> Command | Sense:
    if raw[1] >> 5:
        return _bad(1, 7)
    flags = raw[1]
    if raw[0] == Opcode.WRITE_SAME_10:
        if flags & 0x01:  # no NDOB in WRITE SAME(10)
            return _bad(1, 0)
        return WriteSame(_be(raw, 2, 4), _be(raw, 7, 2), bool(flags & 0x08), False,
                         bool(flags & 0x10))
    return WriteSame(_be(raw, 2, 8), _be(raw, 10, 4), bool(flags & 0x08), bool(flags & 0x01),
                     bool(flags & 0x10))


def _report_luns(raw: bytes) -> Command | Sense:
    alloc = _be(raw, 6, 4)
    if alloc < 16:  # SPC-5 §6.33: less than 16 is an invalid field
        return _bad(6)
    return ReportLuns(raw[2], alloc)


def _maintenance_in(raw: bytes) -> Command | Sense:
    if raw[1] & 0x1F != SA_REPORT_OPCODES:
        return _bad(1, 4)
    options = raw[2] & 0x07
    if options > 3:
        return _bad(2, 2)
    return ReportOpcodes(options, raw[3], _be(raw, 4, 2), bool(raw[2] & 0x80), _be(raw, 6, 4))


def _start_stop(raw: bytes) -> Command | Sense:
    return StartStop(bool(raw[1] & 1), raw[4] >> 4, bool(raw[4] & 0x02), bool(raw[4] & 0x01))


def _prevent_allow(raw: bytes) -> Command | Sense:
    return PreventAllow(raw[4] & 0x03)


def _read_toc(raw: bytes) -> Command | Sense:
    fmt = raw[2] & 0x0F
    if not fmt and raw[9] >> 6:  # the format in the control byte (SFF-8020, as Linux sends)
        fmt = raw[9] >> 6
    return ReadToc(bool(raw[1] & 0x02), fmt, raw[6], _be(raw, 7, 2))


def _get_configuration(raw: bytes) -> Command | Sense:
    rt = raw[1] & 0x03
    if rt == 3:
        return _bad(1, 1)
    return GetConfiguration(rt, _be(raw, 2, 2), _be(raw, 7, 2))


def _get_event_status(raw: bytes) -> Command | Sense:
    if not raw[1] & 1:  # asynchronous operation is not served
        return _bad(1, 0)
    return GetEventStatus(True, raw[4], _be(raw, 7, 2))


def _read_disc_info(raw: bytes) -> Command | Sense:
    data_type = raw[1] & 0x07
    if data_type:
        return _bad(1, 2)
    return ReadDiscInfo(data_type, _be(raw, 7, 2))


_DECODERS = {
    Opcode.TEST_UNIT_READY: _test_unit_ready,
    Opcode.REQUEST_SENSE: _request_sense,
    Opcode.READ_6: _rw,
    Opcode.WRITE_6: _rw,
    Opcode.INQUIRY: _inquiry,
    Opcode.MODE_SELECT_6: _mode_select,
    Opcode.MODE_SENSE_6: _mode_sense,
    Opcode.START_STOP_UNIT: _start_stop,
    Opcode.PREVENT_ALLOW: _prevent_allow,
    Opcode.READ_CAPACITY_10: _read_capacity_10,
    Opcode.READ_10: _rw,
    Opcode.WRITE_10: _rw,
    Opcode.WRITE_VERIFY_10: _rw,
    Opcode.VERIFY_10: _verify,
    Opcode.SYNCHRONIZE_CACHE_10: _sync_cache,
    Opcode.WRITE_SAME_10: _write_same,
    Opcode.UNMAP: _unmap,
    Opcode.READ_TOC: _read_toc,
    Opcode.GET_CONFIGURATION: _get_configuration,
    Opcode.GET_EVENT_STATUS: _get_event_status,
    Opcode.READ_DISC_INFO: _read_disc_info,
    Opcode.MODE_SELECT_10: _mode_select,
    Opcode.MODE_SENSE_10: _mode_sense,
    Opcode.READ_16: _rw,
    Opcode.WRITE_16: _rw,
    Opcode.WRITE_VERIFY_16: _rw,
    Opcode.VERIFY_16: _verify,
    Opcode.SYNCHRONIZE_CACHE_16: _sync_cache,
    Opcode.WRITE_SAME_16: _write_same,
    Opcode.SERVICE_ACTION_IN_16: _service_action_in,
    Opcode.REPORT_LUNS: _report_luns,
    Opcode.MAINTENANCE_IN: _maintenance_in,
    Opcode.READ_12: _rw,
    Opcode.WRITE_12: _rw,
}
