"""A learning Ethernet switch between ``pyvirtio serve net`` processes on one host.

Every process started with ``--switch NAME`` is one port.  A port is a Unix
datagram socket bound in the switch's folder
(``$XDG_RUNTIME_DIR/pyvirtio-switch-NAME/`` or ``/tmp/pyvirtio-switch-NAME/``);
one datagram carries one Ethernet frame.  There is no central process: each
port learns, from the frames it receives, which peer socket each source MAC
address sits behind, and sends

- a unicast frame to a learned address to that peer only;
- a broadcast, multicast or unknown unicast frame to every other socket in
  the folder (flooding).

Robustness: a peer that vanished (its socket refuses, or its file is gone)
is forgotten with every address learned behind it, and the frame is dropped
and counted; a stale socket file of a killed process is removed.  A peer whose
receive queue is full makes the sender wait at most :data:`SEND_WAIT`
(Linux queues only ``net.unix.max_dgram_qlen`` datagrams, 10 by default, per
socket, so a burst can fill it while the peer is busy); if the queue stays
full, the frame is dropped and counted, and for :data:`BUSY_HOLD` that peer
gets no more waiting: frames it cannot take are dropped at once.  A stopped
peer therefore costs the sender at most one short wait per second.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "BUSY_HOLD",
    "MAX_FRAME",
    "RECEIVE_BUDGET",
    "SEND_WAIT",
    "SwitchPort",
    "in_switch_dir",
    "switch_dir",
]

log = logging.getLogger(__name__)

#: Largest datagram read (far above any frame a port sends).
MAX_FRAME = 65536
#: Socket buffer sizes asked for (the kernel may cap them).
_SOCKET_BUFFER = 4 << 20
#: Longest wait for room in a peer's receive queue (seconds).
SEND_WAIT = 0.005
#: After a wait in vain, how long a peer only gets non-blocking sends (seconds).
BUSY_HOLD = 1.0
#: Frames read per :meth:`SwitchPort.receive` call at most (the loop comes back).
RECEIVE_BUDGET = 256
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_T = TypeVar("_T")


def switch_dir(name: str, base: Path | None = None) -> Path:
    """The folder of switch ``name``: under ``base``, ``$XDG_RUNTIME_DIR`` or ``/tmp``.

    Raises:
        ValueError: the name is empty, too long or has characters other than
            letters, digits, ``_``, ``.`` and ``-``.
    """
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"switch name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    if base is None:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return base / f"pyvirtio-switch-{name}"


def in_switch_dir(folder: Path, make: Callable[[], _T]) -> _T:
    """Create the switch folder if needed (mode 0700), then ``make`` something in it.

    The last port leaving removes the folder; if that happens between the two
    steps (``make`` raises FileNotFoundError), try again.

    Raises:
        PermissionError: the folder belongs to another user (in a shared /tmp,
            someone else's folder could feed us frames).
        OSError: the folder cannot be created, or ``make`` failed.
    """
    for attempt in range(3):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            raise PermissionError(f"{folder} belongs to another user")
        try:
            return make()
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class SwitchPort:
    """One port of switch ``name``: a Unix datagram socket bound in the switch folder.

    Receives never block; a send waits at most :data:`SEND_WAIT` for room.

    Args:
        name: the switch.
        base: the folder holding switch folders (default: see :func:`switch_dir`).
        label: the first word of the counters' names (``switch`` for a guest's
            port, ``uplink`` for the tap's).

    Attributes:
        path: this port's socket file.
        table: learned MAC address -> the peer socket it was last seen behind.
        counters: ``switch sent`` (frames sent, one per peer a flood reached),
            ``switch flooded``, ``switch received``, ``switch dropped: peer
            gone``, ``switch dropped: peer busy``... (``switch`` is ``label``).

    Raises:
        ValueError: bad switch name.
        OSError: the folder or the socket cannot be created, or the folder
            belongs to another user.
    """

    def __init__(self, name: str, base: Path | None = None, *, label: str = "switch") -> None:
        self.name = name
        self.label = label
        self.dir = switch_dir(name, base)
        # Short: the whole path must fit sockaddr_un (108 bytes) under a deep runtime dir.
        self.path = self.dir / f"{os.getpid()}-{secrets.token_hex(3)}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        # A blocking socket whose sends time out after SEND_WAIT (a full peer queue);
        # receives never block (MSG_DONTWAIT).
        seconds = int(SEND_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("@ll", seconds, int((SEND_WAIT - seconds) * 1_000_000)))
        try:
            in_switch_dir(self.dir, lambda: sock.bind(str(self.path)))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.table: dict[bytes, str] = {}
        #: Peers whose queue stayed full, and until when they get no waiting.
        self._busy: dict[str, float] = {}
        self.counters: Counter[str] = Counter()
        log.info("switch %s: port %s", name, self.path)

    def fileno(self) -> int:
        """The socket's fd, to poll for incoming frames."""
        return self._sock.fileno()

    def peers(self) -> list[str]:
        """Every other port's socket in the switch folder."""
        own = self.path.name
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [str(self.dir / n) for n in names if n.endswith(".sock") and n != own]

    # -- frames -----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Forward a frame from this port's guest: to the learned peer, or flood it."""
        dst = bytes(frame[:6])
        if not dst[0] & 1:  # unicast
            peer = self.table.get(dst)
            if peer is not None:
                self._send_to(peer, frame)
                return
        self.counters[f"{self.label} flooded"] += 1
        for peer in self.peers():
            self._send_to(peer, frame)

    def _send_to(self, peer: str, frame: bytes) -> bool:
        busy_until = self._busy.get(peer)
        wait = busy_until is None or time.monotonic() >= busy_until
        try:
            self._sock.sendto(frame, 0 if wait else socket.MSG_DONTWAIT, peer)
        except BlockingIOError:
            self.counters[f"{self.label} dropped: peer busy"] += 1
            if wait:
                self._busy[peer] = time.monotonic() + BUSY_HOLD
            return False
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            self.counters[f"{self.label} dropped: peer gone"] += 1
            self._forget(peer)
            if isinstance(exc, ConnectionRefusedError):
                # Nobody reads that socket any more: a killed port's leftover file.
                with contextlib.suppress(OSError):
                    os.unlink(peer)
            return False
        except OSError as exc:
            self.counters[f"{self.label} dropped: send error"] += 1
            if exc.errno != errno.EMSGSIZE:
                log.warning("switch %s: cannot send to %s: %s", self.name, peer, exc)
            return False
        if busy_until is not None:
            del self._busy[peer]
        self.counters[f"{self.label} sent"] += 1
        return True

    def _forget(self, peer: str) -> None:
        self._busy.pop(peer, None)
        gone = [mac for mac, where in self.table.items() if where == peer]
        for mac in gone:
            del self.table[mac]
        log.info("switch %s: peer %s is gone (%d addresses forgotten)", self.name,
                 Path(peer).name, len(gone))

    def receive(self, limit: int = RECEIVE_BUDGET) -> list[bytes]:
        """The frames waiting for this port (at most ``limit``).

        Learns each frame's source address behind its sender.
        """
        frames: list[bytes] = []
        while len(frames) < limit:
            try:
                frame, sender = self._sock.recvfrom(MAX_FRAME, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("switch %s: receive failed: %s", self.name, exc)
                break
            self.counters[f"{self.label} received"] += 1
            src = frame[6:12]
            if len(frame) >= 12 and not src[0] & 1 and isinstance(sender, str) and sender:
                self.table[src] = sender
            frames.append(frame)
        return frames

    def close(self) -> None:
        """Close the socket, remove its file, and the folder if it is empty now."""
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.dir.rmdir()
