"""Doing a packet's offloads in software: its checksum, its TCP segmentation.

A switch port offers the checksum and TCP segmentation offloads
(:data:`~.offload.OFFLOAD_FEATURES`), so a guest may hand it one 64 KiB TCP packet with a
partial checksum instead of 45 finished frames.  Where such a packet goes to a receiver
that did not negotiate those offloads (a guest without GUEST_TSO4, a port of another
daemon, the tap uplink), the switch finishes it here first, as the NIC would have:

- NEEDS_CSUM (VIRTIO 1.4 §5.1.9.2): the checksum field at ``csum_start +
  csum_offset`` holds the sum of the pseudo-header; the rest is the one's complement
  of the sum from ``csum_start`` to the end (RFC 1071);
- GSO TCPV4 / TCPV6 (§5.1.9.2, §5.1.6.2): the payload after the TCP header is cut into
  ``gso_size`` pieces, each a frame with copies of the headers: IPv4 total length,
  identification (+1 per segment) and header checksum, IPv6 payload length, TCP
  sequence number (+ offset), FIN and PSH only on the last segment, CWR only on the
  first, and each segment's full TCP checksum.

Pure functions on bytes; the caller has checked the header against the frame
(:func:`~.offload.tx_header_problem`: the checksum position and ``hdr_len`` lie in it).
"""

from __future__ import annotations

from pyvirtio.errors import SegmentError
from pyvirtio.spec.net import ETH_HLEN, GSO_ECN, GsoType, HdrFlag, NetHeader

__all__ = ["MAX_SEGMENTS", "SegmentError", "finish", "internet_checksum"]

#: Most frames one GSO packet may become (a 64 KiB packet at Linux's smallest MSS of
#: 88 bytes makes 745); a ``gso_size`` that would make more is refused.
MAX_SEGMENTS = 1024
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = 0x8100
_IPPROTO_TCP = 6
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80


def _sum16(data: bytes | bytearray | memoryview) -> int:
    """The one's complement sum of ``data`` as 16-bit big-endian words (RFC 1071),
    folded to 16 bits; an odd length is padded with a zero byte.

    The sum of the words of a number modulo 2**16 - 1 is the number modulo
    2**16 - 1 (as with casting out nines), and one big-integer remainder runs in C."""
    value = int.from_bytes(data, "big")
    if len(data) % 2:
        value <<= 8
    folded = value % 0xFFFF
    return 0xFFFF if folded == 0 and value else folded


