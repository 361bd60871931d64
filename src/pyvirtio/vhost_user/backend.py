"""The vhost-user back-end: protocol state and queue processing for one device.

:class:`VhostUserBackend` takes decoded :class:`~pyvirtio.vhost_user.protocol.Message`
objects and returns reply bytes.  It owns the guest memory, the vrings and the
fds the front-end sent, and drains queues when told a kick arrived.  It does no
socket I/O: the runtime feeds it messages and tells it about kicks, and it
asks an :class:`FdWatcher` to watch or forget kick eventfds.

Ring states follow vhost-user.rst "Ring states": a ring starts when its kick
fd arrives and stops on ``GET_VRING_BASE``; it is processed only while started
and enabled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.errors import (
    BadRingState,
    MissingFds,
    PyVirtioError,
    UnknownRequest,
    VhostUserError,
    VirtqueueError,
)
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.virtqueue import MAX_QUEUE_SIZE, avail_ring_size, desc_table_size, used_ring_size
from pyvirtio.vhost_user.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigPayload,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    close_fds,
    decode_config,
    decode_mem_table,
    decode_region,
    decode_u64,
    decode_vring_addr,
    decode_vring_state,
    encode,
    encode_config,
    encode_u64,
    encode_vring_state,
)
from pyvirtio.virtqueue.split import RingAddresses, SplitQueue, check_queue_size

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "FdWatcher", "VhostUserBackend", "Vring"]

log = logging.getLogger(__name__)

#: Protocol features every pyvirtio back-end offers.
DEFAULT_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32


class FdWatcher(Protocol):
    """Whoever polls kick eventfds (the runtime's event loop)."""

    def watch_kick(self, fd: int, queue: int) -> None:
        """Start polling ``fd``; call :meth:`VhostUserBackend.kick` when readable."""

    def unwatch_kick(self, fd: int) -> None:
        """Stop polling ``fd`` (it is about to be closed)."""


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
        self.queue: SplitQueue | None = None

    @property
    def started(self) -> bool:
        """The ring has a kick fd and has not been stopped since."""
        return self.kick_fd is not None


class VhostUserBackend:
    """Protocol state machine of a vhost-user back-end serving one device.

    Args:
        device: the device model.
        watcher: polls kick fds; ``None`` for purely in-memory use (tests call
            :meth:`kick` themselves).
    """

    def __init__(self, device: VirtioDevice, watcher: FdWatcher | None = None) -> None:
        self.device = device
        self.watcher = watcher
        self.memory = GuestMemory(MAX_MEM_SLOTS)
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.protocol_features_offered = DEFAULT_PROTOCOL_FEATURES
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        #: A failure reply to send before disconnecting, set when :meth:`handle` raises.
        self.pending_reply: bytes | None = None
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
        """The driver notified ``queue``: process it if the ring is running."""
        vring = self.vrings[queue]
        if vring.queue is not None and vring.enabled:
            self._process(vring)

    def disconnect(self) -> None:
        """The front-end went away: forget everything it set up."""
        for vring in self.vrings:
            self._stop(vring)
            close_fds([vring.call_fd])
            close_fds([vring.err_fd])
            self.vrings[vring.index] = Vring(vring.index)
        self.memory.clear()
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.device.start()

    # -- queue processing --------------------------------------------------------------

    def _process(self, vring: Vring) -> None:
        """Drain a queue in one batch and signal the driver at most once (§2.7.7)."""
        queue = vring.queue
        assert queue is not None
        device = self.device
        stats = device.stats[vring.index]
        handle = device.handle_chain
        while True:
            queue.disable_notifications()
            while True:
                try:
                    chain = queue.pop()
                except VirtqueueError as exc:
                    stats.violations += 1
                    log.error("driver violation: %s", exc)
                    if exc.head is not None:
                        queue.push(exc.head, 0)
                    if queue.broken is not None:
                        log.error("queue %d stops until the device is reset", vring.index)
                        break
                    continue
                if chain is None:
                    break
                try:
                    written = handle(vring.index, chain)
                except Exception:
                    log.exception("queue %d: device failed on chain %d", vring.index, chain.head)
                    stats.errors += 1
                    written = 0
                queue.push(chain.head, written)
                stats.requests += 1
            if not queue.enable_notifications():
                break
        if queue.needs_notification() and vring.call_fd is not None:
            try:
                os.eventfd_write(vring.call_fd, 1)
            except OSError as exc:
                log.error("queue %d: cannot signal call fd: %s", vring.index, exc)

    def _start(self, vring: Vring) -> None:
        """(Re)build the running queue from the ring's addresses and base."""
        if vring.addr is None or vring.size == 0:
            raise BadRingState(f"queue {vring.index} started before its size and addresses")
        vring.queue = self._make_queue(vring, vring.base)
        if vring.enabled:
            self._process(vring)

    def _make_queue(self, vring: Vring, last_avail: int) -> SplitQueue:
        addr = vring.addr
        assert addr is not None
        size = vring.size
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
        return SplitQueue(
            self.memory,
            vring.index,
            size,
            RingAddresses(*gpas),
            event_idx=self.device.has_feature(29),
            indirect=self.device.has_feature(28),
            last_avail_idx=last_avail,
        )

    def _stop(self, vring: Vring) -> int:
        """Stop the ring; return the next available index to process."""
        if vring.queue is not None:
            vring.base = vring.queue.last_avail_idx
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
                vring.queue = self._make_queue(vring, vring.queue.last_avail_idx)
            except PyVirtioError as exc:
                log.warning("queue %d paused: %s", vring.index, exc)
                vring.base = vring.queue.last_avail_idx
                vring.queue = None

    # -- message handlers ----------------------------------------------------------------

    def _vring(self, index: int, request: str) -> Vring:
        if index >= len(self.vrings):
            raise BadRingState(
                f"queue {index} does not exist (the device has {len(self.vrings)})",
                request=request,
            )
        return self.vrings[index]

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.device.offered_features() | VHOST_USER_F_PROTOCOL_FEATURES)

    def _set_features(self, msg: Message) -> None:
        features = decode_u64(msg)
        offered = self.device.offered_features() | VHOST_USER_F_PROTOCOL_FEATURES
        if features & ~offered:
            raise VhostUserError(f"features {features & ~offered:#x} were not offered")
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
        self.protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop(vring)
            vring.enabled = False
            vring.base = 0
        self.features = 0
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
        log.info(
            "memory table: %s",
            ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.memory.regions) or "empty",
        )
        self._memory_changed()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        spec = decode_region(msg)
        (fd,) = self._take_fds(msg, 1)
        try:
            self.memory.add_region(spec, fd)
        finally:
            close_fds([fd])
        self._memory_changed()

    def _rem_mem_reg(self, msg: Message) -> None:
        spec = decode_region(msg)
        self.memory.remove_region(spec)
        self._memory_changed()

    def _set_vring_num(self, msg: Message) -> None:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        try:
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
            vring.queue = self._make_queue(vring, vring.queue.last_avail_idx)

    def _set_vring_base(self, msg: Message) -> None:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        if state.num > 0xFFFF:
            raise BadRingState(f"split ring base {state.num} exceeds 16 bits")
        vring.base = state.num

    def _get_vring_base(self, msg: Message) -> bytes:
        state = decode_vring_state(msg)
        vring = self._vring(state.index, msg.name)
        base = self._stop(vring)
        log.info("queue %d stopped at %d: %s", vring.index, base, self.device.stats[vring.index])
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
        vring, fd = self._vring_fd(msg)
        if fd is None:
            raise BadRingState("polling mode (no kick fd) is not supported")
        queue = vring.queue
        last_avail = queue.last_avail_idx if queue is not None else vring.base
        self._stop(vring)
        vring.base = last_avail
        vring.kick_fd = fd
        try:
            self._start(vring)
        except PyVirtioError:
            self._stop(vring)
            raise
        if self.watcher is not None:
            self.watcher.watch_kick(fd, vring.index)

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fds([vring.call_fd])
        vring.call_fd = fd

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        close_fds([vring.err_fd])
        vring.err_fd = fd

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(len(self.vrings))

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

