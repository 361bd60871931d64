"""A virtio-net driver on top of the vhost-user front-end (VIRTIO 1.4 §5.1).

:class:`NetDriver` drives one queue pair and, when the back end offers it,
the control queue: it sends and receives Ethernet frames and issues control
commands (receive modes, MAC table, default MAC, VLAN filter, queue pairs).
It is what a test uses to check a virtio-net back end's behaviour without a
guest, pyvirtio's own or any other.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import NetDriverError
from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import (
    CTRL_ACK_OK,
    ETH_ALEN,
    HDR_SIZE,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    CtrlVlan,
    NetFeature,
    NetHeader,
)
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

__all__ = ["RX_BUFFER", "NetDriver"]

#: Receive buffer size: a 1514-byte frame and its header; larger frames need MRG_RXBUF.
RX_BUFFER = 2048
#: The features the driver asks for (it handles mergeable buffers and the control queue).
WANTED = sum(1 << bit for bit in (
    Feature.VERSION_1, NetFeature.MAC, NetFeature.MTU, NetFeature.STATUS,
    NetFeature.MRG_RXBUF, NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA,
    NetFeature.CTRL_VLAN, NetFeature.CTRL_MAC_ADDR,
))


class NetDriver(Closing):
    """One virtio-net port driven through a vhost-user back end.

    Args:
        frontend: a connected front-end, not yet negotiated.
        queue_size: size of each ring.
        offloads: offload feature bits to ask for besides :data:`WANTED` (CSUM,
            GUEST_CSUM, HOST_TSO4...): with them :meth:`send` takes a header and
            :meth:`receive_packets` returns the device's.

    Raises:
        BackendError: the back end refused a set-up step.
    """

    def __init__(self, frontend: VhostUserFrontend, *, queue_size: int = 64,
                 offloads: int = 0) -> None:
        self.frontend = frontend
        self.timeout = 10.0
        frontend.probe()
        self.features = frontend.negotiate(WANTED | offloads)
        self.ram = GuestRam((4 << 20) + 2 * queue_size * RX_BUFFER)
        frontend.share_memory(self.ram)
        self.rx = frontend.setup_queue(0, queue_size)
        self.tx = frontend.setup_queue(1, queue_size)
        # §5.1.2: controlq is 2N, N 1 without MQ (not negotiated here).
        self.ctrl: FrontendQueue | None = (
            frontend.setup_queue(2, 16) if self.has_feature(NetFeature.CTRL_VQ) else None)
        frontend.driver_ok()
        # Each receive chain keeps its buffer: a used one is read, then made available
        # again as it is.
        self._buffers: dict[int, int] = {}  # rx head -> its buffer's GPA
        ring = self._ring(self.rx)
        for _ in range(queue_size):
            gpa = self.ram.alloc(RX_BUFFER)
            self._buffers[ring.add((), [(gpa, RX_BUFFER)], publish=False)] = gpa
        ring.publish_many(list(self._buffers))
        self.rx.kick()
        self._tx_buffer = self.ram.alloc(HDR_SIZE + 65536)
        self._ctrl_buffer = self.ram.alloc(4096)

    @classmethod
    def open(cls, socket_path: Path | str, *, queue_size: int = 64,
             offloads: int = 0) -> NetDriver:
        """Connect to ``socket_path`` and set the port up."""
        frontend = VhostUserFrontend.connect(socket_path)
        try:
            return cls(frontend, queue_size=queue_size, offloads=offloads)
        except BaseException:
            frontend.close()
            raise

    @staticmethod
    def _ring(queue: FrontendQueue) -> DriverSplitQueue:
        assert isinstance(queue.ring, DriverSplitQueue)  # RING_PACKED is not asked for
        return queue.ring

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    # -- frames --------------------------------------------------------------------------

    def send(self, frame: bytes, header: NetHeader | None = None) -> None:
        """Transmit one frame and wait until sent; ``header``: its offloads (§5.1.9.2;
        default none: a zero header)."""
        packet = (bytes(HDR_SIZE) if header is None else header.pack()) + frame
        self.ram.view(self._tx_buffer, len(packet))[:] = packet
        self.tx.submit([(self._tx_buffer, len(packet))], (), timeout=self.timeout,
                       what="transmit")

    def receive(self, timeout: float = 1.0, *, until: int | None = None) -> list[bytes]:
        """The frames received within ``timeout`` seconds (or once ``until`` arrived).

        Mergeable buffers (§5.1.9.4): a frame spans ``num_buffers`` used buffers.
        Every buffer goes back to the device after it was read.  A head the
        device never made available is a device bug, reported.

        Raises:
            NetDriverError: a header's ``num_buffers`` is impossible.
        """
        return [frame for _, frame in self.receive_packets(timeout, until=until)]

    def receive_packets(self, timeout: float = 1.0, *, until: int | None = None
                        ) -> list[tuple[NetHeader, bytes]]:
        """As :meth:`receive`, each frame with the header the device wrote for it."""
        ring = self._ring(self.rx)
        frames: list[tuple[NetHeader, bytes]] = []
        deadline = time.monotonic() + timeout
        pending: list[tuple[int, int]] = []
        done: list[int] = []
        while until is None or len(frames) < until:
            used = ring.reap()
            if any(head not in self._buffers for head, _ in used):
                raise NetDriverError(f"used ring returned {used}: not all are receive "
                                     "chains", request="virtqueue")
            pending += used
            while pending:
                head, length = pending[0]
                data = bytes(self.ram.view(self._buffers[head], min(length, RX_BUFFER)))
                whole = len(data) >= HDR_SIZE
                header = NetHeader.unpack(data[:HDR_SIZE]) if whole else NetHeader()
                count = header.num_buffers if whole else 1
                if self.has_feature(NetFeature.MRG_RXBUF) and count == 0:
                    raise NetDriverError("num_buffers 0 (VIRTIO 1.4 §5.1.9.4)",
                                         request="virtqueue")
                count = count if self.has_feature(NetFeature.MRG_RXBUF) else 1
                if len(pending) < count:
                    break  # the rest of the frame is not used yet
                parts = [data[HDR_SIZE:]]
                for more, more_len in pending[1:count]:
                    parts.append(bytes(self.ram.view(self._buffers[more],
                                                     min(more_len, RX_BUFFER))))
                frames.append((header, b"".join(parts)))
                done.extend(head for head, _ in pending[:count])
                del pending[:count]
            ring.publish_many(done)
            done.clear()
            self.rx.kick_if_needed()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.rx.wait(min(left, 0.2))
        return frames

    # -- control queue (§5.1.9.5) --------------------------------------------------------

    def command(self, cls: int, command: int, data: bytes = b"") -> int:
        """Send one control command; return the device's ack byte.

        Raises:
            NetDriverError: the control queue was not negotiated.
        """
        if self.ctrl is None:
            raise NetDriverError("the back end did not offer VIRTIO_NET_F_CTRL_VQ",
                                 request="virtqueue")
        body = bytes([cls, command]) + data
        if len(body) + 1 > 4096:
            raise ValueError(f"a {len(body)}-byte command does not fit the command buffer")
        ack = self._ctrl_buffer + len(body)
        self.ram.view(self._ctrl_buffer, len(body))[:] = body
        self.ram.view(ack, 1)[:] = b"\xff"
        written = self.ctrl.submit([(self._ctrl_buffer, len(body))], [(ack, 1)],
                                   timeout=self.timeout, what="control command")
        if written != 1:
            raise NetDriverError(f"the device wrote {written} bytes for a control command's "
                                 "1-byte ack", request="virtqueue")
        return self.ram.view(ack, 1)[0]

    def _ok(self, what: str, cls: int, command: int, data: bytes = b"") -> None:
        ack = self.command(cls, command, data)
        if ack != CTRL_ACK_OK:
            raise NetDriverError(f"{what}: the device answered VIRTIO_NET_ERR ({ack})",
                                 request="virtqueue")

    def set_rx_mode(self, mode: CtrlRx, on: bool) -> None:
        """PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI or NOBCAST on or off (§5.1.9.5.1)."""
        self._ok(f"RX {mode.name} {int(on)}", CtrlClass.RX, mode, bytes([on]))

    def set_mac_table(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        """MAC_TABLE_SET (§5.1.9.5.2)."""
        data = b"".join(struct.pack("<I", len(table)) + b"".join(table)
                        for table in (unicast, multicast))
        self._ok("MAC_TABLE_SET", CtrlClass.MAC, CtrlMac.TABLE_SET, data)

    def set_mac(self, mac: bytes) -> None:
        """MAC_ADDR_SET (§5.1.9.5.2)."""
        if len(mac) != ETH_ALEN:
            raise ValueError("a MAC address has 6 bytes")
        self._ok("MAC_ADDR_SET", CtrlClass.MAC, CtrlMac.ADDR_SET, mac)

    def vlan(self, vid: int, *, add: bool = True) -> None:
        """VLAN_ADD or VLAN_DEL (§5.1.9.5.3)."""
        self._ok(f"VLAN {'ADD' if add else 'DEL'} {vid}", CtrlClass.VLAN,
                 CtrlVlan.ADD if add else CtrlVlan.DEL, struct.pack("<H", vid))

    def set_queue_pairs(self, pairs: int) -> None:
        """VQ_PAIRS_SET (§5.1.9.5.6)."""
        self._ok(f"VQ_PAIRS_SET {pairs}", CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET,
                 struct.pack("<H", pairs))

    def close(self) -> None:
        """Disconnect and release guest RAM."""
        self.frontend.close()
        self.ram.close()
