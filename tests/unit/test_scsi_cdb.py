"""The CDB decoder and sense data (SPC-5 §4.2, §4.4; SBC-4; MMC-6), with property tests.

Properties: any bytes decode to a command or to the sense data that rejects them (never
an exception); every field of READ/WRITE(6/10/12/16), UNMAP, WRITE SAME and INQUIRY
round-trips from bytes the tests build; a CDB shorter than its group's length is an
invalid opcode; NACA is refused; sense data round-trips through both formats.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.devices.scsi import cdb as c
from pyvirtio.devices.scsi.sense import (
    FIXED_SENSE_LEN,
    INVALID_FIELD_IN_CDB,
    INVALID_OPCODE,
    LBA_OUT_OF_RANGE,
    WRITE_PROTECTED,
    Sense,
    SenseKey,
)

GROUP_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


@given(st.binary(max_size=40))
def test_any_bytes_decode_to_a_command_or_sense_never_an_exception(raw: bytes) -> None:
    result = c.decode_cdb(raw)
    assert isinstance(result, (Sense, *c.Command.__args__))
    if not isinstance(result, Sense):
        length = GROUP_LENGTH[raw[0] >> 5]
        assert len(raw) >= length
        assert not raw[length - 1] & 0x04  # NACA set never decodes


@given(st.integers(0, 255), st.binary(min_size=0, max_size=15))
def test_a_cdb_shorter_than_its_group_length_is_an_invalid_opcode(opcode: int, rest: bytes) -> None:
    raw = bytes((opcode,)) + rest
    length = c.cdb_length(opcode)
    if length is None or len(raw) < length:
        assert c.decode_cdb(raw) == INVALID_OPCODE


@given(st.sampled_from([op for op, _ in c.COMMANDS]))
def test_naca_in_the_control_byte_is_an_invalid_field(opcode: int) -> None:
    length = GROUP_LENGTH[opcode >> 5]
    raw = bytearray(length)
    raw[0] = opcode
    raw[-1] = 0x04
    assert c.decode_cdb(bytes(raw)) == INVALID_FIELD_IN_CDB.at(length - 1, 2)


@given(st.integers(0, (1 << 32) - 1), st.integers(0, 0xFFFF), st.booleans(), st.booleans())
def test_read_write_10_fields_round_trip(lba: int, blocks: int, write: bool, fua: bool) -> None:
    op = c.Opcode.WRITE_10 if write else c.Opcode.READ_10
    raw = bytes((op, 0x08 if fua else 0)) + lba.to_bytes(4, "big") + b"\0" \
        + blocks.to_bytes(2, "big") + b"\0"
    assert c.decode_cdb(raw) == c.ReadWrite(write, lba, blocks, fua, op)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.booleans())
def test_read_write_16_fields_round_trip(lba: int, blocks: int, write: bool) -> None:
    op = c.Opcode.WRITE_16 if write else c.Opcode.READ_16
    raw = bytes((op, 0)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"
    assert c.decode_cdb(raw + bytes(16)) == c.ReadWrite(write, lba, blocks, False, op)


@given(st.integers(0, (1 << 21) - 1), st.integers(0, 255))
def test_read_6_zero_blocks_means_256(lba: int, blocks: int) -> None:
    raw = bytes((c.Opcode.READ_6,)) + lba.to_bytes(3, "big") + bytes((blocks, 0))
    decoded = c.decode_cdb(raw)
    assert isinstance(decoded, c.ReadWrite)
    assert (decoded.lba, decoded.blocks) == (lba, blocks or 256)


@given(st.integers(1, 7))
def test_protection_fields_are_refused(protect: int) -> None:
    raw = bytes((c.Opcode.READ_10, protect << 5)) + bytes(8)
    assert c.decode_cdb(raw) == INVALID_FIELD_IN_CDB.at(1, 7)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.booleans(),
       st.booleans())
def test_write_same_16_fields_round_trip(lba: int, blocks: int, unmap: bool, ndob: bool) -> None:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    raw = bytes((c.Opcode.WRITE_SAME_16, flags)) + lba.to_bytes(8, "big") \
        + blocks.to_bytes(4, "big") + b"\0\0"
    assert c.decode_cdb(raw) == c.WriteSame(lba, blocks, unmap, ndob, False)


@given(st.booleans(), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_inquiry_fields_round_trip_and_a_page_without_evpd_is_refused(
    evpd: bool, page: int, alloc: int
) -> None:
    raw = bytes((c.Opcode.INQUIRY, int(evpd), page)) + alloc.to_bytes(2, "big") + b"\0"
    decoded = c.decode_cdb(raw)
    if not evpd and page:
        assert decoded == INVALID_FIELD_IN_CDB.at(2)
    else:
        assert decoded == c.Inquiry(evpd, page, alloc)


def test_service_actions_pick_the_command() -> None:
    rc16 = bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
    assert c.decode_cdb(rc16) == c.ReadCapacity(True, 32)
    assert c.decode_cdb(bytes((0x9E, 0x11)) + bytes(14)) == INVALID_FIELD_IN_CDB.at(1, 4)
    rsoc = bytes((0xA3, 0x0C, 0x01, 0x93, 0, 0)) + (512).to_bytes(4, "big") + b"\0\0"
    assert c.decode_cdb(rsoc) == c.ReportOpcodes(1, 0x93, 0, False, 512)


def test_report_luns_allocation_below_16_is_refused() -> None:
    assert c.decode_cdb(bytes((0xA0, 0, 0, 0, 0, 0)) + (8).to_bytes(4, "big") + b"\0\0") \
        == INVALID_FIELD_IN_CDB.at(6)


def test_read_toc_takes_the_format_from_the_control_byte_as_linux_sends_it() -> None:
    # sr's session query: READ TOC with the (SFF-8020) format 1 in bits 6-7 of byte 9.
    raw = bytes((0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40))
    assert c.decode_cdb(raw) == c.ReadToc(False, 1, 0, 12)


def test_unknown_opcodes_are_invalid_opcode() -> None:
    assert c.decode_cdb(bytes((0x85,)) + bytes(15)) == INVALID_OPCODE  # ATA PASS-THROUGH(16)
    assert c.decode_cdb(b"") == INVALID_OPCODE


@given(st.sampled_from(list(SenseKey)), st.integers(0, 255), st.integers(0, 255),
       st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_sense_data_round_trips_in_both_formats(key: SenseKey, asc: int, ascq: int,
                                                field: int | None) -> None:
    sense = Sense(key, asc, ascq, field)
    fixed = sense.fixed()
    assert len(fixed) == FIXED_SENSE_LEN and fixed[0] == 0x70 and fixed[7] == 10
    assert Sense.parse(fixed) == Sense(key, asc, ascq)
    descriptor = sense.descriptor()
    assert descriptor[0] == 0x72 and descriptor[7] == len(descriptor) - 8
    assert Sense.parse(descriptor) == Sense(key, asc, ascq)
    if field is not None:
        assert fixed[15] & 0x80 and int.from_bytes(fixed[16:18], "big") == field


def test_standard_sense_codes() -> None:
    assert (LBA_OUT_OF_RANGE.key, LBA_OUT_OF_RANGE.asc) == (SenseKey.ILLEGAL_REQUEST, 0x21)
    assert (WRITE_PROTECTED.key, WRITE_PROTECTED.asc) == (SenseKey.DATA_PROTECT, 0x27)
