"""The vhost-user back-end: protocol state for one device.

:class:`VhostUserBackend` takes decoded :class:`~pyvirtio.vhost_user.protocol.Message`
objects and returns a :class:`Reply` value (bytes and fds to send, or the error
that ends the connection).  It owns the guest memory, the vrings
(:mod:`~pyvirtio.vhost_user.rings`) and the fds the front-end sent; its
:class:`~pyvirtio.vhost_user.engine.QueueEngine` drains queues when told a kick
arrived.  It does no socket I/O: the runtime feeds it messages and tells it about
kicks, and it asks an :class:`FdWatcher` to watch or forget kick eventfds.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.errors import (
    BadRingState,
    MissingFds,
    NoBackendChannel,
    PyVirtioError,
    UnknownRequest,
    VhostUserError,
)
from pyvirtio.memory import create_memfd
from pyvirtio.spec.common import DeviceStatus, Feature
from pyvirtio.spec.virtqueue import MAX_QUEUE_SIZE
from pyvirtio.vhost_user.channel import AckCallback, BackendChannel
from pyvirtio.vhost_user.engine import QueueEngine
from pyvirtio.vhost_user.memtable import MAX_MEM_SLOTS, MemoryTable
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
    close_fds,
    decode_config,
    decode_device_state_transfer,
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
from pyvirtio.vhost_user.rings import InflightBuffer, Vring, make_queue, packed_base
from pyvirtio.vhost_user.state import StateTransfer
from pyvirtio.virtqueue.inflight import region_size
from pyvirtio.virtqueue.packed import INITIAL_VRING_BASE, check_packed_queue_size
from pyvirtio.virtqueue.queue import Virtqueue
from pyvirtio.virtqueue.split import check_queue_size

__all__ = ["DEFAULT_PROTOCOL_FEATURES", "FdWatcher", "Reply", "VhostUserBackend"]

log = logging.getLogger(__name__)

#: SET_DEVICE_STATE_FD reply bit 8: no fd returned, the front-end's channel is used.
INVALID_FD_FLAG = 1 << 8


def _without_tracebacks(exc: PyVirtioError) -> PyVirtioError:
    """``exc`` and the errors it was raised from, without their tracebacks.

    A reply keeps its error; the frames of a traceback would keep views of guest
    memory (and so the mappings and their fds) alive with it, in a reference cycle
    only the garbage collector breaks.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__
    return exc


@dataclass(frozen=True, slots=True)
class Reply:
    """What :meth:`VhostUserBackend.handle` answers one message with."""

    #: The bytes to send (a reply or a REPLY_ACK status), or ``None``.
    data: bytes | None = None
    #: Fds to send with :attr:`data` (GET_INFLIGHT_FD); the caller closes them after.
    fds: tuple[int, ...] = ()
    #: The message broke the protocol: send :attr:`data` (the failure ack, with
    #: REPLY_ACK), then drop the connection.
    error: PyVirtioError | None = None


#: What a request handler returns: a reply payload, a payload with fds to send along,
#: a REPLY_ACK status, or nothing.
_Result = bytes | tuple[bytes, tuple[int, ...]] | int | None

