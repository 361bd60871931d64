"""The far side of the vsock device: Unix sockets, their handshakes and buffered output.

:class:`FarSide` is the half of :class:`pyvirtio.devices.vsock.device.VsockDevice`
that talks to host programs and sibling daemons (VIRTIO 1.4 §5.10 says nothing
about them): it accepts ``CONNECT`` handshakes, flushes what the guest sent
(bounded by the credit each connection publishes), watches a far socket only
while the guest can take its bytes, and queues connections that owe the guest a
packet.  The device half (rx and tx, :mod:`~pyvirtio.devices.vsock.device`)
builds on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.vsock.bridge import (
    fit_messages,
    listen_abstract,
    listen_unix,
    parse_connect,
    rendezvous,
    take_line,
)
from pyvirtio.devices.vsock.connection import Connection, ConnKey, Initiator, State
from pyvirtio.spec.vsock import (
    HOST_CID,
    MAX_CID,
    RESERVED_CIDS,
    RXQ,
    TXQ,
    ShutdownFlag,
    VsockFeature,
    VsockType,
)

__all__ = ["DEFAULT_TX_BUFFER", "SEND_FLAGS", "FarSide", "VsockConfig"]

log = logging.getLogger(__name__)

#: The credit each connection publishes by default (bytes held per connection at most).
DEFAULT_TX_BUFFER = 256 * 1024
#: Flags of every send to a far socket: never block the loop, never SIGPIPE.
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_FIRST_HOST_PORT = 1024
_SEND = int(ShutdownFlag.SEND)
_BOTH = int(ShutdownFlag.RCV | ShutdownFlag.SEND)
#: Seconds a connection may wait for the guest's (or the sibling's) answer.
CONNECT_TIMEOUT = 10.0

@dataclass(frozen=True, slots=True)
class VsockConfig:
    """What ``pyvirtio serve vsock`` was given.

    Raises (at construction):
        ValueError: a reserved or too large CID, a bad group name or buffer size.
    """

    guest_cid: int
    uds_path: Path
    groups: tuple[str, ...] = ()
    tx_buffer_size: int = DEFAULT_TX_BUFFER
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.guest_cid in RESERVED_CIDS or not 0 < self.guest_cid <= MAX_CID:
            raise ValueError(f"guest CID {self.guest_cid} is reserved or out of range "
                             "(VIRTIO 1.4 §5.10.4: not 0, 1, 2 or 0xffffffff; 32 bits)")
        for group in self.groups:
            if not group or "/" in group or "\0" in group or len(group) > 64:
                raise ValueError(f"group name {group!r}: 1-64 characters, no '/'")
        if not 4096 <= self.tx_buffer_size <= 0x7FFFFFFF:
            raise ValueError(f"tx buffer size {self.tx_buffer_size}: 4096 bytes to 2 GiB")


@dataclass(eq=False, slots=True)
class _Greeter:
    """An accepted Unix connection before its ``CONNECT`` line."""

    sock: socket.socket
    sibling: bool
    seqpacket: bool
    buffer: bytearray = field(default_factory=bytearray)


class FarSide(VirtioDevice):
    """Connections and their far sockets (the device's host half)."""

    def __init__(self, config: VsockConfig) -> None:
        super().__init__()
        self.config = config
        self.guest_cid = config.guest_cid
        self.conns: dict[ConnKey, Connection] = {}
        #: Connections ended since the daemon started (``pyvirtio stats``).
        self.connections_closed = 0
        self._ready: dict[ConnKey, None] = {}
        self._orphans: deque[bytes] = deque()
        self._greeters: dict[int, _Greeter] = {}
        self._listeners: list[tuple[socket.socket, bool, bool]] = []
        self._next_port = _FIRST_HOST_PORT
        self._rx_kick = False
        self._stopping = False
        try:
            self._listeners.append((listen_unix(config.uds_path), False, False))
            for group in config.groups:
                for seqpacket in (False, True):
                    address = rendezvous(group, config.guest_cid, seqpacket)
                    try:
                        sock = listen_abstract(address, seqpacket)
                    except OSError as exc:
                        raise OSError(exc.errno, f"group {group!r}: CID {config.guest_cid} "
                                      f"cannot be claimed ({exc.strerror}; another daemon "
                                      "has it?)") from None
                    self._listeners.append((sock, True, seqpacket))
        except OSError:
            self._close_listeners()
            raise

    @property
    def seqpacket(self) -> bool:
        """Whether VIRTIO_VSOCK_F_SEQPACKET was negotiated."""
        return self.has_feature(VsockFeature.SEQPACKET)

    def _close_listeners(self) -> None:
        for sock, sibling, _ in self._listeners:
            if self.host is not None:
                self.host.unwatch_fd(sock.fileno())
            sock.close()
            if not sibling:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.uds_path)
        self._listeners.clear()

    def _send_line(self, conn: Connection, line: bytes) -> bool:
        """A handshake line on a fresh socket (it always has room for a few bytes)."""
        try:
            sent = conn.sock.send(line, SEND_FLAGS)
        except OSError as exc:
            sent = -1
            log.debug("vsock: handshake to %s failed: %s", conn.key, exc)
        if sent != len(line):
            self._reset(conn)
            return False
        return True

    def _flush(self, conn: Connection) -> None:
        """Give held bytes to the far socket; then the shutdown steps that waited on it."""
        if conn.key not in self.conns:
            return
        try:
            if conn.seqpacket:
                while conn.messages:
                    message = conn.messages[0]
                    conn.sock.send(message, SEND_FLAGS)
                    conn.messages.popleft()
                    conn.forwarded(len(message))
            else:
                while conn.pending:
                    sent = conn.sock.send(conn.pending, SEND_FLAGS)
                    del conn.pending[:sent]
                    conn.forwarded(sent)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._far_failed(conn, exc)
            return
        if not conn.output_flushed():
            if not conn.waiting_writable and self.host is not None:
                conn.waiting_writable = True
                self.host.when_writable(conn.sock.fileno(), partial(self._writable, conn))
        else:
            self._after_flush(conn)
        self._refresh(conn)

    def _writable(self, conn: Connection) -> None:
        conn.waiting_writable = False
        self._flush(conn)

    def _after_flush(self, conn: Connection) -> None:
        """Everything reached the far side: pass on the guest's shutdown (§5.10.6.5)."""
        if conn.guest_shutdown & _SEND and not conn.far_write_closed:
            conn.far_write_closed = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        both = _BOTH
        if conn.guest_shutdown & both == both and conn.state is not State.CLOSING:
            # a clean disconnect ends with the peer's RST (§5.10.6.5)
            conn.state = State.CLOSING
            conn.want_rst = True

    def _far_failed(self, conn: Connection, exc: OSError) -> None:
        log.debug("vsock: %s: far socket failed: %s", conn.key, exc)
        self.stats[TXQ].kinds["far_reset"] += 1
        self._reset(conn)

    def _reset(self, conn: Connection) -> None:
        """Abort: an RST to the guest, then the connection goes (§5.10.6.5)."""
        conn.state = State.CLOSING
        conn.want_rst = True
        conn.pending.clear()
        conn.messages.clear()
        conn.staged = memoryview(b"")
        self._refresh(conn)

    # -- far side: sockets -----------------------------------------------------------------

    def _watch(self, conn: Connection) -> None:
        if not conn.watching and self.host is not None:
            conn.watching = True
            self.host.watch_fd(conn.sock.fileno(), partial(self._far_readable, conn))

    def _unwatch(self, conn: Connection) -> None:
        if conn.watching and self.host is not None:
            conn.watching = False
            self.host.unwatch_fd(conn.sock.fileno())

    def _far_readable(self, conn: Connection) -> None:
        """The far socket has bytes (or hung up): stop watching until they are taken."""
        self._unwatch(conn)
        if conn.key not in self.conns:
            return
        if conn.awaiting_ok:
            self._sibling_answer(conn)
            return
        conn.readable = True
        self._refresh(conn)

    def _sibling_answer(self, conn: Connection) -> None:
        """The sibling daemon's ``OK``: its guest accepted; the guest gets its RESPONSE."""
        try:
            line = take_line(conn.handshake, conn.sock, conn.seqpacket)
        except BlockingIOError:
            self._watch(conn)
            return
        except (OSError, ValueError):
            line = b""
        if line is None:
            self._watch(conn)
            return
        conn.awaiting_ok = False
        if line != b"OK":
            self.stats[TXQ].kinds["refused"] += 1
            self._reset(conn)
            return
        conn.staged = memoryview(bytes(conn.handshake))
        conn.handshake.clear()
        conn.state = State.ESTABLISHED
        conn.want_response = True
        self._refresh(conn)

    def _refresh(self, conn: Connection) -> None:
        """Watch the far socket when the guest can take its bytes; queue owed packets."""
        if conn.key not in self.conns or self._stopping:
            return
        if conn.wants_input() and not conn.readable and not conn.staged and not conn.awaiting_ok:
            self._watch(conn)
        if conn.has_output():
            self._ready[conn.key] = None
            self._kick_rx()

    def _kick_rx(self) -> None:
        """Process rx soon: once per loop round, after the current drain."""
        if not self._rx_kick and self.host is not None and not self._stopping:
            self._rx_kick = True
            self.host.call_later(0, self._run_rx)

    def _run_rx(self) -> None:
        self._rx_kick = False
        if self.host is not None and not self._stopping:
            self.host.process_queue(RXQ)

    def _remove(self, conn: Connection) -> None:
        """Forget a connection and close its far socket."""
        if self.conns.get(conn.key) is not conn:
            return
        del self.conns[conn.key]
        self._ready.pop(conn.key, None)
        self.connections_closed += 1
        self._unwatch(conn)
        if conn.waiting_writable and self.host is not None:
            self.host.cancel_writable(conn.sock.fileno())
            conn.waiting_writable = False
        conn.sock.close()

    # -- far side: accepting host programs and siblings --------------------------------------

    def _accept(self, listener: socket.socket, sibling: bool, seqpacket: bool) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("vsock: accept failed: %s", exc)
            return
        sock.setblocking(False)
        greeter = _Greeter(sock, sibling, seqpacket)
        self._greeters[sock.fileno()] = greeter
        assert self.host is not None
        self.host.watch_fd(sock.fileno(), partial(self._greet, greeter))

    def _drop_greeter(self, greeter: _Greeter) -> None:
        fd = greeter.sock.fileno()
        if self._greeters.pop(fd, None) is not None and self.host is not None:
            self.host.unwatch_fd(fd)
        greeter.sock.close()

    def _greet(self, greeter: _Greeter) -> None:
        """A ``CONNECT`` line: a host program's or a sibling daemon's REQUEST for the guest."""
        try:
            line = take_line(greeter.buffer, greeter.sock, greeter.seqpacket)
        except BlockingIOError:
            return
        except (OSError, ValueError) as exc:
            log.debug("vsock: handshake failed: %s", exc)
            self._drop_greeter(greeter)
            return
        if line is None:
            return
        words = parse_connect(line, 3 if greeter.sibling else 1)
        ready = self.host is not None and self.host.queue_ready(RXQ)
        if words is None or not ready or len(self.conns) >= self.config.max_connections:
            self.stats[RXQ].kinds["host_connect_refused"] += 1
            log.debug("vsock: host connection refused: %r%s", line,
                      "" if ready else " (no driver)")
            self._drop_greeter(greeter)
            return
        fd = greeter.sock.fileno()
        self._greeters.pop(fd)
        assert self.host is not None
        self.host.unwatch_fd(fd)
        if greeter.sibling:
            port, far_cid, far_port = words
            initiator = Initiator.SIBLING
            if far_cid in RESERVED_CIDS or far_cid in (self.guest_cid,) or far_cid > MAX_CID:
                greeter.sock.close()
                return
        else:
            port, far_cid, far_port = words[0], HOST_CID, self._host_port(words[0])
            initiator = Initiator.HOST
        kind = VsockType.SEQPACKET if greeter.seqpacket else VsockType.STREAM
        conn = Connection(port, far_cid, far_port, kind, greeter.sock, initiator,
                          self.config.tx_buffer_size)
        if conn.key in self.conns or (kind == VsockType.SEQPACKET and not self.seqpacket):
            greeter.sock.close()
            return
        if greeter.seqpacket:
            fit_messages(greeter.sock, self.config.tx_buffer_size)
        conn.staged = memoryview(bytes(greeter.buffer))
        conn.want_request = True
        self.conns[conn.key] = conn
        self._expect_answer(conn)
        self._refresh(conn)

    def _expect_answer(self, conn: Connection) -> None:
        """A connection still connecting after :data:`CONNECT_TIMEOUT` s is reset: a
        guest (or a sibling daemon) that never answers does not hold it open forever."""
        assert self.host is not None
        self.host.call_later(CONNECT_TIMEOUT, partial(self._connect_timeout, conn))

    def _connect_timeout(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn and conn.state is State.CONNECTING:
            self.stats[TXQ].kinds["connect_timeout"] += 1
            log.info("vsock: %s: no answer within %.0f s; reset", conn.key, CONNECT_TIMEOUT)
            self._reset(conn)

    def _host_port(self, guest_port: int) -> int:
        """A free local port on CID 2 for a host program's connection."""
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0x7FFFFFFF else _FIRST_HOST_PORT
            if (guest_port, HOST_CID, port) not in self.conns:
                return port
