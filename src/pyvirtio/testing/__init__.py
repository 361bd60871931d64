"""Test a device without QEMU: a public harness over real memfds, rings and eventfds.

:class:`DeviceHarness` serves a device in-process and sends it requests in a few
lines::

    from pyvirtio.testing import DeviceHarness

    with DeviceHarness(UppercaseDevice()) as harness:
        used = harness.request(readable=b"hello", writable=16)
        assert used.data == b"HELLO" and used.length == 5

The parts it is made of are public too, for tests that need to go lower:

- :mod:`pyvirtio.testing.host`: :class:`InMemoryHost`, the daemon's side of the
  device API (:class:`~pyvirtio.devices.base.DeviceHost`) with a manual clock;
- :mod:`pyvirtio.testing.frontend`: :class:`Frontend`, a vhost-user front-end in
  the same process (what QEMU does: negotiation, a shared memory table, split and
  packed rings, kick and call eventfds), sending raw messages to the back-end;
- :mod:`pyvirtio.testing.guest`: guest memory from memfds (:func:`guest_memory`)
  and split queue pairs in it (:func:`make_queue_pair`).

Nothing is mocked: the back-end, the engine and the device run as they do under
``pyvirtio serve``; only the socket and the event loop are left out (the test's
thread runs the loop's rounds).
"""

from __future__ import annotations

from pyvirtio.testing.frontend import (
    FRONTEND_DATA,
    FRONTEND_GPA,
    FRONTEND_QUEUE_STRIDE,
    FRONTEND_RAM,
    NOT_SPLIT_FEATURES,
    QEMU_PROTOCOL_FEATURES,
    Frontend,
    FrontendFactory,
    packed_ring_addresses,
    parse_reply,
)
from pyvirtio.testing.guest import (
    DATA_GPA,
    REGION_SIZE,
    RING_GPA,
    USER_BASE,
    USER_STRIDE,
    Guest,
    GuestFactory,
    Layout,
    QueuePair,
    guest_memory,
    make_queue_pair,
    ring_addresses,
)
from pyvirtio.testing.harness import DEFAULT_TIMEOUT, DeviceHarness, Used
from pyvirtio.testing.host import InMemoryHost

__all__ = [
    "DATA_GPA",
    "DEFAULT_TIMEOUT",
    "FRONTEND_DATA",
    "FRONTEND_GPA",
    "FRONTEND_QUEUE_STRIDE",
    "FRONTEND_RAM",
    "NOT_SPLIT_FEATURES",
    "QEMU_PROTOCOL_FEATURES",
    "REGION_SIZE",
    "RING_GPA",
    "USER_BASE",
    "USER_STRIDE",
    "DeviceHarness",
    "Frontend",
    "FrontendFactory",
    "Guest",
    "GuestFactory",
    "InMemoryHost",
    "Layout",
    "QueuePair",
    "Used",
    "guest_memory",
    "make_queue_pair",
    "packed_ring_addresses",
    "parse_reply",
    "ring_addresses",
]
