"""The queue engine: drains running queues through the device and completes chains.

One drain takes the chains the driver made available, in one batch, and sends at
most one used-buffer notification (VIRTIO 1.4 §2.7.7, §2.8.10).  For each chain
the device's :meth:`~pyvirtio.devices.base.VirtioDevice.handle_chain` answers at
once (the chain is used) or defers it (:data:`~pyvirtio.devices.base.DEFERRED`):
the device completes it later through :meth:`QueueEngine.complete`, from the
event loop or a worker thread, and the loop uses it at its next
:meth:`QueueEngine.flush`.  With VIRTIO_F_IN_ORDER negotiated, chains are used in
the order they were taken, whatever order the device completes them in.

A driver's violation is counted and logged (rate-limited) and the bad chain
given back empty, or with ``strict`` the device enters DEVICE_NEEDS_RESET (§2.1.2)
and serves nothing until reset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from pyvirtio.devices.base import DEFERRED, Tally, VirtioDevice
from pyvirtio.errors import VirtqueueError
from pyvirtio.spec.common import Feature
from pyvirtio.vhost_user.rings import Outstanding, Vring
from pyvirtio.virtqueue.chain import DescriptorChain
from pyvirtio.virtqueue.queue import Virtqueue

__all__ = ["DRAIN_BUDGET", "QUIESCE_TIMEOUT", "QueueEngine", "Signal"]

log = logging.getLogger(__name__)

#: Most chains one queue handles before the loop turns to other work.
DRAIN_BUDGET = 256
#: Most driver-violation log lines per second (the rest are counted).
VIOLATION_LOG_BURST = 20
#: How long a stopping ring waits for the device's deferred chains (seconds).
QUIESCE_TIMEOUT = 10.0

#: Signals a vring's call (used buffers) or error to the front-end.
Signal = Callable[[Vring, Literal["call", "error"]], None]


class _Context:
    """The :class:`~pyvirtio.devices.base.QueueContext` of one drain."""

    __slots__ = ("_engine", "_vring", "budget", "index", "queue")

    def __init__(self, engine: QueueEngine, vring: Vring, queue: Virtqueue) -> None:
        self._engine = engine
        self._vring = vring
        self.index = vring.index
        self.queue = queue
        self.budget = DRAIN_BUDGET

    def violation(self, exc: VirtqueueError) -> bool:
        self._engine.violation(self._vring, self.queue, exc)
        return self.queue.broken is not None or self._engine.needs_reset

    def rerun(self) -> None:
        self._engine.rerun.add(self.index)


class QueueEngine:
    """Drains the queues of one device and uses the chains it completes.

    Args:
        device: the device model.
        vrings: the back-end's rings (the engine reads their running queues).
        signal: sends a vring's call or error notification.
        strict: the first driver violation sets DEVICE_NEEDS_RESET.
    """

    def __init__(
        self, device: VirtioDevice, vrings: list[Vring], signal: Signal, *, strict: bool = False
    ) -> None:
        self.device = device
        self.vrings = vrings
        self.signal = signal
        self.strict = strict
        #: The device entered DEVICE_NEEDS_RESET (strict mode) and serves nothing.
        self.needs_reset = False
        #: Queues that used up their drain budget with work left.
        self.rerun: set[int] = set()
        #: Completions handed over by :meth:`complete`, used by :meth:`flush`.
        self._completed: deque[tuple[int, DescriptorChain, int, Tally | None]] = deque()
        self._completion_fd: int | None = None
        self._loop_thread: int | None = None
        #: A worker has written the completion eventfd and the loop has not consumed it.
        self._wake_pending = False
        self._log_window = 0.0
        self._log_count = 0
        self._log_suppressed = 0

    @property
    def completion_fd(self) -> int:
        """An eventfd, readable when a thread other than the loop's completed chains
        (made on first use: a back-end whose device never defers has none)."""
        if self._completion_fd is None:
            self._completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self._completion_fd

    def close(self) -> None:
        """Close the completion eventfd, if one was made."""
        fd, self._completion_fd = self._completion_fd, None
        if fd is not None:
            os.close(fd)

    # -- draining ----------------------------------------------------------------------

    def process(self, vring: Vring) -> None:
        """Drain a queue in one batch and signal the driver at most once (§2.7.7).

        At most :data:`DRAIN_BUDGET` chains are taken per call, so one flooded
        queue cannot starve the others or the control socket; a queue with work
        left is in :attr:`rerun`.
        """
        queue = vring.queue
        assert queue is not None
        index = vring.index
        self.rerun.discard(index)
        device = self.device
        if device.drives_queue(index):
            device.drive_queue(_Context(self, vring, queue))
        else:
            self._drain(vring, queue)
        if queue.needs_notification():
            self.signal(vring, "call")

    def _drain(self, vring: Vring, queue: Virtqueue) -> None:
        index = vring.index
        stats = self.device.stats[index]
        handle = self.device.handle_chain
        has_work = self.device.has_work
        outstanding = vring.outstanding
        in_order = self.device.has_feature(Feature.IN_ORDER)
        budget = DRAIN_BUDGET
        while True:
            queue.disable_notifications()
            while True:
                if budget <= 0:
                    self.rerun.add(index)
                    return
                if not has_work(index):
                    # Nothing to put in the driver's buffers yet (a receive queue with no
                    # packet waiting): leave them available and ask for kicks again; the
                    # device has the queue processed when it has work.
                    queue.enable_notifications()
                    return
                # Every pop counts, a rule-breaking chain too: a driver re-publishing bad
                # chains as fast as they are returned must not hold the loop either.
                budget -= 1
                try:
                    chain = queue.pop()
                except VirtqueueError as exc:
                    self.violation(vring, queue, exc)
                    if queue.broken is not None or self.needs_reset:
                        return
                    continue
                if chain is None:
                    break
                try:
                    written = handle(index, chain)
                except Exception:
                    log.exception("queue %d: device failed on chain %d", index, chain.head)
                    stats.errors += 1
                    written = 0
                if written is DEFERRED:
                    outstanding[chain.head] = Outstanding(chain)
                    continue
                stats.requests += 1
                if in_order and outstanding:
                    outstanding[chain.head] = Outstanding(chain, written)
                    self._release_in_order(vring, queue)
                else:
                    queue.push(chain.head, written)
            if not queue.enable_notifications():
                return

    # -- asynchronous completion ---------------------------------------------------------

    def complete(self, queue: int, chain: DescriptorChain, written: int,
                 tally: Tally | None = None) -> None:
        """A deferred chain is done (any thread); the loop uses it, and adds ``tally``
        to the queue's counters, at :meth:`flush`."""
        self._completed.append((queue, chain, written, tally))
        # One wake-up per round of the loop: a worker finding one pending adds nothing
        # (the loop clears the flag after consuming the eventfd and before it flushes,
        # so a completion queued after the flush wakes it again).
        if threading.get_ident() != self._loop_thread and not self._wake_pending:
            self._wake_pending = True
            try:
                os.eventfd_write(self.completion_fd, 1)
            except OSError as exc:  # closed: the daemon is stopping
                log.debug("completion wake-up lost: %s", exc)

    def woken(self) -> None:
        """:attr:`completion_fd` is readable: consume the wake-up and :meth:`flush`."""
        self._wake_pending = True
        self.flush()

    def flush(self) -> None:
        """Use every completed chain; one notification per queue touched.

        The event loop calls this after each round of events (and :meth:`woken`
        when another thread completed chains).
        """
        self._loop_thread = threading.get_ident()
        if self._wake_pending:
            # Read, then clear: cleared first, a worker's write in between would be
            # consumed here with the flag left set, and no later completion would wake
            # the loop.  (A write between the two only costs a spare wake-up.)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.completion_fd)
            self._wake_pending = False
        completed = self._completed
        if not completed:
            return
        touched: dict[int, Vring] = {}
        while completed:
            index, chain, written, tally = completed.popleft()
            vring = self._finish(index, chain, written, tally)
            if vring is not None:
                touched[index] = vring
        for vring in touched.values():
            queue = vring.queue
            if queue is not None and queue.needs_notification():
                self.signal(vring, "call")

    def _finish(self, index: int, chain: DescriptorChain, written: int,
                tally: Tally | None = None) -> Vring | None:
        if not 0 <= index < len(self.vrings):
            log.error("device completed a chain of queue %d, which does not exist", index)
            return None
        vring = self.vrings[index]
        record = vring.outstanding.get(chain.head)
        queue = vring.queue
        if record is None or record.chain is not chain or queue is None:
            log.debug("queue %d: completion of chain %d dropped (the ring stopped or the "
                      "front-end left since it was taken)", index, chain.head)
            return None
        stats = self.device.stats[index]
        if not 0 <= written <= chain.writable_len:
            log.error("queue %d: device completed chain %d with %r bytes written; it has %d "
                      "writable bytes: used with length 0", index, chain.head, written,
                      chain.writable_len)
            stats.errors += 1
            written = 0
        stats.requests += 1
        if tally is not None:
            tally.add_to(stats)
        if self.device.has_feature(Feature.IN_ORDER):
            record.written = written
            self._release_in_order(vring, queue)
        else:
            del vring.outstanding[chain.head]
            queue.push(chain.head, written)
        return vring

    @staticmethod
    def _release_in_order(vring: Vring, queue: Virtqueue) -> None:
        """Use the completed chains at the front of the taken order (VIRTIO_F_IN_ORDER)."""
        outstanding = vring.outstanding
        ready: list[tuple[int, int]] = []
        for head, record in outstanding.items():
            if record.written is None:
                break
            ready.append((head, record.written))
        for head, _ in ready:
            del outstanding[head]
        if ready:
            queue.push_many(ready)

    def quiesce(self, vring: Vring) -> None:
        """The ring stops: wait (at most :data:`QUIESCE_TIMEOUT`) for the chains the
        device holds, use them, and drop what is still missing (counted as errors)."""
        if not vring.outstanding:
            return
        index = vring.index
        try:
            self.device.stop_queue(index)
        except Exception:
            log.exception("queue %d: device failed to stop", index)
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        poller = select.poll()
        poller.register(self.completion_fd, select.POLLIN)
        while True:
            self.woken()
            left = deadline - time.monotonic()
            if not vring.outstanding or left <= 0:
                break
            poller.poll(min(left, 0.1) * 1000)
        if vring.outstanding:
            lost = len(vring.outstanding)
            log.error("queue %d stopped with %d chains the device did not complete in %.0f s; "
                      "they are dropped", index, lost, QUIESCE_TIMEOUT)
            self.device.stats[index].errors += lost
            vring.outstanding.clear()

    # -- violations ----------------------------------------------------------------------

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

    def violation(self, vring: Vring, queue: Virtqueue, exc: VirtqueueError) -> None:
        """Report a driver's spec violation; in strict mode, give up until reset."""
        self.device.stats[vring.index].violations += 1
        self._log_violation(exc)
        if self.strict:
            self.needs_reset = True
            log.error(
                "--strict: the device enters DEVICE_NEEDS_RESET (VIRTIO 1.4 §2.1.2) and "
                "serves no queue until the driver resets it"
            )
            self.signal(vring, "error")  # vhost-user's way to flag a vring error
            return
        if exc.head is not None:
            if vring.outstanding and self.device.has_feature(Feature.IN_ORDER):
                # Behind chains the device still holds: used in its turn (§6.2).
                vring.outstanding[exc.head] = Outstanding(
                    DescriptorChain(exc.head, [], [], 0, 0), 0)
                self._release_in_order(vring, queue)
            else:
                queue.push(exc.head, 0)
        if queue.broken is not None:
            log.error("queue %d stops until the device is reset", vring.index)
