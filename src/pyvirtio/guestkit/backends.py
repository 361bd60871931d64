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
from typing import Any

from pyvirtio.client import ask
from pyvirtio.closing import Closing
from pyvirtio.devices.registry import device_types
from pyvirtio.errors import GuestError

__all__ = [
    "BackendProcess",
    "Daemon",
    "StorageDaemon",
    "serve_command",
    "vhost_user_device_args",
    "vhost_user_net_args",
]


def vhost_user_device_args(
    device: str, socket_path: Path, ident: str, *, reconnect: int | None = None, **props: object
) -> list[str]:
    """QEMU arguments attaching a vhost-user back-end: a socket chardev and the device.

    ``device`` names a device type of the registry, which knows QEMU's device for it
    (:meth:`pyvirtio.devices.registry.DeviceType.qemu_args`). ``props`` become
    ``,key=value`` device properties (``num_queues=2`` gives ``num-queues=2``);
    ``reconnect`` makes QEMU reconnect after that many seconds.

    Raises:
        KeyError: unknown device type.
    """
    return device_types()[device].qemu_args(socket_path, ident, reconnect=reconnect, **props)


def vhost_user_net_args(socket_path: Path, ident: str, mac: str) -> list[str]:
    """QEMU arguments attaching a ``pyvirtio serve net`` port: chardev, netdev, NIC.

    ``vectors=0``: QEMU 7.2 under TCG crashes in virtio-pci's MSI-X path when a
    vhost-user virtio-net device uses MSI-X.  QEMU's virtio-net shows the guest
    its own ``mac=``, so give it the daemon's.
    """
    return vhost_user_device_args("net", socket_path, ident, vectors=0, mac=mac)


def serve_command(
    device: str,
    socket_path: Path,
    options: Sequence[str] = (),
    *,
    log_level: str = "info",
    program: Sequence[str] = (sys.executable, "-m", "pyvirtio.cli"),
) -> list[str]:
    """The ``pyvirtio serve <device>`` command line; *program* runs the CLI."""
    return [
        *program, "serve", device,
        "--socket", str(socket_path), "--log-level", log_level, *options,
    ]


class Daemon(Closing):
    """A back-end daemon started as a child process, listening on a Unix socket.

    Its output goes to ``log_path``; :meth:`stop` sends SIGTERM and waits.

    Raises:
        GuestError: the daemon exited, or did not listen within 20 s.
    """

    #: What the daemon is called in error messages.
    name = "daemon"

    def __init__(self, command: Sequence[str], socket_path: Path, log_path: Path) -> None:
        self.command = list(command)
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop() / kill()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 20.0
        while not socket_path.exists():
            if self.process.poll() is not None:
                self._log.close()
                raise GuestError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(f"{self.name} did not listen on {socket_path}:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send a signal (pyvirtio logs queue statistics on SIGUSR1)."""
        os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the daemon and wait (SIGKILL after ``timeout``); return its exit status."""
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

    def close(self) -> None:
        """Stop the daemon (see :meth:`stop`)."""
        self.stop()


class BackendProcess(Daemon):
    """A running ``pyvirtio serve <device>`` daemon, started through the real CLI.

    Args:
        device: a device type of the registry (``blk``, ``rng``, ``net``...).
        socket_path: where it listens.
        options: further CLI options (``["--image", "disk.img", "--queues", "2"]``).
        log_path: file receiving the daemon's stderr (default: next to the socket).
    """

    name = "pyvirtio serve"

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
        command = serve_command(device, socket_path, options, log_level=log_level)
        super().__init__(command, socket_path, log_path or socket_path.with_suffix(".log"))

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (``pyvirtio stats --json``, over SOCKET.ctl).

        ``queues``: the current connection's, per queue; ``last_connection``: the
        last finished one's (or None); ``totals``: since the daemon started.

        Raises:
            NoDaemon: the daemon does not answer, or not with JSON.
        """
        snapshot: dict[str, Any] = ask(self.socket_path, "stats")
        return snapshot


class StorageDaemon(Daemon):
    """qemu-storage-daemon exporting an image as a vhost-user-blk back-end.

    The C reference to test pyvirtio's front-end against and to compare speed with.

    Args:
        image: raw image file to export.
        socket_path: where the export listens.
        queues: ``num-queues`` of the export.
        writable: export read-write (default) or read-only.
        direct: ``cache.direct=on``: O_DIRECT, no host page cache.
        aio: the file driver's ``aio=`` (``threads``, ``native``, ``io_uring``);
            None: QEMU's default (threads).
    """

    name = "qemu-storage-daemon"

    def __init__(
        self, image: Path, socket_path: Path, *, queues: int = 1, writable: bool = True,
        direct: bool = False, aio: str | None = None,
    ) -> None:
        blockdev = (f"driver=file,node-name=f0,filename={image},"
                    f"cache.direct={'on' if direct else 'off'}")
        if aio is not None:
            blockdev += f",aio={aio}"
        command = [
            "qemu-storage-daemon",
            "--blockdev", blockdev,
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={socket_path},"
            f"writable={'on' if writable else 'off'},num-queues={queues}",
        ]
        super().__init__(command, socket_path, socket_path.with_suffix(".log"))
