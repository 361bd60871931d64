"""``pyvirtio input`` against a real ``pyvirtio serve input`` daemon (real sockets, the
real CLI), and the ``--evdev`` reader on real pipes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvirtio.client import control_path
from pyvirtio.devices.input.client import EVDEV_EVENT, read_evdev
from pyvirtio.devices.input.keymap import Event
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.input import EventType


def _pyvirtio(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)


def _daemon(path: Path, *options: str, device: str = "input") -> BackendProcess:
    """``pyvirtio serve DEVICE`` at ``path``, once its control socket listens too (it
    comes up just after the vhost-user socket)."""
    daemon = BackendProcess(device, path, options)
    deadline = time.monotonic() + 20
    while not control_path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon


def _record(type_: int, code: int, value: int) -> bytes:
    return EVDEV_EVENT.pack(1, 2, type_, code, value)


def test_input_commands_queue_events_on_a_keyboard_daemon(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path / "kbd.sock", "--kind", "keyboard", "--name", "host keyboard")
    try:
        typed = _pyvirtio("input", daemon.socket_path, "--text", "Hello, world!\n")
        assert typed.returncode == 0, typed.stderr
        # 14 characters, 4 events each, 2 shifted (H and !: 4 more each); no guest yet.
        assert "64 events queued" in typed.stdout and "64 waiting" in typed.stdout, typed.stdout
        combo = _pyvirtio("input", daemon.socket_path, "--key", "KEY_LEFTCTRL+KEY_C", "--json")
        assert combo.returncode == 0, combo.stderr
        answer = json.loads(combo.stdout)
        assert (answer["queued"], answer["pending"], answer["kind"]) == (8, 72, "keyboard")
        info = _pyvirtio("input", daemon.socket_path)
        assert info.returncode == 0
        assert "keyboard 'host keyboard'" in info.stdout and "72 waiting" in info.stdout
        refused = _pyvirtio("input", daemon.socket_path, "--abs", "1", "2")
        assert refused.returncode == 1 and "no absolute axes" in refused.stderr
        unknown = _pyvirtio("input", daemon.socket_path, "--text", "né")
        assert unknown.returncode == 1 and "no US keyboard key" in unknown.stderr
        clicked = _pyvirtio("input", daemon.socket_path, "--click", "left")
        assert clicked.returncode == 1 and "2 events left out" in clicked.stderr
        probed = _pyvirtio("probe", "--device", "input", "--json", daemon.socket_path)
        assert probed.returncode == 0, probed.stdout + probed.stderr
        assert '"size": 0' in probed.stdout, probed.stdout  # select 0: UNSET
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log, daemon.log


def test_input_refuses_a_daemon_of_another_device(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path / "rng.sock", device="rng")
    try:
        result = _pyvirtio("input", daemon.socket_path, "--text", "a")
        assert result.returncode == 1 and "not an input daemon" in result.stderr
    finally:
        daemon.stop()
    nobody = _pyvirtio("input", tmp_path / "nobody.sock", "--text", "a")
    assert nobody.returncode == 1 and "pyvirtio input:" in nobody.stderr


def test_read_evdev_hands_over_whole_updates() -> None:
    read_fd, write_fd = os.pipe()
    records = (_record(EventType.MSC, 4, 0x70004) + _record(EventType.KEY, 30, 1)
               + _record(EventType.SYN, 0, 0) + _record(EventType.SYN, 3, 0)  # SYN_DROPPED
               + _record(EventType.REL, 0, -2) + _record(EventType.SYN, 0, 0)
               + _record(EventType.KEY, 30, 0))  # an update the device never finished
    updates: list[list[Event]] = []

    def write() -> None:
        for start in range(0, len(records), 7):  # records cut anywhere
            os.write(write_fd, records[start:start + 7])
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        read_evdev(read_fd, updates.append)
    finally:
        writer.join()
        os.close(read_fd)
    assert updates == [[(EventType.MSC, 4, 0x70004), (EventType.KEY, 30, 1), (0, 0, 0)],
                       [(EventType.REL, 0, -2), (0, 0, 0)]]


def test_evdev_passthrough_forwards_a_device_to_the_daemon(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path / "mouse.sock", "--kind", "mouse")
    fifo = tmp_path / "event0"
    os.mkfifo(fifo)
    moves = b"".join(_record(EventType.REL, 0, i) + _record(EventType.SYN, 0, 0)
                     for i in range(1, 41))

    def device() -> None:
        with open(fifo, "wb") as f:
            f.write(moves + _record(EventType.MSC, 4, 1) + _record(EventType.SYN, 0, 0))

    feeder = threading.Thread(target=device)
    feeder.start()
    try:
        result = _pyvirtio("input", daemon.socket_path, "--evdev", fifo)
        feeder.join()
        # 40 moves with their reports; a mouse has no MSC_SCAN (nor its update's report).
        assert result.returncode == 0, result.stderr
        assert "80 events queued" in result.stdout, result.stdout
        assert "1 the mouse does not have left out" in result.stdout, result.stdout
    finally:
        assert daemon.stop() == 0


def test_read_evdev_ends_when_the_device_is_unplugged(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [_record(EventType.KEY, 30, 1) + _record(EventType.SYN, 0, 0)]

    def read(fd: int, size: int) -> bytes:
        if chunks:
            return chunks.pop()
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(os, "read", read)
    updates: list[list[Event]] = []
    read_evdev(-1, updates.append)
    assert updates == [[(EventType.KEY, 30, 1), (0, 0, 0)]]

    def broken(fd: int, size: int) -> bytes:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "read", broken)
    with pytest.raises(OSError):
        read_evdev(-1, updates.append)
