"""Device state for migration: vhost-user SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE.

vhost-user.rst "Migrating back-end state": the front-end hands over one end of
a pipe-like channel.  Saving, the back-end writes its state into it and closes
it; loading, it reads until the end of file.  The front-end then asks
CHECK_DEVICE_STATE whether the back-end processed it.  The device gives and
takes its state as bytes (:meth:`~pyvirtio.devices.base.VirtioDevice.save_state`,
:meth:`~pyvirtio.devices.base.VirtioDevice.load_state`); the transfer runs in a
thread, because the front-end reads (or writes) the other end only after the
reply, and a state larger than a pipe's buffer would otherwise block the loop.
"""

from __future__ import annotations

import logging
import os
import threading

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.vhost_user.protocol import DeviceStateTransfer, TransferDirection, close_fds

__all__ = ["STATE_LIMIT", "TRANSFER_TIMEOUT", "StateTransfer"]

log = logging.getLogger(__name__)

#: The largest state a back-end reads from a front-end (the data is untrusted).
STATE_LIMIT = 64 << 20
#: How long CHECK_DEVICE_STATE waits for the transfer to end (seconds).
TRANSFER_TIMEOUT = 30.0


class StateTransfer:
    """One transfer over the front-end's channel ``fd`` (owned from here on)."""

    def __init__(self, device: VirtioDevice, params: DeviceStateTransfer, fd: int) -> None:
        self.device = device
        self.direction = params.direction
        self._fd: int | None = fd
        self._data = b""
        self._error: str | None = None
        if self.direction is TransferDirection.SAVE:
            try:
                self._data = device.save_state()
            except Exception as exc:
                log.exception("device state: saving failed")
                self._error = f"saving failed: {exc}"
        self._thread = threading.Thread(target=self._run, name="pyvirtio-device-state",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            if self.direction is TransferDirection.SAVE:
                view = memoryview(self._data)
                while view:
                    view = view[os.write(fd, view):]
            else:
                chunks: list[bytes] = []
                total = 0
                while chunk := os.read(fd, 1 << 16):
                    total += len(chunk)
                    if total > STATE_LIMIT:
                        self._error = f"state larger than {STATE_LIMIT} bytes"
                        return
                    chunks.append(chunk)
                self._data = b"".join(chunks)
        except OSError as exc:
            self._error = f"transfer failed: {exc}"
        finally:
            close_fds([fd])

    def check(self) -> int:
        """CHECK_DEVICE_STATE: 0 when the state was sent, or received and loaded."""
        self._thread.join(TRANSFER_TIMEOUT)
        if self._thread.is_alive():
            self._error = f"the transfer did not end within {TRANSFER_TIMEOUT:.0f} s"
        elif self.direction is TransferDirection.LOAD and self._error is None:
            try:
                self.device.load_state(self._data)
            except ValueError as exc:
                self._error = f"the device refused the state: {exc}"
        if self._error is not None:
            log.error("device state (%s): %s", self.direction.name.lower(), self._error)
            return 1
        log.info("device state %s: %d bytes", "saved" if self.direction is
                 TransferDirection.SAVE else "loaded", len(self._data))
        return 0
