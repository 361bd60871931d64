"""The device API: what a virtio device model implements to be served over vhost-user.

The vhost-user protocol and the queues are handled once
(:class:`pyvirtio.vhost_user.backend.VhostUserBackend` and its queue engine); a
device is a :class:`VirtioDevice` subclass.

**The required core** is small: :attr:`~VirtioDevice.device_id`,
:attr:`~VirtioDevice.num_queues` and :meth:`~VirtioDevice.handle_chain`
(one request: read it with :meth:`DescriptorChain.reader`, answer with
:meth:`DescriptorChain.writer`, return the bytes written).
:meth:`~VirtioDevice.device_features`, :meth:`~VirtioDevice.config_space` and
:meth:`~VirtioDevice.write_config` have defaults (no features, no config space).

**Asynchronous completion.**  ``handle_chain`` may return :data:`DEFERRED`
instead of a length: the device keeps the chain and completes it later with
:meth:`DeviceHost.complete` (from the event loop or from any worker thread),
in any order; the queue goes on serving meanwhile.  When the driver negotiated
VIRTIO_F_IN_ORDER the engine holds completions back and uses the chains in the
order they were taken (VIRTIO 1.4 §2.7.9/§6.2), so every device may offer it.

**Optional capabilities**, each a method with a default:

- own fds and timers: :meth:`~VirtioDevice.attach` gives the
  :class:`DeviceHost` (``watch_fd``, ``call_later``, ``process_queue``);
- a queue that fills from outside (a receive queue): :meth:`~VirtioDevice.has_work`;
- driving a queue itself (several chains per request, as virtio-net's mergeable
  receive buffers): :meth:`~VirtioDevice.drives_queue` and
  :meth:`~VirtioDevice.drive_queue` with a :class:`QueueContext`;
- extra vhost-user requests and protocol features:
  :meth:`~VirtioDevice.vhost_user_requests`,
  :meth:`~VirtioDevice.protocol_features`;
- the back-end request channel (config change notifications and friends):
  :meth:`DeviceHost.config_changed`;
- commands on the daemon's control socket (``pyvirtio resize``):
  :meth:`~VirtioDevice.control_commands`;
- device state for migration (vhost-user DEVICE_STATE):
  :attr:`~VirtioDevice.supports_state`, :meth:`~VirtioDevice.save_state`,
  :meth:`~VirtioDevice.load_state`;
- inflight tracking (INFLIGHT_SHMFD): :attr:`~VirtioDevice.supports_inflight`;
- chains held when a ring stops: :meth:`~VirtioDevice.stop_queue`.

Devices never touch the vhost-user socket or ring memory layouts.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyvirtio.errors import VirtqueueError
from pyvirtio.memory import GuestMemory
from pyvirtio.spec.common import Feature
from pyvirtio.vhost_user.channel import AckCallback
from pyvirtio.vhost_user.protocol import Message
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.queue import Virtqueue

__all__ = [
    "DEFERRED",
    "ControlCommand",
    "ControlReply",
    "Deferred",
    "DeviceHost",
    "QueueContext",
    "QueueStats",
    "RequestHandler",
    "Tally",
    "Timer",
    "VirtioDevice",
]

log = logging.getLogger(__name__)


class Deferred(enum.Enum):
    """The type of :data:`DEFERRED`."""

    DEFERRED = "deferred"


#: What :meth:`VirtioDevice.handle_chain` returns for a chain it completes later
#: (:meth:`DeviceHost.complete`).
DEFERRED = Deferred.DEFERRED

#: Answers a control command (:meth:`VirtioDevice.control_commands`): called once,
#: now or later, with a JSON-friendly object.
ControlReply = Callable[[dict[str, object]], None]
#: A device's control command: the words after its name, and where to answer.
ControlCommand = Callable[[list[str], ControlReply], None]

#: An extra vhost-user request's handler (:meth:`VirtioDevice.vhost_user_requests`):
#: the decoded message in; the reply payload, a REPLY_ACK status or ``None`` out.
RequestHandler = Callable[[Message], bytes | int | None]


@dataclass(slots=True)
class QueueStats:
    """Counters of one queue, for logs and the stats dump."""

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    violations: int = 0
    #: Requests by kind, for devices with several (blk: in, out, flush, discard...).
    kinds: Counter[str] = field(default_factory=Counter)

    def __str__(self) -> str:
        text = (
            f"{self.requests} requests, {self.bytes_in} bytes to the guest, "
            f"{self.bytes_out} bytes from the guest, {self.errors} errors, "
            f"{self.violations} driver violations"
        )
        if self.kinds:
            text += " (" + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())) + ")"
        return text

    def __add__(self, other: QueueStats) -> QueueStats:
        """Both sets of counters together (a new object; the operands are unchanged)."""
        return QueueStats(
            requests=self.requests + other.requests,
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_out=self.bytes_out + other.bytes_out,
            errors=self.errors + other.errors,
            violations=self.violations + other.violations,
            kinds=self.kinds + other.kinds,
        )

    def as_json(self) -> dict[str, object]:
        """The counters as ``pyvirtio stats --json`` names them."""
        return {
            "requests": self.requests, "bytes_to_guest": self.bytes_in,
            "bytes_from_guest": self.bytes_out, "errors": self.errors,
            "violations": self.violations, "kinds": dict(sorted(self.kinds.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueueStats:
        """The counters :meth:`as_json` gave (``pyvirtio stats``' reader side)."""
        return cls(
            requests=data["requests"], bytes_in=data["bytes_to_guest"],
            bytes_out=data["bytes_from_guest"], errors=data["errors"],
            violations=data["violations"], kinds=Counter(data["kinds"]),
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """What one request a worker thread served adds to its queue's counters.

    Worker threads never touch :attr:`VirtioDevice.stats`: they hand this over with
    the chain (:meth:`DeviceHost.complete`), and the loop's thread adds it when it
    uses the chain, with the request itself (``requests``).
    """

    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: A ``kinds`` counter to add one to, if any.
    kind: str | None = None

    def add_to(self, stats: QueueStats) -> None:
        """Add the figures to ``stats`` (on the loop's thread)."""
        stats.errors += self.errors
        stats.bytes_in += self.bytes_in
        stats.bytes_out += self.bytes_out
        if self.kind is not None:
            stats.kinds[self.kind] += 1


class Timer(Protocol):
    """A callback :meth:`DeviceHost.call_later` scheduled."""

    def cancel(self) -> None:
        """Do not call it (nothing if it already ran)."""


class DeviceHost(Protocol):
    """What a device gets from the daemon serving it (:meth:`VirtioDevice.attach`).

    Everything here runs in the event loop's thread except :meth:`complete`,
    which any thread may call.
    """

    @property
    def memory(self) -> GuestMemory:
        """Guest memory as the front-end's memory table maps it (a device that takes
        guest-physical addresses from the driver, as virtio-balloon's page frame
        numbers, checks and reaches them here; it changes with the table)."""

    def complete(self, queue: int, chain: DescriptorChain, written: int,
                 tally: Tally | None = None) -> None:
        """Use ``chain`` (a chain :meth:`VirtioDevice.handle_chain` deferred) with
        ``written`` bytes written into it.  Thread-safe: a worker thread calls it
        when its I/O is done; the loop uses the chain and notifies the driver (one
        notification per batch of completions), and adds ``tally`` to the queue's
        counters.  A chain of a ring that stopped or of a front-end that went away is
        dropped (its tally with it: the counters it was for are gone too)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` in the event loop after ``delay`` seconds."""

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the event loop) whenever ``fd`` is readable."""

    def when_writable(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once (in the event loop) when ``fd`` has room: output the
        host side could not take yet (a full socket) goes on without polling."""

    def cancel_writable(self, fd: int) -> None:
        """Forget a :meth:`when_writable` wait (before the device closes ``fd``)."""

    def unwatch_fd(self, fd: int) -> None:
        """Stop watching ``fd`` for input (before the device closes it)."""

    def process_queue(self, queue: int) -> None:
        """Process ``queue`` now, as after a kick (nothing if the ring is not running)."""

    def queue_ready(self, queue: int) -> bool:
        """Whether ``queue`` is started and enabled (vhost-user "Ring states").

        A device that chooses among several queues (virtio-net spreading received
        frames over its receive queues) uses only ready ones: a ring the
        front-end disabled with SET_VRING_ENABLE (a queue pair the driver does
        not use) would hold frames forever.
        """

    def config_changed(self, on_ack: AckCallback | None = None) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on the
        back-end request channel; the driver gets a configuration change
        notification, VIRTIO 1.4 §2.5.1).  Returns whether an answer comes to
        ``on_ack``.

        Raises:
            NoBackendChannel: the front-end set up no back-end request channel.
            BackendChannelError: the message cannot be sent.
        """


class QueueContext(Protocol):
    """A queue handed to a device that drives it itself (:meth:`VirtioDevice.drive_queue`)."""

    #: The queue's index.
    index: int
    #: The running ring.
    queue: Virtqueue
    #: Chains the device may still take in this call; it stops at 0 and calls :meth:`rerun`.
    budget: int

    def violation(self, exc: VirtqueueError) -> bool:
        """Report a chain or ring that broke the rules (counted, logged, the chain given
        back empty, or DEVICE_NEEDS_RESET with ``--strict``); True when draining must
        stop (the ring is broken or the device needs a reset)."""

    def rerun(self) -> None:
        """Work is left: run :meth:`VirtioDevice.drive_queue` again soon."""


class VirtioDevice(abc.ABC):
    """A virtio device model, independent of transport (the module docstring lists
    the required core and the optional capabilities)."""

    #: The virtio device ID (VIRTIO 1.4 §5): a :class:`~pyvirtio.spec.common.DeviceId`,
    #: or any number for a device the specification does not define (a prototype).
    device_id: int
    #: Number of virtqueues the device offers (GET_QUEUE_NUM).
    num_queues: int = 1
    #: Largest queue size the device accepts (bounds what a driver can make it track).
    max_queue_size: int = 1024
    #: Offer vhost-user INFLIGHT_SHMFD: requests in flight when the back-end dies
    #: are resubmitted by the next one (for devices whose requests are idempotent).
    supports_inflight: bool = False
    #: Offer vhost-user DEVICE_STATE: the device's own state (not the rings') moves
    #: with a migrating VM (:meth:`save_state`, :meth:`load_state`).
    supports_state: bool = False

    def __init__(self) -> None:
        self.features = 0
        self.stats: list[QueueStats] = []
        #: The daemon serving the device, once :meth:`attach` ran.
        self.host: DeviceHost | None = None

    def offered_features(self) -> int:
        """Feature bits offered to the driver: device-specific bits plus ring features.

        The ring features are the back-end's, the same for every device:
        INDIRECT_DESC, EVENT_IDX, RING_PACKED (split or packed rings, §2.7/§2.8),
        and IN_ORDER: the queue engine uses chains in the order it took them
        whenever IN_ORDER was negotiated (§6.2: a device that negotiated it
        MUST), holding back a chain completed early (:data:`DEFERRED`) until
        the ones before it are complete.

        VIRTIO_F_NOTIFICATION_DATA is not offered: over vhost-user the driver's
        notification reaches the back-end as an eventfd count (or, with in-band
        notifications, a VRING_KICK message whose ``num`` field is reserved, 0),
        so the data the driver writes with it (next offset and wrap, §2.9)
        cannot arrive here.
        """
        return (
            (1 << Feature.VERSION_1)
            | (1 << Feature.INDIRECT_DESC)
            | (1 << Feature.EVENT_IDX)
            | (1 << Feature.RING_PACKED)
            | (1 << Feature.IN_ORDER)
            | self.device_features()
        )

    def device_features(self) -> int:
        """The device-specific feature bits (0-23) this device offers."""
        return 0

    def queue_num(self) -> int:
        """What vhost-user GET_QUEUE_NUM answers: the most queues the front-end may use.

        Default: :attr:`num_queues`.  virtio-net answers queue *pairs* instead:
        QEMU's vhost-user net compares the answer with ``queues=N``, its count
        of receive/transmit pairs (a DPDK back end answers pairs too).
        """
        return self.num_queues

    def set_features(self, features: int) -> None:
        """The driver accepted ``features`` (a subset of :meth:`offered_features`)."""
        self.features = features

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    def config_space(self) -> bytes:
        """The device configuration space as the driver reads it (little-endian)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> bool:
        """The driver wrote ``data`` at ``offset``; return False to refuse the write."""
        log.warning(
            "driver wrote %d bytes at config offset %d; this device has no writable fields",
            len(data),
            offset,
        )
        return False

    def attach(self, host: DeviceHost) -> None:
        """The daemon serving this device: complete deferred chains, watch fds, set
        timers, have queues processed (kept in :attr:`host`).

        Called once, before the first front-end connects.  A device that
        overrides it calls ``super().attach(host)`` first.
        """
        self.host = host

    def protocol_features(self) -> int:
        """vhost-user protocol feature bits this device adds to the back-end's
        (GET_PROTOCOL_FEATURES), for the requests :meth:`vhost_user_requests`
        handles.  Default: none."""
        return 0

    def vhost_user_requests(self) -> Mapping[int, RequestHandler]:
        """Handlers of vhost-user requests the generic back-end does not know
        (a GPU's GPU_SET_SOCKET, a crypto device's session requests), by request
        code.  Each gets the decoded message (its fds are closed after it returns:
        take the ones to keep out of ``msg.fds``) and returns the reply payload, a
        REPLY_ACK status or ``None``.  A handler raises a
        :class:`~pyvirtio.errors.VhostUserError` for a message that breaks the
        protocol (the front-end is disconnected).  Default: none."""
        return {}

    def save_state(self) -> bytes:
        """The device's state for a migration (rings and features excluded: the
        front-end moves those), when :attr:`supports_state`.  The device is
        suspended (its rings stopped) when asked.

        Raises:
            NotImplementedError: the default.
        """
        raise NotImplementedError(f"{type(self).__name__} has no state to save")

    def load_state(self, data: bytes) -> None:
        """Take the state :meth:`save_state` gave on the migration source.

        Raises:
            ValueError: ``data`` is not a state this device can take (it comes from
                the front-end: validate it).
            NotImplementedError: the default.
        """
        raise NotImplementedError(f"{type(self).__name__} has no state to load")

    def stats_details(self) -> dict[str, object]:
        """Device-wide figures beyond the per-queue counters, for ``pyvirtio stats``
        (its ``device`` entry; JSON-friendly: numbers, strings, lists and dicts of
        them), e.g. vsock's connection table.  Asked on each ``stats`` command, on the
        loop thread.  Default: none."""
        return {}

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """Commands this device takes on the daemon's control socket, by name (the
        first word of the command line): each gets the other words and a reply
        function to call once, at once or later (when the front-end answered).
        The daemon itself answers ``stats`` (and ``link`` for net).  Default: none."""
        return {}

    def drives_queue(self, queue: int) -> bool:
        """Whether the device takes ``queue``'s chains itself (:meth:`drive_queue`)
        instead of one :meth:`handle_chain` per chain.  Asked at every drain, so a
        device may decide by negotiated features.  Default: False."""
        return False

    def drive_queue(self, ctx: QueueContext) -> None:
        """Drain ``ctx.queue`` (when :meth:`drives_queue` said so): pop, use, and give
        back what cannot be served yet, at most ``ctx.budget`` chains (then
        ``ctx.rerun()``).  Violations go to ``ctx.violation``.  The engine sends
        the used-buffer notification afterwards.

        Raises:
            NotImplementedError: the default; a device whose :meth:`drives_queue`
                ever says True implements this.
        """
        raise NotImplementedError(f"{type(self).__name__} does not drive its queues")

    def stop_queue(self, queue: int) -> None:  # noqa: B027 - optional hook
        """``queue`` stops (GET_VRING_BASE, a reset, the front-end gone) while the
        device holds deferred chains of it: complete them now or soon (cancel
        timers, finish I/O).  The engine then waits a bounded time for their
        :meth:`DeviceHost.complete` before it reports the ring's base; chains not
        completed by then are dropped and counted as errors.  Default: nothing
        (worker threads finish on their own)."""

    def has_work(self, queue: int) -> bool:
        """Whether the device can fill the next chain of ``queue`` now.

        The back-end asks before it takes each chain.  A receive queue answers
        False while no packet waits, so the driver's buffers stay available
        until one arrives; the device then calls
        :meth:`DeviceHost.process_queue`.  Default: always.
        """
        return True

    def start(self) -> None:
        """A front-end connected: reset the per-connection counters."""
        self.features = 0
        self.stats = [QueueStats() for _ in range(self.num_queues)]

    @abc.abstractmethod
    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """Process one chain from ``queue``; return the bytes written into it, or
        :data:`DEFERRED` to complete it later with :meth:`DeviceHost.complete`.

        Must not raise for anything the driver put in the chain: a malformed
        request is answered per the device's spec (an error status) and
        counted in :attr:`stats`.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most devices hold nothing
        """Release back-end resources (files, sockets) when the daemon stops."""
