"""The daemon's side of the device API in memory: :class:`InMemoryHost`.

:class:`InMemoryHost` is a :class:`~pyvirtio.devices.base.DeviceHost` over a
:class:`~pyvirtio.vhost_user.backend.VhostUserBackend`, driven by the test instead
of an event loop: fds a device watches are recorded (the test calls their
callbacks), timers run when the test advances a clock of its own (no sleeping),
and completed chains are used when the test flushes, as the runtime's loop does
after each round of events.
"""

from __future__ import annotations

import select
from collections.abc import Callable

from pyvirtio.devices.base import Tally
from pyvirtio.memory import GuestMemory
from pyvirtio.timers import ScheduledCall, TimerHeap
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.channel import AckCallback
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["InMemoryHost"]


class InMemoryHost:
    """The daemon's side of the device API, driven by a test.

    Args:
        backend: the back-end serving the device (the device gets this host with
            ``device.attach(host)``).

    Attributes:
        watched: fds the device watches, and their callbacks.
        processed: the queues the device asked to have processed, in order.
        now: the clock :meth:`call_later` timers run on (:meth:`advance`).
    """

    def __init__(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self.watched: dict[int, Callable[[], None]] = {}
        #: Fds the device waits to have room in (:meth:`when_writable`).
        self.writable: dict[int, Callable[[], None]] = {}
        self.processed: list[int] = []
        self.now = 0.0
        self._timers = TimerHeap()

    @property
    def memory(self) -> GuestMemory:
        """Guest memory as the front-end's memory table maps it."""
        return self.backend.memory

    def complete(self, queue: int, chain: DescriptorChain, written: int,
                 tally: Tally | None = None) -> None:
        """Hand a deferred chain back (any thread); it is used at the next :meth:`flush`,
        as the runtime uses it after the current round of events."""
        self.backend.engine.complete(queue, chain, written, tally)

    def flush(self) -> None:
        """Call the waits of fds that now have room (:meth:`when_writable`), then use the
        chains completed since the last flush (the event loop does this after each
        round of events)."""
        if self.writable:
            poller = select.poll()
            for fd in self.writable:
                poller.register(fd, select.POLLOUT)
            for fd, events in poller.poll(0):
                if events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    callback = self.writable.pop(fd, None)
                    if callback is not None:
                        callback()
        self.backend.flush()

    def call_later(self, delay: float, callback: Callable[[], None]) -> ScheduledCall:
        """Schedule ``callback`` ``delay`` seconds after :attr:`now`."""
        return self._timers.schedule(self.now + max(delay, 0.0), callback)

    @property
    def pending_timers(self) -> int:
        """Timers scheduled and neither run nor cancelled."""
        return self._timers.pending()

    def advance(self, seconds: float) -> int:
        """Move the clock on; run the timers now due (in due order), then :meth:`flush`.
        Returns how many ran.

        A timer's exception is not caught (the runtime logs it): the test sees it.
        """
        self.now += seconds
        ran = 0
        while due := self._timers.pop_due(self.now):  # a timer may set one due at once
            for call in due:
                call.callback()
                ran += 1
        self.flush()
        return ran

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Record the fd; the test calls ``watched[fd]()`` when it made it readable."""
        self.watched[fd] = callback

    def when_writable(self, fd: int, callback: Callable[[], None]) -> None:
        """Record the wait; :meth:`flush` (and so :meth:`advance`) calls ``callback``
        once ``fd`` has room, as the event loop would."""
        self.writable[fd] = callback

    def unwatch_fd(self, fd: int) -> None:
        """Forget the fd."""
        self.watched.pop(fd, None)

    def cancel_writable(self, fd: int) -> None:
        """Forget a :meth:`when_writable` wait."""
        self.writable.pop(fd, None)

    def process_queue(self, queue: int) -> None:
        """Process ``queue`` now, as the runtime does."""
        self.processed.append(queue)
        self.backend.kick(queue)

    def queue_ready(self, queue: int) -> bool:
        """Whether the back-end's ``queue`` runs."""
        return self.backend.queue_ready(queue)

    def config_changed(self, on_ack: AckCallback | None = None) -> bool:
        """CONFIG_CHANGE_MSG through the back-end's request channel.

        Raises:
            NoBackendChannel: the front-end set up no back-end request channel.
        """
        return self.backend.config_changed(on_ack)
