"""The interface every device model implements.

The vhost-user protocol handler is written once
(:class:`pyvirtio.vhost_user.backend.VhostUserBackend`); a device says how many
queues it has, which features it offers, what its config space holds, and
what to do with one descriptor chain, or with several chains that together hold
one request (:meth:`VirtioDevice.merge_bytes`).  Devices never touch sockets or
rings.
"""

from __future__ import annotations

import abc
import enum
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyvirtio.spec.common import Feature
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["DeviceHost", "MergeFailure", "QueueStats", "VirtioDevice"]

log = logging.getLogger(__name__)


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


class MergeFailure(enum.Enum):
    """Why a request spread over several chains could not be served
    (:meth:`VirtioDevice.merge_failed`)."""

    #: Every chain the ring can hold at once is too short for it together: waiting
    #: for more cannot help.  The chains stay available for the next request.
    RING_TOO_SMALL = "ring too small"
    #: A chain taken for it broke the rules: that chain went back as a driver
    #: violation, the good ones taken before it with length 0.
    VIOLATION = "driver violation"


class DeviceHost(Protocol):
    """What a device with work from outside the guest needs from the daemon's runtime.

    Most devices only answer chains (:meth:`VirtioDevice.handle_chain`).  A device
    whose back end produces work by itself (packets arriving for a network
    device's receive queue) watches its own fds in the runtime's event loop and
    asks for a queue to be processed when it has something for the driver.
    """

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the event loop) whenever ``fd`` is readable."""

    def unwatch_fd(self, fd: int) -> None:
        """Stop watching ``fd`` (before the device closes it)."""

    def process_queue(self, queue: int) -> None:
        """Process ``queue`` now, as after a kick (nothing if the ring is not running)."""

    def queue_ready(self, queue: int) -> bool:
        """Whether ``queue`` is started and enabled (vhost-user "Ring states").

        A device that chooses among several queues (virtio-net spreading received
        frames over its receive queues) uses only ready ones: a ring the
        front-end disabled with SET_VRING_ENABLE (a queue pair the driver does
        not use) would hold frames forever.
        """


class VirtioDevice(abc.ABC):
    """A virtio device model, independent of transport.

    Subclasses set :attr:`device_id`, :attr:`num_queues` and implement
    :meth:`handle_chain`; the rest has sensible defaults.  A device whose
    requests may need more room than one chain has (virtio-net's mergeable
    receive buffers) also implements :meth:`merge_bytes`, :meth:`handle_chains`
    and :meth:`merge_failed`.
    """

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

    def __init__(self) -> None:
        self.features = 0
        self.stats: list[QueueStats] = []

    def offered_features(self) -> int:
        """Feature bits offered to the driver: device-specific bits plus ring features.

        The ring features are the back-end's, the same for every device:
        INDIRECT_DESC, EVENT_IDX, RING_PACKED (split or packed rings, §2.7/§2.8),
        and IN_ORDER: the back-end completes each chain (:meth:`handle_chain`
        returns) before it pops the next, so every device uses buffers in the
        order they were made available (§6.2: a device that negotiated IN_ORDER
        MUST).  A device that completes requests asynchronously must drop
        IN_ORDER here.

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

    def attach(self, host: DeviceHost) -> None:  # noqa: B027 - optional hook
        """The runtime serving this device: watch fds, have queues processed.

        Called once, before the first front-end connects.  Devices that only
        answer chains need nothing from it.
        """

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
    def handle_chain(self, queue: int, chain: DescriptorChain) -> int:
        """Process one chain from ``queue``; return the bytes written into it.

        Must not raise for anything the driver put in the chain: a malformed
        request is answered per the device's spec (an error status) and
        counted in :attr:`stats`.
        """

    def merge_bytes(self, queue: int) -> int:
        """Writable bytes the next request of ``queue`` needs, over as many chains as it takes.

        0 (the default): one chain per request, handled by :meth:`handle_chain`.

        Otherwise the back-end pops chains until their writable bytes together
        reach this many, hands them all to :meth:`handle_chains`, and uses them
        together, so the driver never sees part of a request: one used index
        update for them all on a split ring (VIRTIO 1.4 §2.7.8.2), the first used
        descriptor's flags written last on a packed one (§2.8.21.1).

        - Too few chains available: the back-end gives back the ones it took
          (they stay available) and waits for the driver to notify it about more;
          :meth:`handle_chains` is not called.
        - Even every chain the ring can hold at once is too short: the chains stay
          available and :meth:`merge_failed` (:attr:`MergeFailure.RING_TOO_SMALL`)
          tells the device to drop the request.
        - A chain taken for it breaks the rules: the chains taken before it go back
          with length 0, the bad one as any violation, and :meth:`merge_failed`
          (:attr:`MergeFailure.VIOLATION`) tells the device to drop the request.

        Asked before the first chain of each request is popped, after
        :meth:`has_work` said True.  One request's chains are taken together even
        when they exceed the back-end's per-batch budget: at most the queue size.
        """
        return 0

    def handle_chains(self, queue: int, chains: list[DescriptorChain]) -> list[int]:
        """Process the next request of ``queue`` over ``chains``; return the bytes
        written into each, in order.

        Called when :meth:`merge_bytes` was not 0, with one or more chains whose
        writable bytes together reach it (the last one may be needed only in part).
        Must not raise for anything the driver put in the chains.

        Raises:
            NotImplementedError: the default; a device whose :meth:`merge_bytes`
                is ever non-zero implements this.
        """
        raise NotImplementedError(f"{type(self).__name__} does not spread requests over chains")

    def merge_failed(self, queue: int, failure: MergeFailure, detail: str) -> None:
        """The next request of ``queue`` cannot be served: drop it and count it.

        ``detail`` says why, for the log.  The back-end then asks for the next
        request, so a device that merges drops this one here (else it would be
        offered the same chains again).  Default: log it.
        """
        log.error("queue %d: a request spread over several buffers was not served (%s): %s",
                  queue, failure.value, detail)

    def close(self) -> None:  # noqa: B027 - optional hook, most devices hold nothing
        """Release back-end resources (files, sockets) when the daemon stops."""
