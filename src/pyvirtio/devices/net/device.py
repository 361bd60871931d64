"""virtio-net: an Ethernet port for a guest (VIRTIO 1.4 §5.1 Network Device).

Queues (§5.1.2): ``receiveqN`` at ``2(N-1)`` and ``transmitqN`` at ``2(N-1)+1``
for each of the ``--queues`` pairs, and ``controlq`` last (2N with MQ, else 2).

- **Control queue** (§5.1.9.5): receive modes, MAC table and default MAC,
  VLAN filter, ANNOUNCE_ACK and VQ_PAIRS_SET, executed by
  :class:`~pyvirtio.devices.net.ctrl.NetControl`; the receive filter they set
  decides which frames reach the driver (``kinds["filtered: ..."]``).  QEMU's
  virtio-net answers the control queue (and the config space) itself for
  vhost-user back ends and turns VQ_PAIRS_SET into SET_VRING_ENABLE of each
  pair's rings; with ``--qmp`` the device follows the filter QEMU reports
  (:mod:`pyvirtio.devices.net.qmp`) instead.

- **Multiqueue** (§5.1.9.5.5): with several pairs, VIRTIO_NET_F_MQ is offered
  and ``max_virtqueue_pairs`` is their number; GET_QUEUE_NUM answers pairs.
  A frame sent on any transmit queue goes to the back end; a received frame
  goes to one of the *ready* (started and enabled) receive queues: the one
  paired with the transmit queue the driver last sent the reverse flow on
  (§5.1.9.5.6: the device SHOULD steer a flow's packets to receiveqX after
  the driver sent on transmitqX), else one chosen by a hash of the flow
  (:func:`~.steering.flow_hash`: addresses, protocol, TCP/UDP ports).  Either way one
  flow stays on one queue and in order.

- **Transmit** (§5.1.9.2): each chain is a ``struct virtio_net_hdr`` then one
  Ethernet frame.  The header is checked (:func:`~.offload.tx_header_problem`).  A back
  end that only moves frames (:class:`~.common.FrameBackend`: the switch) gets no
  offloads, so ``NEEDS_CSUM`` or a ``gso_type`` is a malformed header there.
  A back end that carries the header (:class:`~.common.OffloadBackend`: a tap) gets the
  checksum and TCP segmentation offloads, and each header must stay within
  what was negotiated.  A frame shorter than an Ethernet header, or longer
  than MTU + 18 bytes (:data:`~.offload.GSO_MAX_FRAME` for a GSO packet), is
  dropped too.  Every drop is counted and logged; the device keeps going.
- **Receive** (§5.1.9.3-4): frames from the back end (with their header, from
  an :class:`~.common.OffloadBackend`, checked by
  :func:`~.offload.rx_header_problem`) wait in a short backlog until the driver
  has a receive buffer.  The device takes a buffer only while a frame waits,
  so buffers stay with the driver while no frame waits.  A frame finding a
  full backlog, or older than :data:`~.rx.RX_MAX_AGE`, is dropped and counted:
  the rings never block.  With VIRTIO_NET_F_MRG_RXBUF a frame is spread over
  as many receive buffers as it needs (:mod:`.rx`, which drives the receive
  queues itself): ``num_buffers`` in the first buffer's header counts them,
  the others hold only data, and they reach the driver together
  (``kinds["merged frames"]`` counts frames that took more than one).  So
  jumbo frames and 64 KiB GSO packets arrive in the page-sized buffers Linux
  posts.  Without it, a frame must fit one buffer.
- **Statistics**: each receive queue's :class:`QueueStats` counts the packets
  (``requests``) and bytes (``bytes_in``) delivered through it, each transmit
  queue's the packets and bytes sent through it (``bytes_out``); ``errors``
  counts drops, with the reasons in ``kinds``, on the queue the frame was on
  or bound for.  The back end's own counters (switch, tap) cover all queues
  and are kept with ``transmitq1``'s.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from pyvirtio.devices.base import DeviceHost
from pyvirtio.devices.net.common import (
    FrameBackend,
    NetDeviceConfig,
    NullBackend,
    OffloadBackend,
    log,
)
from pyvirtio.devices.net.ctrl import CTRL_MAX_COMMAND, CtrlResult, NetControl, RxFilter
from pyvirtio.devices.net.offload import OFFLOAD_FEATURES
from pyvirtio.devices.net.pcap import PcapWriter
from pyvirtio.devices.net.qmp import QmpRxFilter
from pyvirtio.devices.net.rx import NetReceive
from pyvirtio.devices.net.tx import NetTransmit
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.net import (
    CTRL_HEADER,
    TRANSMITQ,
    NetConfig,
    NetFeature,
    NetHeader,
    NetStatus,
)
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter

__all__ = ["CONTROL_FEATURES", "NetDevice"]

#: The control queue's features (§5.1.3, §5.1.9.5): receive modes, MAC table, default
#: MAC, VLAN filter, guest announcements.
CONTROL_FEATURES = (
    NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA, NetFeature.CTRL_VLAN,
    NetFeature.CTRL_MAC_ADDR, NetFeature.GUEST_ANNOUNCE,
)


def _no_send(frame: bytes) -> None:
    """An offload back end's frames go through ``send_packet``, never here."""
    raise AssertionError("an offload back end sends with send_packet")


