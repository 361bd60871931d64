"""virtio-net's receive path (§5.1.9.3-4): frames from the back end wait in a short
backlog per receive queue until the driver has buffers for them.

The device drives its receive queues itself (:meth:`NetReceive.drive_queue`):
with VIRTIO_NET_F_MRG_RXBUF a frame is spread over as many receive buffers as it
needs, all used together or none, which one chain per request cannot express.

A tap (a back end with ``read_into``, one queue pair) is read straight into the
guest's receive buffers, in the receive queue's drain (:mod:`.taprx`); while the
guest has no buffer, packets are read into the tap's buffer and wait in the
backlog.
"""

from __future__ import annotations

import time

from pyvirtio.devices.base import QueueContext
from pyvirtio.devices.net.common import OffloadBackend, log
from pyvirtio.devices.net.offload import rx_header_problem
from pyvirtio.devices.net.steering import flow_key, pick_rx_queue
from pyvirtio.devices.net.switch import RECEIVE_BUDGET, SwitchPort
from pyvirtio.devices.net.taprx import TapReceive
from pyvirtio.devices.net.tx import TX_BATCH
from pyvirtio.errors import VirtqueueError
from pyvirtio.spec.net import (
    ETH_HLEN,
    HDR,
    HDR_SIZE,
    RECEIVEQ,
    GsoType,
    NetFeature,
    NetHeader,
)
from pyvirtio.virtqueue.chain import DescriptorChain, scatter
from pyvirtio.virtqueue.queue import Virtqueue

__all__ = ["RX_BACKLOG", "RX_MAX_AGE", "RX_PAUSE", "NetReceive"]

#: Frames waiting for a receive buffer at most; more are dropped.
RX_BACKLOG = 256
#: Seconds a frame may wait for a receive buffer before it is dropped.
RX_MAX_AGE = 1.0
#: A back end that can wait (a switch port) is not read while a backlog holds this
#: many frames; reads take at most :data:`~.switch.RECEIVE_BUDGET` frames, and a
#: batch at most :data:`~.tx.TX_BATCH`: the backlog never overflows on a live driver.
RX_PAUSE = 64
#: A port of the same process holds its frames for this device while half the
#: backlog is taken and the oldest frame waited less than this (seconds): the
#: driver is taking frames, just slower than they come.
RX_PRESSURE_AGE = 0.1


def _use(queue: Virtqueue, used: list[tuple[int, int]]) -> None:
    """Use the chains filled so far, together (one used-index update)."""
    if used:
        queue.push_many(used)
        used.clear()


