"""The sans-I/O SCSI target: every command's answer, in memory (SPC-5, SBC-4, MMC-6)."""

from __future__ import annotations

import pytest

from pyvirtio.devices.scsi.sense import (
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    LUN_NOT_SUPPORTED,
    MEDIUM_NOT_PRESENT,
    POWER_ON_RESET,
    WRITE_PROTECTED,
    Sense,
    SenseKey,
    Status,
)
from pyvirtio.devices.scsi.target import Io, LogicalUnit, Reply, ScsiTarget

TiB = 1 << 40


def _target() -> ScsiTarget:
    return ScsiTarget({
        0: LogicalUnit("disk", blocks=(64 << 20) // 512, block_size=512, serial="s0"),
        1: LogicalUnit("disk", blocks=3 * TiB // 512, block_size=512, serial="s1"),
        2: LogicalUnit("cdrom", blocks=100, block_size=2048, readonly=True, serial="cd"),
        5: LogicalUnit("disk", blocks=2048, block_size=512, readonly=True, serial="ro"),
    })


def _no_params(n: int) -> bytes:
    raise AssertionError("no parameter list expected")


def _run(target: ScsiTarget, lun: int, cdb: bytes, params: bytes = b"") -> Reply | Io:
    data = bytearray(params)

    def read(n: int) -> bytes:
        taken = bytes(data[:n])
        del data[:n]
        return taken

    return target.execute(lun, cdb.ljust(16, b"\0"), read if params else _no_params)


def _reply(target: ScsiTarget, lun: int, cdb: bytes, params: bytes = b"") -> Reply:
    answer = _run(target, lun, cdb, params)
    assert isinstance(answer, Reply), answer
    return answer


def _check(answer: Reply | Io) -> Sense:
    assert isinstance(answer, Reply) and answer.status == Status.CHECK_CONDITION, answer
    assert answer.sense is not None
    return answer.sense


def test_inquiry_standard_data_for_a_disk_and_a_cdrom() -> None:
    t = _target()
    disk = _reply(t, 0, bytes((0x12, 0, 0, 0, 96))).data
    assert disk[0] == 0x00 and disk[1] == 0 and disk[2] == 6 and disk[7] & 0x02
    assert disk[8:16] == b"PYVIRTIO" and disk[16:27] == b"VIRTIO DISK"
    cd = _reply(t, 2, bytes((0x12, 0, 0, 0, 36))).data
    assert cd[0] == 0x05 and cd[1] == 0x80  # CD-ROM, removable


def test_a_missing_lun_answers_inquiry_with_qualifier_3_and_everything_else_not_supported() -> None:
    t = _target()
    assert _reply(t, 9, bytes((0x12, 0, 0, 0, 36))).data[0] == 0x7F
    assert _check(_run(t, 9, bytes(6))) == LUN_NOT_SUPPORTED
    sense = Sense.parse(_reply(t, 9, bytes((0x03, 0, 0, 0, 18))).data)
    assert sense == Sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0)


def test_vpd_pages_list_serial_identification_and_block_limits() -> None:
    t = _target()
    pages = _reply(t, 0, bytes((0x12, 1, 0x00, 0, 64))).data
    assert list(pages[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert _reply(t, 0, bytes((0x12, 1, 0x80, 0, 64))).data[4:] == b"s0"
    ident = _reply(t, 0, bytes((0x12, 1, 0x83, 0, 64))).data
    assert ident[4:8] == bytes((0x02, 0x01, 0x00, 10)) and ident[8:] == b"PYVIRTIOs0"
    limits = _reply(t, 0, bytes((0x12, 1, 0xB0, 0, 64))).data
    assert int.from_bytes(limits[24:28], "big") == 256  # unmap descriptors
    provisioning = _reply(t, 0, bytes((0x12, 1, 0xB2, 0, 8))).data
    assert provisioning[5] & 0xC0 == 0xC0  # LBPU, LBPWS
    cd_pages = _reply(t, 2, bytes((0x12, 1, 0x00, 0, 64))).data
    assert list(cd_pages[4:]) == [0x00, 0x80, 0x83]
    assert _check(_run(t, 2, bytes((0x12, 1, 0xB0, 0, 64)))) == INVALID_FIELD_IN_CDB.at(2)


def test_report_luns_lists_every_lun() -> None:
    data = _reply(_target(), 7, bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0))).data
    assert int.from_bytes(data[:4], "big") == 32
    assert [data[8 + 8 * i + 1] for i in range(4)] == [0, 1, 2, 5]


def test_read_capacity_of_a_3_tib_disk_needs_the_16_byte_form() -> None:
    t = _target()
    rc10 = _reply(t, 1, bytes((0x25,)) + bytes(9)).data
    assert rc10 == bytes((0xFF,) * 4) + (512).to_bytes(4, "big")
    rc16 = _reply(t, 1, bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big")).data
    assert int.from_bytes(rc16[:8], "big") == 3 * TiB // 512 - 1
    assert rc16[14] & 0xC0 == 0xC0  # LBPME, LBPRZ


def test_reads_and_writes_become_io_with_byte_offsets_and_are_range_checked() -> None:
    t = _target()
    lba = 3 * TiB // 512 - 8
    read16 = bytes((0x88, 0)) + lba.to_bytes(8, "big") + (8).to_bytes(4, "big")
    assert _run(t, 1, read16) == Io("read", lba * 512, 4096)
    past = bytes((0x88, 0)) + (lba + 1).to_bytes(8, "big") + (8).to_bytes(4, "big")
    assert _check(_run(t, 1, past)) == LBA_OUT_OF_RANGE
    write10 = bytes((0x2A, 0x08)) + (4).to_bytes(4, "big") + b"\0" + (2).to_bytes(2, "big")
    assert _run(t, 0, write10) == Io("write", 2048, 1024, durable=True)  # FUA
    assert _check(_run(t, 5, write10)) == WRITE_PROTECTED
    assert _check(_run(t, 2, write10)).asc == 0x20  # no WRITE on a CD-ROM


def test_mode_sense_reports_write_cache_and_write_protect_and_mode_select_changes_wce() -> None:
    t = _target()
    caching = _reply(t, 0, bytes((0x1A, 0x08, 0x08, 0, 64))).data
    assert caching[3] == 0 and caching[4] == 0x08 and caching[6] & 0x04  # WCE
    assert not caching[2] & 0x80
    assert _reply(t, 5, bytes((0x1A, 0x08, 0x3F, 0, 255))).data[2] & 0x80  # WP
    page = bytearray(caching[4:])
    page[2] &= ~0x04
    select = bytes((0x15, 0x10, 0, 0, 4 + len(page)))
    assert _reply(t, 0, select, bytes(4) + bytes(page)).status == Status.GOOD
    assert t.units[0].wce is False
    assert not _reply(t, 0, bytes((0x1A, 0x08, 0x08, 0, 64))).data[6] & 0x04
    write = bytes((0x2A, 0)) + bytes(4) + b"\0" + (1).to_bytes(2, "big")
    assert _run(t, 0, write) == Io("write", 0, 512, durable=True)  # write-through
    assert _check(_run(t, 0, bytes((0x1A, 0, 0xC8, 0, 64)))).asc == 0x39  # saved values


def test_unmap_parameter_list_becomes_discard_ranges() -> None:
    t = _target()
    descriptors = (8).to_bytes(8, "big") + (16).to_bytes(4, "big") + bytes(4)
    descriptors += (100).to_bytes(8, "big") + (1).to_bytes(4, "big") + bytes(4)
    params = (6 + 32).to_bytes(2, "big") + (32).to_bytes(2, "big") + bytes(4) + descriptors
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + len(params).to_bytes(2, "big") + b"\0"
    assert _run(t, 0, cdb, params) == Io("discard", ranges=((4096, 8192), (51200, 512)))
    bad = (6 + 16).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4) \
        + (131071).to_bytes(8, "big") + (2).to_bytes(4, "big") + bytes(4)
    cdb = bytes((0x42, 0, 0, 0, 0, 0, 0)) + len(bad).to_bytes(2, "big") + b"\0"
    assert _check(_run(t, 0, cdb, bad)) == LBA_OUT_OF_RANGE
    assert _check(_run(t, 5, cdb, bad)) == WRITE_PROTECTED


def test_write_same_zeroes_with_unmap_discard_and_a_pattern_fills() -> None:
    t = _target()
    cdb = bytes((0x93, 0x08)) + (16).to_bytes(8, "big") + (8).to_bytes(4, "big") + b"\0\0"
    assert _run(t, 0, cdb, bytes(512)) == Io("discard", ranges=((8192, 4096),))
    pattern = b"\xab" * 512
    assert _run(t, 0, cdb, pattern) == Io("fill", ranges=((8192, 4096),), pattern=pattern)
    zero_blocks = bytes((0x93, 0x08)) + (16).to_bytes(8, "big") + bytes(6)
    assert _check(_run(t, 0, zero_blocks)).asc == 0x24


def test_report_supported_operation_codes_one_command() -> None:
    t = _target()
    ws16 = _reply(t, 0, bytes((0xA3, 0x0C, 0x01, 0x93, 0, 0, 0, 0, 2, 0, 0, 0))).data
    assert ws16[1] & 0x07 == 0x03 and int.from_bytes(ws16[2:4], "big") == 16
    absent = _reply(t, 0, bytes((0xA3, 0x0C, 0x01, 0x85, 0, 0, 0, 0, 2, 0, 0, 0))).data
    assert absent[1] & 0x07 == 0x01
    listing = _reply(t, 0, bytes((0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0))).data
    assert int.from_bytes(listing[:4], "big") % 8 == 0 and len(listing) > 100


def test_cdrom_toc_configuration_events_disc_information_and_eject() -> None:
    t = _target()
    toc = _reply(t, 2, bytes((0x43, 0, 0, 0, 0, 0, 1, 0, 12, 0))).data
    assert toc[2:4] == b"\x01\x01" and toc[5] == 0x14 and toc[6] == 1
    msf = _reply(t, 2, bytes((0x43, 0x02, 0, 0, 0, 0, 0xAA, 0, 12, 0))).data
    assert msf[6] == 0xAA and tuple(msf[9:12]) == ((100 + 150) // 4500, (250 // 75) % 60, 25)
    config = _reply(t, 2, bytes((0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0))).data
    assert int.from_bytes(config[6:8], "big") == 0x0008
    event = _reply(t, 2, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0))).data
    assert event[2] == 0x04 and event[5] == 0x02  # media class, medium present
    info = _reply(t, 2, bytes((0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0))).data
    assert info[2] == 0x0E
    assert _reply(t, 2, bytes((0x1B, 0, 0, 0, 0x02, 0))).status == Status.GOOD  # eject
    assert _check(_run(t, 2, bytes(6))) == MEDIUM_NOT_PRESENT
    assert _reply(t, 2, bytes((0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8, 0))).data[4] == 0x03
    assert _reply(t, 2, bytes((0x1B, 0, 0, 0, 0x03, 0))).status == Status.GOOD  # load
    assert _reply(t, 2, bytes(6)).status == Status.GOOD


