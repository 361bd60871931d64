"""The example device of docs/writing-a-device.md, served by its own script and driven by
pyvirtio's front-end over a real socket and shared memory."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.spec.common import Feature

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "uppercase_device.py"


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "up.sock"
    daemon = subprocess.Popen([sys.executable, str(EXAMPLE), "--socket", str(path)],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if path.exists():
                break
            time.sleep(0.05)
        yield path
    finally:
        daemon.terminate()
        _out, err = daemon.communicate(timeout=10)
        assert daemon.returncode == 0, err
        assert "Traceback" not in err, err


def test_the_example_device_answers_in_upper_case(socket_path: Path) -> None:
    with VhostUserFrontend.connect(socket_path) as frontend:
        frontend.probe()
        frontend.negotiate(1 << Feature.VERSION_1)
        ram = GuestRam(1 << 20)
        try:
            frontend.share_memory(ram)
            queue = frontend.setup_queue(0, 16)
            frontend.driver_ok()
            text = b"hello, virtio"
            src, dst = ram.alloc(len(text)), ram.alloc(64)
            ram.view(src, len(text))[:] = text
            # The text split over two readable descriptors: the device gathers them.
            written = queue.submit([(src, 5), (src + 5, len(text) - 5)], [(dst, 64)],
                                   timeout=10.0, what="uppercase request")
            assert bytes(ram.view(dst, written)) == b"HELLO, VIRTIO"
            # No room for the answer: nothing written, counted as an error.
            assert queue.submit([(src, len(text))], [(dst, 4)], timeout=10.0,
                                what="short request") == 0
        finally:
            ram.close()
