"""virtio-net's offloads: what a ``virtio_net_hdr`` may ask for, each way (§5.1.9.2-4)."""

from __future__ import annotations

from pyvirtio.spec.net import ETH_HLEN, GSO_ECN, VLAN_HLEN, GsoType, HdrFlag, NetFeature, NetHeader

__all__ = ["GSO_MAX_FRAME", "OFFLOAD_FEATURES", "rx_header_problem", "tx_header_problem"]

#: The longest GSO packet in either direction: VIRTIO 1.4 §5.1.9.3's 65589 bytes (an
#: Ethernet header, a 40-byte IPv6 header, 65535 bytes of payload) plus a VLAN tag.
GSO_MAX_FRAME = ETH_HLEN + 40 + 65535 + VLAN_HLEN
#: The offload features offered with an :class:`~.common.OffloadBackend` (§5.1.3, §5.1.9.2-4):
#: checksum offload both ways, TCP segmentation both ways, with ECN.  No UFO/USO.
OFFLOAD_FEATURES = (
    NetFeature.CSUM, NetFeature.GUEST_CSUM,
    NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN,
    NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN,
)


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


def tx_header_problem(
    header: NetHeader, length: int, features: int, *, max_frame: int, offloads: bool
) -> tuple[str, str] | None:
    """Why a transmitted header and its ``length``-byte frame must be dropped, or None.

    VIRTIO 1.4 §5.1.9.2.1: without CSUM the driver MUST set ``flags`` to zero;
    it never sets DATA_VALID or RSC_INFO on transmit; it MUST NOT use a
    ``gso_type`` whose HOST_* feature was not negotiated, and with a
    ``gso_type`` it MUST set NEEDS_CSUM and ``gso_size`` (the MSS).  Without
    ``offloads`` (a back end that cannot carry them) nothing of that was
    offered.  Beyond the spec: the checksum position and ``hdr_len`` must lie
    inside the frame, and a frame must be 14..``max_frame`` bytes (GSO:
    :data:`GSO_MAX_FRAME`).

    Returns:
        ``(reason, detail)``: the drop counter's name and what was wrong.
    """
    flags, gso_type = header.flags, header.gso_type
    csum = offloads and _has(features, NetFeature.CSUM)
    allowed = HdrFlag.NEEDS_CSUM if csum else 0
    if flags & ~allowed:
        return ("malformed header", f"flags {flags:#x}, but only {allowed:#x} are allowed "
                "here (VIRTIO 1.4 §5.1.9.2.1)")
    if gso_type != GsoType.NONE:
        permitted = set()
        if offloads and _has(features, NetFeature.HOST_TSO4):
            permitted.add(GsoType.TCPV4)
        if offloads and _has(features, NetFeature.HOST_TSO6):
            permitted.add(GsoType.TCPV6)
        if not permitted:
            return ("malformed header", f"gso_type {gso_type:#x}, but no segmentation "
                    "offload was negotiated (VIRTIO 1.4 §5.1.9.2.1)")
        if gso_type & ~GSO_ECN not in permitted:
            return ("malformed header", f"gso_type {gso_type:#x} was not negotiated "
                    "(VIRTIO 1.4 §5.1.9.2.1)")
        if gso_type & GSO_ECN and not _has(features, NetFeature.HOST_ECN):
            return ("malformed header", f"gso_type {gso_type:#x} has the ECN bit, but "
                    "HOST_ECN was not negotiated (VIRTIO 1.4 §5.1.9.2.1)")
        if not flags & HdrFlag.NEEDS_CSUM or header.gso_size == 0:
            return ("malformed header", f"a GSO packet needs NEEDS_CSUM and a gso_size "
                    f"(flags {flags:#x}, gso_size {header.gso_size}; VIRTIO 1.4 §5.1.9.2.1)")
    if length < ETH_HLEN:
        return ("runt frame", f"a {length}-byte frame is shorter than an Ethernet header")
    if gso_type == GsoType.NONE and length > max_frame:
        return ("oversized frame", f"a {length}-byte frame exceeds MTU + "
                f"{ETH_HLEN + VLAN_HLEN} = {max_frame} bytes (VIRTIO 1.4 §5.1.4.2)")
    if length > GSO_MAX_FRAME:
        return ("oversized frame", f"a {length}-byte GSO packet exceeds {GSO_MAX_FRAME} "
                "bytes (VIRTIO 1.4 §5.1.9.3)")
    problem = _offsets_problem(header, length)
    return None if problem is None else ("malformed header", problem)


def rx_header_problem(
    header: NetHeader, length: int, features: int, *, max_frame: int
) -> tuple[str, str] | None:
    """Why a frame from an :class:`~.common.OffloadBackend` must not reach the driver, or None.

    VIRTIO 1.4 §5.1.9.4.1: without GUEST_CSUM the device MUST NOT set
    NEEDS_CSUM, and it MUST NOT send a ``gso_type`` whose GUEST_* feature (TSO4,
    TSO6, ECN) was not negotiated.  A GSO packet needs a ``gso_size``; the
    checksum position and ``hdr_len`` must lie inside the frame; a frame has
    14..``max_frame`` bytes (GSO: :data:`GSO_MAX_FRAME`).

    Returns:
        ``(reason, detail)``: the drop counter's name and what was wrong.
    """
    flags, gso_type = header.flags, header.gso_type
    if flags & HdrFlag.NEEDS_CSUM and not _has(features, NetFeature.GUEST_CSUM):
        return ("offload not negotiated", "NEEDS_CSUM, but GUEST_CSUM was not negotiated")
    if gso_type != GsoType.NONE:
        base = gso_type & ~GSO_ECN
        ok = ((base == GsoType.TCPV4 and _has(features, NetFeature.GUEST_TSO4))
              or (base == GsoType.TCPV6 and _has(features, NetFeature.GUEST_TSO6)))
        if not ok or (gso_type & GSO_ECN and not _has(features, NetFeature.GUEST_ECN)):
            return ("offload not negotiated", f"gso_type {gso_type:#x} was not negotiated")
        if header.gso_size == 0:
            return ("malformed header", "a GSO packet with gso_size 0")
    limit = max_frame if gso_type == GsoType.NONE else GSO_MAX_FRAME
    if not ETH_HLEN <= length <= limit:
        return ("bad frame size", f"a {length}-byte frame (accepted: {ETH_HLEN}..{limit})")
    problem = _offsets_problem(header, length)
    return None if problem is None else ("malformed header", problem)


def _offsets_problem(header: NetHeader, length: int) -> str | None:
    """The checksum field and the headers (``hdr_len``) must lie inside the frame."""
    if header.flags & HdrFlag.NEEDS_CSUM and header.csum_start + header.csum_offset + 2 > length:
        return (f"the checksum at csum_start {header.csum_start} + csum_offset "
                f"{header.csum_offset} lies beyond the {length}-byte frame")
    if header.gso_type != GsoType.NONE and header.hdr_len > length:
        return f"hdr_len {header.hdr_len} exceeds the {length}-byte frame"
    return None

