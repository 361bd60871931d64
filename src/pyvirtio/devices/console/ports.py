"""virtio-console's ports and their configuration: what each port is bridged to on the
host (a listening Unix socket and its one client, or stdin/stdout) and what the
driver said about it (VIRTIO 1.4 §5.3.6.2)."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.spec.console import port_queues
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["MAX_NAME", "MAX_PORTS", "RESIZE_ORDERS", "ConsoleConfig", "Port", "PortSpec"]

#: Field orders of the RESIZE message (:attr:`ConsoleConfig.resize_order`).
RESIZE_ORDERS = ("spec", "rows-first")
#: Ports at most (console included): 2 * 64 + 2 virtqueues.
MAX_PORTS = 64
#: Longest port name (bytes of UTF-8); Linux takes any length, a name is a tag.
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A named port: its name (PORT_NAME, §5.3.6.2) and the socket it is bridged to."""

    name: str
    path: Path

    def __post_init__(self) -> None:
        raw = self.name.encode()
        if not raw or len(raw) > MAX_NAME or "\0" in self.name:
            raise ValueError(f"port name {self.name!r}: 1 to {MAX_NAME} bytes, no NUL")


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """What ``pyvirtio serve console`` serves.

    Attributes:
        console_socket: port 0's socket; None: the daemon's stdin and stdout.
        ports: the named ports 1.., in order.
        cols, rows: the console's size (§5.3.4).
        resize_order: the field order of the RESIZE message: ``spec`` (cols, rows,
            §5.3.6.2, what current Linux reads) or ``rows-first`` (what older Linux
            kernels read).
    """

    console_socket: Path | None = None
    ports: tuple[PortSpec, ...] = ()
    cols: int = 80
    rows: int = 25
    resize_order: str = "spec"

    def __post_init__(self) -> None:
        if len(self.ports) + 1 > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS - 1} named ports")
        if not (0 <= self.cols <= 0xFFFF and 0 <= self.rows <= 0xFFFF):
            raise ValueError(f"console size {self.cols}x{self.rows}: 0..65535 each")
        if self.resize_order not in RESIZE_ORDERS:
            raise ValueError(f"resize order {self.resize_order!r}: spec or rows-first")
        names = [p.name for p in self.ports]
        if len(set(names)) != len(names):
            raise ValueError(f"port names must differ: {names}")
        paths = [str(p.path) for p in self.ports]
        if self.console_socket is not None:
            paths.append(str(self.console_socket))
        if len(set(paths)) != len(paths):
            raise ValueError(f"each port needs a socket of its own: {paths}")


def _listen(path: Path) -> socket.socket:
    """A listening Unix stream socket at ``path`` (a stale socket there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(4)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Port:
    """One port: its queues, its host endpoint and what the driver said about it.

    Attributes:
        index: the port id (§5.3.6.2); 0 is the console.
        name: PORT_NAME's tag (None for the console).
        path: the socket it listens on; None: stdin/stdout.
        client: the connected host client (socket ports).
        readable: the host endpoint has (or may have) bytes for the guest.
        pending: a transmit chain the host took in part, and its unsent views.
        carry: output bytes not sent yet that no longer live in a chain (a ring
            stopped under a held chain, emergency writes).
        added, ready, guest_open: DEVICE_ADD sent, PORT_READY(1) seen, the guest
            has the port open (PORT_OPEN from the driver).
    """

    def __init__(self, index: int, name: str | None, path: Path | None) -> None:
        self.index = index
        self.name = name
        self.path = path
        self.rx_queue, self.tx_queue = port_queues(index)
        self.listener = _listen(path) if path is not None else None
        self.client: socket.socket | None = None
        self.readable = False
        self.watching_input = False
        self.stdin_buffer = b""
        self.stdin_open = path is None
        self.pending: tuple[DescriptorChain, list[memoryview]] | None = None
        self.retry_scheduled = False
        self.carry = bytearray()
        self.added = self.ready = self.guest_open = False

    @property
    def stdio(self) -> bool:
        """Bridged to the daemon's stdin/stdout."""
        return self.path is None

    @property
    def in_fd(self) -> int | None:
        """Where host input is read from, when there is a host side."""
        if self.stdio:
            return 0 if self.stdin_open else None
        return self.client.fileno() if self.client is not None else None

    @property
    def out_fd(self) -> int | None:
        """Where guest output goes, when a host side is connected."""
        if self.stdio:
            return 1
        return self.client.fileno() if self.client is not None else None

    @property
    def host_connected(self) -> bool:
        """A host client is there to take output (always, on stdio)."""
        return self.out_fd is not None

    def reset_guest(self) -> None:
        """A new driver: nothing was announced to it yet."""
        self.added = self.ready = self.guest_open = False