class NetDevice(NetReceive, NetTransmit):
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
        queue = getattr(self.backend, "queue", None)
        send: Callable[[bytes], None] | None = queue
        #: The back end carries the virtio_net_hdr (a tap), or takes packets with their
        #: offloads (a switch port, unless the config says no): offloads are offered.
        self._tx_send_offload = (
            queue if config.offloads and getattr(self.backend, "carries_offloads", False)
            else None)
        self.offloads = (isinstance(self.backend, OffloadBackend)
                         or self._tx_send_offload is not None)
        self._tx_send = send if send is not None else getattr(self.backend, "send", _no_send)
        self._tx_flush = getattr(self.backend, "flush", None)
        self._tx_congested = getattr(self.backend, "congested", None)
        self._tx_wait_room = getattr(self.backend, "wait_room", None)
        self._rx_drained = getattr(self.backend, "drained", None)
        self._tx_held: set[int] = set()
        self._tx_send_views = getattr(self.backend, "send_views", None)
        self._tx_views = bool(getattr(self.backend, "takes_views", False))
        self._rx_paused = False
        self._rx_read_into = getattr(self.backend, "read_into", None)
        self._tap_waiting = self._tap_rerun = False
        self._rx_timer = None
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
        (§5.1.9.4, :meth:`~.rx.NetReceive.drive_queue`).  A Linux driver with MRG_RXBUF posts
        buffers of at most a page, whatever the MTU; one without it must post
        buffers for the largest frame (Linux: "big packets"), and a driver that
        negotiated GUEST_TSO4/6 without MRG_RXBUF SHOULD post buffers of at
        least 65601 bytes (§5.1.9.3.1).  A frame that does not fit one buffer
        then is dropped and counted.

        With an :class:`OffloadBackend` (a tap), or a switch port (unless
        ``--no-offloads``), :data:`OFFLOAD_FEATURES` too.

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
    def attach(self, host: DeviceHost) -> None:
        """Watch the back end's fd (and QMP's, while connected) in the runtime's loop."""
        self._host = host
        if self.qmp is not None:
            self.qmp.attach(host)
        fd = self.backend.fileno()
        if fd is not None:
            host.watch_fd(fd, self.frames_arrived)
            self._watched = fd
        attach_host = getattr(self.backend, "attach_host", None)
        if attach_host is not None:
            # A switch port waits for a full peer's room in the loop (back-pressure).
            attach_host(host)
        bind = getattr(self.backend, "bind_receiver", None)
        if bind is not None:
            # Ports of the same switch in this process hand frames over directly.
            bind(self.deliver, self.rx_pressure, self.accepts_offloads)

    def start(self) -> None:
        """A new front-end: fresh counters, and frames queued for the old one are gone.

        With ``--qmp``, the connection to the old guest's QEMU ends.
        """
        super().start()
        for backlog in self._backlogs:
            backlog.clear()
        self._steering.clear()
        self._tx_held.clear()
        self._tap_waiting = self._tap_rerun = False
        if self._rx_paused:
            self._rx_resume()
        self.control = NetControl(mac=self.config.mac, max_pairs=self.config.queues)
        self._qmp_rx_filter = None
        if self.qmp is not None:
            self.qmp.close()
        self.backend.counters = self.stats[TRANSMITQ].kinds
        if isinstance(self.backend, OffloadBackend):
            self.backend.set_guest_offloads(0)

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
            if self._tx_flush is not None:
                self._tx_flush()
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

