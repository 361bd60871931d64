"""virtio-net: an Ethernet port for a guest (VIRTIO 1.4 §5.1 Network Device).

Queues: ``receiveq1`` (0) and ``transmitq1`` (1); no control queue (QEMU's
virtio-net answers the control queue itself for vhost-user back-ends).

- **Transmit** (§5.1.9.2): each chain is a ``struct virtio_net_hdr`` then one
  Ethernet frame.  The header is checked: no checksum or segmentation
  offload was offered, so ``NEEDS_CSUM`` or a ``gso_type`` is a malformed
  header.  A frame shorter than an Ethernet header or longer than
  MTU + 18 bytes is dropped too.  Every drop is counted and logged; the device
  keeps going.  Good frames go to the back end (a :class:`FrameBackend`).
- **Receive** (§5.1.9.3-4): frames from the back end wait in a short backlog
  until the driver has a receive buffer.  The backend asks :meth:`has_work`
  before taking a buffer, so buffers stay with the driver while no frame
  waits.  A frame finding a full backlog, or older than :data:`RX_MAX_AGE`,
  is dropped and counted: the rings never block.
- **Statistics**: the receive queue's :class:`QueueStats` counts delivered
  packets (``requests``) and bytes (``bytes_in``), the transmit queue's
  sent packets and bytes (``bytes_out``); ``errors`` counts drops, with the
  reasons in ``kinds``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyvirtio.devices.base import DeviceHost, VirtioDevice
from pyvirtio.devices.pcap import PcapWriter
from pyvirtio.spec.common import DeviceId, Feature
from pyvirtio.spec.net import (
    ETH_ALEN,
    ETH_HLEN,
    HDR,
    HDR_LEGACY,
    HDR_SIZE,
    HDR_SIZE_LEGACY,
    RECEIVEQ,
    TRANSMITQ,
    VLAN_HLEN,
    GsoType,
    HdrFlag,
    NetConfig,
    NetFeature,
    NetStatus,
)
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter

__all__ = [
    "RX_BACKLOG",
    "RX_MAX_AGE",
    "STANDARD_MTU",
    "FrameBackend",
    "NetConfig",
    "NetDevice",
    "NetDeviceConfig",
    "NullBackend",
    "default_mac",
    "format_mac",
    "parse_mac",
]

log = logging.getLogger(__name__)

#: The largest MTU with which MRG_RXBUF is offered (see :meth:`NetDevice.device_features`).
STANDARD_MTU = 1500
#: Frames waiting for a receive buffer at most; more are dropped.
RX_BACKLOG = 256
#: Seconds a frame may wait for a receive buffer before it is dropped.
RX_MAX_AGE = 1.0
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


@dataclass(frozen=True, slots=True)
class NetDeviceConfig:
    """Validated settings of ``pyvirtio serve net``.

    Attributes:
        mac: the port's MAC address (config ``mac``, VIRTIO_NET_F_MAC).
        mtu: the largest IP packet (config ``mtu``, VIRTIO_NET_F_MTU); frames
            up to MTU + 14 (+ 4 for a VLAN tag) bytes pass.
        pcap: capture every frame sent and received into this file.
        queue_size: largest queue size accepted.
    """

    mac: bytes
    mtu: int = 1500
    pcap: Path | None = None
    queue_size: int = 1024

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ALEN or self.mac[0] & 1:
            raise ValueError(f"MAC {self.mac.hex()} is not a 6-byte unicast address")
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be 68..65535 (RFC 791 minimum), not {self.mtu}")

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

    def __init__(self, config: NetDeviceConfig, backend: FrameBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_queue_size = config.queue_size
        self.backend: FrameBackend = backend if backend is not None else NullBackend()
        self.pcap = PcapWriter(config.pcap) if config.pcap is not None else None
        self._host: DeviceHost | None = None
        self._watched: int | None = None
        #: Frames from the back end waiting for a receive buffer, with their arrival time.
        self._backlog: deque[tuple[float, bytes]] = deque()
        self._logged: Counter[str] = Counter()

    # -- VirtioDevice -----------------------------------------------------------------

    def device_features(self) -> int:
        """§5.1.3: MAC, STATUS (link up), MTU, and MRG_RXBUF up to MTU 1500; no offloads.

        Every frame fills one receive buffer (``num_buffers`` 1).  A Linux driver
        with MRG_RXBUF posts buffers of 1518 bytes and more: enough up to MTU 1500.
        Above that, MRG_RXBUF is not offered, and a driver that negotiates MTU
        posts buffers for the largest frame instead (Linux: "big packets").
        """
        bits = [NetFeature.MAC, NetFeature.STATUS, NetFeature.MTU]
        if self.config.mtu <= STANDARD_MTU:
            bits.append(NetFeature.MRG_RXBUF)
        return sum(1 << b for b in bits)

    def config_space(self) -> bytes:
        """``struct virtio_net_config`` (§5.1.4): the MAC, link up, one pair, the MTU."""
        return NetConfig(
            mac=self.config.mac, status=NetStatus.LINK_UP, max_virtqueue_pairs=1,
            mtu=self.config.mtu,
        ).pack()

    @property
    def header_size(self) -> int:
        """12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10 (§5.1.9, §5.1.9.1)."""
        if self.has_feature(Feature.VERSION_1) or self.has_feature(NetFeature.MRG_RXBUF):
            return HDR_SIZE
        return HDR_SIZE_LEGACY

    def attach(self, host: DeviceHost) -> None:
        """Watch the back end's fd in the runtime's loop."""
        self._host = host
        fd = self.backend.fileno()
        if fd is not None:
            host.watch_fd(fd, self.frames_arrived)
            self._watched = fd

    def start(self) -> None:
        """A new front-end: fresh counters, and frames queued for the old one are gone."""
        super().start()
        self._backlog.clear()
        self.backend.counters = self.stats[TRANSMITQ].kinds

    def has_work(self, queue: int) -> bool:
        """The receive queue takes a buffer only when a frame waits for it."""
        return queue != RECEIVEQ or bool(self._backlog)

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """Receive queue: deliver the next frame; transmit queue: send one."""
        if queue == TRANSMITQ:
            self._transmit(chain)
            return 0
        if queue == RECEIVEQ:
            return self._receive(chain)
        self._drop(queue, "no such queue", "queue %d does not exist", queue)
        return 0

    def close(self) -> None:
        """Stop watching and close the back end and the capture."""
        if self._host is not None and self._watched is not None:
            self._host.unwatch_fd(self._watched)
            self._watched = None
        self.backend.close()
        if self.pcap is not None:
            self.pcap.close()

    # -- transmit -----------------------------------------------------------------------

    def _transmit(self, chain: DescriptorChain) -> None:
        """One packet from the driver (§5.1.9.2): check the header, pass the frame on."""
        stats = self.stats[TRANSMITQ]
        if chain.writable:
            stats.violations += 1
            self._log_once("tx writable", "transmit chain %d has %d device-writable bytes; "
                           "transmit buffers are device-readable (VIRTIO 1.4 §5.1.9.2)",
                           chain.head, chain.writable_len)
        size = self.header_size
        if chain.readable_len < size:
            self._drop(TRANSMITQ, "malformed header",
                       "transmit chain %d: %d bytes, shorter than the %d-byte virtio_net_hdr "
                       "(VIRTIO 1.4 §5.1.9.2)", chain.head, chain.readable_len, size)
            return
        raw = gather(chain.readable, 0, size)
        fields = HDR.unpack(raw) if size == HDR_SIZE else (*HDR_LEGACY.unpack(raw), 0)
        flags, gso_type = fields[0], fields[1]
        allowed = HdrFlag.NEEDS_CSUM if self.has_feature(NetFeature.CSUM) else 0
        if flags & ~allowed:
            # Without CSUM the driver MUST set flags to zero, and it never sets
            # DATA_VALID or RSC_INFO on transmit.
            self._drop(TRANSMITQ, "malformed header",
                       "transmit chain %d: flags %#x, but only %#x are allowed here "
                       "(VIRTIO 1.4 §5.1.9.2.1)", chain.head, flags, allowed)
            return
        if gso_type != GsoType.NONE:
            self._drop(TRANSMITQ, "malformed header",
                       "transmit chain %d: gso_type %#x, but no segmentation offload was "
                       "negotiated (VIRTIO 1.4 §5.1.9.2.1)", chain.head, gso_type)
            return
        length = chain.readable_len - size
        if length < ETH_HLEN:
            self._drop(TRANSMITQ, "runt frame", "transmit chain %d: a %d-byte frame is "
                       "shorter than an Ethernet header", chain.head, length)
            return
        if length > self.config.max_frame:
            self._drop(TRANSMITQ, "oversized frame",
                       "transmit chain %d: a %d-byte frame exceeds MTU %d + %d "
                       "(VIRTIO 1.4 §5.1.4.2)", chain.head, length, self.config.mtu,
                       ETH_HLEN + VLAN_HLEN)
            return
        frame = gather(chain.readable, size, length)
        if self.pcap is not None:
            self.pcap.write(frame)
        stats.bytes_out += length
        self.backend.send(frame)

    # -- receive ------------------------------------------------------------------------

    def frames_arrived(self) -> None:
        """The back end's fd is readable: queue its frames and fill receive buffers."""
        self.deliver(self.backend.receive())

    def deliver(self, frames: list[bytes]) -> None:
        """Queue ``frames`` for the guest and have the receive queue processed."""
        now = time.monotonic()
        backlog = self._backlog
        while backlog and now - backlog[0][0] > RX_MAX_AGE:
            backlog.popleft()
            self._drop(RECEIVEQ, "no rx buffer", "receive: a frame waited %.1f s for a "
                       "buffer; dropped", RX_MAX_AGE)
        for frame in frames:
            if not ETH_HLEN <= len(frame) <= self.config.max_frame:
                self._drop(RECEIVEQ, "bad frame size", "receive: dropped a %d-byte frame "
                           "(accepted: %d..%d)", len(frame), ETH_HLEN, self.config.max_frame)
            elif len(backlog) >= RX_BACKLOG:
                self._drop(RECEIVEQ, "no rx buffer", "receive: %d frames wait for receive "
                           "buffers; dropped one", len(backlog))
            else:
                backlog.append((now, frame))
        if backlog and self._host is not None:
            self._host.process_queue(RECEIVEQ)

    def _receive(self, chain: DescriptorChain) -> int:
        """Copy the next waiting frame into one receive buffer (§5.1.9.4)."""
        _, frame = self._backlog.popleft()
        stats = self.stats[RECEIVEQ]
        if chain.readable:
            stats.violations += 1
            self._log_once("rx readable", "receive chain %d has %d device-readable bytes; "
                           "receive buffers are device-writable (VIRTIO 1.4 §5.1.9.3)",
                           chain.head, chain.readable_len)
        size = self.header_size
        need = size + len(frame)
        if chain.writable_len < need:
            # Drivers size buffers for the MTU we announce (see device_features); a frame
            # that does not fit one is not spread over several (num_buffers > 1).
            self._drop(RECEIVEQ, "rx buffer too small",
                       "receive chain %d: %d bytes, a %d-byte frame needs %d", chain.head,
                       chain.writable_len, len(frame), need)
            return 0
        # §5.1.9.4: no offloads, so flags and gso_type 0; num_buffers 1 with MRG_RXBUF
        # (and VERSION_1, where the field is always there and the device sets it to 1).
        header = HDR.pack(0, GsoType.NONE, 0, 0, 0, 0, 1)[:size]
        scatter(chain.writable, 0, header)
        scatter(chain.writable, size, frame)
        if self.pcap is not None:
            self.pcap.write(frame)
        stats.bytes_in += len(frame)
        return need

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
