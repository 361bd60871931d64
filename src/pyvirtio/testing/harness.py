"""Test a device in a few lines: :class:`DeviceHarness`.

The harness serves a device the way ``pyvirtio serve`` does, minus the socket:
a :class:`~pyvirtio.vhost_user.backend.VhostUserBackend` with an
:class:`~pyvirtio.testing.host.InMemoryHost` attached to the device, driven by
the in-process :class:`~pyvirtio.testing.frontend.Frontend` over memfd guest RAM,
real rings (split or packed) and eventfds::

    with DeviceHarness(UppercaseDevice()) as harness:
        assert harness.request(readable=b"hi", writable=8).data == b"HI"

For a device that completes chains later (:data:`~pyvirtio.devices.base.DEFERRED`),
:meth:`DeviceHarness.post` and :meth:`DeviceHarness.kick` make requests available,
:meth:`DeviceHarness.wait_used` waits for chains completed from worker threads,
and :meth:`DeviceHarness.advance` moves the host's clock to run ``call_later``
timers.  Each used element is returned once, by whichever of these calls collected
it first.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtio.closing import Closing
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.errors import DeviceRingError
from pyvirtio.spec.common import Feature
from pyvirtio.spec.virtqueue import EVENT_SUPPRESS_SIZE, packed_ring_size, used_ring_size
from pyvirtio.testing.frontend import FRONTEND_GPA, NOT_SPLIT_FEATURES, Frontend
from pyvirtio.testing.guest import Guest, guest_memory, ring_addresses
from pyvirtio.testing.host import InMemoryHost
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.protocol import (
    CONFIG_HEADER,
    U64,
    VRING_STATE,
    Request,
    encode_config,
    encode_vring_state,
)
from pyvirtio.virtqueue.chain import gather

__all__ = ["DEFAULT_TIMEOUT", "DeviceHarness", "Used"]

#: Seconds :meth:`DeviceHarness.wait_used` and :meth:`DeviceHarness.request` wait by default.
DEFAULT_TIMEOUT = 5.0
#: Most times one round re-runs queues that used up their drain budget.
_RERUN_LIMIT = 64
_PAGE = 0x1000


@dataclass(frozen=True, slots=True)
class Used:
    """A chain the device used, as the driver collected it (VIRTIO 1.4 §2.7.8, §2.8.7).

    Attributes:
        queue: the queue it was posted on.
        head: its id (what :meth:`DeviceHarness.post` returned).
        length: the used length: the bytes the device says it wrote.
        data: the first ``length`` bytes of its writable buffers.
    """

    queue: int
    head: int
    length: int
    data: bytes


Readable = bytes | bytearray | memoryview | Sequence[bytes]
Writable = int | Sequence[int]


class DeviceHarness(Closing):
    """A device served in-process, with a driver to send it requests.

    Building it builds the back-end, attaches an :class:`InMemoryHost` to the
    device (``device.attach``), negotiates features and starts the queues; use it
    as a context manager (or call :meth:`close`) to stop it.

    Args:
        device: the device to test (not attached to a host yet).
        queue_size: the size of every queue.
        packed: use packed rings (VIRTIO_F_RING_PACKED) instead of split ones.
        in_order: negotiate VIRTIO_F_IN_ORDER.
        features: the feature bits the driver accepts (default: every bit offered
            but RING_PACKED and IN_ORDER, which ``packed`` and ``in_order`` add).
        queues: the queues to start (default: all of ``device.num_queues``).
        buffer_space: bytes of guest RAM for buffers (requests and answers).
        strict: the back-end's ``--strict``: a driver violation sets
            DEVICE_NEEDS_RESET.

    Attributes:
        device: the device.
        backend: the back-end serving it.
        host: the device's :class:`InMemoryHost` (timers, watched fds).
        frontend: the in-process front-end (rings in :attr:`Frontend.drivers` or
            :attr:`Frontend.packed_drivers`, eventfds, raw messages).
        guest: the guest RAM.
        packed: whether the rings are packed.

    Raises:
        PyVirtioError: the back-end refused the set-up (a feature not offered, a
            queue size the device does not take).
        ValueError: ``device`` has no queue to start.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        queue_size: int = 16,
        packed: bool = False,
        in_order: bool = False,
        features: int | None = None,
        queues: Sequence[int] | None = None,
        buffer_space: int = 0x100000,
        strict: bool = False,
    ) -> None:
        started = list(range(device.num_queues)) if queues is None else list(queues)
        if not started:
            raise ValueError(f"{type(device).__name__} has no queue to start")
        self.device = device
        self.packed = packed
        self._stack = contextlib.ExitStack()
        self._posted: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._pending: dict[int, list[Used]] = {index: [] for index in started}
        ring_bytes = (packed_ring_size(queue_size) + 2 * EVENT_SUPPRESS_SIZE if packed
                      else ring_addresses(0, queue_size).used + used_ring_size(queue_size))
        stride = (ring_bytes + _PAGE - 1) & ~(_PAGE - 1)
        rings = [FRONTEND_GPA + _PAGE + i * stride for i in range(len(started))]
        data_gpa = FRONTEND_GPA + _PAGE + len(started) * stride
        try:
            self.guest: Guest = self._stack.enter_context(
                guest_memory(((FRONTEND_GPA, data_gpa - FRONTEND_GPA + buffer_space),)))
            self.backend = VhostUserBackend(device, strict=strict)
            self._stack.callback(self._stop_backend)
            self.host = InMemoryHost(self.backend)
            device.attach(self.host)
            self.frontend = Frontend(self.backend, self.guest, data_gpa=data_gpa)
            self._stack.callback(self.frontend.close)
            self.frontend.negotiate(self._features(features, packed=packed, in_order=in_order))
            self.frontend.set_mem_table()
            for index, ring in zip(started, rings, strict=True):
                if packed:
                    self.frontend.setup_packed_queue(index, queue_size, ring_gpa=ring)
                else:
                    self.frontend.setup_queue(index, queue_size, ring_gpa=ring)
            self._round()  # the test's thread is the "event loop" from here on
        except BaseException:
            self._stack.close()
            raise

    def _features(self, features: int | None, *, packed: bool, in_order: bool) -> int:
        offered: int = U64.unpack(self.frontend.call(Request.GET_FEATURES))[0]
        accepted = offered & ~NOT_SPLIT_FEATURES if features is None else features
        if packed:
            accepted |= 1 << Feature.RING_PACKED
        if in_order:
            accepted |= 1 << Feature.IN_ORDER
        return accepted

    def _stop_backend(self) -> None:
        self.backend.disconnect()
        self.device.close()
        self.backend.engine.close()

    # -- life cycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect the front-end (rings stop: chains the device still holds are
        waited for, see :meth:`VirtioDevice.stop_queue`), close the device, free the
        guest RAM and the eventfds.  Idempotent."""
        self._stack.close()

    # -- requests ------------------------------------------------------------------------

    def post(
        self, queue: int = 0, readable: Readable = b"", writable: Writable = 0, *,
        indirect: bool = False,
    ) -> int:
        """Make one chain available on ``queue`` without notifying the device.

        Args:
            queue: the queue.
            readable: what the driver sends: bytes (one descriptor, none if empty),
                or several pieces, one descriptor each.
            writable: room for the answer: a byte count (one descriptor, none if 0),
                or several counts, one descriptor each.  The buffers start zeroed.
            indirect: put the descriptors in an indirect table (INDIRECT_DESC must
                be negotiated).

        Returns:
            The chain's id (:attr:`Used.head` of its used element).

        Raises:
            ValueError: an empty chain, or the ring is full.
            GuestRamExhausted: no room left for the buffers (``buffer_space``).
        """
        if isinstance(readable, bytes | bytearray | memoryview):
            pieces = [bytes(readable)] if readable else []
        else:
            pieces = [bytes(piece) for piece in readable]
        sizes = ([writable] if writable else []) if isinstance(writable, int) else list(writable)
        if not self._posted:  # nothing in flight: reuse the buffer space from the start
            self.frontend.reset_buffers()
        out = [(self.frontend.put(piece), len(piece)) for piece in pieces]
        into = [(self.frontend.put(bytes(size)), size) for size in sizes]
        if not out and not into:
            raise ValueError("a chain needs at least one buffer")
        packed_driver = self.frontend.packed_drivers.get(queue)
        if indirect:
            table = self.frontend.alloc(16 * (len(out) + len(into)))
            if packed_driver is not None:
                head = packed_driver.add_indirect(table, out, into)
            else:
                head = self.frontend.drivers[queue].add_indirect(table, out, into)
        elif packed_driver is not None:
            head = packed_driver.add(out, into)
        else:
            head = self.frontend.drivers[queue].add(out, into)
        self._posted[(queue, head)] = into
        return head

    def kick(self, queue: int = 0) -> list[Used]:
        """Notify ``queue`` (its kick eventfd and the back-end), as a driver does; then
        one round of the event loop (:meth:`flush`).

        Returns:
            The used elements of ``queue`` collected so far and not returned yet, in
            the order the device used them.
        """
        self._collect(queue, self.frontend.kick(queue))
        self._round()
        return self._take(queue)

    def request(
        self, queue: int = 0, readable: Readable = b"", writable: Writable = 0, *,
        indirect: bool = False, timeout: float = DEFAULT_TIMEOUT,
    ) -> Used:
        """Post one chain, kick, and wait for its used element (:meth:`post` says what
        ``readable``, ``writable`` and ``indirect`` take).

        A chain the device defers is waited for up to ``timeout`` seconds (completed
        from a worker thread); timers do not run meanwhile (:meth:`advance` runs them).
        Other chains used meanwhile stay for :meth:`wait_used`.

        Raises:
            TimeoutError: the chain was not used within ``timeout`` seconds.
        """
        head = self.post(queue, readable, writable, indirect=indirect)
        # An earlier chain with the same id may wait in the pending list: this one is
        # the next element with that id.
        earlier = sum(u.head == head for u in self._pending.setdefault(queue, []))
        self._collect(queue, self.frontend.kick(queue))
        pending = self._wait(queue, timeout,
                             lambda pending: sum(u.head == head for u in pending) > earlier,
                             f"chain {head} of queue {queue}")
        index = [i for i, u in enumerate(pending) if u.head == head][earlier]
        return pending.pop(index)

    def wait_used(
        self, queue: int = 0, count: int = 1, *, timeout: float = DEFAULT_TIMEOUT
    ) -> list[Used]:
        """Wait until ``count`` used elements of ``queue`` are collected and not returned
        yet; return those ``count`` in the order the device used them (more stay for
        the next call).

        While waiting it runs rounds of the event loop: chains completed from worker
        threads are used (it sleeps on the engine's completion eventfd between
        rounds); timers do not run (:meth:`advance` runs them).

        Raises:
            TimeoutError: fewer than ``count`` came within ``timeout`` seconds.
        """
        self._wait(queue, timeout, lambda pending: len(pending) >= count,
                   f"{count} used elements of queue {queue}")
        pending = self._pending[queue]
        taken, pending[:] = pending[:count], pending[count:]
        return taken

    def used(self, queue: int = 0) -> list[Used]:
        """One round of the event loop (:meth:`flush`); then the used elements of
        ``queue`` collected and not returned yet, without waiting."""
        self._round()
        return self._take(queue)

    @property
    def in_flight(self) -> int:
        """Chains posted (on any queue) whose used element has not been collected."""
        return len(self._posted)

    # -- the event loop's part ---------------------------------------------------------------

    def flush(self) -> None:
        """One round of the event loop, as the runtime runs it after each batch of events:
        use the chains completed since (from any thread), run queues that used up their
        drain budget again, and collect the used elements of every queue."""
        self._round()

    def advance(self, seconds: float) -> int:
        """Move the host's clock ``seconds`` on and run the timers now due
        (``call_later``), then one round (:meth:`flush`); returns how many timers ran.
        What they completed is then returned by :meth:`used` or :meth:`wait_used`."""
        ran = self.host.advance(seconds)
        self._round()
        return ran

    def fd_readable(self, fd: int) -> None:
        """Call what the device registered for ``fd`` (``watch_fd``), as the event loop
        does when ``fd`` is readable; then one round (:meth:`flush`).

        Raises:
            KeyError: the device does not watch ``fd``.
        """
        self.host.watched[fd]()
        self._round()

    # -- configuration space ------------------------------------------------------------------

    def read_config(self, offset: int = 0, size: int | None = None) -> bytes:
        """The driver's read of the config space (GET_CONFIG), ``size`` bytes at
        ``offset`` (default: the rest of the device's config space)."""
        if size is None:
            size = max(len(self.device.config_space()) - offset, 0)
        payload = encode_config(offset, size, 0, bytes(size))
        reply = self.frontend.call(Request.GET_CONFIG, payload)
        return reply[CONFIG_HEADER.size :]

    def write_config(self, offset: int, data: bytes) -> bool:
        """The driver's write to the config space (SET_CONFIG); whether the device took it."""
        status = self.frontend.ack_or_none(
            Request.SET_CONFIG, encode_config(offset, len(data), 0, data))
        return status in (None, 0)

    def stop_queue(self, queue: int = 0) -> int:
        """GET_VRING_BASE: the front-end stops ``queue`` (the device's deferred chains
        are waited for first, see :meth:`VirtioDevice.stop_queue`); returns the base.
        Used elements written meanwhile are collected."""
        reply = self.frontend.call(Request.GET_VRING_BASE, encode_vring_state(queue, 0))
        self._collect(queue, self.frontend.get_used(queue))
        _index, base = VRING_STATE.unpack(reply)
        value: int = base
        return value

    # -- internals ---------------------------------------------------------------------------

    def _round(self) -> None:
        engine = self.backend.engine
        engine.woken()  # consume a worker thread's wake-up, use what was completed
        for _ in range(_RERUN_LIMIT):
            if self.backend.recheck_interval is None:
                break
            self.backend.recheck()
            engine.flush()
        for queue in self._pending:
            self._collect(queue, self.frontend.get_used(queue))

    def _collect(self, queue: int, elements: list[tuple[int, int]]) -> None:
        pending = self._pending.setdefault(queue, [])
        for head, length in elements:
            writable = self._posted.pop((queue, head), None)
            if writable is None:
                raise DeviceRingError(f"queue {queue}: the device used chain {head}, which "
                                      "the harness did not post")
            room = sum(size for _gpa, size in writable)
            views = [self.frontend.memory.view(gpa, size) for gpa, size in writable]
            data = gather(views, 0, min(length, room))
            pending.append(Used(queue, head, length, data))

    def _take(self, queue: int) -> list[Used]:
        pending = self._pending.get(queue, [])
        taken = list(pending)
        pending.clear()
        return taken

    def _wait(
        self, queue: int, timeout: float, done: Callable[[list[Used]], bool], what: str
    ) -> list[Used]:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.backend.engine.completion_fd, select.POLLIN)
        while True:
            self._round()
            pending = self._pending.setdefault(queue, [])
            if done(pending):
                return pending
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} not used within {timeout} s "
                                   f"({len(pending)} other used elements waiting)")
            poller.poll(min(left, 0.05) * 1000)
