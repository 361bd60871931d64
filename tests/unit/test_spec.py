"""Wire structures against the specifications: sizes, offsets, round trips, feature names."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.memory import RegionSpec
from pyvirtio.spec import virtqueue as vq
from pyvirtio.spec.blk import (
    CONFIG,
    CONFIG_SIZE,
    DISCARD_SEGMENT,
    REQUEST_HEADER,
    WRITEBACK_OFFSET,
    BlkConfig,
    BlkFeature,
)
from pyvirtio.spec.common import Feature, feature_names
from pyvirtio.vhost_user import protocol

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


# -- VIRTIO 1.4 §2.7 split virtqueue ----------------------------------------------------------


def test_virtq_desc_is_16_bytes_per_spec_2_7_5() -> None:
    assert vq.DESC.size == vq.DESC_SIZE == 16


def test_virtq_used_elem_is_8_bytes_per_spec_2_7_8() -> None:
    assert vq.USED_ELEM.size == vq.USED_ELEM_SIZE == 8


def test_ring_part_sizes_follow_queue_part_sizes_table() -> None:
    # VIRTIO 1.4 §2.7 "Queue Part Sizes": 16*N, 6 + 2*N, 6 + 8*N.
    for n in (1, 2, 256, vq.MAX_QUEUE_SIZE):
        assert vq.desc_table_size(n) == 16 * n
        assert vq.avail_ring_size(n) == 6 + 2 * n
        assert vq.used_ring_size(n) == 6 + 8 * n


def test_virtqueue_wire_structs_are_little_endian() -> None:
    # §2.7: modern rings are little-endian regardless of the host.
    assert vq.DESC.pack(1, 2, 3, 4) == bytes.fromhex("01000000000000000200000003000400")
    assert vq.USED_ELEM.pack(0x01020304, 5) == bytes.fromhex("0403020105000000")
    assert vq.U16.pack(0x1234) == b"\x34\x12"


def test_virtqueue_flag_values_match_spec() -> None:
    assert (vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE, vq.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert vq.VIRTQ_AVAIL_F_NO_INTERRUPT == 1
    assert vq.VIRTQ_USED_F_NO_NOTIFY == 1


@settings(max_examples=50, deadline=None)
@given(addr=u64, length=u32, flags=u16, next_=u16)
def test_virtq_desc_round_trips(addr: int, length: int, flags: int, next_: int) -> None:
    assert vq.DESC.unpack(vq.DESC.pack(addr, length, flags, next_)) == (addr, length, flags, next_)


# -- VIRTIO 1.4 §5.2 block device -------------------------------------------------------------


def test_blk_request_header_is_16_bytes_type_reserved_sector() -> None:
    assert REQUEST_HEADER.size == 16
    raw = REQUEST_HEADER.pack(1, 0, 0x0102030405060708)
    assert raw[0:4] == b"\x01\0\0\0"
    assert raw[8:16] == bytes.fromhex("0807060504030201")


def test_blk_discard_segment_is_16_bytes_sector_num_flags() -> None:
    assert DISCARD_SEGMENT.size == 16
    raw = DISCARD_SEGMENT.pack(7, 9, 1)
    assert struct.unpack_from("<Q", raw, 0)[0] == 7
    assert struct.unpack_from("<I", raw, 8)[0] == 9
    assert struct.unpack_from("<I", raw, 12)[0] == 1


def test_blk_config_is_96_bytes() -> None:
    assert CONFIG.size == CONFIG_SIZE == 96


def _config_with_distinct_values() -> bytes:
    return BlkConfig(
        capacity=0x1122334455667788,
        size_max=0xA1A1A1A1,
        seg_max=0xB2B2B2B2,
        blk_size=0xC3C3C3C3,
        num_queues=0xD4D4,
        max_discard_sectors=0xE5E5E5E5,
        max_discard_seg=0xF6F6F6F6,
        discard_sector_alignment=0x17171717,
        max_write_zeroes_sectors=0x28282828,
        max_write_zeroes_seg=0x39393939,
        write_zeroes_may_unmap=True,
        writeback=True,
    ).pack()


@pytest.mark.parametrize(
    ("field", "offset", "fmt", "value"),
    [
        ("capacity", 0, "<Q", 0x1122334455667788),
        ("size_max", 8, "<I", 0xA1A1A1A1),
        ("seg_max", 12, "<I", 0xB2B2B2B2),
        ("blk_size", 20, "<I", 0xC3C3C3C3),
        ("writeback", 32, "<B", 1),
        ("num_queues", 34, "<H", 0xD4D4),
        ("max_discard_sectors", 36, "<I", 0xE5E5E5E5),
        ("max_discard_seg", 40, "<I", 0xF6F6F6F6),
        ("discard_sector_alignment", 44, "<I", 0x17171717),
        ("max_write_zeroes_sectors", 48, "<I", 0x28282828),
        ("max_write_zeroes_seg", 52, "<I", 0x39393939),
        ("write_zeroes_may_unmap", 56, "<B", 1),
    ],
)
def test_blk_config_field_is_at_spec_offset(field: str, offset: int, fmt: str, value: int) -> None:
    """VIRTIO 1.4 §5.2.4 struct virtio_blk_config layout."""
    raw = _config_with_distinct_values()
    assert struct.unpack_from(fmt, raw, offset)[0] == value, field


def test_blk_config_fields_pyvirtio_does_not_fill_are_zero() -> None:
    raw = _config_with_distinct_values()
    # geometry 16..19, topology 24..31, unused0 33, unused1 57..59, secure erase and zoned 60..95
    for start, end in ((16, 20), (24, 32), (33, 34), (57, 96)):
        assert raw[start:end] == bytes(end - start), (start, end)


def test_blk_writeback_offset_matches_config_layout() -> None:
    assert WRITEBACK_OFFSET == 32


# -- vhost-user (vhost-user.rst "Message Specification") --------------------------------------


def test_vhost_user_header_is_12_bytes() -> None:
    assert protocol.HEADER.size == 12


def test_vring_address_description_is_40_bytes_desc_used_avail_order() -> None:
    assert protocol.VRING_ADDR.size == 40
    raw = protocol.encode_vring_addr(
        protocol.VringAddr(
            index=1,
            flags=2,
            desc_user_addr=0xD,
            used_user_addr=0xE,
            avail_user_addr=0xA,
            log_guest_addr=0xF,
        )
    )
    assert struct.unpack("=IIQQQQ", raw) == (1, 2, 0xD, 0xE, 0xA, 0xF)


def test_memory_region_description_is_32_bytes() -> None:
    assert protocol.REGION.size == 32


def test_single_memory_region_payload_is_40_bytes_padding_then_region() -> None:
    raw = protocol.encode_region(RegionSpec(0x1000, 0x2000, 0x3000, 0x4000))
    assert len(raw) == 40
    assert raw[:8] == bytes(8)
    assert struct.unpack("=QQQQ", raw[8:]) == (0x1000, 0x2000, 0x3000, 0x4000)


def test_vring_state_is_8_bytes_and_u64_payload_is_8_bytes() -> None:
    assert protocol.VRING_STATE.size == 8
    assert protocol.U64.size == 8


# -- feature names ----------------------------------------------------------------------------


def test_feature_names_prefer_device_names_then_reserved_then_bit_numbers() -> None:
    bits = (
        (1 << BlkFeature.FLUSH)
        | (1 << Feature.INDIRECT_DESC)
        | (1 << 30)
        | (1 << Feature.VERSION_1)
        | (1 << 50)
    )
    assert feature_names(bits, BlkFeature) == [
        "FLUSH",
        "INDIRECT_DESC",
        "bit30",
        "VERSION_1",
        "bit50",
    ]


def test_feature_names_without_device_enum_number_device_bits() -> None:
    assert feature_names((1 << 9) | (1 << Feature.EVENT_IDX)) == ["bit9", "EVENT_IDX"]


def test_feature_names_of_zero_is_empty() -> None:
    assert feature_names(0, BlkFeature) == []


@settings(max_examples=50, deadline=None)
@given(bits=u64)
def test_feature_names_names_every_set_bit_once(bits: int) -> None:
    assert len(feature_names(bits, BlkFeature)) == bits.bit_count()
