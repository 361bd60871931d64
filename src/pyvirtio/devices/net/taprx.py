"""A tap's packets read straight into the guest's receive buffers (§5.1.9.4).

When the tap's fd is readable and no frame waits in the backlog, the receive
queue's drain (:meth:`~.rx.NetReceive.drive_queue`) takes a chain and the tap's
next packet is read into its buffers with one ``readv``
(:meth:`TapReceive._tap_receive`); the tap's header is checked there and
rewritten in place (DATA_VALID only with GUEST_CSUM, ``num_buffers``).  A packet
longer than the chain goes through the backlog (the tap's own buffer took the
rest), to be spread over mergeable buffers.
"""

from __future__ import annotations

import time

from pyvirtio.devices.net.common import NetPort
from pyvirtio.devices.net.offload import rx_header_problem
from pyvirtio.spec.net import HDR, HDR_SIZE, GsoType, HdrFlag, NetFeature, NetHeader
from pyvirtio.virtqueue.chain import DescriptorChain, gather, scatter

__all__ = ["TAP_READS", "TapReceive"]

#: Packets a tap read into one receive chain may refuse (drop, filter) before the
#: drain gives the loop back.
TAP_READS = 256

class TapReceive(NetPort):
    """Reading a tap's packets into receive chains (:class:`~.rx.NetReceive` uses it)."""

    def _tap_receive(self, queue: int, chain: DescriptorChain) -> int | None:
        """Read the tap's next packet straight into ``chain``'s buffers (§5.1.9.4).

        The tap writes its ``virtio_net_hdr`` (12 bytes, VERSION_1 layout) and the
        frame; the header is checked against the negotiated features, the receive
        filter applied, then the header is rewritten for the driver.  A packet
        dropped or filtered leaves the chain for the next one.  A packet longer
        than the chain (the rest went to the tap's ``spill``) waits in the backlog,
        whole, for as many buffers as it needs (or is dropped there without
        MRG_RXBUF).

        Returns:
            Bytes written into the chain, or None: the tap has no packet now (or
            one waits in the backlog); the caller gives the chain back.
        """
        read_into = self._rx_read_into
        assert read_into is not None
        self._check_rx_chain(queue, chain)
        views = chain.writable if chain.writable_len >= HDR_SIZE else []
        room = chain.writable_len if views else 0
        stats = self.stats[queue]
        for _ in range(TAP_READS):
            n = read_into(views)
            if n is None:
                return None
            if n == 0:
                continue
            if n > room:
                spill: memoryview = self.backend.spill  # type: ignore[union-attr]
                data = gather(views, 0, room) + bytes(spill[: n - room])
                header = NetHeader.unpack(data[:HDR_SIZE])
                frame = data[HDR_SIZE:]
                if self._tap_accept(queue, header, frame):
                    self._backlogs[queue // 2].append((time.monotonic(), header, frame))
                    return None
                continue
            length = n - HDR_SIZE
            header = NetHeader.unpack(gather(views, 0, HDR_SIZE))
            if not self._tap_accept(queue, header, gather(views, HDR_SIZE, min(length, 18)),
                                    length):
                continue
            scatter(views, 0, self._rx_header(header, 1))
            if header.gso_type != GsoType.NONE:
                stats.kinds["gso packets"] += 1
            if self.pcap is not None:
                self.pcap.write(gather(views, HDR_SIZE, length))
            stats.bytes_in += length
            stats.kinds["tap read in place"] += 1
            return n
        return None  # only refused packets so far: the loop comes back (fd readable)

    def _tap_accept(self, queue: int, header: NetHeader, head: bytes,
                    length: int | None = None) -> bool:
        """Whether a packet from the tap goes to the driver: its header fits the
        negotiated features and the receive filter takes it (``head``: its first
        bytes, at least the Ethernet and VLAN headers; ``length``: the frame's).
        A refused one is counted."""
        length = len(head) if length is None else length
        problem = rx_header_problem(header, length, self.features,
                                    max_frame=self.config.max_frame)
        if problem is not None:
            reason, detail = problem
            self._drop(queue, reason, "receive: %s", detail)
            return False
        rx_filter = self.rx_filter
        if rx_filter is not None and (why := rx_filter.reject(head)) is not None:
            self.stats[queue].kinds[f"filtered: {why}"] += 1
            return False
        return True

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