def internet_checksum(*parts: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of ``parts`` (each of even length but the last)."""
    total = 0
    for part in parts:
        total += _sum16(part)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _l3_offset(frame: bytes) -> tuple[int, int]:
    """The network header's offset and ethertype (after one VLAN tag, if any)."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == _ETH_P_8021Q:
        return ETH_HLEN + 4, int.from_bytes(frame[16:18], "big")
    return ETH_HLEN, ethertype


def finish(header: NetHeader, frame: bytes) -> list[bytes]:
    """The frames ``frame`` becomes once its offloads are done in software.

    A plain header (no NEEDS_CSUM, no GSO) gives ``[frame]``.

    Raises:
        SegmentError: a GSO packet that is not TCP over IPv4/IPv6 as its header
            says, a TCP header outside the frame, or more than
            :data:`MAX_SEGMENTS` segments.
    """
    gso = header.gso_type & ~GSO_ECN
    if gso == GsoType.NONE:
        if not header.flags & HdrFlag.NEEDS_CSUM:
            return [frame]
        start, at = header.csum_start, header.csum_start + header.csum_offset
        out = bytearray(frame)
        checksum = internet_checksum(memoryview(out)[start:])
        if checksum == 0 and header.csum_offset == 6:  # UDP: 0 means "no checksum"
            checksum = 0xFFFF
        out[at : at + 2] = checksum.to_bytes(2, "big")
        return [bytes(out)]
    if gso not in (GsoType.TCPV4, GsoType.TCPV6):
        raise SegmentError(f"gso_type {header.gso_type:#x} is not TCP segmentation")
    return _segment_tcp(header, frame, v4=gso == GsoType.TCPV4)


def _segment_tcp(header: NetHeader, frame: bytes, *, v4: bool) -> list[bytes]:
    """TCP segmentation of one GSO packet (see the module's docstring)."""
    l3, ethertype = _l3_offset(frame)
    if ethertype != (_ETH_P_IP if v4 else _ETH_P_IPV6):
        raise SegmentError(f"a TCPV{4 if v4 else 6} GSO packet with ethertype {ethertype:#06x}")
    l4 = header.csum_start
    if len(frame) < l3 + (20 if v4 else 40):
        raise SegmentError("the frame ends inside its IP header")
    if v4:
        ihl = (frame[l3] & 0x0F) * 4
        if ihl < 20 or l4 != l3 + ihl or frame[l3 + 9] != _IPPROTO_TCP:
            raise SegmentError("the IPv4 header does not lead to the TCP header at csum_start")
    elif l4 < l3 + 40:
        raise SegmentError("the TCP header at csum_start is inside the IPv6 header")
    if l4 + 20 > len(frame):
        raise SegmentError("the TCP header at csum_start lies beyond the frame")
    payload_at = l4 + (frame[l4 + 12] >> 4) * 4
    if payload_at < l4 + 20 or payload_at > len(frame):
        raise SegmentError("the TCP header's data offset lies beyond the frame")
    mss = header.gso_size
    payload = len(frame) - payload_at
    count = max(1, -(-payload // mss))
    if count > MAX_SEGMENTS:
        raise SegmentError(f"gso_size {mss} cuts {payload} bytes into {count} segments "
                           f"(at most {MAX_SEGMENTS})")
    head = bytearray(frame[:payload_at])
    seq = int.from_bytes(head[l4 + 4 : l4 + 8], "big")
    tcp_flags = head[l4 + 13]
    ip_id = int.from_bytes(head[l3 + 4 : l3 + 6], "big") if v4 else 0
    addresses = bytes(head[l3 + 12 : l3 + 20] if v4 else head[l3 + 8 : l3 + 40])
    segments: list[bytes] = []
    for number in range(count):
        offset = number * mss
        data = frame[payload_at + offset : payload_at + min(offset + mss, payload)]
        last = number == count - 1
        seg = bytearray(head)
        seg += data
        if v4:
            seg[l3 + 2 : l3 + 4] = (len(seg) - l3).to_bytes(2, "big")
            seg[l3 + 4 : l3 + 6] = ((ip_id + number) & 0xFFFF).to_bytes(2, "big")
            seg[l3 + 10 : l3 + 12] = b"\0\0"
            seg[l3 + 10 : l3 + 12] = internet_checksum(seg[l3:l4]).to_bytes(2, "big")
        else:
            seg[l3 + 4 : l3 + 6] = (len(seg) - l3 - 40).to_bytes(2, "big")
        seg[l4 + 4 : l4 + 8] = ((seq + offset) & 0xFFFFFFFF).to_bytes(4, "big")
        flags = tcp_flags
        if not last:
            flags &= ~(_TCP_FIN | _TCP_PSH)
        if number:
            flags &= ~_TCP_CWR
        seg[l4 + 13] = flags
        seg[l4 + 16 : l4 + 18] = b"\0\0"
        tcp_len = len(seg) - l4
        pseudo = (addresses + bytes((0, _IPPROTO_TCP)) + tcp_len.to_bytes(2, "big") if v4
                  else addresses + tcp_len.to_bytes(4, "big") + bytes((0, 0, 0, _IPPROTO_TCP)))
        checksum = internet_checksum(pseudo, memoryview(seg)[l4:])
        seg[l4 + 16 : l4 + 18] = checksum.to_bytes(2, "big")
        segments.append(bytes(seg))
    return segments
