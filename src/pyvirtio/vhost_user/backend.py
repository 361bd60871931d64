"""The vhost-user back-end: protocol state and queue processing for one device.

:class:`VhostUserBackend` takes decoded :class:`~pyvirtio.vhost_user.protocol.Message`
objects and returns reply bytes.  It owns the guest memory, the vrings and the
fds the front-end sent, and drains queues when told a kick arrived.  It does no
socket I/O: the runtime feeds it messages and tells it about kicks, and it
asks an :class:`FdWatcher` to watch or forget kick eventfds.

Ring states follow vhost-user.rst "Ring states": a ring starts when its kick
fd arrives and stops on ``GET_VRING_BASE``; it is processed only while started
and enabled.

With VIRTIO_F_RING_PACKED negotiated the rings are packed
(:class:`~pyvirtio.virtqueue.packed.PackedQueue`), and ``SET/GET_VRING_BASE``
carry both ring positions and both wrap counters
(:func:`~pyvirtio.virtqueue.packed.encode_vring_base`); a split ring's base is
its next available index.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal, Protocol

from pyvirtio.devices.base import MergeFailure, VirtioDevice
from pyvirtio.errors import (
    BadMemoryRegion,
    BadRingState,
    MissingFds,
    NoBackendChannel,
    PyVirtioError,
    UnknownRequest,
    VhostUserError,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory, MemoryRegion, RegionSpec, create_memfd
from pyvirtio.spec.common import DeviceStatus, Feature
from pyvirtio.spec.virtqueue import (
    EVENT_SUPPRESS_SIZE,
    MAX_QUEUE_SIZE,
    PACKED_DESC,
    VIRTQ_DESC_F_USED,
    avail_ring_size,
    desc_table_size,
    packed_ring_size,
    used_ring_size,
)
from pyvirtio.vhost_user.channel import AckCallback, BackendChannel
from pyvirtio.vhost_user.protocol import (
    DEFAULT_PROTOCOL_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigPayload,
    InflightInfo,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    close_fds,
    decode_config,
    decode_inflight,
    decode_mem_table,
    decode_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_state,
    encode,
    encode_config,
    encode_inflight,
    encode_u64,
    encode_vring_state,
)
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.inflight import InflightRegion, region_size
from pyvirtio.virtqueue.packed import (
    INITIAL_VRING_BASE,
    PackedQueue,
    PackedRingAddresses,
    check_packed_queue_size,
    complete_vring_base,
)
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue, check_queue_size

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "FdWatcher", "VhostUserBackend", "Vring"]

log = logging.getLogger(__name__)

#: Memory slots offered with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32
#: Most driver-violation log lines per second (the rest are counted).
VIOLATION_LOG_BURST = 20
#: Most chains one queue handles before the loop turns to other work.
DRAIN_BUDGET = 256

#: A running queue of either layout.
Virtqueue = SplitQueue | PackedQueue


class InflightBuffer:
    """The mapped inflight buffer: one :class:`InflightRegion` per queue."""

    def __init__(self, fd: int, info: InflightInfo) -> None:
        """Map ``info.mmap_size`` bytes of ``fd``.

        Raises:
            BadMemoryRegion: the fd is too small or cannot be mapped.
        """
        need = info.num_queues * region_size(info.queue_size)
        if info.mmap_size < need:
            raise BadMemoryRegion(f"inflight buffer of {info.mmap_size} bytes, {need} needed")
        self._region = MemoryRegion(RegionSpec(0, info.mmap_size, 0, info.mmap_offset), fd)
        self.info = info

    def region(self, queue: int, size: int) -> InflightRegion | None:
        """The region of ``queue`` if the buffer covers it and its size matches."""
        info = self.info
        if queue >= info.num_queues or size != info.queue_size:
            log.warning("queue %d (size %d) is not covered by the inflight buffer "
                        "(%d queues of %d)", queue, size, info.num_queues, info.queue_size)
            return None
        step = region_size(size)
        return InflightRegion(self._region.view[queue * step : (queue + 1) * step], size)

    def close(self) -> None:
        """Unmap the buffer (the front-end keeps its own mapping)."""
        self._region.release()


def _ring_base(queue: Virtqueue) -> int:
    """The queue's state as ``GET_VRING_BASE`` reports it (vhost-user.rst, "Vring
    descriptor index for split virtqueues" / "indices for packed virtqueues")."""
    if isinstance(queue, PackedQueue):
        return queue.vring_base
    return queue.last_avail_idx


def _region_key(spec: RegionSpec) -> tuple[int, int, int]:
    """What identifies a region in ADD_MEM_REG / REM_MEM_REG: GPA, size, user address."""
    return (spec.guest_addr, spec.size, spec.user_addr)


