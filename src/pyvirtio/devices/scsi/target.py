"""The SCSI target, sans I/O: one target, its logical units, every command's answer.

:meth:`ScsiTarget.execute` takes a LUN number and CDB bytes and returns either a
:class:`Reply` (status, sense data, data-in bytes: everything but the medium's
data), or an :class:`Io` that says which bytes of which unit's medium to move or
drop: the device does that with file I/O and turns the outcome into the answer.
The target never touches a file, so every command is testable in memory.

Logical units are :class:`LogicalUnit` descriptions (a disk, SBC-4, or a CD-ROM,
MMC-6).  A LUN number the target has no unit for gets what SPC-5 §4.5.20 asks:
INQUIRY answers peripheral qualifier 011b, REPORT LUNS and REQUEST SENSE work,
everything else is LOGICAL UNIT NOT SUPPORTED.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvirtio.devices.scsi import cdb as c
from pyvirtio.devices.scsi import mmc
from pyvirtio.devices.scsi.answers import (
    GOOD,
    Io,
    LogicalUnit,
    ParamReader,
    Reply,
    answer,
    check,
)
from pyvirtio.devices.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    LUN_NOT_SUPPORTED,
    MEDIUM_NOT_PRESENT,
    NO_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    Sense,
    SenseKey,
)

__all__ = [
    "MAX_UNMAP_DESCRIPTORS",
    "MAX_WRITE_SAME_BLOCKS",
    "Io",
    "LogicalUnit",
    "Reply",
    "ScsiTarget",
]

#: Block limits (VPD page B0h) the target advertises.
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = 1 << 22
_SAVING_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
_REMOVAL_PREVENTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x53, 0x02)
_CACHING_PAGE, _CONTROL_PAGE, _CAPABILITIES_PAGE, _ALL_PAGES = 0x08, 0x0A, 0x2A, 0x3F
_VPD_DISK = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
_VPD_CDROM = (0x00, 0x80, 0x83)


@dataclass(slots=True)
class ScsiTarget:
    """Target 0 and its logical units, by LUN number.

    Attributes:
        units: the logical units by LUN.
        vendor: INQUIRY's T10 vendor identification (8 characters).
    """

    units: dict[int, LogicalUnit] = field(default_factory=dict)
    vendor: str = "PYVIRTIO"

    def execute(self, lun: int, cdb: bytes, params: ParamReader) -> Reply | Io:
        """The answer to ``cdb`` sent to ``lun`` (never raises for any input)."""
        command = c.decode_cdb(cdb)
        unit = self.units.get(lun)
        if isinstance(command, Sense):
            return check(command)
        if isinstance(command, c.Inquiry):
            return self._inquiry(unit, command)
        if isinstance(command, c.ReportLuns):
            return self._report_luns(command)
        if isinstance(command, c.RequestSense):
            return self._request_sense(unit, command)
        if unit is None:
            return check(LUN_NOT_SUPPORTED)
        if unit.unit_attention is not None:
            sense, unit.unit_attention = unit.unit_attention, None
            return check(sense)
        key = (cdb[0], _service_action(command))
        served = c.COMMANDS.get(key)
        if served is None or unit.kind not in served[1]:
            return check(Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, 0))
        return self._unit_command(unit, command, params)

    # -- commands any LUN takes ----------------------------------------------------------

    def _inquiry(self, unit: LogicalUnit | None, cmd: c.Inquiry) -> Reply:
        """INQUIRY (SPC-5 §6.6): standard data or a VPD page (§7.8)."""
        if unit is None:
            data = bytearray(36)
            data[0] = 0x7F  # qualifier 011b: no logical unit here; type 1Fh unknown
            data[2], data[3], data[4] = 0x06, 0x12, 31
            return answer(data, cmd.alloc)
        ptype = 0x00 if unit.kind == "disk" else 0x05
        if not cmd.evpd:
            data = bytearray(36)
            data[0] = ptype
            data[1] = 0x80 if unit.kind == "cdrom" else 0x00  # RMB
            data[2] = 0x06 if unit.kind == "disk" else 0x05  # SPC-4 / SPC-3
            data[3] = 0x12  # HISUP, response data format 2
            data[4] = 31
            data[7] = 0x02  # CMDQUE
            data[8:16] = self.vendor.encode()[:8].ljust(8)
            product = "VIRTIO DISK" if unit.kind == "disk" else "VIRTIO CD-ROM"
            data[16:32] = product.encode().ljust(16)
            data[32:36] = b"1.0 "
            return answer(data, cmd.alloc)
        pages = _VPD_DISK if unit.kind == "disk" else _VPD_CDROM
        if cmd.page not in pages:
            return check(INVALID_FIELD_IN_CDB.at(2))
        body = self._vpd(unit, cmd.page, pages)
        head = bytes((ptype, cmd.page)) + len(body).to_bytes(2, "big")
        return answer(head + body, cmd.alloc)

    def _vpd(self, unit: LogicalUnit, page: int, pages: tuple[int, ...]) -> bytes:
        serial = unit.serial.encode()[:64]
        if page == 0x00:
            return bytes(pages)
        if page == 0x80:
            return serial
        if page == 0x83:  # one designator: T10 vendor ID (code set ASCII, type 1)
            ident = self.vendor.encode()[:8].ljust(8) + serial
            return bytes((0x02, 0x01, 0x00, len(ident))) + ident
        if page == 0xB0:  # block limits (SBC-4 §6.6.4)
            body = bytearray(0x3C)
            body[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is refused
            body[16:20] = (0xFFFFFFFF).to_bytes(4, "big")  # maximum unmap LBA count
            body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
            body[24:28] = (4096 // unit.block_size or 1).to_bytes(4, "big")  # granularity
            body[32:40] = MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
            return bytes(body)
        if page == 0xB1:  # block device characteristics: non-rotating
            body = bytearray(0x3C)
            body[1] = 0x01
            return bytes(body)
        # 0xB2, logical block provisioning (SBC-4 §6.6.6): LBPU, LBPWS, LBPWS10,
        # LBPRZ 001b (unmapped blocks read zeroes); thin provisioned.
        return bytes((0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00))

    def _report_luns(self, cmd: c.ReportLuns) -> Reply:
        """REPORT LUNS (SPC-5 §6.33): single-level LUNs, peripheral format below 256."""
        if cmd.select not in (0x00, 0x01, 0x02):
            return check(INVALID_FIELD_IN_CDB.at(2))
        luns = [] if cmd.select == 0x01 else sorted(self.units)
        body = b"".join(
            (bytes((0, n)) if n < 256 else bytes((0x40 | n >> 8, n & 0xFF))) + bytes(6)
            for n in luns)
        return answer((len(body)).to_bytes(4, "big") + bytes(4) + body, cmd.alloc)

    def _request_sense(self, unit: LogicalUnit | None, cmd: c.RequestSense) -> Reply:
        """REQUEST SENSE (SPC-5 §6.39): the pending unit attention, else the unit's state."""
        if unit is None:
            sense = LUN_NOT_SUPPORTED
        elif unit.unit_attention is not None:
            sense, unit.unit_attention = unit.unit_attention, None
        elif not unit.medium:
            sense = MEDIUM_NOT_PRESENT
        else:
            sense = NO_SENSE
        return answer(sense.descriptor() if cmd.desc else sense.fixed(), cmd.alloc)

    # -- the unit's commands --------------------------------------------------------------

    def _unit_command(self, unit: LogicalUnit, cmd: c.Command, params: ParamReader) -> Reply | Io:
        if isinstance(cmd, c.TestUnitReady):
            return GOOD if unit.medium else check(MEDIUM_NOT_PRESENT)
        if isinstance(cmd, c.ModeSense):
            return self._mode_sense(unit, cmd)
        if isinstance(cmd, c.ModeSelect):
            return self._mode_select(unit, cmd, params)
        if isinstance(cmd, c.StartStop):
            return self._start_stop(unit, cmd)
        if isinstance(cmd, c.PreventAllow):
            unit.prevent = cmd.prevent
            return GOOD
        if isinstance(cmd, c.ReportOpcodes):
            return self._report_opcodes(unit, cmd)
        if isinstance(cmd, c.GetConfiguration):
            return mmc.get_configuration(unit, cmd)
        if isinstance(cmd, c.GetEventStatus):
            return mmc.get_event_status(unit, cmd)
        if not unit.medium:
            return check(MEDIUM_NOT_PRESENT)
        if isinstance(cmd, c.ReadCapacity):
            return self._read_capacity(unit, cmd)
        if isinstance(cmd, c.ReadWrite):
            return self._read_write(unit, cmd)
        if isinstance(cmd, c.Verify):
            return _range(unit, cmd.lba, cmd.blocks) or GOOD
        if isinstance(cmd, c.SyncCache):
            end = unit.blocks if cmd.blocks == 0 else cmd.lba + cmd.blocks
            if cmd.lba > unit.blocks or end > unit.blocks:
                return check(LBA_OUT_OF_RANGE)
            return Io("sync")
        if isinstance(cmd, c.Unmap):
            return self._unmap(unit, cmd, params)
        if isinstance(cmd, c.WriteSame):
            return self._write_same(unit, cmd, params)
        if isinstance(cmd, c.ReadToc):
            return mmc.read_toc(unit, cmd)
        if isinstance(cmd, c.ReadDiscInfo):
            return mmc.read_disc_info(unit, cmd)
        return check(INVALID_FIELD_IN_CDB.at(0))  # pragma: no cover - COMMANDS lists all

    def _read_write(self, unit: LogicalUnit, cmd: c.ReadWrite) -> Reply | Io:
        """READ/WRITE (SBC-4 §5.14-§5.17, §5.40-§5.44)."""
        bad = _range(unit, cmd.lba, cmd.blocks)
        if bad is not None:
            return bad
        if cmd.write and unit.readonly:
            return check(WRITE_PROTECTED)
        if cmd.blocks == 0:
            return GOOD
        offset, length = cmd.lba * unit.block_size, cmd.blocks * unit.block_size
        if not cmd.write:
            return Io("read", offset, length)
        verify = cmd.opcode in (c.Opcode.WRITE_VERIFY_10, c.Opcode.WRITE_VERIFY_16)
        return Io("write", offset, length, durable=cmd.fua or verify or not unit.wce)

    def _read_capacity(self, unit: LogicalUnit, cmd: c.ReadCapacity) -> Reply:
        """READ CAPACITY(10)/(16) (SBC-4 §5.20, §5.21)."""
        last = max(unit.blocks - 1, 0)
        if not cmd.sixteen:
            return answer(min(last, 0xFFFFFFFF).to_bytes(4, "big")
                         + unit.block_size.to_bytes(4, "big"), 8)
        data = bytearray(32)
        data[0:8] = last.to_bytes(8, "big")
        data[8:12] = unit.block_size.to_bytes(4, "big")
        if unit.kind == "disk":
            data[14] = 0x80 | 0x40  # LBPME, LBPRZ: thin provisioned, unmapped reads zero
        return answer(data, cmd.alloc)

    def _mode_pages(self, unit: LogicalUnit, pc: int) -> dict[int, bytes]:
        changeable = pc == 1
        pages: dict[int, bytes] = {}
        if unit.kind == "disk":
            caching = bytearray(20)
            caching[0], caching[1] = _CACHING_PAGE, 18
            if changeable:
                caching[2] = 0x04
            elif unit.wce or pc == 2:
                caching[2] = 0x04  # WCE
            pages[_CACHING_PAGE] = bytes(caching)
        control = bytearray(12)
        control[0], control[1] = _CONTROL_PAGE, 10
        if not changeable:
            control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            control[8:10] = (0xFFFF).to_bytes(2, "big")  # busy timeout: unlimited
        pages[_CONTROL_PAGE] = bytes(control)
        if unit.kind == "cdrom":
            caps = bytearray(22)
            caps[0], caps[1] = _CAPABILITIES_PAGE, 20
            if not changeable:
                caps[6] = 0x29  # tray loader, eject, lock
                caps[8:10] = (1764).to_bytes(2, "big")  # 10x, in kB/s
                caps[14:16] = (1764).to_bytes(2, "big")
            pages[_CAPABILITIES_PAGE] = bytes(caps)
        return pages

    def _mode_sense(self, unit: LogicalUnit, cmd: c.ModeSense) -> Reply:
        """MODE SENSE(6)/(10) (SPC-5 §6.13/§6.14): caching, control, capabilities."""
        if cmd.pc == 3:
            return check(_SAVING_NOT_SUPPORTED)
        pages = self._mode_pages(unit, cmd.pc)
        if cmd.subpage not in (0x00, 0xFF) or (cmd.subpage == 0xFF and cmd.page != _ALL_PAGES):
            return check(INVALID_FIELD_IN_CDB.at(3))
        if cmd.page == _ALL_PAGES:
            body = b"".join(pages[p] for p in sorted(pages))
        elif cmd.page in pages:
            body = pages[cmd.page]
        else:
            return check(INVALID_FIELD_IN_CDB.at(2, 5))
        devspec = (0x80 if unit.readonly else 0) | (0x10 if unit.kind == "disk" else 0)
        block_desc = b""
        longlba = False
        if not cmd.dbd and unit.kind == "disk":
            if cmd.llbaa and unit.blocks > 0xFFFFFF:
                longlba = True
                block_desc = (unit.blocks.to_bytes(8, "big") + bytes(4)
                              + unit.block_size.to_bytes(4, "big"))
            else:
                block_desc = (bytes((0,)) + min(unit.blocks, 0xFFFFFF).to_bytes(3, "big")
                              + bytes((0,)) + unit.block_size.to_bytes(3, "big"))
        if cmd.ten:
            header = bytearray(8)
            length = 6 + len(block_desc) + len(body)
            header[0:2] = length.to_bytes(2, "big")
            header[3] = devspec
            header[4] = 0x01 if longlba else 0
            header[6:8] = len(block_desc).to_bytes(2, "big")
        else:
            length = 3 + len(block_desc) + len(body)
            if length > 0xFF:
                return check(INVALID_FIELD_IN_CDB.at(4))  # pragma: no cover - pages are short
            header = bytearray((length, 0, devspec, len(block_desc)))
        return answer(bytes(header) + block_desc + body, cmd.alloc)

    def _mode_select(self, unit: LogicalUnit, cmd: c.ModeSelect, params: ParamReader) -> Reply:
        """MODE SELECT(6)/(10) (SPC-5 §6.11/§6.12): the caching page's WCE can change."""
        if cmd.sp:
            return check(_SAVING_NOT_SUPPORTED)
        if not cmd.pf:
            return check(INVALID_FIELD_IN_CDB.at(1, 4))
        data = params(cmd.length)
        if len(data) < cmd.length:
            return check(PARAMETER_LIST_LENGTH_ERROR)
        head = 8 if cmd.ten else 4
        if len(data) < head:
            return GOOD if not data else check(PARAMETER_LIST_LENGTH_ERROR)
        bd_len = int.from_bytes(data[6:8], "big") if cmd.ten else data[3]
        pos = head + bd_len
        if pos > len(data):
            return check(PARAMETER_LIST_LENGTH_ERROR)
        wce = unit.wce
        current = self._mode_pages(unit, 0)
        while pos < len(data):
            if pos + 2 > len(data):
                return check(PARAMETER_LIST_LENGTH_ERROR)
            page, plen = data[pos] & 0x3F, data[pos + 1]
            if data[pos] & 0x40:  # SPF: subpages are not served
                return check(INVALID_FIELD_IN_PARAMETER_LIST.at(pos, 6))
            body = data[pos : pos + 2 + plen]
            if len(body) < 2 + plen:
                return check(PARAMETER_LIST_LENGTH_ERROR)
            if page not in current or plen != len(current[page]) - 2:
                return check(INVALID_FIELD_IN_PARAMETER_LIST.at(pos))
            if page == _CACHING_PAGE:
                wce = bool(body[2] & 0x04)
            pos += 2 + plen
        unit.wce = wce
        return GOOD

    def _start_stop(self, unit: LogicalUnit, cmd: c.StartStop) -> Reply:
        """START STOP UNIT: a CD-ROM's LOEJ ejects or loads its medium."""
        if cmd.power:
            return GOOD
        if cmd.loej and unit.kind == "cdrom":
            if not cmd.start:
                if unit.prevent:
                    return check(_REMOVAL_PREVENTED)
                unit.medium = False
                unit.media_event = 0x03  # medium removal
            elif not unit.medium:
                unit.medium = True
                unit.media_event = 0x02  # new media
        return GOOD

    def _report_opcodes(self, unit: LogicalUnit, cmd: c.ReportOpcodes) -> Reply:
        """REPORT SUPPORTED OPERATION CODES (SPC-5 §6.35), no timeouts descriptors."""
        served = {k: v for k, v in c.COMMANDS.items() if unit.kind in v[1]}
        if cmd.options == 0:
            body = b"".join(
                bytes((op, 0)) + (sa or 0).to_bytes(2, "big")
                + bytes((0, 0x01 if sa is not None else 0)) + length.to_bytes(2, "big")
                for (op, sa), (length, _) in sorted(served.items(), key=lambda kv: (
                    kv[0][0], kv[0][1] or 0)))
            return answer(len(body).to_bytes(4, "big") + body, cmd.alloc)
        has_sa = {op for op, sa in served if sa is not None}
        key: tuple[int, int | None] = (cmd.opcode, None)
        if cmd.options == 1:
            if cmd.opcode in has_sa:
                return check(INVALID_FIELD_IN_CDB.at(2))
        elif cmd.opcode in has_sa:
            key = (cmd.opcode, cmd.service_action)
        elif cmd.options == 2 and any(op == cmd.opcode for op, _ in served):
            return check(INVALID_FIELD_IN_CDB.at(2))
        elif cmd.service_action:
            return answer(bytes((0, 0x01, 0, 0)), cmd.alloc)  # no such service action
        entry = served.get(key)
        if entry is None:
            return answer(bytes((0, 0x01, 0, 0)), cmd.alloc)  # not supported
        length = entry[0]
        usage = bytes((cmd.opcode,)) + b"\xff" * (length - 2) + b"\x03"
        return answer(bytes((0, 0x03)) + length.to_bytes(2, "big") + usage, cmd.alloc)

    def _unmap(self, unit: LogicalUnit, cmd: c.Unmap, params: ParamReader) -> Reply | Io:
        """UNMAP (SBC-4 §5.32): block descriptors in the parameter list."""
        if cmd.anchor:
            return check(INVALID_FIELD_IN_CDB.at(1, 0))
        if unit.readonly:
            return check(WRITE_PROTECTED)
        if cmd.length == 0:
            return GOOD
        data = params(cmd.length)
        if len(data) < cmd.length or len(data) < 8:
            return check(PARAMETER_LIST_LENGTH_ERROR)
        bd_len = int.from_bytes(data[2:4], "big")
        if bd_len % 16 or 8 + bd_len > len(data):
            return check(INVALID_FIELD_IN_PARAMETER_LIST.at(2))
        count = bd_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            return check(INVALID_FIELD_IN_PARAMETER_LIST.at(2))
        ranges = []
        for i in range(count):
            at = 8 + 16 * i
            lba = int.from_bytes(data[at : at + 8], "big")
            blocks = int.from_bytes(data[at + 8 : at + 12], "big")
            if lba + blocks > unit.blocks:
                return check(LBA_OUT_OF_RANGE)
            if blocks:
                ranges.append((lba * unit.block_size, blocks * unit.block_size))
        return Io("discard", ranges=tuple(ranges)) if ranges else GOOD

    def _write_same(self, unit: LogicalUnit, cmd: c.WriteSame, params: ParamReader) -> Reply | Io:
        """WRITE SAME(10)/(16) (SBC-4 §5.47/§5.48): zeroes become holes with UNMAP."""
        if cmd.anchor:
            return check(INVALID_FIELD_IN_CDB.at(1, 4))
        if cmd.blocks == 0 or cmd.blocks > MAX_WRITE_SAME_BLOCKS:
            return check(INVALID_FIELD_IN_CDB.at(10 if cmd.lba > 0xFFFFFFFF else 7))
        bad = _range(unit, cmd.lba, cmd.blocks)
        if bad is not None:
            return bad
        if unit.readonly:
            return check(WRITE_PROTECTED)
        pattern = bytes(unit.block_size)
        if not cmd.ndob:
            pattern = params(unit.block_size)
            if len(pattern) < unit.block_size:
                return check(PARAMETER_LIST_LENGTH_ERROR)
        ranges = ((cmd.lba * unit.block_size, cmd.blocks * unit.block_size),)
        if any(pattern):
            return Io("fill", ranges=ranges, pattern=pattern, durable=not unit.wce)
        return Io("discard" if cmd.unmap else "zero", ranges=ranges, durable=not unit.wce)

def _service_action(command: c.Command) -> int | None:
    if isinstance(command, c.ReadCapacity) and command.sixteen:
        return c.SA_READ_CAPACITY_16
    if isinstance(command, c.ReportOpcodes):
        return c.SA_REPORT_OPCODES
    return None


def _range(unit: LogicalUnit, lba: int, blocks: int) -> Reply | None:
    """LOGICAL BLOCK ADDRESS OUT OF RANGE when ``lba`` + ``blocks`` passes the end."""
    if lba + blocks > unit.blocks or lba > unit.blocks:
        return check(LBA_OUT_OF_RANGE)
    return None
