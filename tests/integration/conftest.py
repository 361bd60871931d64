"""Fixtures: real back-end daemons (pyvirtio serve, qemu-storage-daemon) on real images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.guestkit.assets import ensure_host_tools
from pyvirtio.guestkit.backends import BackendProcess, Daemon, StorageDaemon

MiB = 1 << 20
IMAGE_SIZE = 32 * MiB


@pytest.fixture(scope="session", autouse=True)
def _host_tools() -> None:
    """qemu-storage-daemon comes with QEMU's packages (installed when missing)."""
    ensure_host_tools()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse raw image."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture(params=["pyvirtio", "qsd"])
def blk_backend(request: pytest.FixtureRequest, image: Path, tmp_path: Path) -> Iterator[Daemon]:
    """A vhost-user-blk back-end with 2 queues on ``image``: pyvirtio's, then QEMU's."""
    socket_path = tmp_path / f"{request.param}.sock"
    if request.param == "pyvirtio":
        backend = BackendProcess(
            "blk", socket_path, ["--image", str(image), "--queues", "2", "--serial", "itest"]
        )
        yield backend
        assert backend.stop() == 0
        log = backend.log
        assert "Traceback" not in log and "driver violation:" not in log, log
    else:
        daemon = StorageDaemon(image, socket_path, queues=2)
        yield daemon
        daemon.stop()
