"""pyvirtio's virtio-rng driver against ``pyvirtio serve rng`` (VIRTIO 1.4 §5.4).

A real daemon, a real socket, shared memory: the driver sets DRIVER_OK, asks for
random bytes of several sizes, and the daemon's counters agree with what it asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.frontend.rng import RngDriver
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.common import DeviceStatus


@pytest.fixture
def rng_daemon(tmp_path: Path) -> Iterator[BackendProcess]:
    daemon = BackendProcess("rng", tmp_path / "rng.sock", [])
    yield daemon
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "driver violation:" not in daemon.log, daemon.log


def test_driver_sets_driver_ok_and_reads_random_bytes(rng_daemon: BackendProcess) -> None:
    sizes = [1, 16, 512, 4096, 65536]
    with RngDriver.open(rng_daemon.socket_path) as driver:
        assert driver.frontend.get_status() & DeviceStatus.DRIVER_OK  # §3.1.1 step 8
        blocks = [driver.read(n) for n in sizes]
        stats = rng_daemon.stats()
    assert [len(b) for b in blocks] == sizes  # pyvirtio fills every buffer whole
    assert len(set(blocks[1:])) == len(sizes) - 1
    assert len(set(blocks[-1])) == 256  # 64 KiB of random bytes hold every value
    queue = stats["queues"][0]
    assert queue["requests"] == len(sizes), stats
    assert queue["bytes_to_guest"] == sum(sizes), stats
    assert queue["violations"] == 0, stats
