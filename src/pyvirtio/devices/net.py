"""virtio-net: an Ethernet port for a guest (VIRTIO 1.4 §5.1 Network Device).

Queues (§5.1.2): ``receiveqN`` at ``2(N-1)`` and ``transmitqN`` at ``2(N-1)+1``
for each of the ``--queues`` pairs, and ``controlq`` last (2N with MQ, else 2).

- **Control queue** (§5.1.9.5): receive modes, MAC table and default MAC,
  VLAN filter, ANNOUNCE_ACK and VQ_PAIRS_SET, executed by
  :class:`~pyvirtio.devices.netctrl.NetControl`; the receive filter they set
  decides which frames reach the driver (``kinds["filtered: ..."]``).  QEMU's
  virtio-net answers the control queue (and the config space) itself for
  vhost-user back ends and turns VQ_PAIRS_SET into SET_VRING_ENABLE of each
  pair's rings; with ``--qmp`` the device follows the filter QEMU reports
  (:mod:`pyvirtio.devices.qmp`) instead.

- **Multiqueue** (§5.1.9.5.5): with several pairs, VIRTIO_NET_F_MQ is offered
  and ``max_virtqueue_pairs`` is their number; GET_QUEUE_NUM answers pairs.
  A frame sent on any transmit queue goes to the back end; a received frame
  goes to one of the *ready* (started and enabled) receive queues: the one
  paired with the transmit queue the driver last sent the reverse flow on
  (§5.1.9.5.6: the device SHOULD steer a flow's packets to receiveqX after
  the driver sent on transmitqX), else one chosen by a hash of the flow
  (:func:`flow_hash`: addresses, protocol, TCP/UDP ports).  Either way one
  flow stays on one queue and in order.

- **Transmit** (§5.1.9.2): each chain is a ``struct virtio_net_hdr`` then one
  Ethernet frame.  The header is checked (:func:`tx_header_problem`).  A back
  end that only moves frames (:class:`FrameBackend`: the switch) gets no
  offloads, so ``NEEDS_CSUM`` or a ``gso_type`` is a malformed header there.
  A back end that carries the header (:class:`OffloadBackend`: a tap) gets the
  checksum and TCP segmentation offloads, and each header must stay within
  what was negotiated.  A frame shorter than an Ethernet header, or longer
  than MTU + 18 bytes (:data:`GSO_MAX_FRAME` for a GSO packet), is dropped too.  Every
  drop is counted and logged; the device keeps going.
- **Receive** (§5.1.9.3-4): frames from the back end (with their header, from
  an :class:`OffloadBackend`, checked by :func:`rx_header_problem`) wait in a short backlog
  until the driver has a receive buffer.  The backend asks :meth:`has_work`
  before taking a buffer, so buffers stay with the driver while no frame
  waits.  A frame finding a full backlog, or older than :data:`RX_MAX_AGE`,
  is dropped and counted: the rings never block.  With VIRTIO_NET_F_MRG_RXBUF
  a frame is spread over as many receive buffers as it needs
  (:meth:`merge_bytes`, :meth:`handle_chains`): ``num_buffers`` in the first
  buffer's header counts them, the others hold only data, and they reach the
  driver together (``kinds["merged frames"]`` counts frames that took more
  than one).  So jumbo frames and 64 KiB GSO packets arrive in the page-sized
  buffers Linux posts.  Without it, a frame must fit one buffer.
- **Statistics**: each receive queue's :class:`QueueStats` counts the packets
  (``requests``) and bytes (``bytes_in``) delivered through it, each transmit
  queue's the packets and bytes sent through it (``bytes_out``); ``errors``
  counts drops, with the reasons in ``kinds``, on the queue the frame was on
  or bound for.  The back end's own counters (switch, tap) cover all queues
  and are kept with ``transmitq1``'s.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pyvirtio.devices.base import DeviceHost, MergeFailure, VirtioDevice
from pyvirtio.devices.netctrl import CTRL_MAX_COMMAND, CtrlResult, NetControl, RxFilter
from pyvirtio.devices.pcap import PcapWriter
from pyvirtio.devices.qmp import QmpRxFilter
from pyvirtio.spec.common import DeviceId, Feature
from pyvirtio.spec.net import (
    CTRL_HEADER,
    ETH_ALEN,
    ETH_HLEN,
    GSO_ECN,
    HDR,
    HDR_SIZE,
    HDR_SIZE_LEGACY,
    RECEIVEQ,
    TRANSMITQ,
    VLAN_HLEN,
    GsoType,
    HdrFlag,
    NetConfig,
    NetFeature,
    NetHeader,
    NetStatus,
)
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter

__all__ = [
    "CONTROL_FEATURES",
    "GSO_MAX_FRAME",
    "MAX_QUEUE_PAIRS",
    "OFFLOAD_FEATURES",
    "RX_BACKLOG",
    "RX_MAX_AGE",
    "STEERING_FLOWS",
    "FrameBackend",
    "NetConfig",
    "NetDevice",
    "NetDeviceConfig",
    "NullBackend",
    "OffloadBackend",
    "default_mac",
    "flow_hash",
    "flow_key",
    "format_mac",
    "parse_mac",
    "pick_rx_queue",
    "rx_header_problem",
    "tx_header_problem",
]

log = logging.getLogger(__name__)

#: Frames waiting for a receive buffer at most; more are dropped.
RX_BACKLOG = 256
#: Seconds a frame may wait for a receive buffer before it is dropped.
RX_MAX_AGE = 1.0
#: The longest GSO packet in either direction: VIRTIO 1.4 §5.1.9.3's 65589 bytes (an
#: Ethernet header, a 40-byte IPv6 header, 65535 bytes of payload) plus a VLAN tag.
GSO_MAX_FRAME = ETH_HLEN + 40 + 65535 + VLAN_HLEN
#: The offload features offered with an :class:`OffloadBackend` (§5.1.3, §5.1.9.2-4):
#: checksum offload both ways, TCP segmentation both ways, with ECN.  No UFO/USO.
OFFLOAD_FEATURES = (
    NetFeature.CSUM, NetFeature.GUEST_CSUM,
    NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN,
    NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN,
)
#: The control queue's features (§5.1.3, §5.1.9.5): receive modes, MAC table, default
#: MAC, VLAN filter, guest announcements.
CONTROL_FEATURES = (
    NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN,
    NetFeature.CTRL_MAC_ADDR, NetFeature.GUEST_ANNOUNCE,
)
#: The most queue pairs: vhost-user carries a ring index in 8 bits (256 rings, one of
#: them the control queue).
MAX_QUEUE_PAIRS = 127
#: Flows remembered for receive steering (their transmit queue); more start afresh.
STEERING_FLOWS = 4096
#: Errors of one kind logged in full; after that, every 1000th.
_LOG_FIRST = 10
_MAC = re.compile(r"([0-9a-fA-F]{2})(?::([0-9a-fA-F]{2})){5}")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes.

    Raises:
        ValueError: not six colon-separated hex bytes, or a multicast address.
    """
    if not _MAC.fullmatch(text):
        raise ValueError(f"not a MAC address: {text!r} (try 02:00:00:00:00:01)")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address; a port needs a unicast one")
    return mac


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``52:54:00:12:34:56``."""
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(socket_path: Path) -> bytes:
    """A stable, locally administered unicast MAC derived from the socket path."""
    digest = bytearray(hashlib.sha256(str(socket_path.absolute()).encode()).digest()[:ETH_ALEN])
    digest[0] = (digest[0] & 0xFC) | 0x02  # locally administered, unicast
    return bytes(digest)


class FrameBackend(Protocol):
    """Where a port's frames go and come from (a switch port, a tap...).

    Attributes:
        counters: the back end's own counts (sent, flooded, dropped...); the
            device points it at the transmit queue's ``kinds`` on each
            connection, so they are logged with the queue statistics.
    """

    counters: Counter[str]

    def fileno(self) -> int | None:
        """An fd that is readable when :meth:`receive` has frames; None: never."""

    def send(self, frame: bytes) -> None:
        """Forward one frame from the guest (never blocks; drops are the back end's)."""

    def receive(self) -> list[bytes]:
        """Frames waiting for the guest now (non-blocking)."""

    def close(self) -> None:
        """Release the back end."""


class NullBackend:
    """A port with no cable: sent frames vanish, nothing arrives."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def fileno(self) -> int | None:
        """No fd: nothing ever arrives."""
        return None

    def send(self, frame: bytes) -> None:
        """Discard the frame."""

    def receive(self) -> list[bytes]:
        """Nothing."""
        return []

    def close(self) -> None:
        """Nothing to release."""


@runtime_checkable
class OffloadBackend(Protocol):
    """A back end that carries each frame's ``virtio_net_hdr`` (a tap with IFF_VNET_HDR).

    With one, the device offers the checksum and TCP segmentation offloads
    (:data:`OFFLOAD_FEATURES`): the back end passes partially checksummed and
    GSO packets on as they are, so it must understand the header.

    Attributes:
        counters: as :attr:`FrameBackend.counters`.
    """

    counters: Counter[str]

    def fileno(self) -> int | None:
        """An fd that is readable when :meth:`receive_packets` has frames; None: never."""

    def send_packet(self, header: NetHeader, frame: bytes) -> None:
        """Forward one checked frame from the guest with its header (never blocks)."""

    def receive_packets(self) -> list[tuple[NetHeader, bytes]]:
        """Frames waiting for the guest now, each with its header (non-blocking)."""

    def set_guest_offloads(self, features: int) -> None:
        """The driver negotiated ``features``: hand it only offloads among them."""

    def close(self) -> None:
        """Release the back end."""


_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_P_8021Q = (0x8100, 0x88A8)
_IPPROTO_PORTS = (6, 17, 132)  # TCP, UDP, SCTP: ports follow the IP header


def flow_key(frame: bytes, *, reverse: bool = False) -> bytes:
    """What identifies the frame's flow (one direction of it), for receive steering.

    IPv4 and IPv6 (after up to two VLAN tags): the protocol, source and
    destination addresses, and for TCP, UDP and SCTP the two ports (not for an
    IPv4 fragment: only the first has ports, and a flow's fragments must stay
    together).  Anything else: the two MAC addresses and the EtherType.  With
    ``reverse``, the key of the opposite direction: what a reply carries.
    """
    offset = 12
    ethertype = int.from_bytes(frame[12:14], "big")
    for _ in range(2):
        if ethertype not in _ETH_P_8021Q:
            break
        offset += 4
        ethertype = int.from_bytes(frame[offset : offset + 2], "big")
    ip = offset + 2
    if ethertype == _ETH_P_IP and len(frame) >= ip + 20:
        ihl = (frame[ip] & 0x0F) * 4
        proto = frame[ip + 9]
        src, dst = frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
        fragment = int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x3FFF
        ports = ip + ihl if proto in _IPPROTO_PORTS and not fragment and ihl >= 20 else None
    elif ethertype == _ETH_P_IPV6 and len(frame) >= ip + 40:
        proto = frame[ip + 6]
        src, dst = frame[ip + 8 : ip + 24], frame[ip + 24 : ip + 40]
        ports = ip + 40 if proto in _IPPROTO_PORTS else None
    else:
        src, dst = frame[6:12], frame[0:6]
        return dst + src + frame[12:14] if reverse else src + dst + frame[12:14]
    sport = dport = b""
    if ports is not None:
        sport, dport = frame[ports : ports + 2], frame[ports + 2 : ports + 4]
    if reverse:
        src, dst, sport, dport = dst, src, dport, sport
    return bytes([proto]) + src + dst + sport + dport


def flow_hash(frame: bytes) -> int:
    """A 32-bit hash of the frame's :func:`flow_key`: one flow, one receive queue."""
    return zlib.crc32(flow_key(frame))


def pick_rx_queue(frame: bytes, ready: list[int]) -> int:
    """The receive queue for ``frame`` among the ``ready`` ones (by :func:`flow_hash`).

    With no queue ready, ``receiveq1`` (0): the frame waits in its backlog.
    """
    if len(ready) <= 1:
        return ready[0] if ready else RECEIVEQ
    return ready[flow_hash(frame) % len(ready)]


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
    """Why a frame from an :class:`OffloadBackend` must not reach the driver, or None.

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


@dataclass(frozen=True, slots=True)
class NetDeviceConfig:
    """Validated settings of ``pyvirtio serve net``.

    Attributes:
        mac: the port's MAC address (config ``mac``, VIRTIO_NET_F_MAC).
        mtu: the largest IP packet (config ``mtu``, VIRTIO_NET_F_MTU); frames
            up to MTU + 14 (+ 4 for a VLAN tag) bytes pass.
        pcap: capture every frame sent and received into this file.
        queue_size: largest queue size accepted.
        queues: receive/transmit queue pairs (``max_virtqueue_pairs``; MQ with more
            than one).
        qmp: QEMU's QMP socket, to follow the guest's receive filter there
            (:mod:`pyvirtio.devices.qmp`).
        qmp_nic: QEMU's name of the NIC (else found by MAC).
    """

    mac: bytes
    mtu: int = 1500
    pcap: Path | None = None
    queue_size: int = 1024
    queues: int = 1
    qmp: Path | None = None
    qmp_nic: str | None = None

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN or self.mac[0] & 1:
            raise ValueError(f"MAC {self.mac.hex()} is not a 6-byte unicast address")
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535 (RFC 791 minimum), not {self.mtu}")
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queues must be 1..{MAX_QUEUE_PAIRS} pairs (vhost-user ring "
                             f"indices have 8 bits), not {self.queues}")

    @property
    def max_frame(self) -> int:
        """The longest frame accepted in either direction: MTU + Ethernet header + VLAN tag."""
        return self.mtu + ETH_HLEN + VLAN_HLEN


class NetDevice(VirtioDevice):
    """A virtio-net device whose frames travel through a :class:`FrameBackend`.

    Raises:
        OSError: the pcap file cannot be created.
    """

    device_id = DeviceId.NET
    num_queues = 2

    def __init__(
        self, config: NetDeviceConfig, backend: FrameBackend | OffloadBackend | None = None
    ) -> None:
        super().__init__()
        self.config = config
        #: receiveq1, transmitq1, ... receiveqN, transmitqN, controlq (§5.1.2).
        self.num_queues = 2 * config.queues + 1
        self.control_queue = 2 * config.queues
        #: The control queue's state: receive filter, pairs in use, announce (§5.1.9.5).
        self.control = NetControl(mac=config.mac, max_pairs=config.queues)
        #: The receive filter QEMU last reported (``--qmp``), if any.
        self._qmp_rx_filter: RxFilter | None = None
        self.qmp = (QmpRxFilter(config.qmp, config.mac, config.qmp_nic, self._qmp_filter)
                    if config.qmp is not None else None)
        self.max_queue_size = config.queue_size
        self.backend: FrameBackend | OffloadBackend = (
            backend if backend is not None else NullBackend()
        )
        #: The back end carries the virtio_net_hdr: offloads are offered.
        self.offloads = isinstance(self.backend, OffloadBackend)
        self.pcap = PcapWriter(config.pcap) if config.pcap is not None else None
        self._host: DeviceHost | None = None
        self._watched: int | None = None
        #: Per receive queue (index // 2): frames from the back end waiting for one of
        #: its buffers, with their arrival time.
        self._backlogs: list[deque[tuple[float, NetHeader | None, bytes]]] = [
            deque() for _ in range(config.queues)
        ]
        self._logged: Counter[str] = Counter()
        #: Receive steering: the flow key of frames the driver sent -> their pair.
        self._steering: dict[bytes, int] = {}

    # -- VirtioDevice -----------------------------------------------------------------

    def device_features(self) -> int:
        """§5.1.3: MAC, STATUS (link up), MTU, MRG_RXBUF; the offloads with a tap.

        MRG_RXBUF always, at any MTU and with or without offloads: a frame
        longer than one receive buffer is spread over as many as it needs
        (§5.1.9.4, :meth:`handle_chains`).  A Linux driver with MRG_RXBUF posts
        buffers of at most a page, whatever the MTU; one without it must post
        buffers for the largest frame (Linux: "big packets"), and a driver that
        negotiated GUEST_TSO4/6 without MRG_RXBUF SHOULD post buffers of at
        least 65601 bytes (§5.1.9.3.1).  A frame that does not fit one buffer
        then is dropped and counted.

        With an :class:`OffloadBackend`, :data:`OFFLOAD_FEATURES` too.

        The control queue and its commands (:data:`CONTROL_FEATURES`, §5.1.9.5),
        and with several queue pairs MQ.  QEMU's virtio-net keeps CTRL_VQ,
        CTRL_RX, CTRL_RX_EXTRA, CTRL_VLAN and CTRL_MAC_ADDR to itself (they are
        not among the bits it takes from a vhost-user back end) and answers
        the control queue; with ``--qmp`` the device follows the result.  It
        does take GUEST_ANNOUNCE from the back end: offered, the guest
        announces itself (QMP ``announce-self``, or after a migration).
        """
        bits = [NetFeature.MAC, NetFeature.STATUS, NetFeature.MTU, *CONTROL_FEATURES]
        if self.config.queues > 1:
            bits.append(NetFeature.MQ)
        bits.append(NetFeature.MRG_RXBUF)
        if self.offloads:
            bits.extend(OFFLOAD_FEATURES)
        return sum(1 << b for b in bits)

    def set_features(self, features: int) -> None:
        """Record the features and reset the control state (§5.1.9.5) to them.

        An offload back end hands the guest only the offloads negotiated.  With
        ``--qmp``, the first negotiation of a front end connects to its QEMU to
        follow the guest's receive filter there.
        """
        super().set_features(features)
        self.control.reset(features)
        # §5.1.2: controlq is 2N, N = max_virtqueue_pairs with MQ, else 1.
        self.control_queue = (2 * self.config.queues if self.has_feature(NetFeature.MQ)
                              else 2)
        if self.control.filter is None and self.qmp is not None and self.qmp.fileno() is None:
            self.qmp.connect()
        if isinstance(self.backend, OffloadBackend):
            self.backend.set_guest_offloads(features)

    def config_space(self) -> bytes:
        """``struct virtio_net_config`` (§5.1.4): the MAC, link up, the pairs, the MTU.

        The MAC is the one CTRL_MAC_ADDR_SET set, if any (§5.1.9.5.2); the
        status has ANNOUNCE while an announcement waits for its ack.
        """
        status = NetStatus.LINK_UP | (NetStatus.ANNOUNCE if self.control.announce else 0)
        return NetConfig(
            mac=self.control.mac, status=status,
            max_virtqueue_pairs=self.config.queues, mtu=self.config.mtu,
        ).pack()

    def queue_num(self) -> int:
        """GET_QUEUE_NUM: queue pairs, as QEMU's vhost-user net (``queues=N``) counts them."""
        return self.config.queues

    @property
    def header_size(self) -> int:
        """12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10 (§5.1.9, §5.1.9.1)."""
        if self.has_feature(Feature.VERSION_1) or self.has_feature(NetFeature.MRG_RXBUF):
            return HDR_SIZE
        return HDR_SIZE_LEGACY

    def attach(self, host: DeviceHost) -> None:
        """Watch the back end's fd (and QMP's, while connected) in the runtime's loop."""
        self._host = host
        if self.qmp is not None:
            self.qmp.attach(host)
        fd = self.backend.fileno()
        if fd is not None:
            host.watch_fd(fd, self.frames_arrived)
            self._watched = fd

    def start(self) -> None:
        """A new front-end: fresh counters, and frames queued for the old one are gone.

        With ``--qmp``, the connection to the old guest's QEMU ends.
        """
        super().start()
        for backlog in self._backlogs:
            backlog.clear()
        self._steering.clear()
        self.control = NetControl(mac=self.config.mac, max_pairs=self.config.queues)
        self._qmp_rx_filter = None
        if self.qmp is not None:
            self.qmp.close()
        self.backend.counters = self.stats[TRANSMITQ].kinds
        if isinstance(self.backend, OffloadBackend):
            self.backend.set_guest_offloads(0)

    def has_work(self, queue: int) -> bool:
        """A receive queue takes a buffer only when a frame waits for it."""
        if queue % 2 or queue >= self.control_queue:
            return True
        return bool(self._backlogs[queue // 2])

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """Receive queue (even): deliver its next frame; transmit queue (odd): send one;
        the control queue: execute a command."""
        if not 0 <= queue < self.num_queues:
            log.error("queue %d does not exist", queue)
            return 0
        if queue == self.control_queue:
            return self._control(chain)
        if queue > self.control_queue:
            # Without MQ the driver has receiveq1, transmitq1 and controlq (§5.1.2).
            self.stats[queue].violations += 1
            self._log_once("no such queue", "chain %d on queue %d, which the negotiated "
                           "features do not give the driver (queues 0..%d, VIRTIO 1.4 "
                           "§5.1.2); returned unused", chain.head, queue, self.control_queue)
            return 0
        if queue % 2 == TRANSMITQ:
            self._transmit(queue, chain)
            return 0
        return self._receive(queue, chain)

    def close(self) -> None:
        """Stop watching and close the back end, QMP and the capture."""
        if self._host is not None and self._watched is not None:
            self._host.unwatch_fd(self._watched)
            self._watched = None
        self.backend.close()
        if self.qmp is not None:
            self.qmp.close()
        if self.pcap is not None:
            self.pcap.close()

    # -- control ------------------------------------------------------------------------

    def _control(self, chain: DescriptorChain) -> int:
        """One control command (§5.1.9.5): class, command, data; the device writes the ack.

        A chain without the two-byte head or without a writable byte for the
        ack breaks §5.1.9.5's layout: counted and logged, returned unanswered.
        An ERR answer's reason is logged too.
        """
        queue = self.control_queue
        stats = self.stats[queue]
        if not self.has_feature(NetFeature.CTRL_VQ):
            stats.violations += 1
            self._log_once("ctrl without feature", "control chain %d, but CTRL_VQ was not "
                           "negotiated (VIRTIO 1.4 §5.1.2)", chain.head)
            return 0
        if chain.readable_len < CTRL_HEADER.size or chain.writable_len < 1:
            stats.violations += 1
            self._log_once("ctrl layout", "control chain %d: %d readable and %d writable "
                           "bytes; a command needs its class and command, and a byte for "
                           "the ack (VIRTIO 1.4 §5.1.9.5)", chain.head, chain.readable_len,
                           chain.writable_len)
            return 0
        if chain.readable_len > CTRL_MAX_COMMAND:
            result = CtrlResult.error(f"a {chain.readable_len}-byte command is longer than "
                                      f"{CTRL_MAX_COMMAND} bytes")
        else:
            cls, command = CTRL_HEADER.unpack(gather(chain.readable, 0, CTRL_HEADER.size))
            data = gather(chain.readable, CTRL_HEADER.size,
                          chain.readable_len - CTRL_HEADER.size)
            result = self.control.execute(cls, command, data)
        if result.problem is not None:
            stats.errors += 1
            stats.kinds["commands refused"] += 1
            self._log_once("ctrl refused", "control chain %d: %s; answered VIRTIO_NET_ERR",
                           chain.head, result.problem)
        else:
            stats.kinds["commands"] += 1
        scatter(chain.writable, 0, bytes([result.ack]))
        return 1

    def _qmp_filter(self, rx_filter: RxFilter | None) -> None:
        """QEMU reported the guest's receive filter (or the QMP connection ended)."""
        self._qmp_rx_filter = rx_filter

    @property
    def rx_filter(self) -> RxFilter | None:
        """The filter applied to frames for the guest: the control queue's, else the one
        QEMU reports (``--qmp``); None: every frame is delivered."""
        return self.control.filter if self.control.filter is not None else self._qmp_rx_filter

    # -- transmit -----------------------------------------------------------------------

    def _transmit(self, queue: int, chain: DescriptorChain) -> None:
        """One packet from the driver (§5.1.9.2): check the header, pass the frame on."""
        stats = self.stats[queue]
        if chain.writable:
            stats.violations += 1
            self._log_once("tx writable", "transmit chain %d has %d device-writable bytes; "
                           "transmit buffers are device-readable (VIRTIO 1.4 §5.1.9.2)",
                           chain.head, chain.writable_len)
        size = self.header_size
        if chain.readable_len < size:
            self._drop(queue, "malformed header",
                       "transmit chain %d: %d bytes, shorter than the %d-byte virtio_net_hdr "
                       "(VIRTIO 1.4 §5.1.9.2)", chain.head, chain.readable_len, size)
            return
        header = NetHeader.unpack(gather(chain.readable, 0, size))
        length = chain.readable_len - size
        problem = tx_header_problem(header, length, self.features,
                                    max_frame=self.config.max_frame, offloads=self.offloads)
        if problem is not None:
            reason, detail = problem
            self._drop(queue, reason, "transmit chain %d: %s", chain.head, detail)
            return
        frame = gather(chain.readable, size, length)
        if self.pcap is not None:
            self.pcap.write(frame)
        stats.bytes_out += length
        if self.config.queues > 1:
            steering = self._steering
            if len(steering) >= STEERING_FLOWS:
                steering.clear()
            steering[flow_key(frame)] = queue // 2
        if isinstance(self.backend, OffloadBackend):
            if header.gso_type != GsoType.NONE:
                stats.kinds["gso packets"] += 1
            self.backend.send_packet(header, frame)
        else:
            self.backend.send(frame)

    # -- receive ------------------------------------------------------------------------

    def frames_arrived(self) -> None:
        """The back end's fd is readable: queue its frames and fill receive buffers.

        A back end whose fd failed for good (a tap deleted under it) answers
        :meth:`FrameBackend.fileno` None from then on: stop watching it, or the
        loop would spin on an fd that stays "readable".
        """
        if isinstance(self.backend, OffloadBackend):
            self.deliver_packets(self.backend.receive_packets())
        else:
            self.deliver(self.backend.receive())
        if self._watched is not None and self.backend.fileno() is None:
            log.error("the back end's fd %d failed; no more frames will reach the guest",
                      self._watched)
            if self._host is not None:
                self._host.unwatch_fd(self._watched)
            self._watched = None

    def deliver_packets(self, packets: list[tuple[NetHeader, bytes]]) -> None:
        """Queue frames that come with a header (an :class:`OffloadBackend`'s) for the guest.

        Each header is checked against the negotiated features first
        (:func:`rx_header_problem`); a bad one is dropped and counted.
        """
        ready = self._ready_rx_queues()
        good: list[tuple[int, NetHeader | None, bytes]] = []
        for header, frame in packets:
            queue = self._steer(frame, ready)
            problem = rx_header_problem(header, len(frame), self.features,
                                        max_frame=self.config.max_frame)
            if problem is None:
                good.append((queue, header, frame))
            else:
                reason, detail = problem
                self._drop(queue, reason, "receive: %s", detail)
        self._enqueue(good)

    def deliver(self, frames: list[bytes]) -> None:
        """Queue ``frames`` (no offloads) for the guest and have the receive queue processed."""
        ready = self._ready_rx_queues()
        good: list[tuple[int, NetHeader | None, bytes]] = []
        for frame in frames:
            queue = self._steer(frame, ready)
            if not ETH_HLEN <= len(frame) <= self.config.max_frame:
                self._drop(queue, "bad frame size", "receive: dropped a %d-byte frame "
                           "(accepted: %d..%d)", len(frame), ETH_HLEN, self.config.max_frame)
            else:
                good.append((queue, None, frame))
        self._enqueue(good)

    def _steer(self, frame: bytes, ready: list[int]) -> int:
        """The receive queue for ``frame``: its reverse flow's pair if ready, else by hash."""
        if len(ready) > 1:
            pair = self._steering.get(flow_key(frame, reverse=True))
            if pair is not None and 2 * pair in ready:
                return 2 * pair
        return pick_rx_queue(frame, ready)

    def _ready_rx_queues(self) -> list[int]:
        """The receive queues started and enabled now (every one without a runtime)."""
        pairs = 1  # without MQ, one pair (§5.1.2), whatever rings the front-end started
        if self.has_feature(NetFeature.MQ):
            # The driver's VQ_PAIRS_SET (§5.1.9.5.6); QEMU, which keeps the control
            # queue, enables the pairs in use with SET_VRING_ENABLE instead.
            pairs = (self.control.pairs if self.has_feature(NetFeature.CTRL_VQ)
                     else self.config.queues)
        queues = range(0, 2 * pairs, 2)
        if self._host is None:
            return list(queues)
        if pairs == 1:
            return [RECEIVEQ]  # nothing to choose: frames wait for the one queue
        return [q for q in queues if self._host.queue_ready(q)]

    def _enqueue(self, packets: list[tuple[int, NetHeader | None, bytes]]) -> None:
        """Add checked frames to their queues' backlogs (dropping stale ones), fill buffers."""
        now = time.monotonic()
        for index, backlog in enumerate(self._backlogs):
            while backlog and now - backlog[0][0] > RX_MAX_AGE:
                backlog.popleft()
                self._drop(2 * index, "no rx buffer", "receive: a frame waited %.1f s for "
                           "a buffer; dropped", RX_MAX_AGE)
        rx_filter = self.rx_filter
        for queue, header, frame in packets:
            if rx_filter is not None and (why := rx_filter.reject(frame)) is not None:
                # §5.1.9.5.1-3: a frame the driver did not ask for; not an error.
                self.stats[queue].kinds[f"filtered: {why}"] += 1
                continue
            backlog = self._backlogs[queue // 2]
            if len(backlog) >= RX_BACKLOG:
                self._drop(queue, "no rx buffer", "receive: %d frames wait for receive "
                           "buffers of queue %d; dropped one", len(backlog), queue)
            else:
                backlog.append((now, header, frame))
        if self._host is not None:
            for index, backlog in enumerate(self._backlogs):
                if backlog:
                    self._host.process_queue(2 * index)

    def merge_bytes(self, queue: int) -> int:
        """With MRG_RXBUF, what a receive queue's next frame needs: its header and the
        frame, over as many receive buffers as it takes (§5.1.9.4); else 0 (one
        buffer per frame, :meth:`handle_chain`)."""
        if queue % 2 or queue >= self.control_queue:
            return 0
        backlog = self._backlogs[queue // 2]
        if not backlog or not self.has_feature(NetFeature.MRG_RXBUF):
            return 0
        return self.header_size + len(backlog[0][2])

    def handle_chains(self, queue: int, chains: list[DescriptorChain]) -> list[int]:
        """Spread the next waiting frame of receive ``queue`` over ``chains`` (§5.1.9.4).

        The header starts the first buffer, with ``num_buffers`` the number of
        chains ("the device MUST set num_buffers to indicate the number of buffers
        the packet (including the header) is spread over"); the frame follows and
        fills each buffer completely before the next ("MUST use all buffers but
        the last ... completely up to the full length of each buffer"), so the
        other buffers hold only data.  The back-end uses the chains together.

        A buffer shorter than the header breaks §5.1.9.3.1 ("each buffer MUST be
        at least size of struct virtio_net_hdr"): counted as a violation, the
        frame is dropped and every chain returned with length 0.
        """
        none = [0] * len(chains)
        if queue % 2 or queue // 2 >= len(self._backlogs) or not self._backlogs[queue // 2]:
            log.error("queue %d: %d chains, but no frame waits for them", queue, len(chains))
            return none
        _, offload, frame = self._backlogs[queue // 2].popleft()
        size = self.header_size
        for chain in chains:
            self._check_rx_chain(queue, chain)
        for chain in chains:
            if chain.writable_len < size:
                self.stats[queue].violations += 1
                self._drop(queue, "rx buffer too small",
                           "receive chain %d: %d bytes, shorter than the %d-byte "
                           "virtio_net_hdr a mergeable receive buffer MUST hold "
                           "(VIRTIO 1.4 §5.1.9.3.1)", chain.head, chain.writable_len, size)
                return none
        room = sum(chain.writable_len for chain in chains)
        if room < size + len(frame):  # the back-end takes enough; never trust it blindly
            self._drop(queue, "rx buffer too small",
                       "receive: %d chains of %d bytes, a %d-byte frame needs %d",
                       len(chains), room, len(frame), size + len(frame))
            return none
        data = self._rx_header(offload, len(chains)) + frame
        written: list[int] = []
        offset = 0
        for chain in chains:
            n = scatter(chain.writable, 0, data[offset : offset + chain.writable_len])
            written.append(n)
            offset += n
        self._received(queue, offload, frame, len(chains))
        return written

    def _receive(self, queue: int, chain: DescriptorChain) -> int:
        """Copy the next waiting frame of ``queue`` into one receive buffer (§5.1.9.4).

        Without MRG_RXBUF: "the device MUST use only a single descriptor"
        (§5.1.9.3.2), so a frame longer than the buffer is dropped and counted.
        """
        _, offload, frame = self._backlogs[queue // 2].popleft()
        self._check_rx_chain(queue, chain)
        size = self.header_size
        need = size + len(frame)
        if chain.writable_len < need:
            self._drop(queue, "rx buffer too small",
                       "receive chain %d: %d bytes, a %d-byte frame needs %d", chain.head,
                       chain.writable_len, len(frame), need)
            return 0
        scatter(chain.writable, 0, self._rx_header(offload, 1))
        scatter(chain.writable, size, frame)
        self._received(queue, offload, frame, 1)
        return need

    def _check_rx_chain(self, queue: int, chain: DescriptorChain) -> None:
        """Count a receive chain with device-readable buffers as a violation (§5.1.9.3)."""
        if chain.readable:
            self.stats[queue].violations += 1
            self._log_once("rx readable", "receive chain %d has %d device-readable bytes; "
                           "receive buffers are device-writable (VIRTIO 1.4 §5.1.9.3)",
                           chain.head, chain.readable_len)

    def _rx_header(self, offload: NetHeader | None, num_buffers: int) -> bytes:
        """The ``virtio_net_hdr`` of a received frame spread over ``num_buffers`` (§5.1.9.4).

        ``num_buffers`` is 1 without MRG_RXBUF (with VERSION_1 the field is
        always there).  Without offloads, flags and gso_type 0; with them, the
        back end's header as it came (checked against the negotiated features),
        DATA_VALID only with GUEST_CSUM.
        """
        size = self.header_size
        if offload is None:
            return HDR.pack(0, GsoType.NONE, 0, 0, 0, 0, num_buffers)[:size]
        flags: int = offload.flags & (HdrFlag.NEEDS_CSUM | HdrFlag.DATA_VALID)
        if not self.has_feature(NetFeature.GUEST_CSUM):
            flags = 0
        return HDR.pack(flags, offload.gso_type, offload.hdr_len, offload.gso_size,
                        offload.csum_start, offload.csum_offset, num_buffers)[:size]

    def _received(self, queue: int, offload: NetHeader | None, frame: bytes,
                  buffers: int) -> None:
        """Count (and capture) a frame delivered in ``buffers`` receive buffers."""
        stats = self.stats[queue]
        if offload is not None and offload.gso_type != GsoType.NONE:
            stats.kinds["gso packets"] += 1
        if buffers > 1:
            stats.kinds["merged frames"] += 1
        if self.pcap is not None:
            self.pcap.write(frame)
        stats.bytes_in += len(frame)

    def merge_failed(self, queue: int, failure: MergeFailure, detail: str) -> None:
        """Drop the next waiting frame of receive ``queue``: the ring cannot take it."""
        if queue % 2 or queue // 2 >= len(self._backlogs) or not self._backlogs[queue // 2]:
            super().merge_failed(queue, failure, detail)
            return
        _, _, frame = self._backlogs[queue // 2].popleft()
        self._drop(queue, f"rx {failure.value}", "receive: a %d-byte frame: %s",
                   len(frame), detail)

    # -- counting -----------------------------------------------------------------------

    def _drop(self, queue: int, reason: str, message: str, *args: object) -> None:
        """Count a dropped frame against ``queue`` and log it (rate-limited)."""
        stats = self.stats[queue]
        stats.errors += 1
        stats.kinds[f"dropped: {reason}"] += 1
        self._log_once(reason, message + " [dropped: %s, %d so far]", *args, reason,
                       stats.kinds[f"dropped: {reason}"])

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        """Log the first :data:`_LOG_FIRST` events of a kind, then every 1000th."""
        self._logged[kind] += 1
        n = self._logged[kind]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.error(message, *args)
