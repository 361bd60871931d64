"""The CD-ROM's MMC-6 commands, sans I/O: what Linux ``sr``, ``cdrom`` and ``isofs`` ask.

One data track (a single-session, finalised disc) whose blocks are the ISO's.
"""

from __future__ import annotations

from pyvirtio.devices.scsi import cdb as c
from pyvirtio.devices.scsi.answers import LogicalUnit, Reply, answer, check
from pyvirtio.devices.scsi.sense import INVALID_FIELD_IN_CDB

__all__ = ["get_configuration", "get_event_status", "read_disc_info", "read_toc"]

#: CD-ROM addresses in MSF count from 00:02:00 (MMC-6 §4.2.3.5: 150 frames before LBA 0).
_MSF_OFFSET = 150
_PROFILE_CDROM = 0x0008


def read_toc(unit: LogicalUnit, cmd: c.ReadToc) -> Reply:
    """READ TOC/PMA/ATIP (MMC-6 §6.35): one data track; formats 0 and 1."""

    def address(lba: int) -> bytes:
        if not cmd.msf:
            return lba.to_bytes(4, "big")
        frames = lba + _MSF_OFFSET
        return bytes((0, frames // 4500, frames // 75 % 60, frames % 75))

    if cmd.format == 0:
        if cmd.track > 1 and cmd.track != 0xAA:
            return check(INVALID_FIELD_IN_CDB.at(6))
        body = b""
        if cmd.track <= 1:
            body += bytes((0, 0x14, 1, 0)) + address(0)
        body += bytes((0, 0x14, 0xAA, 0)) + address(unit.blocks)
        return answer((len(body) + 2).to_bytes(2, "big") + bytes((1, 1)) + body, cmd.alloc)
    if cmd.format == 1:
        body = bytes((0, 0x14, 1, 0)) + address(0)
        return answer((len(body) + 2).to_bytes(2, "big") + bytes((1, 1)) + body, cmd.alloc)
    return check(INVALID_FIELD_IN_CDB.at(2, 3))

def get_configuration(unit: LogicalUnit, cmd: c.GetConfiguration) -> Reply:
    """GET CONFIGURATION (MMC-6 §6.6): the CD-ROM profile, the core feature."""
    profile = _PROFILE_CDROM if unit.medium else 0
    features = {
        0x0000: bytes((0x00, 0x00, 0x03, 4)) + _PROFILE_CDROM.to_bytes(2, "big")
        + bytes((0x01 if unit.medium else 0, 0)),
        0x0001: bytes((0x00, 0x01, 0x0B, 8)) + (0x00000001).to_bytes(4, "big") + bytes(4),
        0x0003: bytes((0x00, 0x03, 0x03, 4, 0x29, 0, 0, 0)),  # removable medium
    }
    if cmd.rt == 2:
        chosen = [features[cmd.start]] if cmd.start in features else []
    else:
        chosen = [f for n, f in sorted(features.items()) if n >= cmd.start]
    body = bytes(2) + profile.to_bytes(2, "big") + b"".join(chosen)
    return answer((len(body)).to_bytes(4, "big") + body, cmd.alloc)

def get_event_status(unit: LogicalUnit, cmd: c.GetEventStatus) -> Reply:
    """GET EVENT STATUS NOTIFICATION, polled (MMC-6 §6.7): the media class."""
    supported = 0x10
    if not cmd.classes & supported:
        return answer(bytes((0, 2, 0x80, supported)), cmd.alloc)
    event, unit.media_event = unit.media_event, 0
    body = bytes((event, 0x02 if unit.medium else 0x00, 0, 0))
    return answer(bytes((0, 6, 0x04, supported)) + body, cmd.alloc)

def read_disc_info(unit: LogicalUnit, cmd: c.ReadDiscInfo) -> Reply:
    """READ DISC INFORMATION (MMC-6 §6.22): a finalised single-session disc."""
    data = bytearray(34)
    data[0:2] = (32).to_bytes(2, "big")
    data[2] = 0x0E  # last session complete, disc finalised
    data[3] = data[4] = data[5] = data[6] = 1
    data[7] = 0x20  # unrestricted use
    return answer(data, cmd.alloc)
