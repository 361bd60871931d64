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
and counted; a stale socket file of a killed process is removed.

Back-pressure (:mod:`.peers`): sends never block; when a peer's queue is full,
the port holds what it could not take and the device leaves its guest's transmit
chains in the ring until the peer has room; only a peer that takes nothing for
:data:`~.peers.PEER_STALL` gets its frames dropped (counted).

Batches: a port given frames with :meth:`SwitchPort.queue` sends them at
:meth:`SwitchPort.flush`, several per datagram: a datagram that starts with
:data:`BATCH_MAGIC` (a multicast address no port sends to: a frame for it is
sent in a batch of one) holds frames each prefixed by its length (16 bits, big
endian).  A datagram or batch entry that starts with :data:`OFFLOAD_MAGIC` is a packet
with its offloads (a record: the magic, the ``virtio_net_hdr`` fields, the frame; a
guest's frame to that address goes as a record too).  Any other datagram is one
frame.  Ports of one switch in one process (``serve net --socket A --socket B``) pass
frames to each other without a socket at all (:mod:`.hub`).

Offloads: a guest on a port may send packets with a partial checksum or for TCP
segmentation (the device offers them).  They travel with the packet, to ports of
this process and in records to other processes; a receiving port whose guest
negotiated them takes the packet as it is, and for any other receiver the switch does
them in software first (:mod:`.segment`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pyvirtio.devices.net.hub import LocalHub
from pyvirtio.devices.net.peers import PEER_BACKLOG, PEER_STALL, PeerSender
from pyvirtio.devices.net.segment import SegmentError, finish
from pyvirtio.spec.net import HDR_SIZE_LEGACY, NetHeader

__all__ = [
    "BATCH_MAGIC",
    "MAX_FRAME",
    "OFFLOAD_MAGIC",
    "PEER_BACKLOG",
    "PEER_STALL",
    "RECEIVE_BUDGET",
    "Receiver",
    "SwitchPort",
    "in_switch_dir",
    "switch_dir",
]

log = logging.getLogger(__name__)

#: Largest datagram read (above any frame a port sends: a GSO packet with its offload
#: record is at most about 65.6 KB).
MAX_FRAME = 1 << 17
#: The first bytes of a datagram holding several frames (a locally administered
#: multicast address: "\\x03pyvio").
BATCH_MAGIC = b"\x03pyvio"
#: The first bytes of an offload record: this, the packet's ``virtio_net_hdr`` without
#: ``num_buffers`` (10 bytes), the frame.  A datagram or an entry of a batch.
OFFLOAD_MAGIC = b"\x03pyvih"
#: The largest batch datagram (its entries' lengths have 16 bits).
_BATCH_MAX = 65536
#: A frame's length inside a batch.
_LENGTH = struct.Struct(">H")
#: Socket buffer sizes asked for (the kernel may cap them).
_SOCKET_BUFFER = 4 << 20
#: Frames read per :meth:`SwitchPort.receive` call at most (the loop comes back; a
#: batch datagram is taken whole).
RECEIVE_BUDGET = 128
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_T = TypeVar("_T")
#: A device's ``deliver``: frames, and the offload headers of some (by index).
Receiver = Callable[[list[bytes | memoryview], dict[int, NetHeader]], None]


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


class SwitchPort(PeerSender):
    """One port of switch ``name``: a Unix datagram socket bound in the switch folder.

    Neither receives nor sends block; a full peer makes the port hold its
    datagrams and ask for back-pressure (:meth:`congested`).

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
        hub: the ports of this switch in this process, once :meth:`bind_receiver`
            joined it.

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
        # Room for the datagrams in flight to every peer (a datagram's memory counts
        # against its sender's buffer until it is read); FORCE needs CAP_NET_ADMIN.
        for force, option in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
                              (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, _SOCKET_BUFFER)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        sock.setblocking(False)
        try:
            in_switch_dir(self.dir, lambda: sock.bind(str(self.path)))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.table: dict[bytes, str] = {}
        self.counters: Counter[str] = Counter()
        PeerSender.__init__(self)
        #: The counters' names, made once (a frame costs no string formatting).
        self._k_sent, self._k_flooded, self._k_received = (
            f"{label} sent", f"{label} flooded", f"{label} received")
        #: Frames :meth:`queue` holds for each peer socket until :meth:`flush`.
        self._pending: dict[str, list[bytes | memoryview]] = {}
        #: The peers a flood goes to, listed once per :meth:`flush` round.
        self._flood_peers: list[str] | None = None
        #: The datagram buffer :meth:`receive` reuses.
        self._rbuf = bytearray(MAX_FRAME)
        self.hub: LocalHub | None = None
        #: Where frames from ports of the same process go (:meth:`bind_receiver`), with
        #: the offload headers of some (by their index in the list).
        self.receiver: Receiver | None = None
        #: Whether the receiver takes a packet with this offload header as it is.
        self.accepts_offloads: Callable[[NetHeader, int], bool] | None = None
        #: The device may stop reading the socket while its receive backlog drains:
        #: the frames wait in the socket, and their senders wait (or drop) there.
        self.pause_reading = True
        #: Whether the receiver asks senders of this process to hold frames now.
        self.pressure: Callable[[], bool] | None = None
        #: Frames from ports of the same process, for :attr:`receiver` at the hub's flush,
        #: and the offload headers of some of them (by index in the inbox).
        self.inbox: list[bytes | memoryview] = []
        self.inbox_headers: dict[int, NetHeader] = {}
        log.info("switch %s: port %s", name, self.path)

    def fileno(self) -> int:
        """The socket's fd, to poll for incoming frames."""
        return self._sock.fileno()

    def bind_receiver(self, receiver: Receiver, pressure: Callable[[], bool] | None = None,
                      accepts: Callable[[NetHeader, int], bool] | None = None) -> None:
        """Take frames from ports of the same switch in this process as calls of
        ``receiver`` (a device's ``deliver``) instead of datagrams: join the hub.

        ``pressure``: whether the device asks the hub's senders to hold frames now
        (its receive backlog fills while its driver still takes frames).
        ``accepts``: whether the device takes a packet with this offload header and
        length as it is (its guest negotiated those offloads); else the offloads
        are done in software before it gets the packet.
        """
        self.receiver = receiver
        self.pressure = pressure
        self.accepts_offloads = accepts
        if self.hub is None:
            self.hub = LocalHub.join(self)

    def congested(self) -> bool:
        """Whether the sender should hold its frames now: a peer's queue is full (for
        less than :data:`PEER_STALL`), or a port of this process asks for it."""
        if self.congested_peers():
            return True
        return self.hub is not None and self.hub.congested(self)

    def wait_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once when a full peer took what waited for it (or was given
        up on), or a port of this process drained its backlog."""
        self.wait_peers(resume)
        if self.hub is not None:
            self.hub.wait_room(resume)

    def drained(self) -> None:
        """This port's device delivered frames: resume senders held for room."""
        if self.hub is not None:
            self.hub.drained()

    def peers(self) -> list[str]:
        """Every other port's socket in the switch folder (without this process's
        ports in the hub: they are reached directly)."""
        own = self.path.name
        local = self.hub.names if self.hub is not None else ()
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [str(self.dir / n) for n in names
                if n.endswith(".sock") and n != own and n not in local]

    # -- frames -----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Forward a frame from this port's guest: to the learned peer, or flood it."""
        self.queue(frame)
        self.flush()

    #: :meth:`queue` takes views of a guest's transmit buffer: each is copied (into a
    #: datagram, or a receive buffer or bytes by the receiving device) by :meth:`flush`.
    takes_views = True
    #: :meth:`queue` takes packets with offloads (partial checksums, TCP segmentation):
    #: the device offers the offload features.
    carries_offloads = True

    def queue(self, frame: bytes | memoryview, header: NetHeader | None = None) -> None:
        """Forward a frame at the next :meth:`flush` (several in one datagram per peer).

        ``frame`` may be a view of guest memory, valid until :meth:`flush` returns.
        ``header``: its offloads (checked by the device): they go with the packet (to
        another process in an offload record); the receiving port does them in
        software if its guest did not negotiate them (:meth:`finish_offloads`).
        """
        dst = bytes(frame[:6])
        hub = self.hub
        if hub is not None:
            src = bytes(frame[6:12])
            if len(src) == 6 and not src[0] & 1:
                hub.where[src] = self
        if dst and not dst[0] & 1:  # unicast
            if hub is not None:
                port = hub.where.get(dst)
                if port is not None:
                    if port is not self:  # never back out of the port it came in
                        hub.put(port, frame, header)
                        self.counters[self._k_sent] += 1
                    return
            peer = self.table.get(dst)
            if peer is not None:
                self._pending.setdefault(peer, []).append(
                    frame if header is None and frame[:6] != OFFLOAD_MAGIC
                    else _offload_record(header, frame))
                return
        self.counters[self._k_flooded] += 1
        if hub is not None:
            for port in hub.ports:
                if port is not self:
                    hub.put(port, frame, header)
                    self.counters[self._k_sent] += 1
        peers = self._flood_peers
        if peers is None:
            peers = self._flood_peers = self.peers()
        if peers:
            if header is not None or frame[:6] == OFFLOAD_MAGIC:
                frame = _offload_record(header, frame)
            for peer in peers:
                self._pending.setdefault(peer, []).append(frame)

    def finish_offloads(self, header: NetHeader, frame: bytes | memoryview) -> list[bytes]:
        """``frame``'s offloads done in software (:func:`~.segment.finish`): the frames
        to send instead; none if it cannot be done (counted: ``dropped: bad offload``)."""
        try:
            frames = finish(header, bytes(frame))
        except SegmentError as exc:
            self.counters[f"{self.label} dropped: bad offload"] += 1
            log.warning("switch %s: dropped a %d-byte packet: %s", self.name, len(frame), exc)
            return []
        self.counters[f"{self.label} offloads done in software"] += 1
        return frames

    def flush(self) -> None:
        """Send the frames :meth:`queue` holds: per peer, as few datagrams as fit them
        (one frame alone as it is); then the hub delivers to ports of this process.

        What a full peer cannot take waits in the port (copied) for its room."""
        self._flood_peers = None
        self.retry_peers()
        pending, self._pending = self._pending, {}
        for peer, frames in pending.items():
            if len(frames) == 1 and frames[0][:6] != BATCH_MAGIC:
                self._send_batches(peer, [(frames[0], 1)])
            else:
                self._send_batches(peer, _batches(frames))
        if self.hub is not None:
            self.hub.flush()

    def receive(self, limit: int = RECEIVE_BUDGET) -> list[bytes]:
        """The frames waiting for this port (at most about ``limit``: a batch is
        taken whole).

        Learns each frame's source address behind its sender.
        """
        return self.receive_packets(limit, with_offloads=False)[0]

    def receive_packets(self, limit: int = RECEIVE_BUDGET, *, with_offloads: bool = True
                        ) -> tuple[list[bytes], dict[int, NetHeader]]:
        """:meth:`receive`, and the offload headers of some of the frames (by index):
        those the receiver takes as they are (:attr:`accepts_offloads`); the offloads
        of the others (all of them without ``with_offloads``) are done in software."""
        frames: list[bytes] = []
        headers: dict[int, NetHeader] = {}
        buf = self._rbuf
        view = memoryview(buf)
        received = self._k_received
        table = self.table
        where = self.hub.where if self.hub is not None else None
        while len(frames) < limit:
            try:
                size, sender = self._sock.recvfrom_into(buf, MAX_FRAME, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("switch %s: receive failed: %s", self.name, exc)
                break
            if size >= len(BATCH_MAGIC) and buf.startswith(BATCH_MAGIC):
                parts = self._unbatch(view, size)
            else:
                parts = [bytes(view[:size])]
            if any(part[:6] == OFFLOAD_MAGIC for part in parts):
                parts = self._offloaded(parts, len(frames), headers, with_offloads)
            self.counters[received] += len(parts)
            learn = isinstance(sender, str) and sender
            for frame in parts:
                src = frame[6:12]
                if learn and len(src) == 6 and not src[0] & 1:
                    table[src] = sender
                    if where is not None and src in where:
                        del where[src]  # the address moved to another process
            frames += parts
        view.release()
        return frames, headers

    def _offloaded(self, parts: list[bytes], base: int, headers: dict[int, NetHeader],
                   keep: bool) -> list[bytes]:
        """``parts`` with each offload record replaced by its frame, its header put
        in ``headers`` (by index, counted from ``base``) if ``keep`` and the receiver
        takes it as it is, else by the frames its offloads give (done here)."""
        out: list[bytes] = []
        accepts = self.accepts_offloads if keep else None
        for part in parts:
            if part[:6] != OFFLOAD_MAGIC:
                out.append(part)
                continue
            if len(part) < _RECORD_HEAD:
                self.counters[f"{self.label} dropped: bad batch"] += 1
                continue
            header = NetHeader.unpack(part[len(OFFLOAD_MAGIC) : _RECORD_HEAD])
            frame = part[_RECORD_HEAD:]
            if not header.flags and not header.gso_type:
                out.append(frame)
            elif accepts is not None and accepts(header, len(frame)):
                headers[base + len(out)] = header
                out.append(frame)
            else:
                out += self.finish_offloads(header, frame)
        return out

    def _unbatch(self, view: memoryview, size: int) -> list[bytes]:
        """The frames of a batch datagram of ``size`` bytes in ``view``; a malformed
        tail is dropped and counted (``dropped: bad batch``)."""
        frames: list[bytes] = []
        pos = len(BATCH_MAGIC)
        unpack = _LENGTH.unpack_from
        while pos + _LENGTH.size <= size:
            (length,) = unpack(view, pos)
            pos += _LENGTH.size
            if pos + length > size:
                break
            frames.append(bytes(view[pos : pos + length]))
            pos += length
        if pos != size:
            self.counters[f"{self.label} dropped: bad batch"] += 1
            log.warning("switch %s: a %d-byte batch datagram is malformed at byte %d",
                        self.name, size, pos)
        return frames

    def close(self) -> None:
        """Leave the hub, close the socket, remove its file, and the folder if it is
        empty now."""
        if self.hub is not None:
            self.hub.leave(self)
            self.hub = None
        self.close_peers()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.dir.rmdir()


#: An offload record's magic and header (the ``virtio_net_hdr`` without ``num_buffers``).
_RECORD_HEAD = len(OFFLOAD_MAGIC) + HDR_SIZE_LEGACY


def _offload_record(header: NetHeader | None, frame: bytes | memoryview) -> bytes:
    """A packet with its offloads as one record for a peer process (a plain frame
    that starts like a record goes as a record with an empty header)."""
    return b"".join((OFFLOAD_MAGIC, (header or NetHeader()).pack(legacy=True), frame))


def _batches(frames: Sequence[bytes | memoryview]) -> list[tuple[bytes | memoryview, int]]:
    """``frames`` as batch datagrams of at most 64 KiB, with their frame counts.  A
    frame too long for a batch goes alone, as it is (one whose first bytes are
    :data:`BATCH_MAGIC` cannot: it is left out)."""
    out: list[tuple[bytes | memoryview, int]] = []
    parts: list[bytes | memoryview] = [BATCH_MAGIC]
    size, count = len(BATCH_MAGIC), 0
    pack = _LENGTH.pack
    for frame in frames:
        need = _LENGTH.size + len(frame)
        if len(BATCH_MAGIC) + need > _BATCH_MAX:
            if frame[:6] != BATCH_MAGIC:
                out.append((frame, 1))
            continue
        if size + need > _BATCH_MAX:
            out.append((b"".join(parts), count))
            parts, size, count = [BATCH_MAGIC], len(BATCH_MAGIC), 0
        parts.append(pack(len(frame)))
        parts.append(frame)
        size += need
        count += 1
    if count:
        out.append((b"".join(parts), count))
    return out
