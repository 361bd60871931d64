"""Fixtures of the unit tests: real guest memory, queue pairs, an in-process front-end.

The pieces are public, in :mod:`pyvirtio.testing`: guest RAM is memfds mapped with
``mmap`` (as a vhost-user front-end shares it), rings are built in that memory by
the driver-side queues, notifications are eventfds.  Nothing of pyvirtio's own
layers is mocked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.memory import GuestMemory, create_memfd
from pyvirtio.testing import (
    FRONTEND_GPA,
    FRONTEND_RAM,
    REGION_SIZE,
    Frontend,
    FrontendFactory,
    Guest,
    GuestFactory,
    Layout,
    QueuePair,
    guest_memory,
    make_queue_pair,
)
from pyvirtio.vhost_user.backend import VhostUserBackend


@pytest.fixture
def make_guest() -> Iterator[GuestFactory]:
    """Factory of :class:`Guest` objects (``make_guest(layout)``), closed at teardown."""
    with contextlib.ExitStack() as stack:

        def make(layout: Layout = ((0, REGION_SIZE),)) -> Guest:
            return stack.enter_context(guest_memory(layout))

        yield make


@pytest.fixture
def guest(make_guest: GuestFactory) -> Guest:
    """One 256 KiB region at GPA 0."""
    return make_guest()


@pytest.fixture
def memory(guest: Guest) -> GuestMemory:
    """The memory of :func:`guest`."""
    return guest.memory


@pytest.fixture
def two_regions(make_guest: GuestFactory) -> Guest:
    """Two 256 KiB regions adjacent in guest physical space (GPA 0 and 0x40000),
    from two different memfds, far apart in the front-end's address space."""
    return make_guest(((0, REGION_SIZE), (REGION_SIZE, REGION_SIZE)))


@pytest.fixture
def memfds() -> Iterator[Callable[[int], int]]:
    """Factory of memfds of a given size, closed at teardown."""
    fds: list[int] = []

    def make(size: int) -> int:
        fd = create_memfd(size, "unit-extra")
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def pair(memory: GuestMemory) -> QueuePair:
    """A 16-entry queue (index 3, INDIRECT_DESC negotiated) over :func:`memory`."""
    return make_queue_pair(memory, 16, indirect=True, index=3, data_end=REGION_SIZE)


@pytest.fixture
def make_frontend(make_guest: GuestFactory) -> Iterator[FrontendFactory]:
    """Factory: a back-end (no watcher) for ``device`` and a front-end with 1 MiB of RAM.

    At teardown the back-end disconnects, the device closes and the eventfds go.
    """
    made: list[Frontend] = []

    def make(device: VirtioDevice) -> Frontend:
        backend = VhostUserBackend(device)
        frontend = Frontend(backend, make_guest(((FRONTEND_GPA, FRONTEND_RAM),)))
        made.append(frontend)
        return frontend

    yield make
    for frontend in made:
        frontend.backend.disconnect()
        frontend.backend.device.close()
        frontend.close()
