"""Fixtures for end-to-end tests: a real Linux guest under QEMU drives pyvirtio daemons."""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.assets import ensure_qemu_backports
from pyvirtio.guestkit.backends import BackendProcess

Serve = Callable[..., BackendProcess]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e boots a guest."""
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def kit() -> GuestKit:
    """QEMU and the Debian guest kernel (installed / downloaded once, then cached)."""
    return GuestKit.ensure()


@pytest.fixture
def kit10(kit: GuestKit, monkeypatch: pytest.MonkeyPatch) -> GuestKit:
    """The kit with QEMU 10.0 from bookworm-backports (fetched once into the cache,
    :func:`ensure_qemu_backports`) instead of the system's QEMU 7.2; its module
    folder is in the environment for the test's QEMU processes.  ``kit10.qemu`` is
    its binary."""
    qemu = ensure_qemu_backports()
    for name, value in qemu.env.items():
        monkeypatch.setenv(name, value)
    return dataclasses.replace(kit, qemu=qemu.binary)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start ``pyvirtio serve <device>`` daemons through the real CLI; stop them after."""
    started: list[BackendProcess] = []

    def start(device: str, *options: str, name: str | None = None) -> BackendProcess:
        backend = BackendProcess(device, tmp_path / f"{name or device}.sock", options)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, always deleted afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    name = f"pyvirtio-test-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"ip netns add failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
