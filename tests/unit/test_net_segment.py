"""Offloads done in software (:mod:`pyvirtio.devices.net.segment`), checked against a
plain RFC 1071 sum written here."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.devices.net.segment import MAX_SEGMENTS, SegmentError, finish, internet_checksum
from pyvirtio.spec.net import GSO_ECN, GsoType, HdrFlag, NetHeader
from pyvirtio.testing.packets import ones_complement_sum as _sum

ETH = bytes(6) + bytes(range(1, 7))


@given(st.binary(max_size=3000))
def test_internet_checksum_is_rfc_1071(data: bytes) -> None:
    assert internet_checksum(data) == ~_sum(data) & 0xFFFF


def _tcp(payload: bytes, *, v6: bool = False, vlan: bool = False, flags: int = 0x19
         ) -> tuple[NetHeader, bytes, int]:
    """A GSO TCP packet as Linux hands it over; its network header's offset."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 0xFFFFFF00, 9, 5 << 4, flags, 100, 0, 0))
    if v6:
        src, dst = bytes(range(16)), bytes(range(16, 32))
        l3hdr = struct.pack("!IHBB", 6 << 28, 20 + len(payload), 6, 64) + src + dst
        pseudo = src + dst + (20 + len(payload)).to_bytes(4, "big") + bytes((0, 0, 0, 6))
        ethertype = b"\x86\xdd"
    else:
        l3hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0xFFFF, 0, 64, 6, 0,
                            b"\x0a\0\0\1", b"\x0a\0\0\2")
        pseudo = l3hdr[12:20] + bytes((0, 6)) + (20 + len(payload)).to_bytes(2, "big")
        ethertype = b"\x08\x00"
    tcp[16:18] = _sum(pseudo).to_bytes(2, "big")
    l2 = ETH + (b"\x81\x00\x00\x05" if vlan else b"") + ethertype
    l4 = len(l2) + len(l3hdr)
    header = NetHeader(flags=HdrFlag.NEEDS_CSUM,
                       gso_type=(GsoType.TCPV6 if v6 else GsoType.TCPV4) | GSO_ECN,
                       hdr_len=l4 + 20, gso_size=1000, csum_start=l4, csum_offset=16)
    return header, l2 + l3hdr + bytes(tcp) + payload, len(l2)


@pytest.mark.parametrize(("v6", "vlan"), [(False, False), (True, False), (False, True)])
def test_tcp_segmentation_gives_valid_frames(v6: bool, vlan: bool) -> None:
    payload = os.urandom(4500)
    header, frame, l3 = _tcp(payload, v6=v6, vlan=vlan, flags=0x80 | 0x19)
    segments = finish(header, frame)
    assert len(segments) == 5
    l4 = header.csum_start
    got = b""
    for number, seg in enumerate(segments):
        assert seg[:l4] != b"" and len(seg) == l4 + 20 + min(1000, 4500 - number * 1000)
        if v6:
            assert int.from_bytes(seg[l3 + 4 : l3 + 6], "big") == len(seg) - l3 - 40
            pseudo = seg[l3 + 8 : l3 + 40] + (len(seg) - l4).to_bytes(4, "big") + b"\0\0\0\6"
        else:
            assert _sum(seg[l3:l4]) == 0xFFFF
            assert int.from_bytes(seg[l3 + 2 : l3 + 4], "big") == len(seg) - l3
            assert int.from_bytes(seg[l3 + 4 : l3 + 6], "big") == (0xFFFF + number) & 0xFFFF
            pseudo = seg[l3 + 12 : l3 + 20] + b"\0\6" + (len(seg) - l4).to_bytes(2, "big")
        assert _sum(pseudo + seg[l4:]) == 0xFFFF
        # The sequence number wraps; CWR on the first only, FIN and PSH on the last only.
        assert int.from_bytes(seg[l4 + 4 : l4 + 8], "big") == (0xFFFFFF00 + number * 1000
                                                                ) & 0xFFFFFFFF
        assert bool(seg[l4 + 13] & 0x80) == (number == 0)
        assert bool(seg[l4 + 13] & 0x09) == (number == 4)
        got += seg[l4 + 20 :]
    assert got == payload


def test_partial_checksum_is_completed() -> None:
    _, frame, _ = _tcp(os.urandom(777))
    plain = NetHeader(flags=HdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=16)
    (done,) = finish(plain, frame)
    pseudo = done[26:34] + b"\0\6" + (len(done) - 34).to_bytes(2, "big")
    assert _sum(pseudo + done[34:]) == 0xFFFF
    assert done[:50] == frame[:50] and done[52:] == frame[52:]
    assert finish(NetHeader(), frame) == [frame]


def test_udp_checksum_zero_is_sent_as_ffff() -> None:
    # A UDP datagram whose sum is 0xFFFF: the checksum 0 means "none", so 0xFFFF is sent.
    frame = ETH + b"\x08\x00" + bytes(20) + b"\xff\xff" + bytes(6)
    (done,) = finish(NetHeader(flags=HdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=6), frame)
    assert done[40:42] == b"\xff\xff"


def test_what_cannot_be_segmented_is_refused() -> None:
    header, frame, _ = _tcp(os.urandom(3000))
    with pytest.raises(SegmentError, match="ethertype"):
        finish(NetHeader(flags=1, gso_type=GsoType.TCPV6, gso_size=1000, csum_start=34,
                         csum_offset=16), frame)
    with pytest.raises(SegmentError, match="not TCP"):
        finish(NetHeader(flags=1, gso_type=GsoType.UDP, gso_size=1000, csum_start=34,
                         csum_offset=16), frame)
    with pytest.raises(SegmentError, match="csum_start"):
        finish(NetHeader(flags=1, gso_type=GsoType.TCPV4, gso_size=1000, csum_start=30,
                         csum_offset=16), frame)
    with pytest.raises(SegmentError, match=f"at most {MAX_SEGMENTS}"):
        finish(NetHeader(flags=1, gso_type=GsoType.TCPV4, gso_size=1, csum_start=34,
                         csum_offset=16), frame)
    with pytest.raises(SegmentError, match="beyond the frame"):
        finish(header, frame[:40])


@given(st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84]),
                 st.integers(0, 3000), st.integers(0, 120), st.integers(0, 40)),
       st.binary(max_size=400))
def test_any_header_gives_frames_or_a_segment_error(
    fields: tuple[int, int, int, int, int], tail: bytes,
) -> None:
    """Headers the device let through (the checksum field inside the frame) on frames
    of any content: finished frames or SegmentError, nothing else."""
    flags, gso_type, gso_size, csum_start, csum_offset = fields
    _, frame, _ = _tcp(tail)
    for data in (frame, frame[:60], ETH + b"\x08\x00" + tail, ETH + b"\x86\xdd" + tail):
        if csum_start + csum_offset + 2 > len(data):
            continue
        h = NetHeader(flags=flags, gso_type=gso_type, gso_size=gso_size or 1,
                      csum_start=csum_start, csum_offset=csum_offset)
        try:
            out = finish(h, data)
        except SegmentError:
            continue
        assert all(isinstance(f, bytes) for f in out) and out
