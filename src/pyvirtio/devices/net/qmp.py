"""The receive filter of a QEMU guest, read from QEMU's QMP monitor (``--qmp PATH``).

With a vhost-user back end, QEMU's virtio-net answers the control virtqueue
itself: the guest's receive modes, MAC table and VLAN filter (VIRTIO 1.4
§5.1.9.5.1-3) never reach the back end.  QEMU reports them, though:
``query-rx-filter`` returns the state of a NIC, and QEMU emits
``NIC_RX_FILTER_CHANGED`` when the guest changes it (once, until the next
query).  :class:`QmpRxFilter` keeps a connection to QEMU's QMP socket
(``-qmp unix:PATH,server=on,wait=off``) in the daemon's loop, queries the
filter at the start and after every such event, and hands each new
:class:`~pyvirtio.devices.net.ctrl.RxFilter` to the device.

Which NIC: the one named with ``nic`` (its ``-device ...,id=``), else the one
whose MAC is the daemon's, else the only one QEMU has.

QMP is line-delimited JSON (docs/interop/qmp-spec in QEMU).  QEMU is the
host's own process, yet its input is still checked: a line longer than
:data:`MAX_LINE`, bad JSON or an unexpected answer is logged and ends the
connection; the device then filters nothing until the next front-end
connects (and :meth:`QmpRxFilter.connect` is called again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from pyvirtio.devices.base import DeviceHost
from pyvirtio.devices.net.ctrl import RxFilter

__all__ = ["MAX_LINE", "QmpRxFilter"]

log = logging.getLogger(__name__)

#: The longest QMP message accepted (a query-rx-filter answer with full tables is ~10 KiB).
MAX_LINE = 1 << 20
_QUERY_ID = "pyvirtio-rx-filter"


class QmpRxFilter:
    """A QMP client that follows one NIC's receive filter.

    Args:
        path: QEMU's QMP socket.
        mac: the daemon's MAC, to find the NIC when ``nic`` is not given.
        nic: QEMU's name of the NIC (``-device virtio-net-pci,id=NAME``).
        on_filter: called with each filter read, and with None when the
            connection ends.
    """

    def __init__(self, path: Path, mac: bytes, nic: str | None,
                 on_filter: Callable[[RxFilter | None], None]) -> None:
        self.path = path
        self.mac = mac
        self.nic = nic
        self.on_filter = on_filter
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._ready = False
        #: The NIC's name once known (``nic``, or found by MAC).
        self._name: str | None = nic
        #: A query is out: an event now only needs another query after it.
        self._querying = False
        self._again = False
        self._host: DeviceHost | None = None

    def attach(self, host: DeviceHost) -> None:
        """Have the daemon's loop call :meth:`readable` while connected."""
        self._host = host

    def fileno(self) -> int | None:
        """The socket's fd while connected."""
        return self._sock.fileno() if self._sock is not None else None

    def connect(self) -> bool:
        """Connect (again) to QEMU's QMP socket; False, logged, if it cannot be reached."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(1.0)
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            log.warning("QMP %s: cannot connect (%s); the guest's receive filter is not "
                        "applied", self.path, exc)
            return False
        sock.setblocking(False)
        self._sock = sock
        if self._host is not None:
            self._host.watch_fd(sock.fileno(), self.readable)
        self._buffer.clear()
        self._ready = self._querying = self._again = False
        self._name = self.nic
        log.info("QMP %s: connected; following the guest's receive filter", self.path)
        return True

    def readable(self) -> None:
        """Read what QEMU sent and act on each complete message."""
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"receive failed: {exc}")
            return
        if not data:
            self._lost("QEMU closed the connection")
            return
        self._buffer += data
        while self._sock is not None and (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                self._message(line)
        if len(self._buffer) > MAX_LINE:
            self._lost(f"a message longer than {MAX_LINE} bytes")

    def _message(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            self._lost(f"not JSON: {exc}")
            return
        if not isinstance(msg, dict):
            self._lost(f"not a JSON object: {line[:80]!r}")
        elif "QMP" in msg:
            self._send({"execute": "qmp_capabilities"})
        elif "event" in msg:
            if msg["event"] == "NIC_RX_FILTER_CHANGED":
                # The event names the NIC by its -device id; a NIC without one
                # sends no name (QEMU 7.2): query then too, by the name query gave.
                data = msg.get("data")
                name = data.get("name") if isinstance(data, dict) else None
                if self._name is None or name is None or name == self._name:
                    self._query()
        elif "error" in msg:
            error = msg["error"]
            self._lost(f"QEMU answered an error: {error}")
        elif "return" in msg:
            if not self._ready:
                self._ready = True
                self._query()
            elif msg.get("id") == _QUERY_ID:
                self._answer(msg["return"])

    def _query(self) -> None:
        if self._querying:
            self._again = True
            return
        self._querying = True
        command: dict[str, object] = {"execute": "query-rx-filter", "id": _QUERY_ID}
        if self._name is not None:
            command["arguments"] = {"name": self._name}
        self._send(command)

    def _answer(self, nics: object) -> None:
        self._querying = False
        if not isinstance(nics, list) or not all(isinstance(n, dict) for n in nics):
            self._lost(f"query-rx-filter returned {nics!r}")
            return
        nic = self._pick(nics)
        if nic is None:
            return
        try:
            rx_filter = RxFilter.from_qmp(nic)
        except ValueError as exc:
            self._lost(str(exc))
            return
        if self._name is None:
            self._name = str(nic.get("name"))
            log.info("QMP %s: following NIC %s", self.path, self._name)
        log.info("QMP %s: receive filter of %s: %s", self.path, self._name,
                 rx_filter.describe())
        self.on_filter(rx_filter)
        if self._again:
            self._again = False
            self._query()

    def _pick(self, nics: list[dict[str, object]]) -> dict[str, object] | None:
        if self._name is not None:
            chosen = [n for n in nics if n.get("name") == self._name]
        else:
            mac = ":".join(f"{b:02x}" for b in self.mac)
            chosen = [n for n in nics if n.get("main-mac") == mac] or (
                nics if len(nics) == 1 else [])
        if len(chosen) != 1:
            names = ", ".join(str(n.get("name")) for n in nics) or "none"
            self._lost(f"cannot tell which NIC is this daemon's (QEMU has: {names}); "
                       "name it with --qmp-nic")
            return None
        return chosen[0]

    def _send(self, command: dict[str, object]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(json.dumps(command).encode() + b"\n")
        except OSError as exc:
            self._lost(f"send failed: {exc}")

    def _lost(self, why: str) -> None:
        log.error("QMP %s: %s; the guest's receive filter is no longer applied",
                  self.path, why)
        self.close()
        self.on_filter(None)

    def close(self) -> None:
        """Close the connection (if any)."""
        if self._sock is not None:
            if self._host is not None:
                self._host.unwatch_fd(self._sock.fileno())
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