class NetReceive(TapReceive):
    """The receive queues of :class:`~.device.NetDevice`: the backlogs and draining them."""

    def frames_arrived(self) -> None:
        """The back end's fd is readable: queue its frames and fill receive buffers.

        A back end whose fd failed for good (a tap deleted under it) answers
        :meth:`FrameBackend.fileno` None from then on: stop watching it, or the
        loop would spin on an fd that stays "readable".
        """
        if isinstance(self.backend, OffloadBackend):
            direct = (self._rx_read_into is not None and self._host is not None
                      and self.config.queues == 1 and self.header_size == HDR_SIZE)
            if direct and self._host is not None:
                # Read straight into the guest's buffers, in the receive queue's drain.
                self._tap_waiting, self._tap_rerun = True, False
                self._host.process_queue(RECEIVEQ)
            if not direct or (self._tap_waiting and not self._tap_rerun):
                # No receive buffer (or the ring is not running): into the backlog.
                self._tap_waiting = False
                self.deliver_packets(self.backend.receive_packets())
        elif isinstance(self.backend, SwitchPort) and self.backend.pause_reading:
            # A switch port: read no more than the backlog can take (a batch datagram
            # is taken whole: up to a transmit batch beyond the limit); frames come
            # with their offloads.
            room = RX_BACKLOG - TX_BATCH - max(len(backlog) for backlog in self._backlogs)
            if room > 0:
                self.deliver(*self.backend.receive_packets(min(room, RECEIVE_BUDGET)))
        else:
            self.deliver(self.backend.receive())
        if self._watched is not None and self.backend.fileno() is None:
            log.error("the back end's fd %d failed; no more frames will reach the guest",
                      self._watched)
            if self._host is not None:
                self._host.unwatch_fd(self._watched)
            self._watched = None
            return
        if (self._watched is not None and self._host is not None and not self._rx_paused
                and getattr(self.backend, "pause_reading", False)
                and any(len(backlog) >= RX_PAUSE for backlog in self._backlogs)):
            # The driver takes frames slower than they come: leave them in the back
            # end's socket, whose sender then waits (or drops), until it took these.
            self._rx_paused = True
            self._host.unwatch_fd(self._watched)
            self._rx_timer = self._host.call_later(RX_MAX_AGE, self._rx_resume)

    def _rx_resume(self) -> None:
        """Read the back end again (after the backlogs drained, or :data:`RX_MAX_AGE`:
        frames that waited that long are dropped now)."""
        if not self._rx_paused:
            return
        self._rx_paused = False
        if self._rx_timer is not None:
            self._rx_timer.cancel()  # a later pause gets a timer of its own
            self._rx_timer = None
        self._expire(time.monotonic())
        if self._host is not None and self._watched is not None:
            self._host.watch_fd(self._watched, self.frames_arrived)

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

    def accepts_offloads(self, header: NetHeader, length: int) -> bool:
        """Whether a packet with this offload header and length may reach the driver
        as it is: it negotiated those offloads (§5.1.9.4.1).  A switch port of this
        process asks before it hands one over (else it does them in software)."""
        return rx_header_problem(header, length, self.features,
                                 max_frame=self.config.max_frame) is None

    def deliver(self, frames: list[bytes] | list[memoryview] | list[bytes | memoryview],
                headers: dict[int, NetHeader] | None = None) -> None:
        """Queue ``frames`` for the guest and have the receive queue processed.

        ``headers``: the offloads of some frames, by index (a port of the same daemon
        hands them over only if :meth:`accepts_offloads` said yes); the others
        have none.  A frame may be a view of another guest's transmit buffer (a
        port of the same daemon, :mod:`.hub`), valid only during this call: it is
        copied straight into a receive buffer if one is there, and what still waits
        is copied into a bytes object before this returns.
        """
        ready = self._ready_rx_queues()
        only = ready[0] if len(ready) == 1 else None  # nothing to steer
        max_frame = self.config.max_frame
        good: list[tuple[int, NetHeader | None, bytes]] = []
        views = False
        for index, given in enumerate(frames):
            frame = given
            if isinstance(given, memoryview):
                views = True
                if len(ready) > 1:  # steering reads the headers into dictionary keys
                    frame = bytes(given)
            queue = only if only is not None else self._steer(frame, ready)  # type: ignore[arg-type]
            header = headers.get(index) if headers else None
            if header is not None:
                problem = rx_header_problem(header, len(frame), self.features,
                                            max_frame=max_frame)
                if problem is None:
                    good.append((queue, header, frame))  # type: ignore[arg-type]
                else:
                    self._drop(queue, problem[0], "receive: %s", problem[1])
            elif not ETH_HLEN <= len(frame) <= max_frame:
                self._drop(queue, "bad frame size", "receive: dropped a %d-byte frame "
                           "(accepted: %d..%d)", len(frame), ETH_HLEN, max_frame)
            else:
                good.append((queue, None, frame))  # type: ignore[arg-type]
        self._enqueue(good)
        if views:
            self._keep(len(good))

    def _keep(self, count: int) -> None:
        """Copy the views among the last ``count`` frames of each backlog into bytes."""
        for backlog in self._backlogs:
            for i in range(len(backlog) - 1, max(len(backlog) - count, 0) - 1, -1):
                arrived, header, frame = backlog[i]
                if isinstance(frame, memoryview):
                    backlog[i] = (arrived, header, bytes(frame))

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
        self._expire(now)
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

    def _expire(self, now: float) -> None:
        """Drop the waiting frames older than :data:`RX_MAX_AGE` (counted)."""
        for index, backlog in enumerate(self._backlogs):
            while backlog and now - backlog[0][0] > RX_MAX_AGE:
                backlog.popleft()
                self._drop(2 * index, "no rx buffer", "receive: a frame waited %.1f s for "
                           "a buffer; dropped", RX_MAX_AGE)

    def rx_pressure(self) -> bool:
        """Whether senders in this process should hold frames for this device now.

        True while a receive backlog is at least half full and its oldest frame
        waited less than :data:`RX_PRESSURE_AGE`: the driver takes frames, only
        slower than they come, so they wait in the sender's ring instead of being
        dropped here.  A driver that takes none for longer gets them dropped as
        usual (a stuck guest never holds up its peers for long).
        """
        now = time.monotonic()
        for backlog in self._backlogs:
            if len(backlog) >= RX_BACKLOG // 2 and now - backlog[0][0] < RX_PRESSURE_AGE:
                return True
        return False

    def has_work(self, queue: int) -> bool:
        """A receive queue takes a buffer only when a frame waits for it."""
        if queue % 2 or queue >= self.control_queue:
            return True
        return bool(self._backlogs[queue // 2]) or self._tap_waiting

    def drives_queue(self, queue: int) -> bool:
        """The receive and transmit queues (below the control queue) are drained by
        :meth:`drive_queue`; the control queue one chain at a time (:meth:`handle_chain`)."""
        return queue < self.control_queue

    def drive_queue(self, ctx: QueueContext) -> None:
        """Fill receive buffers with waiting frames, as long as frames and buffers last.

        A buffer is taken only while a frame waits (:meth:`has_work`), so the
        driver's buffers stay available until one arrives.  Without MRG_RXBUF
        one buffer per frame (:meth:`_receive`); with it, as many as the frame
        needs (:meth:`_receive_merged`).  Every chain popped counts against
        ``ctx.budget``, a rule-breaking one too (a driver re-publishing bad
        chains as fast as they are returned must not hold the loop either); one
        frame's chains are taken together even beyond it (at most the ring).
        """
        if ctx.index % 2:
            self.drive_tx(ctx)
            return
        self._drive_rx(ctx)
        if self._rx_drained is not None:
            self._rx_drained()
        if self._rx_paused and all(len(b) < RX_PAUSE for b in self._backlogs):
            self._rx_resume()

    def _drive_rx(self, ctx: QueueContext) -> None:
        """:meth:`drive_queue` for a receive queue.

        A frame that fits the first buffer of one chain (the common case) is
        written there directly (:meth:`_receive_fast`); the chains filled so far
        are used together when the drain ends (one used-index update), or before
        anything else is used (a merged frame's chains, a violation's chain), so
        the used ring keeps the order they were taken in.
        """
        index, queue = ctx.index, ctx.queue
        backlog = self._backlogs[index // 2]
        stats = self.stats[index]
        merge = self.has_feature(NetFeature.MRG_RXBUF)
        size = self.header_size
        plain = HDR.pack(0, GsoType.NONE, 0, 0, 0, 0, 1)[:size]
        used: list[tuple[int, int]] = []
        try:
            while True:
                queue.disable_notifications()
                while True:
                    if ctx.budget <= 0:
                        ctx.rerun()
                        self._tap_rerun = True
                        return
                    direct = not backlog
                    if direct and not self._tap_waiting:
                        # No frame waits: leave the buffers available and ask for kicks
                        # again; _enqueue has the queue processed when one arrives.
                        queue.enable_notifications()
                        return
                    if merge or direct:
                        queue.mark()  # the frame's chains may have to go back
                    ctx.budget -= 1
                    try:
                        chain = queue.pop()
                    except VirtqueueError as exc:
                        _use(queue, used)
                        if ctx.violation(exc):
                            return
                        continue
                    if chain is None:
                        break
                    if direct:
                        written = self._tap_receive(index, chain)
                        if written is None:
                            queue.rewind()  # the chain stays available
                            if backlog:
                                continue  # a packet longer than the chain waits there
                            self._tap_waiting = False  # the tap has no more
                            queue.enable_notifications()
                            return
                        stats.requests += 1
                        used.append((chain.head, written))
                        continue
                    written = self._receive_fast(index, chain, size, plain)
                    if written is not None:
                        stats.requests += 1
                        used.append((chain.head, written))
                        continue
                    if merge:
                        if self._receive_merged(ctx, chain, used):
                            return
                        continue
                    try:
                        written = self._receive(index, chain)
                    except Exception:
                        log.exception("queue %d: device failed on chain %d", index,
                                      chain.head)
                        stats.errors += 1
                        written = 0
                    stats.requests += 1
                    used.append((chain.head, written))
                if not queue.enable_notifications():
                    return
        finally:
            _use(queue, used)

    def _receive_fast(self, queue: int, chain: DescriptorChain, size: int,
                      plain: bytes) -> int | None:
        """Write the next waiting frame of ``queue`` and its header into the first
        buffer of ``chain``, if it is a plain frame (no offload header) and fits
        there, and the chain has only writable buffers; else None (nothing done)."""
        backlog = self._backlogs[queue // 2]
        _, offload, frame = backlog[0]
        writable = chain.writable
        if offload is not None or chain.readable or not writable:
            return None
        first = writable[0]
        need = size + len(frame)
        if len(first) < need:
            return None
        backlog.popleft()
        first[:size] = plain
        first[size:need] = frame
        if self.pcap is not None:
            self.pcap.write(frame)
        self.stats[queue].bytes_in += len(frame)  # as _received counts a plain frame
        return need

    def _receive_merged(self, ctx: QueueContext, first: DescriptorChain,
                        used: list[tuple[int, int]]) -> bool:
        """Take chains after ``first`` until they hold the next waiting frame of
        ``ctx.queue`` with its header (§5.1.9.4), fill them and use them together,
        so the driver never sees part of a frame: one used index update for them
        all on a split ring (§2.7.8.2), the first used descriptor's flags written
        last on a packed one (§2.8.21.1).  The ring was marked before ``first``.

        - Too few chains available: they go back (they stay available, nothing is
          used) and the device waits for the driver to notify it about the buffer
          after the last available one (``enable_notifications(at=end)``).
        - Even every chain the ring can hold at once is too short: the chains stay
          available, the frame is dropped (``dropped: rx ring too small``).
        - A chain taken for it breaks the rules: the chains taken before it go back
          with length 0, the bad one as any violation (``ctx.violation``), and the
          frame is dropped (``dropped: rx driver violation``).

        ``used``: chains filled before ``first`` and not used yet; they are used
        before (and together with) this frame's, or stay pending when the chains
        go back (a push would end the mark).

        Returns:
            Whether draining must stop (the ring is broken, the device needs a
            reset, or it waits for the driver's notification).
        """
        index, queue = ctx.index, ctx.queue
        need = self.header_size + len(self._backlogs[index // 2][0][2])
        chains = [first]
        have = first.writable_len
        while have < need:
            ctx.budget -= 1
            try:
                chain = queue.pop()
            except VirtqueueError as exc:
                queue.push_many(used + [(c.head, 0) for c in chains])
                used.clear()
                stop = ctx.violation(exc)
                self._merge_failed(index, "driver violation",
                                   f"{len(chains)} buffers returned empty; {exc}")
                return stop
            if chain is None:
                # Chains filled before this frame and not used yet go back to the
                # driver right after: with them the ring is not full.
                if queue.ring_full() and not used:
                    queue.rewind()
                    self._merge_failed(
                        index, "ring too small",
                        f"{need} bytes needed; all {len(chains)} buffers the ring of "
                        f"{queue.size} can hold at once have {have}",
                    )
                    return False
                end = queue.last_avail_idx
                queue.rewind()
                return not queue.enable_notifications(at=end)
            chains.append(chain)
            have += chain.writable_len
        stats = self.stats[index]
        try:
            written = self._merge_into(index, chains)
        except Exception:
            log.exception("queue %d: device failed on chains %s", index,
                          [c.head for c in chains])
            stats.errors += 1
            written = [0] * len(chains)
        if len(written) != len(chains) or any(
            not 0 <= n <= c.writable_len for c, n in zip(chains, written, strict=False)
        ):
            log.error("queue %d: device reported lengths %s for chains of %s writable bytes",
                      index, written, [c.writable_len for c in chains])
            stats.errors += 1
            written = [0] * len(chains)
        queue.push_many(used + [(c.head, n) for c, n in zip(chains, written, strict=True)])
        used.clear()
        stats.requests += 1
        return False

    def _merge_into(self, queue: int, chains: list[DescriptorChain]) -> list[int]:
        """Spread the next waiting frame of receive ``queue`` over ``chains`` (§5.1.9.4).

        The header starts the first buffer, with ``num_buffers`` the number of
        chains ("the device MUST set num_buffers to indicate the number of buffers
        the packet (including the header) is spread over"); the frame follows and
        fills each buffer completely before the next ("MUST use all buffers but
        the last ... completely up to the full length of each buffer"), so the
        other buffers hold only data.  :meth:`_receive_merged` uses the chains together.

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
        if room < size + len(frame):  # the caller takes enough; never trust it blindly
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

    def _merge_failed(self, queue: int, why: str, detail: str) -> None:
        """Drop the next waiting frame of receive ``queue``: the ring cannot take it."""
        _, _, frame = self._backlogs[queue // 2].popleft()
        self._drop(queue, f"rx {why}", "receive: a %d-byte frame: %s", len(frame), detail)
