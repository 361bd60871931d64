"""virtio-net's shared parts: MAC addresses, the back-end protocols, the settings, and
:class:`NetPort`, the state the receive and transmit paths share."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from pyvirtio.devices.base import DeviceHost, QueueContext, Timer, VirtioDevice
from pyvirtio.devices.net.ctrl import NetControl, RxFilter
from pyvirtio.devices.net.pcap import PcapWriter
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import (
    ETH_ALEN,
    ETH_HLEN,
    HDR_SIZE,
    HDR_SIZE_LEGACY,
    VLAN_HLEN,
    NetFeature,
    NetHeader,
)

__all__ = [
    "MAX_QUEUE_PAIRS",
    "FrameBackend",
    "NetDeviceConfig",
    "NetPort",
    "NullBackend",
    "OffloadBackend",
    "default_mac",
    "format_mac",
    "parse_mac",
]

log = logging.getLogger("pyvirtio.devices.net")

#: The most queue pairs: vhost-user carries a ring index in 8 bits (256 rings, one of
#: them the control queue).
MAX_QUEUE_PAIRS = 127
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
            (:mod:`pyvirtio.devices.net.qmp`).
        qmp_nic: QEMU's name of the NIC (else found by MAC).
        offloads: a switch port offers the checksum and TCP segmentation offloads
            (done in software for a receiver that lacks them); a tap always does.
    """

    mac: bytes
    mtu: int = 1500
    pcap: Path | None = None
    queue_size: int = 1024
    queues: int = 1
    qmp: Path | None = None
    qmp_nic: str | None = None
    offloads: bool = True
    #: The longest frame accepted in either direction: MTU + Ethernet header + VLAN
    #: tag (derived; a field, not a property: it is read for every frame).
    max_frame: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN or self.mac[0] & 1:
            raise ValueError(f"MAC {self.mac.hex()} is not a 6-byte unicast address")
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535 (RFC 791 minimum), not {self.mtu}")
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queues must be 1..{MAX_QUEUE_PAIRS} pairs (vhost-user ring "
                             f"indices have 8 bits), not {self.queues}")
        object.__setattr__(self, "max_frame", self.mtu + ETH_HLEN + VLAN_HLEN)



class NetPort(VirtioDevice):
    """The state of a virtio-net device that its receive (:mod:`.rx`) and transmit
    (:mod:`.tx`) paths share, and their counting; :class:`~.device.NetDevice` sets it up."""

    config: NetDeviceConfig
    #: controlq's index: 2N with MQ, else 2 (§5.1.2).
    control_queue: int
    #: The control queue's state: receive filter, pairs in use, announce (§5.1.9.5).
    control: NetControl
    #: The receive filter QEMU last reported (``--qmp``), if any.
    _qmp_rx_filter: RxFilter | None
    backend: FrameBackend | OffloadBackend
    #: The back end carries the virtio_net_hdr (a tap), or takes packets with their
    #: offloads (a switch port): offloads are offered.
    offloads: bool
    #: A switch port's ``queue`` for a packet with offloads (with ``offloads``).
    _tx_send_offload: Callable[[bytes, NetHeader], None] | None
    pcap: PcapWriter | None
    _host: DeviceHost | None
    _watched: int | None
    #: Per receive queue (index // 2): frames from the back end waiting for one of
    #: its buffers, with their arrival time.
    _backlogs: list[deque[tuple[float, NetHeader | None, bytes]]]
    _logged: Counter[str]
    #: Receive steering: the flow key of frames the driver sent -> their pair.
    _steering: dict[bytes, int]
    #: How a transmitted frame goes to a :class:`FrameBackend`: its ``queue`` (held
    #: until ``flush``) if it has one, else its ``send``.
    _tx_send: Callable[[bytes], None]
    #: The back end's ``flush`` (after each transmit batch), if it has one.
    _tx_flush: Callable[[], None] | None
    #: The back end's ``congested`` (a port of this process asks senders to hold
    #: frames), ``wait_room`` (resume me when one drained) and ``drained`` (this
    #: device delivered frames), if it has them (:mod:`.hub`).
    _tx_congested: Callable[[], bool] | None
    _tx_wait_room: Callable[[Callable[[], None]], None] | None
    _rx_drained: Callable[[], None] | None
    #: The back end takes frames as views of the guest's transmit buffers, used
    #: (copied) before its ``flush`` returns (``takes_views``: a switch port).
    _tx_views: bool
    #: An offload back end's ``send_views`` (a tap: ``writev`` from guest memory).
    _tx_send_views: Callable[[list[memoryview]], None] | None
    #: Transmit queues holding their frames for a congested port of this process.
    _tx_held: set[int]
    #: A tap's ``read_into`` (``readv`` straight into a receive chain's buffers, then
    #: its ``spill`` buffer), if the back end has one.
    _rx_read_into: Callable[[list[memoryview]], int | None] | None
    #: The timer that ends a pause of reading the back end (:mod:`.rx`), if any.
    _rx_timer: Timer | None
    #: The tap's fd was readable and was not read to its end yet (:mod:`.rx`).
    _tap_waiting: bool
    #: The last drain of the receive queue ran out of budget (it runs again soon).
    _tap_rerun: bool
    #: The back end's fd is not read while the backlogs drain (:mod:`.rx`).
    _rx_paused: bool

    def drive_tx(self, ctx: QueueContext) -> None:
        """Drain a transmit queue in one batch (:meth:`.tx.NetTransmit.drive_tx`)."""
        raise NotImplementedError

    #: :attr:`header_size` and the features it was worked out for.
    _header: tuple[int, int] = (-1, 0)

    @property
    def header_size(self) -> int:
        """12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10 (§5.1.9, §5.1.9.1)."""
        features, size = self._header
        if features != self.features:
            size = HDR_SIZE if (self.has_feature(Feature.VERSION_1)
                                or self.has_feature(NetFeature.MRG_RXBUF)) else HDR_SIZE_LEGACY
            self._header = (self.features, size)
        return size

    @property
    def rx_filter(self) -> RxFilter | None:
        """The filter applied to frames for the guest: the control queue's, else the one
        QEMU reports (``--qmp``); None: every frame is delivered."""
        return self.control.filter if self.control.filter is not None else self._qmp_rx_filter

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
