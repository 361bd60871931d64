"""virtio-console's control queues (VIRTIO 1.4 §5.3.6.2) and the console size.

:class:`ControlQueues` is the part of :class:`~pyvirtio.devices.console.device.ConsoleDevice`
that speaks to the driver on the control queues: it validates the driver's messages
(DEVICE_READY, PORT_READY, PORT_OPEN), answers them (DEVICE_ADD, CONSOLE_PORT,
RESIZE, PORT_NAME, PORT_OPEN) and serves the ``console`` and ``console-size``
control commands.  A malformed message is counted, logged and ignored.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence

from pyvirtio.devices.base import ControlCommand, ControlReply, VirtioDevice
from pyvirtio.devices.console.ports import ConsoleConfig, Port
from pyvirtio.errors import BackendChannelError
from pyvirtio.spec.console import (
    CONTROL,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    RESIZE,
    ConsoleFeature,
    ControlEvent,
)
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["ControlQueues"]

log = logging.getLogger("pyvirtio.devices.console.device")

#: Malformed control messages logged at WARNING; the rest at DEBUG (still counted).
_LOUD_MALFORMED = 20


class ControlQueues(VirtioDevice):
    """The control-queue half of the console device (see the module docstring)."""

    config: ConsoleConfig
    ports: list[Port]
    cols: int
    rows: int
    _control_out: deque[bytes]
    _malformed: int
    _stopping: bool

    @property
    def multiport(self) -> bool:
        """Whether the driver took MULTIPORT (the control queues and ports 1.. exist)."""
        return self.has_feature(ConsoleFeature.MULTIPORT)

    def _process(self, queue: int) -> None:
        if self.host is not None and not self._stopping:
            self.host.process_queue(queue)

    # -- the control queues (§5.3.6.2) -----------------------------------------------------

    def _queue_control(self, port: int, event: ControlEvent, value: int = 0,
                       extra: bytes = b"") -> None:
        self._control_out.append(CONTROL.pack(port, event, value) + extra)

    def _flush_control(self) -> None:
        if self._control_out:
            self._process(CONTROL_RECEIVEQ)

    def _send_control(self, chain: DescriptorChain) -> int:
        """One device-to-driver control message into one control receive buffer."""
        stats = self.stats[CONTROL_RECEIVEQ]
        message = self._control_out.popleft()
        writer = chain.writer()
        if writer.remaining < len(message):
            stats.errors += 1
            log.warning("control receive buffer %d holds %d bytes; a %d-byte control message "
                        "does not fit and is dropped", chain.head, writer.remaining,
                        len(message))
            return 0
        writer.write(message)
        stats.bytes_in += len(message)
        event = CONTROL.unpack_from(message)[1]
        stats.kinds[ControlEvent(event).name.lower()] += 1
        return writer.written

    def _malformed_control(self, chain: DescriptorChain, why: str) -> None:
        stats = self.stats[CONTROL_TRANSMITQ]
        stats.errors += 1
        stats.kinds["malformed"] += 1
        self._malformed += 1
        level = logging.WARNING if self._malformed <= _LOUD_MALFORMED else logging.DEBUG
        log.log(level, "malformed control message in buffer %d: %s (VIRTIO 1.4 §5.3.6.2); "
                "ignored (%d so far)", chain.head, why, self._malformed)

    def _receive_control(self, chain: DescriptorChain) -> None:
        """One driver-to-device control message (§5.3.6.2), validated before use."""
        stats = self.stats[CONTROL_TRANSMITQ]
        if chain.readable_len < CONTROL.size:
            self._malformed_control(chain, f"{chain.readable_len} bytes, a message has "
                                    f"{CONTROL.size}")
            return
        raw = chain.reader().read(CONTROL.size)
        stats.bytes_out += chain.readable_len
        ident, event, value = CONTROL.unpack(raw)
        if event not in (ControlEvent.DEVICE_READY, ControlEvent.PORT_READY,
                         ControlEvent.PORT_OPEN):
            self._malformed_control(chain, f"event {event} is not one a driver sends")
            return
        if value not in (0, 1):
            self._malformed_control(chain, f"event {ControlEvent(event).name}: value {value} "
                                    "is neither 0 nor 1")
            return
        if not self.multiport:
            self._malformed_control(chain, "MULTIPORT was not negotiated")
            return
        stats.kinds[ControlEvent(event).name.lower()] += 1
        if event == ControlEvent.DEVICE_READY:
            if not value:
                log.warning("the driver failed to set up (DEVICE_READY 0)")
                return
            for port in self.ports:
                if not port.added:
                    port.added = True
                    self._queue_control(port.index, ControlEvent.DEVICE_ADD)
            self._flush_control()
            return
        if ident >= len(self.ports) or not self.ports[ident].added:
            self._malformed_control(chain, f"{ControlEvent(event).name} for port {ident}, "
                                    f"which was not added ({len(self.ports)} ports)")
            return
        port = self.ports[ident]
        if event == ControlEvent.PORT_READY:
            self._port_ready(port, bool(value))
        else:
            self._guest_open(port, bool(value))

    def _port_ready(self, port: Port, ok: bool) -> None:
        if not ok:
            log.warning("port %d: the driver failed to set it up (PORT_READY 0)", port.index)
            return
        if port.ready:
            log.debug("port %d: PORT_READY again", port.index)
        port.ready = True
        if port.index == 0:
            self._queue_control(0, ControlEvent.CONSOLE_PORT, 1)
            self._queue_control(0, ControlEvent.RESIZE, 0, self._resize_payload())
            port.guest_open = True  # a console port takes input at any time
        if port.name is not None:
            self._queue_control(port.index, ControlEvent.PORT_NAME, 0, port.name.encode())
        if port.host_connected:
            self._queue_control(port.index, ControlEvent.PORT_OPEN, 1)
        self._flush_control()

    def _guest_open(self, port: Port, is_open: bool) -> None:
        port.guest_open = is_open or port.index == 0
        log.info("port %d: guest %s it", port.index, "opened" if is_open else "closed")
        if port.guest_open:
            self._process(port.rx_queue)

    def _announce_open(self, port: Port, is_open: bool) -> None:
        if port.ready and self.multiport:
            self._queue_control(port.index, ControlEvent.PORT_OPEN, int(is_open))
            self._flush_control()

    def _resize_payload(self) -> bytes:
        if self.config.resize_order == "rows-first":
            return RESIZE.pack(self.rows, self.cols)
        return RESIZE.pack(self.cols, self.rows)

    # -- resize and control commands -------------------------------------------------------

    def resize(self, cols: int, rows: int) -> str:
        """The console is now ``cols`` x ``rows``: the config space changes (with a
        configuration change notification, §2.5.1) and, with MULTIPORT, a RESIZE
        control message goes to port 0 (§5.3.6.2).  Returns how the driver was told.

        Raises:
            ValueError: a size out of 0..65535.
        """
        if not (0 <= cols <= 0xFFFF and 0 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows}: 0..65535 each")
        self.cols, self.rows = cols, rows
        told = []
        if self.multiport and self.ports[0].ready:
            self._queue_control(0, ControlEvent.RESIZE, 0, self._resize_payload())
            self._flush_control()
            told.append("resize message")
        if self.host is not None and self.has_feature(ConsoleFeature.SIZE):
            try:
                self.host.config_changed()
                told.append("config change")
            except BackendChannelError as exc:  # NoFrontend, NoBackendChannel too
                log.info("console resize: no config change notification: %s", exc)
        return ", ".join(told) or "nothing (no driver yet)"

    def control_commands(self) -> Mapping[str, ControlCommand]:
        """``console`` (where the ports are) and ``console-size COLS ROWS``."""
        return {"console": self._console_command, "console-size": self._size_command}

    def describe(self) -> dict[str, object]:
        """The ports and the size, as the ``console`` control command answers."""
        return {
            "ok": True, "cols": self.cols, "rows": self.rows,
            "path": str(self.ports[0].path) if self.ports[0].path is not None else None,
            "ports": [
                {"id": p.index, "name": p.name,
                 "path": str(p.path) if p.path is not None else None,
                 "host_connected": p.host_connected, "ready": p.ready,
                 "guest_open": p.guest_open}
                for p in self.ports
            ],
        }

    def _console_command(self, args: Sequence[str], reply: ControlReply) -> None:
        reply(self.describe())

    def _size_command(self, args: Sequence[str], reply: ControlReply) -> None:
        if len(args) != 2 or not all(a.isdigit() for a in args):
            reply({"ok": False, "error": f"usage: console-size COLS ROWS, not {list(args)!r}"})
            return
        try:
            told = self.resize(int(args[0]), int(args[1]))
        except ValueError as exc:
            reply({"ok": False, "error": str(exc)})
            return
        reply({"ok": True, "cols": self.cols, "rows": self.rows, "notified": told})