class FdWatcher(Protocol):
    """Whoever polls kick eventfds (the runtime's event loop)."""

    def watch_kick(self, fd: int, queue: int) -> None:
        """Start polling ``fd``; call :meth:`VhostUserBackend.kick` when readable."""

    def unwatch_kick(self, fd: int) -> None:
        """Stop polling ``fd`` (it is about to be closed)."""

    def watch_channel(self, fd: int, channel: BackendChannel) -> None:
        """Carry ``channel``'s messages over ``fd`` (the back-end request channel's
        socket): attach a transport that writes to it, and feed the channel what
        the front-end answers (:meth:`BackendChannel.receive`)."""

    def unwatch_channel(self, fd: int) -> None:
        """Stop reading ``fd`` (the channel is about to be closed)."""


class Vring:
    """Front-end supplied state of one virtqueue."""

    __slots__ = (
        "addr",
        "base",
        "call_fd",
        "enabled",
        "err_fd",
        "index",
        "kick_fd",
        "queue",
        "size",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addr: VringAddr | None = None
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        #: The running queue while the ring is started.
        self.queue: Virtqueue | None = None

    @property
    def started(self) -> bool:
        """The ring has a kick fd (or, with in-band kicks, runs) and was not stopped since."""
        return self.kick_fd is not None or self.queue is not None


class VhostUserBackend:
    """Protocol state machine of a vhost-user back-end serving one device.

    Args:
        device: the device model.
        watcher: polls kick fds; ``None`` for purely in-memory use (tests call
            :meth:`kick` themselves).
        strict: on the first driver violation, set DEVICE_NEEDS_RESET and stop
            serving (instead of returning the bad chain and going on).
        inband_notifications: also offer INBAND_NOTIFICATIONS: kicks may come
            as VRING_KICK messages and calls go back as VRING_CALL messages on
            the back-end request channel (vhost-user.rst "In-band
            notifications"; for simulations, not advised otherwise).
        packed_rings: offer VIRTIO_F_RING_PACKED (§2.8); without it every
            front-end uses split rings (§2.7), e.g. to test a driver's split path
            with one that would otherwise pick packed rings (user-mode Linux).
    """

    def __init__(
        self,
        device: VirtioDevice,
        watcher: FdWatcher | None = None,
        *,
        strict: bool = False,
        inband_notifications: bool = False,
        packed_rings: bool = True,
    ) -> None:
        self.device = device
        self.watcher = watcher
        self.memory = GuestMemory(MAX_MEM_SLOTS)
        #: How many times each mapped region (GPA, size, user address) was added; see
        #: :meth:`_add_mem_reg`.
        self._region_refs: Counter[tuple[int, int, int]] = Counter()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.protocol_features_offered = DEFAULT_PROTOCOL_FEATURES
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        #: A failure reply to send before disconnecting, set when :meth:`handle` raises.
        self.pending_reply: bytes | None = None
        #: Violation log rate limit: window start, lines logged in it, lines held back.
        self._log_window = 0.0
        self._log_count = 0
        self._log_suppressed = 0
        #: Queues that used up their drain budget with work left.
        self._rerun: set[int] = set()
        #: Device status as the front-end set it (STATUS protocol feature), plus
        #: DEVICE_NEEDS_RESET once a strict device saw a violation.
        self.status = 0
        self.strict = strict
        self.packed_rings = packed_rings
        #: The inflight buffer the front-end handed over (SET_INFLIGHT_FD).
        self._inflight: InflightBuffer | None = None
        #: Fds to send with the reply :meth:`handle` just returned (the caller closes them).
        self.reply_fds: list[int] = []
        if device.supports_inflight:
            self.protocol_features_offered |= 1 << ProtocolFeature.INFLIGHT_SHMFD
        # The back-end request channel: CONFIG_CHANGE_MSG (a blk resize) and, for
        # front-ends that want them, in-band notifications.  User-mode Linux needs it
        # (without it the UML driver's interrupt setup fails).
        self.protocol_features_offered |= 1 << ProtocolFeature.BACKEND_REQ
        if inband_notifications:
            self.protocol_features_offered |= 1 << ProtocolFeature.INBAND_NOTIFICATIONS
        #: The back-end request channel (SET_BACKEND_REQ_FD) and its socket's fd.
        self.channel: BackendChannel | None = None
        self._channel_fd: int | None = None
        self._handlers: dict[int, Callable[[Message], bytes | int | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_device,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.VRING_KICK: self._vring_kick,
        }
        device.start()

    # -- entry points ----------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Handle one message; return the reply to send (or ``None``).

        Unused fds of the message are closed.

        Raises:
            VhostUserError: the message breaks the protocol; the connection
                should be dropped (any REPLY_ACK failure reply has been
                set in :attr:`pending_reply` first).
            BadMemoryRegion: a memory region cannot be used.
        """
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                raise UnknownRequest("request not supported by this back-end", request=msg.name)
            log.debug("%s flags=%#x size=%d fds=%d", msg.name, msg.flags, len(msg.payload),
                      len(msg.fds))
            try:
                result = handler(msg)
            except PyVirtioError as exc:
                if isinstance(exc, VhostUserError) and exc.request is None:
                    exc.request = msg.name
                    exc.args = (f"{msg.name}: {exc}",)
                self.pending_reply = self._ack(msg, 1)
                raise
            if isinstance(result, bytes):
                return encode(msg.request, result, reply=True)
            return self._ack(msg, result or 0)
        finally:
            msg.close_fds()

    def _ack(self, msg: Message, status: int) -> bytes | None:
        if msg.need_reply and self.protocol_features >> ProtocolFeature.REPLY_ACK & 1:
            return encode(msg.request, encode_u64(status), reply=True)
        return None

    def kick(self, queue: int) -> None:
        """The driver notified ``queue``: process it if the ring is running.

        Devices whose queues fill from outside (a network device's receive queue)
        call this too, through :meth:`pyvirtio.devices.base.DeviceHost.process_queue`,
        when they have new work for buffers the driver already made available.
        """
        vring = self.vrings[queue]
        if vring.queue is not None and vring.enabled and not self.needs_reset:
            self._process(vring)

    def queue_ready(self, queue: int) -> bool:
        """Whether ``queue`` is started and enabled, and the device serves (not NEEDS_RESET)."""
        if not 0 <= queue < len(self.vrings):
            return False
        vring = self.vrings[queue]
        return vring.queue is not None and vring.enabled and not self.needs_reset

    def disconnect(self) -> None:
        """The front-end went away: forget everything it set up."""
        for vring in self.vrings:
            self._stop(vring)
            close_fds([vring.call_fd])
            close_fds([vring.err_fd])
            self.vrings[vring.index] = Vring(vring.index)
        self.memory.clear()
        self._region_refs.clear()
        self.close_channel()
        self._rerun.clear()
        self.status = 0
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.device.start()

    # -- queue processing --------------------------------------------------------------

    def _process(self, vring: Vring) -> None:
        """Drain a queue in one batch and signal the driver at most once (§2.7.7).

        At most :data:`DRAIN_BUDGET` chains are handled per call, so one flooded
        queue cannot starve the other queues or the control socket; a queue
        with work left is run again by :meth:`recheck`.  A request the device
        spreads over several chains (:meth:`VirtioDevice.merge_bytes`) is served
        by :meth:`_serve_merged`; its chains count against the budget too, but
        are never cut short by it.
        """
        queue = vring.queue
        assert queue is not None
        index = vring.index
        stats = self.device.stats[index]
        handle = self.device.handle_chain
        has_work = self.device.has_work
        merge_bytes = self.device.merge_bytes
        budget = DRAIN_BUDGET
        self._rerun.discard(index)
        stop = False
        while not stop:
            queue.disable_notifications()
            while True:
                if budget <= 0:
                    self._rerun.add(index)
                    stop = True
                    break
                if not has_work(index):
                    # Nothing to put in the driver's buffers yet (a receive queue with
                    # no packet waiting): leave them available and ask for kicks again;
                    # the device calls :meth:`kick` when it has work.
                    queue.enable_notifications()
                    stop = True
                    break
                need = merge_bytes(index)
                if need:
                    queue.mark()  # the request's chains may have to go back
                # Every pop counts, a rule-breaking chain too: a driver re-publishing
                # bad chains as fast as they are returned must not hold the loop either.
                budget -= 1
                try:
                    chain = queue.pop()
                except VirtqueueError as exc:
                    self._violation(vring, queue, exc)
                    if queue.broken is not None or self.needs_reset:
                        stop = True
                        break
                    continue
                if chain is None:
                    break
                if need:
                    taken, stop = self._serve_merged(vring, queue, chain, need)
                    budget -= taken
                    if stop:
                        break
                    continue
                try:
                    written = handle(index, chain)
                except Exception:
                    log.exception("queue %d: device failed on chain %d", index, chain.head)
                    stats.errors += 1
                    written = 0
                queue.push(chain.head, written)
                stats.requests += 1
            if not stop and not queue.enable_notifications():
                break
        if queue.needs_notification():
            self._signal(vring, "call")

    def _serve_merged(
        self, vring: Vring, queue: Virtqueue, first: DescriptorChain, need: int
    ) -> tuple[int, bool]:
        """Serve one request that needs ``need`` writable bytes, starting with ``first``.

        Pops further chains until their writable bytes reach ``need``, has the
        device fill them (:meth:`VirtioDevice.handle_chains`) and uses them all at
        once (``push_many``): the driver must never see the first buffer of a
        request before the last (virtio-net §5.1.9.4: "the device MUST use all
        buffers used by a single receive packet together"; Linux drops the packet
        as "rx error: N buffers missing" if it looks in between).

        When the ring has no more chains, the ones taken go back (``rewind``):

        - if they are every chain the ring can hold, waiting cannot help: the
          device drops the request (:attr:`MergeFailure.RING_TOO_SMALL`);
        - otherwise the device waits for the driver to add buffers beyond those it
          already made available: notifications are enabled from there (with
          EVENT_IDX, ``avail_event`` or the device event at that position, not at
          the rewound one, which the driver has passed: it would never notify, and
          the next drain would pop the same chains again).

        A chain that breaks the rules ends the request: the chains taken before it
        go back with length 0, the bad one as :meth:`_violation` returns it, and
        the device drops the request (:attr:`MergeFailure.VIOLATION`).

        Returns:
            The chains popped after ``first`` (for the drain budget), and whether
            the drain stops here.
        """
        index = vring.index
        device = self.device
        chains = [first]
        have = first.writable_len
        popped = 0
        while have < need:
            popped += 1
            try:
                chain = queue.pop()
            except VirtqueueError as exc:
                queue.push_many([(c.head, 0) for c in chains])
                self._violation(vring, queue, exc)
                device.merge_failed(index, MergeFailure.VIOLATION,
                                    f"{len(chains)} buffers returned empty; {exc}")
                return popped, queue.broken is not None or self.needs_reset
            if chain is None:
                if queue.ring_full():
                    queue.rewind()
                    device.merge_failed(
                        index, MergeFailure.RING_TOO_SMALL,
                        f"{need} bytes needed; all {len(chains)} buffers the ring of "
                        f"{vring.size} can hold at once have {have}",
                    )
                    return popped, False
                end = queue.last_avail_idx
                queue.rewind()
                # The driver added buffers meanwhile: try again (each retry follows
                # new buffers, and pops count against the budget: no spinning).
                return popped, not queue.enable_notifications(at=end)
            chains.append(chain)
            have += chain.writable_len
        stats = device.stats[index]
        try:
            written = device.handle_chains(index, chains)
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
        queue.push_many([(c.head, n) for c, n in zip(chains, written, strict=True)])
        stats.requests += 1
        return popped, False

    @property
    def needs_reset(self) -> bool:
        """The device set DEVICE_NEEDS_RESET and serves nothing until reset (§2.1)."""
        return bool(self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    def _log_violation(self, exc: VirtqueueError) -> None:
        """Log a violation, at most :data:`VIOLATION_LOG_BURST` lines a second.

        A guest that floods the rings with broken chains must not flood the log;
        the statistics still count every violation.
        """
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._log_suppressed:
                log.error("%d more driver violations in the last second were not logged "
                          "(the queue statistics count them all)", self._log_suppressed)
            self._log_window, self._log_count, self._log_suppressed = now, 0, 0
        if self._log_count < VIOLATION_LOG_BURST:
            self._log_count += 1
            log.error("driver violation: %s", exc)
        else:
            self._log_suppressed += 1

    def _violation(self, vring: Vring, queue: Virtqueue, exc: VirtqueueError) -> None:
        """Report a driver's spec violation; in strict mode, give up until reset."""
        self.device.stats[vring.index].violations += 1
        self._log_violation(exc)
        if self.strict:
            self.status |= DeviceStatus.DEVICE_NEEDS_RESET
            log.error(
                "--strict: the device enters DEVICE_NEEDS_RESET (VIRTIO 1.4 §2.1.2) and "
                "serves no queue until the driver resets it"
            )
            self._signal(vring, "error")  # vhost-user's way to flag a vring error
            return
        if exc.head is not None:
            queue.push(exc.head, 0)
        if queue.broken is not None:
            log.error("queue %d stops until the device is reset", vring.index)

    @property
    def recheck_interval(self) -> float | None:
        """Seconds until :meth:`recheck` is due, or ``None`` when nothing waits."""
        return 0.0 if self._rerun else None

    def recheck(self) -> None:
        """Run the queues their drain budget left with work."""
        for index in sorted(self._rerun):
            vring = self.vrings[index]
            if vring.queue is None or not vring.enabled or self.needs_reset:
                self._rerun.discard(index)
            else:
                self._process(vring)

    def _start(self, vring: Vring) -> None:
        """(Re)build the running queue from the ring's addresses and base."""
        if vring.addr is None or vring.size == 0:
            raise BadRingState(f"queue {vring.index} started before its size and addresses")
        base = self._packed_base(vring) if self._packed() else vring.base
        queue = self._make_queue(vring, base)
        vring.queue = queue
        inflight = self._inflight
        if isinstance(queue, SplitQueue) and inflight is not None:
            region = inflight.region(vring.index, vring.size)
            if region is not None:
                resubmitted = queue.attach_inflight(region)
                if resubmitted:
                    log.info("queue %d: resubmitting %d requests a previous back-end left "
                             "in flight", vring.index, resubmitted)
        if vring.enabled:
            self._process(vring)

    def _rebuild(self, vring: Vring) -> None:
        """Re-create a running queue in place (new addresses or memory), keeping its state."""
        old = vring.queue
        assert old is not None
        new = self._make_queue(vring, _ring_base(old))
        if isinstance(old, SplitQueue) and isinstance(new, SplitQueue):
            new.take_over(old)
        vring.queue = new

    def _packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: the rings are packed (VIRTIO 1.4 §2.8)."""
        return self.device.has_feature(Feature.RING_PACKED)

    def _make_queue(self, vring: Vring, base: int) -> Virtqueue:
        addr = vring.addr
        assert addr is not None
        size = vring.size
        packed = self._packed()
        if packed:  # §2.8.10.1 sizes, §2.8.11 alignments
            parts = (
                ("descriptor ring", addr.desc_user_addr, packed_ring_size(size), 16),
                ("driver event suppression", addr.avail_user_addr, EVENT_SUPPRESS_SIZE, 4),
                ("device event suppression", addr.used_user_addr, EVENT_SUPPRESS_SIZE, 4),
            )
        else:
            parts = (
                ("descriptor table", addr.desc_user_addr, desc_table_size(size), 16),
                ("available ring", addr.avail_user_addr, avail_ring_size(size), 2),
                ("used ring", addr.used_user_addr, used_ring_size(size), 4),
            )
        gpas = []
        for name, user_addr, length, align in parts:
            if user_addr % align:
                raise BadRingState(
                    f"queue {vring.index} {name} at {user_addr:#x} is not {align}-byte aligned"
                )
            try:
                gpas.append(self.memory.user_to_guest(user_addr, length))
            except PyVirtioError as exc:
                raise BadRingState(f"queue {vring.index} {name}: {exc}") from exc
        if packed:
            try:
                return PackedQueue(
                    self.memory,
                    vring.index,
                    size,
                    PackedRingAddresses(*gpas),
                    event_idx=self.device.has_feature(Feature.EVENT_IDX),
                    indirect=self.device.has_feature(Feature.INDIRECT_DESC),
                    vring_base=base,
                )
            except ValueError as exc:
                raise BadRingState(f"queue {vring.index}: {exc}") from exc
        try:
            return SplitQueue(
                self.memory,
                vring.index,
                size,
                RingAddresses(*gpas),
                event_idx=self.device.has_feature(29),
                indirect=self.device.has_feature(28),
                last_avail_idx=base,
            )
        except ValueError as exc:  # a size set for packed rings, then split ones negotiated
            raise BadRingState(f"queue {vring.index}: {exc}") from exc

    def _stop(self, vring: Vring) -> int:
        """Stop the ring; return its base (the next available index, or the packed state)."""
        if vring.queue is not None:
            vring.base = _ring_base(vring.queue)
        vring.queue = None
        if vring.kick_fd is not None:
            if self.watcher is not None:
                self.watcher.unwatch_kick(vring.kick_fd)
            close_fds([vring.kick_fd])
            vring.kick_fd = None
        return vring.base

    def _memory_changed(self) -> None:
        """Re-translate every running ring after the memory table changed."""
        for vring in self.vrings:
            if vring.queue is None:
                continue
            try:
                self._rebuild(vring)
            except PyVirtioError as exc:
                log.warning("queue %d paused: %s", vring.index, exc)
                vring.base = _ring_base(vring.queue)
                vring.queue = None

    # -- message handlers ----------------------------------------------------------------

    def _vring(self, index: int, request: str) -> Vring:
        if index >= len(self.vrings):
            raise BadRingState(
                f"queue {index} does not exist (the device has {len(self.vrings)})",
                request=request,
            )
        return self.vrings[index]

    def offered_features(self) -> int:
        """What GET_FEATURES answers: the device's features, less RING_PACKED when
        packed rings are turned off (``packed_rings=False``), plus PROTOCOL_FEATURES."""
        offered = self.device.offered_features() | VHOST_USER_F_PROTOCOL_FEATURES
        if not self.packed_rings:
            offered &= ~(1 << Feature.RING_PACKED)
        return offered

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        features = decode_u64(msg)
        offered = self.offered_features()
        if features & ~offered:
            raise VhostUserError(f"features {features & ~offered:#x} were not offered")
        was_packed = self._packed()
        packed = bool(features >> Feature.RING_PACKED & 1)
        if packed != was_packed:
            for vring in self.vrings:
                if vring.queue is not None:
                    raise BadRingState(
                        f"queue {vring.index} is running: the ring layout cannot change"
                    )
                # A ring never moved from its start gets the new layout's start:
                # a packed ring begins with both wrap counters at 1 (§2.8.1).
                if vring.base == (INITIAL_VRING_BASE if was_packed else 0):
                    vring.base = INITIAL_VRING_BASE if packed else 0
        self.features = features
        self.device.set_features(features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            for vring in self.vrings:
                vring.enabled = True

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.protocol_features_offered)

    def _set_protocol_features(self, msg: Message) -> None:
        features = decode_u64(msg)
        if features & ~self.protocol_features_offered:
            raise VhostUserError(
                f"protocol features {features & ~self.protocol_features_offered:#x} "
                "were not offered"
            )
        # vhost-user.rst "In-band notifications": an error without the other two; the
        # back-end should close the connection.
        needs = (1 << ProtocolFeature.BACKEND_REQ) | (1 << ProtocolFeature.REPLY_ACK)
        if features >> ProtocolFeature.INBAND_NOTIFICATIONS & 1 and features & needs != needs:
            raise VhostUserError("INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK")
        self.protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop(vring)
            vring.enabled = False
            vring.base = 0
        self.features = 0
        self.status = 0
        self._rerun.clear()
        self.device.set_features(0)

    def _take_fds(self, msg: Message, count: int) -> list[int]:
        if len(msg.fds) < count:
            raise MissingFds(f"needs {count} fds, got {len(msg.fds)}", request=msg.name)
        fds, msg.fds = msg.fds[:count], msg.fds[count:]
        return fds

    def _set_mem_table(self, msg: Message) -> None:
        specs = decode_mem_table(msg)
        fds = self._take_fds(msg, len(specs))
        try:
            self.memory.set_table(zip(specs, fds, strict=True))
        finally:
            close_fds(fds)
        self._region_refs = Counter(_region_key(spec) for spec in specs)
        log.info(
            "memory table: %s",
            ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.memory.regions) or "empty",
        )
        self._memory_changed()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        """ADD_MEM_REG; a region identical to a mapped one is counted, not mapped again.

        QEMU keeps one memory table per vhost device, and a multiqueue
        virtio-net has one vhost device per queue pair on the same connection:
        each adds (and later removes) every region itself.  Each REM_MEM_REG
        then takes one count away; the last one unmaps the region.
        """
        spec = decode_region(msg)
        (fd,) = self._take_fds(msg, 1)
        key = _region_key(spec)
        try:
            if self._region_refs[key]:
                self._region_refs[key] += 1
                log.debug("region %#x+%#x added again (%d times)", spec.guest_addr, spec.size,
                          self._region_refs[key])
                return
            self.memory.add_region(spec, fd)
        finally:
            close_fds([fd])
        self._region_refs[key] = 1
        self._memory_changed()

    def _rem_mem_reg(self, msg: Message) -> None:
        spec = decode_region(msg)
        key = _region_key(spec)
        if self._region_refs[key] > 1:
            self._region_refs[key] -= 1
            return
        self.memory.remove_region(spec)
        self._region_refs.pop(key, None)
        self._memory_changed()

    def _set_vring_num(self, msg: Message) -> None:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        try:
            if self._packed():
                check_packed_queue_size(state.num)  # any size: no power of 2 needed
            else:
                check_queue_size(state.num)
        except ValueError as exc:
            raise BadRingState(str(exc)) from exc
        if state.num > limit:
            raise BadRingState(f"queue size {state.num} exceeds this device's maximum {limit}")
        vring.size = state.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg)
        vring = self._vring(addr.index, msg.name)
        vring.addr = addr
        if vring.queue is not None:
            self._rebuild(vring)

    def _set_vring_base(self, msg: Message) -> None:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        # A packed ring's base is checked against the size when the ring starts.
        if state.num > 0xFFFF and not self._packed():
            raise BadRingState(f"split ring base {state.num} exceeds 16 bits")
        vring.base = state.num

    def _get_vring_base(self, msg: Message) -> bytes:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        base = self._stop(vring)
        log.info("queue %d stopped at %s: %s", vring.index,
                 f"{base:#010x}" if self._packed() else base, self.device.stats[vring.index])
        return encode_vring_state(vring.index, base)

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        value = decode_u64(msg)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise BadRingState(f"unknown bits in {value:#x}")
        vring = self._vring(value & VRING_IDX_MASK, msg.name)
        if value & VRING_NOFD_MASK:
            return vring, None
        (fd,) = self._take_fds(msg, 1)
        return vring, fd

    def _set_vring_kick(self, msg: Message) -> None:
        """SET_VRING_KICK starts the ring (vhost-user.rst "Ring states").

        Without a fd the ring is started too when INBAND_NOTIFICATIONS is
        negotiated: kicks then come as VRING_KICK messages.
        """
        vring, fd = self._vring_fd(msg)
        if fd is None and not self._negotiated(ProtocolFeature.INBAND_NOTIFICATIONS):
            raise BadRingState("polling mode (no kick fd) is not supported")
        queue = vring.queue
        last_avail = _ring_base(queue) if queue is not None else vring.base
        self._stop(vring)
        vring.base = last_avail
        vring.kick_fd = fd
        try:
            self._start(vring)
        except PyVirtioError:
            self._stop(vring)
            raise
        if self.watcher is not None and fd is not None:
            self.watcher.watch_kick(fd, vring.index)

    def _packed_base(self, vring: Vring) -> int:
        """The base a packed ring starts from: ``vring.base``, read the way older
        front-ends meant it.

        A packed base carries both positions and both wrap counters (vhost-user.rst
        "indices for packed virtqueues"; a fresh ring is 0x80008000, §2.8.1), but:

        - DPDK 22.11 sends only the lower half (``0x8000`` for a fresh ring):
          :func:`complete_vring_base` takes the used half as the available one;
        - user-mode Linux sends 0, its split-ring value.  Base 0 (both positions 0,
          both counters 0) is also the state of a ring whose first lap was fully
          used, so descriptor 0 decides: after a used lap its flags have USED set
          (the device's used element, or the driver's next descriptor in wrap 0),
          while in a fresh ring USED is clear (zeroed memory, or the driver's first
          descriptor in wrap 1).
        """
        base = complete_vring_base(vring.base)
        if base != vring.base:
            log.info("queue %d: packed ring base %#x has no used half (an older front-end); "
                     "resuming with nothing in flight", vring.index, vring.base)
            return base
        if base != 0 or vring.addr is None:
            return base
        try:
            gpa = self.memory.user_to_guest(vring.addr.desc_user_addr, PACKED_DESC.size)
            flags = PACKED_DESC.unpack(self.memory.read(gpa, PACKED_DESC.size))[3]
        except PyVirtioError:
            return base  # _make_queue reports the bad address
        if flags & VIRTQ_DESC_F_USED:
            return base
        log.info("queue %d: packed ring base 0 from the front-end taken as a fresh ring "
                 "(wrap counters 1; descriptor 0 flags %#06x)", vring.index, flags)
        return INITIAL_VRING_BASE

    def _negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    def _signal(self, vring: Vring, kind: Literal["call", "error"]) -> None:
        """Signal ``vring``'s call (used buffers) or error: its eventfd, else in-band
        (VRING_CALL / VRING_ERR on the back-end channel, vhost-user.rst "In-band
        notifications")."""
        fd = vring.call_fd if kind == "call" else vring.err_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.error("queue %d: cannot signal %s fd: %s", vring.index, kind, exc)
            return
        channel = self.channel
        if channel is not None and channel.inband_notifications:
            send = channel.vring_call if kind == "call" else channel.vring_err
            try:
                send(vring.index)
            except PyVirtioError as exc:
                log.error("queue %d: cannot send the in-band %s: %s", vring.index, kind, exc)

    def _vring_kick(self, msg: Message) -> None:
        """VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS), ``num`` reserved as 0."""
        if not self._negotiated(ProtocolFeature.INBAND_NOTIFICATIONS):
            raise UnknownRequest("VRING_KICK without INBAND_NOTIFICATIONS negotiated")
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        if state.num != 0:
            raise BadRingState(f"reserved num field is {state.num}, must be 0")
        if vring.queue is None:
            # vhost-user.rst "Ring states": the first in-band kick starts the ring
            # (user-mode Linux sends no SET_VRING_KICK at all with in-band kicks).
            try:
                self._start(vring)
            except PyVirtioError:
                self._stop(vring)
                raise
            return
        self.kick(vring.index)

    def _set_backend_req_fd(self, msg: Message) -> None:
        """SET_BACKEND_REQ_FD: the socket of the back-end request channel.

        A new one replaces the old one (whose awaited answers will not come).
        """
        if not self._negotiated(ProtocolFeature.BACKEND_REQ):
            raise UnknownRequest("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
        (fd,) = self._take_fds(msg, 1)
        self.close_channel()
        self.channel = BackendChannel(
            reply_ack=self._negotiated(ProtocolFeature.REPLY_ACK),
            inband_notifications=self._negotiated(ProtocolFeature.INBAND_NOTIFICATIONS),
        )
        self._channel_fd = fd
        if self.watcher is not None:
            self.watcher.watch_channel(fd, self.channel)
        log.info("back-end request channel set up%s",
                 " (answers with REPLY_ACK)" if self.channel.reply_ack else "")

    def close_channel(self) -> None:
        """Forget the back-end request channel (disconnect, or a new one)."""
        fd, self._channel_fd = self._channel_fd, None
        if fd is not None:
            if self.watcher is not None:
                self.watcher.unwatch_channel(fd)
            close_fds([fd])
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def config_changed(self, on_ack: AckCallback | None = None) -> bool:
        """Tell the front-end that the config space changed (CONFIG_CHANGE_MSG).

        The front-end re-reads it (GET_CONFIG) and notifies the driver (VIRTIO
        1.4 §2.5.1).  ``on_ack`` gets the front-end's answer with REPLY_ACK.

        Returns:
            Whether an answer will come.

        Raises:
            NoBackendChannel: the front-end gave no back-end request channel
                (no front-end, BACKEND_REQ not negotiated, or no SET_BACKEND_REQ_FD).
            BackendChannelError: the message cannot be sent.
        """
        if self.channel is None:
            raise NoBackendChannel(
                "the front-end set up no back-end request channel (BACKEND_REQ, "
                "SET_BACKEND_REQ_FD): it cannot be told about the config change"
            )
        return self.channel.config_changed(on_ack)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fds([vring.call_fd])
        vring.call_fd = fd

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fds([vring.err_fd])
        vring.err_fd = fd

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(self.device.queue_num())

    def _set_vring_enable(self, msg: Message) -> None:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        if state.num > 1:
            raise BadRingState(f"enable value {state.num} is neither 0 nor 1")
        vring.enabled = bool(state.num)
        if vring.enabled and vring.queue is not None:
            self._process(vring)

    def _get_config(self, msg: Message) -> bytes:
        req: ConfigPayload = decode_config(msg)
        space = self.device.config_space()
        window = space[req.offset : req.offset + req.size]
        window += bytes(req.size - len(window))
        return encode_config(req.offset, req.size, req.flags, window)

    def _set_config(self, msg: Message) -> int:
        req = decode_config(msg)
        return 0 if self.device.write_config(req.offset, req.data) else 1

    def _set_status(self, msg: Message) -> None:
        """SET_STATUS: the driver's status byte; writing 0 resets the device (§2.1, §2.4)."""
        status = decode_u64(msg)
        if status > 0xFF:
            raise VhostUserError(f"status {status:#x} does not fit the 8-bit status field")
        if status == 0:
            if self.needs_reset:
                log.info("device reset by the driver: DEVICE_NEEDS_RESET cleared")
            self.status = 0
        else:
            self.status = status | (self.status & DeviceStatus.DEVICE_NEEDS_RESET)

    def _get_status(self, msg: Message) -> bytes:
        return encode_u64(self.status)

    def _check_inflight(self, info: InflightInfo) -> None:
        if not 1 <= info.num_queues <= len(self.vrings):
            raise BadRingState(f"inflight buffer for {info.num_queues} queues; the device "
                               f"has {len(self.vrings)}")
        if not 1 <= info.queue_size <= min(self.device.max_queue_size, MAX_QUEUE_SIZE):
            raise BadRingState(f"inflight buffer for queues of {info.queue_size}")

    def _get_inflight_fd(self, msg: Message) -> bytes:
        """GET_INFLIGHT_FD: a fresh, zeroed buffer for the front-end to keep."""
        info = decode_inflight(msg)
        self._check_inflight(info)
        size = info.num_queues * region_size(info.queue_size)
        self.reply_fds = [create_memfd(size, "pyvirtio-inflight")]
        return encode_inflight(InflightInfo(size, 0, info.num_queues, info.queue_size))

    def _set_inflight_fd(self, msg: Message) -> None:
        """SET_INFLIGHT_FD: the buffer to track (and recover) inflight requests in."""
        info = decode_inflight(msg)
        self._check_inflight(info)
        (fd,) = self._take_fds(msg, 1)
        try:
            buffer = InflightBuffer(fd, info)
        finally:
            close_fds([fd])
        if self._inflight is not None:
            self._inflight.close()
        self._inflight = buffer

