"""Ports of one switch in one process: frames pass between them without a socket.

``pyvirtio serve net --socket A.sock --socket B.sock --switch NAME`` serves
several ports from one process (one event loop).  Their
:class:`~pyvirtio.devices.net.switch.SwitchPort` back ends join this process's
:class:`LocalHub` of the switch (:meth:`SwitchPort.bind_receiver`): a frame one
port's guest sends to an address learned behind another port of the hub goes
into that port's inbox (with its offloads, if the receiving guest negotiated
them: else they are done in software first), and at the end of the transmit batch
(:meth:`SwitchPort.flush`) each inbox goes to its device's receive path in one
call, which fills that guest's receive buffers and notifies it once.  No
datagram, no syscall: the frame is copied out of the sender's transmit buffer
once and into the receiver's receive buffer once.

Each port keeps its socket in the switch folder, so ports of other processes
reach it as before; floods go to the hub's other ports directly and to the
sockets of every other process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pyvirtio.devices.net.switch import SwitchPort
    from pyvirtio.spec.net import NetHeader

__all__ = ["LocalHub"]

log = logging.getLogger(__name__)


class LocalHub:
    """The ports of switch folder ``folder`` in this process.

    Attributes:
        ports: the ports, in the order they joined.
        names: their socket files' names (excluded from the folder's peers).
        where: MAC address -> the port of the hub whose guest last sent from it.
    """

    _hubs: ClassVar[dict[Path, LocalHub]] = {}

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports: list[SwitchPort] = []
        self.names: set[str] = set()
        self.where: dict[bytes, SwitchPort] = {}
        #: Ports with frames in their inbox, in the order they got the first.
        self._due: list[SwitchPort] = []
        self._flushing = False
        #: Senders that stopped taking frames while a port was congested: what
        #: resumes each (called when a port of the hub drained its backlog).
        self._waiting: list[Callable[[], None]] = []

    def congested(self, sender: SwitchPort) -> bool:
        """Whether another port of the hub asks senders to hold their frames now
        (its device's receive backlog fills while its driver is still taking frames)."""
        for port in self.ports:
            if port is not sender and port.pressure is not None and port.pressure():
                return True
        return False

    def wait_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once, the next time a port drained (:meth:`drained`)."""
        self._waiting.append(resume)

    def drained(self) -> None:
        """A port's device delivered frames from its backlog: resume the senders."""
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for resume in waiting:
                resume()

    @classmethod
    def join(cls, port: SwitchPort) -> LocalHub:
        """Add ``port`` to its switch's hub in this process (made on first use)."""
        hub = cls._hubs.get(port.dir)
        if hub is None:
            hub = cls._hubs[port.dir] = cls(port.dir)
        hub.ports.append(port)
        hub.names.add(port.path.name)
        log.info("switch %s: port %s joins %d other port(s) of this process", port.name,
                 port.path.name, len(hub.ports) - 1)
        return hub

    def leave(self, port: SwitchPort) -> None:
        """``port`` closes: forget it and what was learned behind it."""
        if port in self.ports:
            self.ports.remove(port)
        self.names.discard(port.path.name)
        for mac in [mac for mac, where in self.where.items() if where is port]:
            del self.where[mac]
        if port in self._due:
            self._due.remove(port)
        port.inbox.clear()
        port.inbox_headers.clear()
        if not self.ports and self._hubs.get(self.folder) is self:
            del self._hubs[self.folder]

    def put(self, port: SwitchPort, frame: bytes | memoryview,
            header: NetHeader | None = None) -> None:
        """A frame for ``port``'s guest, delivered at :meth:`flush` (the sender's
        flush: a view of its guest's buffer stays valid until then).

        ``header``: the packet's offloads (a partial checksum, TCP segmentation),
        passed on as they are if ``port``'s guest negotiated them, else done here
        in software (:meth:`SwitchPort.finish_offloads`)."""
        if self._flushing and isinstance(frame, memoryview):
            frame = bytes(frame)  # a flush in progress may end after the sender's
        if header is not None:
            accepts = port.accepts_offloads
            if accepts is None or not accepts(header, len(frame)):
                for finished in port.finish_offloads(header, frame):
                    self.put(port, finished)
                return
            port.inbox_headers[len(port.inbox)] = header
        if not port.inbox:
            self._due.append(port)
        port.inbox.append(frame)

    def flush(self) -> None:
        """Hand each port's inbox to its receiver (its device: one batch each).

        A receiver's own sends (none today: a receive path sends nothing) would be
        delivered by the same loop, not by a nested one.
        """
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._due:
                port = self._due.pop(0)
                frames, port.inbox = port.inbox, []
                headers, port.inbox_headers = port.inbox_headers, {}
                port.counters[port._k_received] += len(frames)
                if port.receiver is None:
                    port.counters[f"{port.label} dropped: no receiver"] += len(frames)
                    continue
                try:
                    port.receiver(frames, headers)  # copies the views before it returns
                except Exception:
                    log.exception("switch %s: port %s failed to take %d frames", port.name,
                                  port.path.name, len(frames))
        finally:
            self._flushing = False
