"""The virtio-console device model (VIRTIO 1.4 §5.3 Console Device).

Port 0 is the console (the guest's ``hvc0``); ports 1.. are named ports (the
guest's ``/dev/vportNpM``, named in ``/sys/class/virtio-ports/*/name``).  The
device always offers VIRTIO_CONSOLE_F_MULTIPORT, F_SIZE and F_EMERG_WRITE
(§5.3.3); with MULTIPORT the ports are announced on the control queues
(§5.3.6.2): the driver's DEVICE_READY gets a DEVICE_ADD per port, each
PORT_READY gets CONSOLE_PORT (port 0), RESIZE (port 0), PORT_NAME (named ports)
and PORT_OPEN when a host client is connected.

Each port is bridged to a host endpoint: a Unix stream socket the device listens
on (one client at a time, as QEMU's ``-chardev socket,server=on``), or, for port
0 without a socket, the daemon's stdin and stdout.

**No data is lost** (back-pressure both ways):

- guest output: a transmitq's chains are taken only while the port's host client
  is connected and has taken everything before (:meth:`ConsoleDevice.has_work`).
  A chain the socket takes only in part is held (:data:`DEFERRED`, its views sent
  as they are, no copy) and retried from a timer; the chains behind it stay in
  the ring, so the guest's writes block;
- host input: a receiveq's chains are taken only when host bytes wait, and, for a
  named port, while the guest has the port open (Linux discards data that reaches
  a port the guest has closed).  The socket is read straight into the guest's
  buffers; while the guest has no buffer, the socket is not read and the host's
  writes block.

Resize (§5.3.4, §5.3.6.2): the size is in the config space (``cols``, ``rows``,
with a configuration change notification) and in a RESIZE control message for
port 0.  §5.3.6.2 gives the message's size as ``cols, rows``, the order the device
sends by default (``resize_order="spec"``) and the one the guests tested here
(Debian's Linux 6.1.17x, UML and x86) read; Linux kernels without the fix
"virtio_console: fix order of fields cols and rows" read ``rows, cols``
(``resize_order="rows-first"``).

The guest is untrusted: control messages are validated (length, port id, event,
value); a malformed one is counted (``errors`` and ``kinds["malformed"]`` of the
control transmitq), logged, and answered by nothing; the device keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from functools import partial

from pyvirtio.devices.base import (
    DEFERRED,
    Deferred,
    DeviceHost,
)
from pyvirtio.devices.console.controlq import ControlQueues
from pyvirtio.devices.console.ports import (
    MAX_PORTS,
    RESIZE_ORDERS,
    ConsoleConfig,
    Port,
    PortSpec,
)
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.console import (
    CONFIG,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    ConsoleFeature,
    queue_count,
    queue_port,
)
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = [
    "MAX_PORTS",
    "RESIZE_ORDERS",
    "ConsoleConfig",
    "ConsoleDevice",
    "Port",
    "PortSpec",
]

log = logging.getLogger(__name__)

#: Malformed control messages logged at WARNING; the rest at DEBUG (still counted).
_LOUD_MALFORMED = 20
#: Bytes of stdin read per wake-up (port 0 on stdio).
_STDIN_CHUNK = 65536
#: Emergency-write bytes kept while no host client is connected.
_MAX_CARRY = 65536


class ConsoleDevice(ControlQueues):
    """virtio-console with MULTIPORT: the console plus named ports (§5.3).

    Raises (at construction):
        OSError: a port's socket cannot be created.
    """

    device_id = DeviceId.CONSOLE
    max_queue_size = 1024

    def __init__(self, config: ConsoleConfig) -> None:
        super().__init__()
        self.config = config
        self.cols = config.cols
        self.rows = config.rows
        self.ports: list[Port] = []
        try:
            self.ports.append(Port(0, None, config.console_socket))
            for number, spec in enumerate(config.ports, start=1):
                self.ports.append(Port(number, spec.name, spec.path))
        except OSError:
            self._close_listeners()
            raise
        self.num_queues = queue_count(len(self.ports))
        self._control_out: deque[bytes] = deque()
        self._malformed = 0
        self._stopping = False

    # -- features and config space (§5.3.3, §5.3.4) ---------------------------------------

    @property
    def max_nr_ports(self) -> int:
        """``max_nr_ports`` of the config space: the console and the named ports."""
        return len(self.ports)

    def device_features(self) -> int:
        """SIZE, MULTIPORT and EMERG_WRITE (§5.3.3)."""
        return sum(1 << bit for bit in ConsoleFeature)

    def config_space(self) -> bytes:
        """``struct virtio_console_config`` (§5.3.4): the size, max_nr_ports, emerg_wr 0."""
        return CONFIG.pack(self.cols, self.rows, self.max_nr_ports, 0)

    def write_config(self, offset: int, data: bytes) -> bool:
        """An emergency write (§5.3.4, §5.3.5): a 32-bit write to ``emerg_wr`` (offset 8)
        puts its low byte out on port 0.  Every other write is refused."""
        if offset != 8 or len(data) not in (1, 2, 4) or not self.has_feature(
                ConsoleFeature.EMERG_WRITE):
            log.warning("driver wrote %d bytes at config offset %d: only emerg_wr (offset 8, "
                        "with VIRTIO_CONSOLE_F_EMERG_WRITE) is writable (VIRTIO 1.4 §5.3.4)",
                        len(data), offset)
            return False
        port = self.ports[0]
        if len(port.carry) < _MAX_CARRY:
            port.carry += data[:1]
        if port.pending is None:
            self._flush_carry(port)
        return True

    def start(self) -> None:
        """A new front-end: its driver has seen no control message yet."""
        super().start()
        self._control_out.clear()
        for port in self.ports:
            port.reset_guest()

    # -- life cycle ------------------------------------------------------------------------

    def attach(self, host: DeviceHost) -> None:
        """Watch the listening sockets and, for a stdio console, stdin."""
        super().attach(host)
        for port in self.ports:
            if port.listener is not None:
                self._watch(port.listener.fileno(), partial(self._accept, port))
            else:
                self._watch_input(port)

    def close(self) -> None:
        """Stop listening, drop clients, remove the sockets."""
        self._stopping = True
        for port in self.ports:
            self._drop_client(port, announce=False)
            if port.stdio and port.watching_input and self.host is not None:
                self.host.unwatch_fd(0)
        self._close_listeners()

    def _close_listeners(self) -> None:
        for port in self.ports:
            if port.listener is None:
                continue
            if self.host is not None:
                self.host.unwatch_fd(port.listener.fileno())
            port.listener.close()
            port.listener = None
            if port.path is not None:
                with contextlib.suppress(OSError):
                    port.path.unlink()

    def _watch(self, fd: int, callback: Callable[[], None]) -> bool:
        assert self.host is not None
        try:
            self.host.watch_fd(fd, callback)
        except OSError as exc:  # stdin on /dev/null or a file: epoll refuses it
            log.info("port input fd %d cannot be watched (%s): no host input", fd, exc)
            return False
        return True

    # -- host endpoints --------------------------------------------------------------------

    def _accept(self, port: Port) -> None:
        """A host client connects to ``port``'s socket (one at a time)."""
        assert port.listener is not None
        try:
            client, _ = port.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("port %d: accept failed: %s", port.index, exc)
            return
        if port.client is not None and not self._client_gone(port):
            log.warning("port %d (%s): a second host client refused; one at a time",
                        port.index, port.path)
            client.close()
            return
        if port.client is not None:
            self._drop_client(port)
        client.setblocking(False)
        port.client = client
        port.readable = False
        log.info("port %d (%s): host client connected", port.index, port.path)
        self._watch_input(port)
        self._announce_open(port, True)
        if port.carry:
            self._flush_carry(port)
        if port.pending is not None:
            self._retry_output(port)
        self._process(port.tx_queue)

    def _client_gone(self, port: Port) -> bool:
        """Whether ``port``'s client hung up (its unread bytes are still read first)."""
        assert port.client is not None
        try:
            return port.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def _drop_client(self, port: Port, *, announce: bool = True) -> None:
        """The host client went away: PORT_OPEN 0 to the driver; output waits again."""
        client = port.client
        if client is None:
            return
        if self.host is not None:
            if port.watching_input:
                self.host.unwatch_fd(client.fileno())
            if port.retry_scheduled:
                self.host.cancel_writable(client.fileno())
        port.watching_input = False
        port.retry_scheduled = False
        port.client = None
        port.readable = False
        client.close()
        log.info("port %d (%s): host client disconnected", port.index, port.path)
        if announce:
            self._announce_open(port, False)

    def _watch_input(self, port: Port) -> None:
        fd = port.in_fd
        if fd is None or port.watching_input:
            return
        port.watching_input = self._watch(fd, partial(self._input_ready, port))
        if not port.watching_input and port.stdio:
            port.stdin_open = False

    def _unwatch_input(self, port: Port) -> None:
        fd = port.in_fd
        if fd is not None and port.watching_input and self.host is not None:
            self.host.unwatch_fd(fd)
        port.watching_input = False

    def _input_ready(self, port: Port) -> None:
        """Host bytes wait for ``port``: stop watching until the guest took them."""
        self._unwatch_input(port)
        if port.stdio:
            try:
                data = os.read(0, _STDIN_CHUNK)
            except BlockingIOError:
                self._watch_input(port)
                return
            except OSError as exc:
                log.info("console stdin: %s; no more host input", exc)
                data = b""
            if not data:
                port.stdin_open = False
                return
            port.stdin_buffer = data
        port.readable = True
        self._process(port.rx_queue)

    # -- the engine's questions ------------------------------------------------------------

    def has_work(self, queue: int) -> bool:
        """Control receiveq: a message waits.  A port's receiveq: host bytes wait and
        the guest takes them.  A transmitq: its host side can take output now."""
        if queue == CONTROL_RECEIVEQ:
            return bool(self._control_out)
        if queue == CONTROL_TRANSMITQ:
            return True
        number = queue_port(queue)
        if number is None or number >= len(self.ports):
            return False
        port = self.ports[number]
        if number > 0 and not self.multiport:
            return False
        if queue == port.tx_queue:
            return port.host_connected and port.pending is None and not port.carry
        if number > 0 and not port.guest_open:
            return False
        return self._input_waits(port)

    def _input_waits(self, port: Port) -> bool:
        if not port.readable:
            return False
        if port.stdio:
            if port.stdin_buffer:
                return True
            port.readable = False
            self._watch_input(port)
            return False
        if port.client is None:
            port.readable = False
            return False
        try:
            peeked = port.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            port.readable = False
            self._watch_input(port)
            return False
        except OSError:
            peeked = b""
        if not peeked:  # the client hung up after everything it sent was taken
            port.readable = False
            assert self.host is not None
            self.host.call_later(0, partial(self._drop_client, port))
            return False
        return True

    # -- chains ----------------------------------------------------------------------------

    def handle_chain(self, queue: int, chain: DescriptorChain) -> int | Deferred:
        """Dispatch by queue: control messages, or a port's input or output (§5.3.6)."""
        if queue == CONTROL_RECEIVEQ:
            return self._send_control(chain)
        if queue == CONTROL_TRANSMITQ:
            self._receive_control(chain)
            return 0
        number = queue_port(queue)
        if number is None or number >= len(self.ports):
            return 0
        port = self.ports[number]
        if queue == port.rx_queue:
            return self._fill_input(port, chain)
        return self._take_output(port, chain)

    def _fill_input(self, port: Port, chain: DescriptorChain) -> int:
        """Host bytes into the guest's receive buffer (§5.3.6.1), read straight into it."""
        stats = self.stats[port.rx_queue]
        if chain.readable_len:
            stats.violations += 1
            log.warning("port %d: receive buffer %d has %d device-readable bytes "
                        "(VIRTIO 1.4 §5.3.6.1: receive buffers are device-writable)",
                        port.index, chain.head, chain.readable_len)
        views = [v for v in chain.writable if len(v)]
        if not views:
            return 0
        if port.stdio:
            data = port.stdin_buffer
            writer = chain.writer()
            n = min(len(data), writer.remaining)
            writer.write(data[:n])
            port.stdin_buffer = data[n:]
            if not port.stdin_buffer:
                port.readable = False
                self._watch_input(port)
            stats.bytes_in += n
            return n
        assert port.client is not None
        try:
            n = os.readv(port.client.fileno(), views)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            log.info("port %d: read from host client failed: %s", port.index, exc)
            n = 0
        if n == 0:
            port.readable = False
            self._watch_input(port)
        stats.bytes_in += n
        return n

    def _take_output(self, port: Port, chain: DescriptorChain) -> int | Deferred:
        """Guest output to the host side (§5.3.6.1); what it cannot take yet is held."""
        stats = self.stats[port.tx_queue]
        if chain.writable_len:
            stats.violations += 1
            log.warning("port %d: transmit buffer %d has %d device-writable bytes "
                        "(VIRTIO 1.4 §5.3.6.1: transmit buffers are device-readable)",
                        port.index, chain.head, chain.writable_len)
        stats.bytes_out += chain.readable_len
        views = [v for v in chain.readable if len(v)]
        left = self._write(port, views)
        if not left:
            return 0
        port.pending = (chain, left)
        self._schedule_retry(port)
        return DEFERRED

    def _write(self, port: Port, views: list[memoryview]) -> list[memoryview]:
        """Send ``views`` to the host side; return what it did not take."""
        while views:
            fd = port.out_fd
            if fd is None:
                return views
            try:
                sent = os.writev(fd, views[:1024])
            except (BlockingIOError, InterruptedError):
                return views
            except OSError as exc:
                if port.stdio:
                    log.warning("console stdout: %s; output dropped", exc)
                    return []
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("port %d: write to host client failed: %s", port.index, exc)
                self._drop_client(port)
                return views
            while sent:
                head = views[0]
                if sent >= len(head):
                    sent -= len(head)
                    views = views[1:]
                else:
                    views = [head[sent:], *views[1:]]
                    sent = 0
        return views

    def _schedule_retry(self, port: Port) -> None:
        """Go on with held output when the host side has room (no polling)."""
        fd = port.out_fd
        if port.retry_scheduled or self.host is None or not port.host_connected or fd is None:
            return
        port.retry_scheduled = True
        self.host.when_writable(fd, partial(self._retry_output, port))

    def _retry_output(self, port: Port) -> None:
        """Try held output again; when it is all out, use its chain, take more."""
        port.retry_scheduled = False
        if self._stopping:
            return
        if port.carry:
            self._flush_carry(port)
            if port.carry:
                self._schedule_retry(port)
                return
        if port.pending is None:
            self._process(port.tx_queue)
            return
        chain, views = port.pending
        left = self._write(port, views)
        if left:
            port.pending = (chain, left)
            self._schedule_retry(port)
            return
        port.pending = None
        assert self.host is not None
        self.host.complete(port.tx_queue, chain, 0)
        self._process(port.tx_queue)

    def _flush_carry(self, port: Port) -> None:
        if not port.carry:
            return
        left = self._write(port, [memoryview(bytes(port.carry))])
        port.carry = bytearray(b"".join(left))
        if port.carry:
            self._schedule_retry(port)

    def stop_queue(self, queue: int) -> None:
        """A ring stops under a held transmit chain: keep its unsent bytes (a copy:
        the guest memory may go away) and use the chain (§2.7.8: transmit used length 0)."""
        number = queue_port(queue)
        if number is None or number >= len(self.ports):
            return
        port = self.ports[number]
        if queue != port.tx_queue or port.pending is None:
            return
        chain, views = port.pending
        port.pending = None
        for view in views:
            port.carry += view
        assert self.host is not None
        self.host.complete(queue, chain, 0)
