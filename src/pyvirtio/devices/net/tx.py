"""virtio-net's transmit path (§5.1.9.2): check each packet's header, pass the frame on.

The device drives its transmit queues itself (:meth:`NetTransmit.drive_tx`): it
takes a batch of chains, hands each frame to the back end (a view of the guest's
buffer to a back end that ``takes_views``: a switch port, which copies it once, into
a datagram or another guest's receive buffer, before the chain is used), which may
hold them (
a switch port sends several per datagram, or into ports of the same process,
at its ``flush``), flushes the back end once, then uses the whole batch with one
used-index update, and the engine notifies the driver at most once for it
(honouring EVENT_IDX, §2.7.10).
"""

from __future__ import annotations

from pyvirtio.devices.base import QueueContext
from pyvirtio.devices.net.common import NetPort, OffloadBackend, log
from pyvirtio.devices.net.offload import tx_header_problem
from pyvirtio.devices.net.steering import remember_flow
from pyvirtio.errors import VirtqueueError
from pyvirtio.spec.net import ETH_HLEN, HDR_SIZE, GsoType, NetHeader
from pyvirtio.virtqueue.chain import DescriptorChain, gather
from pyvirtio.virtqueue.queue import Virtqueue

__all__ = ["TX_BATCH", "TX_RETRY", "NetTransmit"]

#: Chains sent before the back end is flushed and they are used (one used-index
#: update for them), within one drain.
TX_BATCH = 64
#: Seconds a transmit queue held for a congested port waits at most before it
#: looks again (a drained port resumes it sooner).
TX_RETRY = 0.01


class NetTransmit(NetPort):
    """The transmit queues of :class:`~.device.NetDevice`."""

    def drive_tx(self, ctx: QueueContext) -> None:
        """Send every frame the driver made available (at most ``ctx.budget``), in
        one batch: the back end is flushed once, and the chains are used together.

        A driver violation uses the chains taken before it first (so the used
        ring keeps their order), then is handled as every violation.
        """
        index, queue = ctx.index, ctx.queue
        stats = self.stats[index]
        used: list[tuple[int, int]] = []
        self._tx_held.discard(index)
        congested = self._tx_congested
        try:
            while True:
                queue.disable_notifications()
                while True:
                    if ctx.budget <= 0:
                        ctx.rerun()
                        return
                    if len(used) >= TX_BATCH:
                        self._tx_done(queue, used)
                    if not used and congested is not None and congested():
                        self._hold_tx(index)
                        return
                    ctx.budget -= 1
                    try:
                        chain = queue.pop()
                    except VirtqueueError as exc:
                        self._tx_done(queue, used)
                        if ctx.violation(exc):
                            return
                        continue
                    if chain is None:
                        break
                    try:
                        self._transmit(index, chain)
                    except Exception:
                        log.exception("queue %d: device failed on chain %d", index, chain.head)
                        stats.errors += 1
                    stats.requests += 1
                    used.append((chain.head, 0))
                if not queue.enable_notifications():
                    return
        finally:
            self._tx_done(queue, used)

    def _hold_tx(self, index: int) -> None:
        """A port of this process is congested: leave the chains available and look
        again when a port drained, or after :data:`TX_RETRY` at the latest."""
        if index in self._tx_held or self._host is None:
            return
        self._tx_held.add(index)
        host = self._host

        def resume() -> None:
            if index in self._tx_held:
                self._tx_held.discard(index)
                host.process_queue(index)

        def soon() -> None:
            # Not from inside the receiver's drain: from the loop, right after it.
            host.call_later(0, resume)

        host.call_later(TX_RETRY, resume)
        if self._tx_wait_room is not None:
            self._tx_wait_room(soon)

    def _tx_done(self, queue: Virtqueue, used: list[tuple[int, int]]) -> None:
        """Flush the back end, then use the batch's chains (one used-index update)."""
        if self._tx_flush is not None:
            try:
                self._tx_flush()
            except Exception:
                log.exception("the back end failed to send a batch")
        if used:
            queue.push_many(used)
            used.clear()

    def _transmit(self, queue: int, chain: DescriptorChain) -> None:
        """One packet from the driver (§5.1.9.2): check the header, pass the frame on."""
        if chain.writable:
            self.stats[queue].violations += 1
            self._log_once("tx writable", "transmit chain %d has %d device-writable bytes; "
                           "transmit buffers are device-readable (VIRTIO 1.4 §5.1.9.2)",
                           chain.head, chain.readable_len)
        size = self.header_size
        length = chain.readable_len - size
        readable = chain.readable
        first = readable[0] if readable else None
        if ((self._tx_views or not self.offloads) and first is not None and len(first) >= size
                and not first[0] and not first[1]
                and ETH_HLEN <= length <= self.config.max_frame):
            # The common case: flags and gso_type 0, a frame of an accepted size:
            # nothing else in the header matters (§5.1.9.2.1); a back end that takes
            # views (a switch port) needs no header for it.
            frame = ((first[size:] if self._tx_views else bytes(first[size:]))
                     if len(first) == chain.readable_len else gather(readable, size, length))
            if self.pcap is None and self.config.queues == 1:  # _count_tx, the short way
                self.stats[queue].bytes_out += length
                self._tx_send(frame)  # type: ignore[arg-type]  # a view only if it takes them
                return
        else:
            stats = self.stats[queue]
            if chain.readable_len < size:
                self._drop(queue, "malformed header",
                           "transmit chain %d: %d bytes, shorter than the %d-byte "
                           "virtio_net_hdr (VIRTIO 1.4 §5.1.9.2)", chain.head,
                           chain.readable_len, size)
                return
            header = NetHeader.unpack(gather(readable, 0, size))
            problem = tx_header_problem(header, length, self.features,
                                        max_frame=self.config.max_frame,
                                        offloads=self.offloads)
            if problem is not None:
                reason, detail = problem
                self._drop(queue, reason, "transmit chain %d: %s", chain.head, detail)
                return
            if header.gso_type != GsoType.NONE:  # allowed only with an offload back end
                stats.kinds["gso packets"] += 1
            if isinstance(self.backend, OffloadBackend):
                send_views = self._tx_send_views
                if (send_views is not None and size == HDR_SIZE and self.pcap is None
                        and self.config.queues == 1):
                    # Header and frame go to the kernel straight from guest memory.
                    stats.bytes_out += length
                    send_views(readable)
                    return
                frame = gather(readable, size, length)
                self._count_tx(queue, frame)
                self.backend.send_packet(header, frame)
                return
            frame = gather(readable, size, length)
            send_offload = self._tx_send_offload
            if send_offload is not None and (header.flags or header.gso_type):
                # A switch port: the packet goes with its offloads (§5.1.9.2).
                self._count_tx(queue, frame)
                send_offload(frame, header)
                return
        self._count_tx(queue, frame)
        self._tx_send(frame)  # type: ignore[arg-type]  # a view only if it takes them

    def _count_tx(self, queue: int, frame: bytes | memoryview) -> None:
        """Capture and count a frame sent on ``queue``; remember its flow (MQ)."""
        if self.pcap is not None:
            self.pcap.write(bytes(frame))
        self.stats[queue].bytes_out += len(frame)
        if self.config.queues > 1:
            remember_flow(self._steering, bytes(frame), queue // 2)