def test_prevent_medium_removal_refuses_an_eject() -> None:
    t = _target()
    assert _reply(t, 2, bytes((0x1E, 0, 0, 0, 1, 0))).status == Status.GOOD
    assert _check(_run(t, 2, bytes((0x1B, 0, 0, 0, 0x02, 0)))).asc == 0x53


def test_a_unit_attention_is_reported_once_and_request_sense_clears_it() -> None:
    t = _target()
    t.units[0].unit_attention = POWER_ON_RESET
    assert _reply(t, 0, bytes((0x12, 0, 0, 0, 36))).status == Status.GOOD  # INQUIRY is exempt
    assert _check(_run(t, 0, bytes(6))) == POWER_ON_RESET
    assert _reply(t, 0, bytes(6)).status == Status.GOOD
    t.units[0].unit_attention = POWER_ON_RESET
    assert Sense.parse(_reply(t, 0, bytes((0x03, 1, 0, 0, 64))).data) == Sense(
        SenseKey.UNIT_ATTENTION, 0x29, 0)
    assert _reply(t, 0, bytes(6)).status == Status.GOOD


@pytest.mark.parametrize("cdb", [
    bytes((0xFF,)) + bytes(15),
    bytes((0x12, 0x02)) + bytes(4),  # CMDDT
    bytes((0x2F, 0x02)) + bytes(8),  # VERIFY with BYTCHK
    bytes((0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0)),  # asynchronous GESN
])
def test_commands_not_served_answer_illegal_request(cdb: bytes) -> None:
    assert _check(_run(_target(), 2 if cdb[0] == 0x4A else 0, cdb)).key == SenseKey.ILLEGAL_REQUEST
