"""Driver violations fed from a Python driver to `pyvirtio serve` over a real socket.

The daemon's log must say what happened, on which queue and descriptor, and
cite the spec section; `--strict` must put the device in DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.common import DeviceStatus, Feature
from pyvirtio.spec.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

Breaker = Callable[[DriverSplitQueue, GuestRam], None]


def _loop(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.write_desc(0, ram.alloc(64), 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)


def _next_out_of_range(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.write_desc(0, ram.alloc(64), 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 99)
    ring.publish(0)


def _readable_after_writable(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.write_desc(0, ram.alloc(64), 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, ram.alloc(64), 64, 0, 0)
    ring.publish(0)


def _outside_memory(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.write_desc(0, 1 << 40, 64, VIRTQ_DESC_F_WRITE, 0)
    ring.publish(0)


def _indirect_not_negotiated(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.write_desc(0, ram.alloc(64), 32, VIRTQ_DESC_F_INDIRECT, 0)
    ring.publish(0)


def _avail_index_jump(ring: DriverSplitQueue, ram: GuestRam) -> None:
    ring.set_avail_idx(100)


VIOLATIONS: list[tuple[str, Breaker, str, str]] = [
    ("descriptor loop", _loop, "queue 0, descriptor 0", "VIRTIO 1.4 §2.7.5.2"),
    ("next out of range", _next_out_of_range, "queue 0, descriptor 0", "VIRTIO 1.4 §2.7.5"),
    ("readable after writable", _readable_after_writable, "queue 0, descriptor 1",
     "VIRTIO 1.4 §2.7.4.2"),
    ("buffer outside memory", _outside_memory, "queue 0, descriptor 0", "VIRTIO 1.4 §2.7.5"),
    ("indirect not negotiated", _indirect_not_negotiated, "queue 0, descriptor 0",
     "VIRTIO 1.4 §2.7.5.3.1"),
    ("available index jump", _avail_index_jump, "queue 0:", "VIRTIO 1.4 §2.7.6"),
]


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Callable[..., tuple[BackendProcess, VhostUserFrontend,
                                                              FrontendQueue]]]:
    opened: list[tuple[BackendProcess, VhostUserFrontend]] = []

    def start(*options: str) -> tuple[BackendProcess, VhostUserFrontend, FrontendQueue]:
        backend = BackendProcess("rng", tmp_path / "rng.sock", options)
        fe = VhostUserFrontend.connect(backend.socket_path)
        opened.append((backend, fe))
        fe.probe()
        fe.negotiate(1 << Feature.VERSION_1)
        fe.share_memory(GuestRam(1 << 20))
        return backend, fe, fe.setup_queue(0, 16)

    yield start
    for backend, fe in opened:
        fe.close()
        backend.stop()


def _wait_for(backend: BackendProcess, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = backend.log
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{backend.log}")


@pytest.mark.parametrize(("name", "breaker", "where", "section"), VIOLATIONS,
                         ids=[v[0] for v in VIOLATIONS])
def test_violation_log_names_queue_descriptor_and_section(
    connect: Callable[..., tuple[BackendProcess, VhostUserFrontend, FrontendQueue]],
    name: str, breaker: Breaker, where: str, section: str,
) -> None:
    backend, fe, queue = connect()
    assert isinstance(queue.ring, DriverSplitQueue) and fe.ram is not None
    breaker(queue.ring, fe.ram)
    queue.kick()
    log = _wait_for(backend, "driver violation:")
    line = next(x for x in log.splitlines() if "driver violation:" in x)
    assert where in line and section in line, line
    # Without --strict the device keeps its status clean and the connection alive.
    assert not fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


@pytest.mark.parametrize(("name", "breaker", "where", "section"), VIOLATIONS[:3],
                         ids=[v[0] for v in VIOLATIONS[:3]])
def test_strict_sets_needs_reset_on_the_first_violation(
    connect: Callable[..., tuple[BackendProcess, VhostUserFrontend, FrontendQueue]],
    name: str, breaker: Breaker, where: str, section: str,
) -> None:
    backend, fe, queue = connect("--strict")
    assert isinstance(queue.ring, DriverSplitQueue) and fe.ram is not None
    breaker(queue.ring, fe.ram)
    queue.kick()
    _wait_for(backend, "DEVICE_NEEDS_RESET")
    assert fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    fe.set_status(0)  # the driver resets the device
    assert not fe.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
