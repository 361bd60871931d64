"""virtio-net's transmit path (§5.1.9.2): check each packet's header, pass the frame on."""

from __future__ import annotations

from pyvirtio.devices.net.common import NetPort, OffloadBackend
from pyvirtio.devices.net.offload import tx_header_problem
from pyvirtio.devices.net.steering import remember_flow
from pyvirtio.spec.net import GsoType, NetHeader
from pyvirtio.virtqueue.chain import DescriptorChain, gather

__all__ = ["NetTransmit"]


class NetTransmit(NetPort):
    """The transmit queues of :class:`~.device.NetDevice`."""

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
            remember_flow(self._steering, frame, queue // 2)
        if isinstance(self.backend, OffloadBackend):
            if header.gso_type != GsoType.NONE:
                stats.kinds["gso packets"] += 1
            self.backend.send_packet(header, frame)
        else:
            self.backend.send(frame)
