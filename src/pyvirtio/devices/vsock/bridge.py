"""The host side of hybrid vsock: Unix sockets, handshake lines, group rendezvous.

The conventions are those of rust-vmm's vhost-device-vsock (hybrid vsock):

- the guest connects to CID 2 port P: the device connects to the Unix socket
  ``<uds-path>_P`` (a SOCK_STREAM one, or SOCK_SEQPACKET for a seqpacket socket);
- a host program connects to ``<uds-path>`` itself, writes ``CONNECT P\\n`` and,
  once the guest's listener on port P accepted, reads ``OK <host port>\\n``; then
  the socket carries the stream.

Sibling guests (``--group NAME``): every daemon of a group listens on two abstract
Unix sockets named after the group and its guest's CID (:func:`rendezvous`), one
per socket type.  A daemon whose guest connects to CID C port P connects to C's
socket and writes ``CONNECT P <source CID> <source port>\\n`` (for seqpacket: that
one message); C's daemon answers ``OK\\n`` once its guest accepted, or closes.
Abstract names vanish with the daemon, and a second daemon claiming a CID in the
same group fails to start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

__all__ = [
    "LINE_LIMIT",
    "connect_guest",
    "connect_unix",
    "fit_messages",
    "listen_abstract",
    "listen_unix",
    "parse_connect",
    "port_path",
    "rendezvous",
    "take_line",
]

#: Linux's SO_SNDBUFFORCE (asm-generic/socket.h), which Python's socket module lacks.
_SO_SNDBUFFORCE = 32
#: The longest handshake line accepted (``CONNECT 4294967295 4294967295 4294967295``).
LINE_LIMIT = 64


def port_path(uds_path: Path, port: int) -> str:
    """The Unix socket a guest's connection to host port ``port`` goes to."""
    return f"{uds_path}_{port}"


def rendezvous(group: str, cid: int, seqpacket: bool) -> bytes:
    """The abstract socket address of ``cid``'s daemon in ``group``."""
    return f"\0pyvirtio-vsock/{group}/{cid}/{'seqpacket' if seqpacket else 'stream'}".encode()


def listen_unix(path: Path) -> socket.socket:
    """A non-blocking stream listener on ``path`` (a stale socket there is replaced).

    Raises:
        OSError: it cannot bind, ``path`` exists and is not a socket, or something
            listens there already.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nobody listens: a stale socket, replaced
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: a daemon already listens there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.bind(str(path))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def listen_abstract(address: bytes, seqpacket: bool) -> socket.socket:
    """A non-blocking listener on an abstract address.

    Raises:
        OSError: it is taken (EADDRINUSE: another daemon has this CID in the group).
    """
    kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def connect_unix(address: str | bytes, seqpacket: bool) -> socket.socket:
    """A non-blocking connected Unix socket.  A Unix connect completes at once or fails.

    Raises:
        OSError: nobody listens there (ENOENT, ECONNREFUSED), its backlog is full
            (EAGAIN), or the types differ (EPROTOTYPE).
    """
    kind = socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def fit_messages(sock: socket.socket, size: int) -> None:
    """Let a seqpacket socket send messages of ``size`` bytes: Linux refuses a Unix
    datagram longer than the send buffer (EMSGSIZE), 208 KiB by default.  As root the
    buffer is forced past ``net.core.wmem_max``; otherwise it is raised up to it."""
    want = 2 * size + 4096
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= want:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, want)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)


def take_line(buffer: bytearray, sock: socket.socket, seqpacket: bool) -> bytes | None:
    """Read a handshake line from ``sock`` into ``buffer``.

    Returns the line (without ``\\n``) once complete, leaving the bytes read after it
    in ``buffer``; None while it is incomplete.  A seqpacket handshake is one message.

    Raises:
        ConnectionError: the peer closed before a full line.
        ValueError: the line is longer than :data:`LINE_LIMIT`.
        BlockingIOError: nothing to read now.
    """
    chunk = sock.recv(LINE_LIMIT + 1 if seqpacket else LINE_LIMIT + 1 - len(buffer))
    if not chunk:
        raise ConnectionError("closed before the handshake line")
    if seqpacket:
        if len(chunk) > LINE_LIMIT:
            raise ValueError("handshake message too long")
        return chunk.rstrip(b"\n")
    buffer += chunk
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > LINE_LIMIT:
            raise ValueError("handshake line too long")
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line


def parse_connect(line: bytes, words: int) -> list[int] | None:
    """``CONNECT n [n n]`` with ``words`` numbers, each a u32; None if it is not one."""
    parts = line.split()
    if len(parts) != words + 1 or parts[0] != b"CONNECT":
        return None
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        return None
    if not all(0 <= n <= 0xFFFFFFFF for n in numbers):
        return None
    return numbers


def connect_guest(uds_path: Path, port: int, timeout: float = 60.0) -> tuple[socket.socket, int]:
    """A host program's side of the handshake: connect to ``uds_path``, write
    ``CONNECT port``, read ``OK <host port>``.  Returns the socket, ready to carry
    the stream to the guest's listener on ``port``, and the host port the guest
    sees as its peer's.

    Raises:
        ConnectionRefusedError: the daemon closed the socket instead (nothing
            listens on that port in the guest, or the guest reset the connection).
        OSError: ``uds_path`` cannot be connected to; a timeout.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < LINE_LIMIT:
            byte = sock.recv(1)  # one byte at a time: what follows the line is the stream's
            if not byte:
                raise ConnectionRefusedError(f"CONNECT {port}: refused by {uds_path}")
            line += byte
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise ConnectionRefusedError(f"CONNECT {port}: unexpected answer {line!r}")
        sock.settimeout(None)
        return sock, int(words[1])
    except BaseException:
        sock.close()
        raise
