"""The example device of docs/writing-a-device.md, served by its own script and, once a
(throwaway) distribution registers it in the ``pyvirtio.devices`` entry-point group, by
``pyvirtio serve``; driven by pyvirtio's front-end over a real socket and shared memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.guestkit.backends import BackendProcess
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
    drive(socket_path)


def drive(socket_path: Path) -> None:
    """Send text over two descriptors, then a request with too little room."""
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


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution naming the example's UPPERCASE_TYPE in ``pyvirtio.devices``, on the
    ``PYTHONPATH`` of the ``pyvirtio`` commands this test starts."""
    info = tmp_path / "site" / "uppercase_example-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: uppercase-example\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pyvirtio.devices]\nuppercase = uppercase_device:UPPERCASE_TYPE\n")
    path = [str(info.parent), str(EXAMPLE.parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


def pyvirtio(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.usefixtures("registered")
def test_a_registered_example_is_served_by_pyvirtio_serve(tmp_path: Path) -> None:
    listed = pyvirtio("devices", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(d for d in json.loads(listed.stdout)["devices"] if d["name"] == "uppercase")
    assert entry["virtio_id"] == 0x3FFF and not entry["builtin"]
    assert entry["source"] == ("uppercase = uppercase_device:UPPERCASE_TYPE "
                               "(uppercase-example 1.0)")

    daemon = BackendProcess("uppercase", tmp_path / "up.sock")
    try:
        probed = pyvirtio("probe", "--device", "uppercase", "--json", str(daemon.socket_path))
        assert probed.returncode == 0, probed.stderr
        report = json.loads(probed.stdout)
        assert report["device"] == "uppercase" and report["queue_num"] == 1
        drive(daemon.socket_path)
        assert daemon.stats()["totals"][0]["errors"] == 1  # the short request
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