#: No reply, nothing wrong.
NO_REPLY = Reply()


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
        #: Guest memory as the front-end's memory table maps it.
        self.memtable = MemoryTable()
        self.memory = self.memtable.memory
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.protocol_features_offered = DEFAULT_PROTOCOL_FEATURES
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        #: Device status as the front-end set it (STATUS protocol feature).
        self._status = 0
        self.packed_rings = packed_rings
        #: Drains the queues and completes the chains the device deferred.
        self.engine = QueueEngine(device, self.vrings, self._signal, strict=strict)
        #: The inflight buffer the front-end handed over (SET_INFLIGHT_FD).
        self._inflight: InflightBuffer | None = None
        self.protocol_features_offered |= device.protocol_features()
        #: The device state transfer under way (SET_DEVICE_STATE_FD).
        self._transfer: StateTransfer | None = None
        if device.supports_state:
            self.protocol_features_offered |= 1 << ProtocolFeature.DEVICE_STATE
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
        self._handlers: dict[int, Callable[[Message], _Result]] = {
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
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
        }
        for request, handler in device.vhost_user_requests().items():
            if request in self._handlers:
                raise ValueError(f"{type(device).__name__} handles request {request}, which "
                                 "the back-end handles itself")
            self._handlers[request] = handler
        device.start()

    # -- entry points ----------------------------------------------------------------

    def handle(self, msg: Message) -> Reply:
        """Handle one message; return what to send back.

        Unused fds of the message are closed.  A message that breaks the protocol
        (a :class:`~pyvirtio.errors.VhostUserError`) or names memory that cannot
        be used (:class:`~pyvirtio.errors.BadMemoryRegion`) gives a reply whose
        ``error`` says why; the connection is then to be dropped, after sending
        the failure ack the reply carries with REPLY_ACK.
        """
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                raise UnknownRequest("request not supported by this back-end", request=msg.name)
            log.debug("%s flags=%#x size=%d fds=%d", msg.name, msg.flags, len(msg.payload),
                      len(msg.fds))
            result = handler(msg)
        except PyVirtioError as exc:
            if isinstance(exc, VhostUserError) and exc.request is None:
                exc.request = msg.name
                exc.args = (f"{msg.name}: {exc}",)
            return Reply(self._ack(msg, 1), error=_without_tracebacks(exc))
        finally:
            msg.close_fds()
        if isinstance(result, tuple):  # a payload and the fds that go with it
            payload, fds = result
            return Reply(encode(msg.request, payload, reply=True), fds)
        if isinstance(result, bytes):
            return Reply(encode(msg.request, result, reply=True))
        data = self._ack(msg, result or 0)
        return NO_REPLY if data is None else Reply(data)

    def close(self) -> None:
        """Forget the front-end (:meth:`disconnect`) and release the engine's fd."""
        self.disconnect()
        self.engine.close()

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
            self.engine.process(vring)

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
        self.memtable.clear()
        self.close_channel()
        self.engine.rerun.clear()
        self._set_device_status(0)
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.device.start()

    @property
    def needs_reset(self) -> bool:
        """The device set DEVICE_NEEDS_RESET and serves nothing until reset (§2.1)."""
        return self.engine.needs_reset

    @property
    def status(self) -> int:
        """The device status (GET_STATUS): the driver's bits, plus DEVICE_NEEDS_RESET
        once a strict device saw a violation."""
        return self._status | (DeviceStatus.DEVICE_NEEDS_RESET if self.needs_reset else 0)

    def _set_device_status(self, status: int) -> None:
        """The driver's status byte; 0 resets the device and clears DEVICE_NEEDS_RESET."""
        if status == 0 and self.needs_reset:
            log.info("device reset by the driver: DEVICE_NEEDS_RESET cleared")
        if status == 0:
            self.engine.needs_reset = False
        self._status = status

    # -- queue processing --------------------------------------------------------------

    def flush(self) -> None:
        """Use the chains the device completed since (asynchronous completion)."""
        self.engine.flush()

    @property
    def recheck_interval(self) -> float | None:
        """Seconds until :meth:`recheck` is due, or ``None`` when nothing waits."""
        return 0.0 if self.engine.rerun else None

    def recheck(self) -> None:
        """Run the queues their drain budget left with work."""
        for index in sorted(self.engine.rerun):
            vring = self.vrings[index]
            if vring.queue is None or not vring.enabled or self.needs_reset:
                self.engine.rerun.discard(index)
            else:
                self.engine.process(vring)

    def _start(self, vring: Vring) -> None:
        """(Re)build the running queue from the ring's addresses and base."""
        packed = self._packed()
        base = packed_base(self.memory, vring) if packed else vring.base
        queue = self._make_queue(vring, base)
        vring.queue = queue
        inflight = self._inflight
        if inflight is not None:
            region = inflight.region(vring.index, vring.size)
            if region is not None:
                resubmitted = queue.attach_inflight(region)
                if resubmitted:
                    log.info("queue %d: resubmitting %d requests a previous back-end left "
                             "in flight", vring.index, resubmitted)
        if vring.enabled:
            self.engine.process(vring)

    def _rebuild(self, vring: Vring) -> None:
        """Re-create a running queue in place (new addresses or memory), keeping its state
        (chains in flight included)."""
        old = vring.queue
        assert old is not None
        new = self._make_queue(vring, old.vring_base)
        new.take_over(old)
        vring.queue = new

    def _packed(self) -> bool:
        """VIRTIO_F_RING_PACKED was negotiated: the rings are packed (VIRTIO 1.4 §2.8)."""
        return self.device.has_feature(Feature.RING_PACKED)

    def _make_queue(self, vring: Vring, base: int) -> Virtqueue:
        return make_queue(
            self.memory, vring, base, packed=self._packed(),
            event_idx=self.device.has_feature(Feature.EVENT_IDX),
            indirect=self.device.has_feature(Feature.INDIRECT_DESC),
        )

    def _stop(self, vring: Vring) -> int:
        """Stop the ring; return its base (the next available index, or the packed state).

        Chains the device still holds are completed first (or dropped after
        :data:`~pyvirtio.vhost_user.engine.QUIESCE_TIMEOUT`): the base the
        front-end gets back must not name a chain that will never be used.
        """
        if vring.queue is not None:
            self.engine.quiesce(vring)
            vring.base = vring.queue.vring_base
        vring.outstanding.clear()
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
                vring.base = vring.queue.vring_base
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
        self._set_device_status(0)
        self.engine.rerun.clear()
        self.device.set_features(0)

    def _take_fds(self, msg: Message, count: int) -> list[int]:
        if len(msg.fds) < count:
            raise MissingFds(f"needs {count} fds, got {len(msg.fds)}", request=msg.name)
        fds, msg.fds = msg.fds[:count], msg.fds[count:]
        return fds

    def _set_mem_table(self, msg: Message) -> None:
        specs = decode_mem_table(msg)
        self.memtable.set_table(specs, self._take_fds(msg, len(specs)))
        self._memory_changed()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        spec = decode_region(msg)
        (fd,) = self._take_fds(msg, 1)
        if self.memtable.add(spec, fd):
            self._memory_changed()

    def _rem_mem_reg(self, msg: Message) -> None:
        if self.memtable.remove(decode_region(msg)):
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
        last_avail = queue.vring_base if queue is not None else vring.base
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
        """A new call fd.  On a running ring it is signalled once: QEMU 7.2 replaces
        the call fd of a ring it just started (unacknowledged) while the guest
        already kicks, so a call made between the two went to the old fd, which
        QEMU no longer reads; the guest would wait for it forever.  A spurious
        call costs the driver one look at an unchanged used ring (VIRTIO 1.4 §2.7.10
        allows it); libvhost-user does the same."""
        vring, fd = self._vring_fd(msg)
        close_fds([vring.call_fd])
        vring.call_fd = fd
        if fd is not None and vring.queue is not None:
            self._signal(vring, "call")

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
            self.engine.process(vring)

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
        self._set_device_status(status & ~DeviceStatus.DEVICE_NEEDS_RESET)

    def _get_status(self, msg: Message) -> bytes:
        return encode_u64(self.status)

    def _check_inflight(self, info: InflightInfo) -> None:
        if not 1 <= info.num_queues <= len(self.vrings):
            raise BadRingState(f"inflight buffer for {info.num_queues} queues; the device "
                               f"has {len(self.vrings)}")
        if not 1 <= info.queue_size <= min(self.device.max_queue_size, MAX_QUEUE_SIZE):
            raise BadRingState(f"inflight buffer for queues of {info.queue_size}")

    def _get_inflight_fd(self, msg: Message) -> tuple[bytes, tuple[int, ...]]:
        """GET_INFLIGHT_FD: a fresh, zeroed buffer for the front-end to keep."""
        info = decode_inflight(msg)
        self._check_inflight(info)
        size = info.num_queues * region_size(info.queue_size)
        fd = create_memfd(size, "pyvirtio-inflight")
        return encode_inflight(InflightInfo(size, 0, info.num_queues, info.queue_size)), (fd,)

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

    def _set_device_state_fd(self, msg: Message) -> bytes:
        """SET_DEVICE_STATE_FD: transfer the device's state over the front-end's
        channel (:mod:`~pyvirtio.vhost_user.state`).  The reply's invalid-FD flag
        (bit 8) says the back-end uses the front-end's channel."""
        if not self._negotiated(ProtocolFeature.DEVICE_STATE):
            raise UnknownRequest("SET_DEVICE_STATE_FD without DEVICE_STATE negotiated")
        params = decode_device_state_transfer(msg)
        (fd,) = self._take_fds(msg, 1)
        self._transfer = StateTransfer(self.device, params, fd)
        return encode_u64(INVALID_FD_FLAG)

    def _check_device_state(self, msg: Message) -> bytes:
        """CHECK_DEVICE_STATE: 0 when the transfer and its processing succeeded."""
        if not self._negotiated(ProtocolFeature.DEVICE_STATE):
            raise UnknownRequest("CHECK_DEVICE_STATE without DEVICE_STATE negotiated")
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            log.error("CHECK_DEVICE_STATE without a transfer (SET_DEVICE_STATE_FD)")
            return encode_u64(1)
        return encode_u64(transfer.check())
