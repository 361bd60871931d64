"""The example device of docs/writing-a-device.md, as a user gets it: ``pip install``
of examples/uppercase (a project of its own) into a throwaway target folder, then
``pyvirtio devices`` and ``pyvirtio serve uppercase`` through the real CLI, driven by
pyvirtio's front-end over a real socket and shared memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtio.frontend.connection import GuestRam, VhostUserFrontend
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.common import Feature

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "uppercase"


def pip_install(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """Install ``source`` into ``target`` with pip: offline with the setuptools at hand
    first; a setuptools without a wheel builder (before 70.1, no ``wheel`` package) makes
    pip fetch a build back-end instead."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--target", str(target)]
    run = subprocess.run([*command, "--no-build-isolation", "--no-index", str(source)],
                         capture_output=True, text=True, timeout=120, check=False)
    if run.returncode != 0 and "bdist_wheel" in run.stdout + run.stderr:
        run = subprocess.run([*command, str(source)], capture_output=True, text=True,
                             timeout=120, check=False)
    return run


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the example is installed into, as pip installs it (its entry point too)."""
    base = tmp_path_factory.mktemp("example")
    source = base / "source"  # a copy: the build leaves egg-info and build/ folders behind
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build"))
    run = pip_install(source, base / "site")
    if run.returncode != 0 and "satisfies the requirement setuptools" in run.stderr:
        pytest.skip(f"no package index for the build back-end here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stdout + run.stderr
    return base / "site"


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed example on the ``PYTHONPATH`` of the ``pyvirtio`` commands."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))


def pyvirtio(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.usefixtures("installed")
def test_the_installed_example_is_listed_and_served_by_pyvirtio(tmp_path: Path) -> None:
    listed = pyvirtio("devices", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["problems"] == []
    entry = next(d for d in report["devices"] if d["name"] == "uppercase")
    assert entry["virtio_id"] == 0x3FFF and not entry["builtin"]
    assert entry["source"].startswith("uppercase = pyvirtio_uppercase:UPPERCASE_TYPE (")
    assert entry["source"].endswith(" 1.0)")

    daemon = BackendProcess("uppercase", tmp_path / "up.sock")
    try:
        probed = pyvirtio("probe", "--device", "uppercase", "--json", str(daemon.socket_path))
        assert probed.returncode == 0, probed.stderr
        assert json.loads(probed.stdout)["queue_num"] == 1
        drive(daemon.socket_path)
        totals = daemon.stats()["totals"][0]
        assert (totals["requests"], totals["errors"]) == (2, 1)  # the short request
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


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
            # The text split over two readable descriptors: the device's cursor reads both.
            written = queue.submit([(src, 5), (src + 5, len(text) - 5)], [(dst, 64)],
                                   timeout=10.0, what="uppercase request")
            assert bytes(ram.view(dst, written)) == b"HELLO, VIRTIO"
            # No room for the answer: nothing written, counted as an error.
            assert queue.submit([(src, len(text))], [(dst, 4)], timeout=10.0,
                                what="short request") == 0
        finally:
            ram.close()
