"""What a device-side virtqueue offers, whatever its layout (VIRTIO 1.4 §2.6).

:class:`Virtqueue` is the protocol both :class:`~pyvirtio.virtqueue.split.SplitQueue`
(§2.7) and :class:`~pyvirtio.virtqueue.packed.PackedQueue` (§2.8) implement, so
the queue engine and the devices that drive a queue themselves never ask which
layout they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pyvirtio.errors import VirtqueueError
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.inflight import InflightRegion

__all__ = ["Virtqueue"]


class Virtqueue(Protocol):
    """The device side of one running virtqueue.

    ``pop`` takes what the driver made available; ``push``/``push_many`` use it;
    ``mark``/``rewind`` give back chains taken for a request that cannot be served
    yet; the notification methods implement event suppression (§2.7.10, §2.8.10).
    """

    #: The queue's index, for messages.
    index: int
    #: Queue size (entries).
    size: int
    #: Set once the driver corrupted the ring beyond recovery: nothing more is popped.
    broken: VirtqueueError | None

    @property
    def last_avail_idx(self) -> int:
        """The next position to pop from (a packed ring: wrap counter in bit 15)."""

    @property
    def vring_base(self) -> int:
        """The ring state vhost-user ``GET_VRING_BASE`` reports and a successor resumes from."""

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None``.

        Raises:
            VirtqueueError: the chain breaks a rule (``head`` set when it can be
                given back with length 0).
        """

    def push(self, head: int, length: int) -> None:
        """Use chain ``head`` with ``length`` bytes written."""

    def push_many(self, used: Sequence[tuple[int, int]]) -> None:
        """Use several chains at once: the driver sees all of them or none."""

    def mark(self) -> None:
        """Remember the position, for :meth:`rewind`."""

    def rewind(self) -> None:
        """Give back every chain popped since :meth:`mark` (they stay available)."""

    def ring_full(self) -> bool:
        """Whether the device holds every entry the ring has (the driver can add none)."""

    def disable_notifications(self) -> None:
        """Ask the driver not to notify while the device drains."""

    def enable_notifications(self, at: int | None = None) -> bool:
        """Ask for notifications again; True when buffers arrived meanwhile."""

    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification now (consumed)."""

    def take_over(self, old: Virtqueue) -> None:
        """Continue ``old``'s bookkeeping: this queue replaces it in place (new
        addresses or memory), with chains still in flight."""

    def attach_inflight(self, region: InflightRegion) -> int:
        """Track taken chains in ``region`` (vhost-user INFLIGHT_SHMFD); return how
        many a previous back-end left that are popped again first."""
