"""pyvirtio back-end daemons started through the real CLI, and their QEMU arguments.

Used by the end-to-end tests and ``make demo``: each back-end is a
``pyvirtio serve <device>`` process, exactly as a user would start it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from pyvirtio.guestkit.assets import GuestError

__all__ = ["BackendProcess", "StorageDaemon", "vhost_user_device_args"]

#: QEMU ``-device`` driver for each pyvirtio device name.
_QEMU_DEVICES = {"blk": "vhost-user-blk-pci", "rng": "vhost-user-rng-pci"}


def vhost_user_device_args(
    device: str, socket_path: Path, ident: str, *, reconnect: int | None = None, **props: object
) -> list[str]:
    """QEMU arguments attaching a vhost-user back-end: a socket chardev and the device.

    ``props`` become ``,key=value`` device properties (``num_queues=2`` gives
    ``num-queues=2``); ``reconnect`` makes QEMU reconnect after that many seconds.
    """
    chardev = f"socket,id={ident},path={socket_path}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    dev = f"{_QEMU_DEVICES[device]},chardev={ident}"
    for key, value in props.items():
        dev += f",{key.replace('_', '-')}={value}"
    return ["-chardev", chardev, "-device", dev]


class BackendProcess:
    """A running ``pyvirtio serve`` daemon.

    Args:
        device: ``blk`` or ``rng``.
        socket_path: where it listens.
        options: further CLI options (``["--image", "disk.img", "--queues", "2"]``).
        log_path: file receiving the daemon's stderr (default: next to the socket).
    """

    def __init__(
        self,
        device: str,
        socket_path: Path,
        options: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        log_level: str = "info",
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        self.log_path = log_path or socket_path.with_suffix(".log")
        self.command = [
            sys.executable, "-m", "pyvirtio.cli", "serve", device,
            "--socket", str(socket_path), "--log-level", log_level, *options,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.process.poll() is not None:
                self._log.close()
                raise GuestError(
                    f"pyvirtio serve {self.device} exited with {self.process.returncode}:\n"
                    f"{self.log}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(f"pyvirtio serve {self.device} did not listen:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        """Everything the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send a signal (SIGUSR1 dumps queue statistics to the log)."""
        os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the daemon and wait; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (crash simulation, or clean-up after a failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class StorageDaemon:
    """qemu-storage-daemon exporting an image as a vhost-user-blk back-end.

    The C reference to test pyvirtio's front-end against and to compare speed with.

    Args:
        image: raw image file to export.
        socket_path: where the export listens.
        queues: ``num-queues`` of the export.
        writable: export read-write (default) or read-only.
    """

    def __init__(
        self, image: Path, socket_path: Path, *, queues: int = 1, writable: bool = True
    ) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.command = [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={socket_path},"
            f"writable={'on' if writable else 'off'},num-queues={queues}",
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise GuestError(f"qemu-storage-daemon did not start:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        """What the daemon printed."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the daemon and wait; return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
