"""Sending a switch port's datagrams to the peer sockets, with back-pressure.

Every send is non-blocking.  Linux queues only ``net.unix.max_dgram_qlen``
datagrams (10 by default) per receiving socket, so a burst can fill a peer's
queue while it is busy.  Then the datagrams it could not take wait in the port
(:data:`PEER_BACKLOG` at most), :meth:`PeerSender.congested_peers` answers True,
and the device stops taking chains from its guest's transmit ring (they stay
there) until the peer has room again: a socket connected to the peer (the
*probe*; Linux reports a connected datagram socket writable only while its
peer's queue has room) is handed to the device host's ``when_writable``, and
the port sends what waits and resumes the senders (:meth:`PeerSender.wait_peers`).
The loop never blocks.  Only a peer that stays full for :data:`PEER_STALL` is
not keeping up: what waits for it is dropped and counted (``dropped: peer
busy``), and until its queue has room again frames it cannot take are dropped at
once, so a stopped peer holds the others up once, for :data:`PEER_STALL`, not
forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirtio.devices.base import DeviceHost

__all__ = ["PEER_BACKLOG", "PEER_STALL", "PeerSender"]

log = logging.getLogger(__name__)

#: How long a peer may keep its receive queue full before the frames waiting for it
#: are dropped (seconds): longer, it is not keeping up.  A live receiver on a loaded
#: host can take nothing for 100 ms (its daemon or its guest not scheduled: seen on a
#: 2-CPU machine at load 5); its own backlog keeps frames for a second (RX_MAX_AGE).
PEER_STALL = 0.25
#: Datagrams waiting in a port for one full peer at most; more are dropped at once.
PEER_BACKLOG = 64
#: What :meth:`SwitchPort._send_to` answers when the peer's queue is full.
_FULL = "full"
#: Retry delay when our own send buffer (not the peer's queue) is full (seconds).
_OWN_BUFFER_RETRY = 0.001

class _Held:
    """The datagrams waiting in a port for a peer whose queue is full."""

    __slots__ = ("datagrams", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.datagrams: deque[tuple[bytes, int]] = deque()



class PeerSender:
    """The sending side of a :class:`~.switch.SwitchPort`: datagrams to peer sockets,
    held for a full peer, dropped (counted) for one that is not keeping up."""

    _sock: socket.socket
    name: str
    label: str
    counters: Counter[str]
    table: dict[bytes, str]
    _k_sent: str

    def __init__(self) -> None:
        #: Peers whose queue is full, and the datagrams waiting for them.
        self._held: dict[str, _Held] = {}
        #: Peers that stayed full for PEER_STALL: dropped at once until they have room.
        self._lagging: set[str] = set()
        #: A socket connected to each peer that was full: writable when it has room.
        self._probes: dict[str, socket.socket] = {}
        #: The device host (:meth:`attach_host`): when_writable, call_later.
        self._host: DeviceHost | None = None
        #: Whether a call_later for the stall check is pending.
        self._stall_timer = False
        #: Senders held while a peer was full: what resumes each.
        self._waiting: list[Callable[[], None]] = []
        self._k_busy = f"{self.label} dropped: peer busy"

    def attach_host(self, host: DeviceHost) -> None:
        """Wait for full peers with ``host.when_writable`` (else: at each flush)."""
        self._host = host

    def congested_peers(self) -> bool:
        """Whether a peer's queue is full (for less than :data:`PEER_STALL`)."""
        if self._held:
            if self._host is None:  # nobody tells us of room: look now
                for peer in list(self._held):
                    self._retry(peer)
            self._check_stalls()
        return bool(self._held)

    def wait_peers(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once when no datagram waits for a full peer any more."""
        if self._held:
            self._waiting.append(resume)

    def retry_peers(self) -> None:
        """Before a flush: without a device host, look whether full peers have room;
        give up on those full for too long."""
        if self._held:
            if self._host is None:
                for peer in list(self._held):
                    self._retry(peer)
            self._check_stalls()

    def close_peers(self) -> None:
        """Close the probes; forget what waits."""
        for probe in self._probes.values():
            if self._host is not None:
                self._host.cancel_writable(probe.fileno())
            probe.close()
        self._probes.clear()
        self._held.clear()

    def _send_batches(self, peer: str,
                      datagrams: list[tuple[bytes | memoryview, int]]) -> None:
        """Send ``datagrams`` (with their frame counts) to ``peer``, in order: what a
        full peer cannot take waits (up to :data:`PEER_BACKLOG` datagrams), or is
        dropped at once for a peer that is not keeping up."""
        held = self._held.get(peer)
        rest = datagrams
        if held is None:
            for number, (datagram, count) in enumerate(datagrams):
                problem = self._send_to(peer, datagram, count)
                if problem is None:
                    continue
                rest = datagrams[number:]
                if problem is _FULL and peer not in self._lagging:
                    held = self._hold(peer)
                    break
                self.counters[self._k_busy if problem is _FULL else problem] += sum(
                    n for _, n in rest)
                return
            else:
                return
        assert held is not None
        for datagram, count in rest:
            if len(held.datagrams) >= PEER_BACKLOG:
                self.counters[self._k_busy] += count
            else:
                held.datagrams.append((bytes(datagram), count))

    def _send_to(self, peer: str, frame: bytes | memoryview, count: int = 1) -> str | None:
        """Send one datagram (``count`` frames) without blocking; None (sent and
        counted), :data:`_FULL`, or the name of the drop counter (not counted yet)."""
        try:
            self._sock.sendto(frame, socket.MSG_DONTWAIT, peer)
        except BlockingIOError:
            return _FULL
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            self._forget(peer)
            if isinstance(exc, ConnectionRefusedError):
                # Nobody reads that socket any more: a killed port's leftover file.
                with contextlib.suppress(OSError):
                    os.unlink(peer)
            return f"{self.label} dropped: peer gone"
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                log.warning("switch %s: cannot send to %s: %s", self.name, peer, exc)
            return f"{self.label} dropped: send error"
        self.counters[self._k_sent] += count
        if self._lagging:
            self._lagging.discard(peer)  # it took one: it reads again
        return None

    # -- back-pressure ----------------------------------------------------------------

    def _hold(self, peer: str) -> _Held:
        """``peer``'s queue is full: hold what is for it, wait for its room."""
        held = self._held[peer] = _Held(time.monotonic())
        self.counters[f"{self.label} waited: peer full"] += 1
        self._wait_room_of(peer)
        if self._host is not None and not self._stall_timer:
            self._stall_timer = True
            self._host.call_later(PEER_STALL, self._stall_check)
        return held

    def _probe(self, peer: str) -> socket.socket | None:
        """A socket connected to ``peer`` (made once), or None if it cannot connect."""
        probe = self._probes.get(peer)
        if probe is None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(peer)
            except OSError:
                probe.close()
                return None
            probe.setblocking(False)
            self._probes[peer] = probe
        return probe

    def _wait_room_of(self, peer: str) -> None:
        """Have :meth:`_room` called when ``peer``'s queue has room (or, without a
        device host, leave it to the next flush)."""
        if self._host is None:
            return
        probe = self._probe(peer)
        if probe is None:
            self._host.call_later(0, partial(self._room, peer))  # the send will tell
            return
        self._host.when_writable(probe.fileno(), partial(self._room, peer))

    def _room(self, peer: str) -> None:
        """``peer``'s queue has room: send what waits for it; a peer given up on is
        taken as keeping up again."""
        self._lagging.discard(peer)
        if peer in self._held:
            self._retry(peer)
            if not self._held:
                self._wake()

    def _retry(self, peer: str) -> None:
        """Send the datagrams waiting for ``peer`` while it takes them."""
        held = self._held.get(peer)
        if held is None:
            return
        datagrams = held.datagrams
        while datagrams:
            datagram, count = datagrams[0]
            problem = self._send_to(peer, datagram, count)
            if problem is None:
                datagrams.popleft()
                continue
            if problem is _FULL:
                probe = self._probes.get(peer)
                if (self._host is not None and probe is not None
                        and select.select([], [probe], [], 0)[1]):
                    # The peer has room: our own send buffer is full.
                    self._host.call_later(_OWN_BUFFER_RETRY, partial(self._room, peer))
                else:
                    self._wait_room_of(peer)
                return
            if peer not in self._held:  # gone: _forget counted what waited
                return
            self.counters[problem] += sum(n for _, n in datagrams)
            datagrams.clear()
        self._release(peer)

    def _release(self, peer: str) -> None:
        """Nothing waits for ``peer`` any more."""
        if self._held.pop(peer, None) is not None and self._host is not None:
            probe = self._probes.get(peer)
            if probe is not None and peer not in self._lagging:
                self._host.cancel_writable(probe.fileno())

    def _check_stalls(self) -> None:
        """Give up on the peers full for longer than :data:`PEER_STALL`: drop (and
        count) what waits for them, and whatever they cannot take until they have
        room again; resume the senders if nothing waits any more."""
        if not self._held:
            return
        now = time.monotonic()
        for peer, held in list(self._held.items()):
            if now - held.since >= PEER_STALL:
                dropped = sum(n for _, n in held.datagrams)
                self.counters[self._k_busy] += dropped
                log.warning("switch %s: peer %s took nothing for %.0f ms; dropped %d "
                            "frames", self.name, Path(peer).name, PEER_STALL * 1000,
                            dropped)
                del self._held[peer]
                self._lagging.add(peer)  # the probe's wait stays: it ends the lag
                if self._host is None:
                    continue
                probe = self._probes.get(peer)
                if probe is not None:
                    self._host.when_writable(probe.fileno(), partial(self._room, peer))
        if not self._held:
            self._wake()

    def _stall_check(self) -> None:
        """The timer of :meth:`_check_stalls` (again while a peer stays full)."""
        self._stall_timer = False
        self._check_stalls()
        if self._held and self._host is not None:
            first = min(held.since for held in self._held.values())
            self._stall_timer = True
            self._host.call_later(max(first + PEER_STALL - time.monotonic(), 0.001),
                                  self._stall_check)

    def _wake(self) -> None:
        """Resume the senders held while a peer was full."""
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for resume in waiting:
                resume()

    def _forget(self, peer: str) -> None:
        held = self._held.pop(peer, None)
        if held is not None:
            self.counters[f"{self.label} dropped: peer gone"] += sum(
                n for _, n in held.datagrams)
        self._lagging.discard(peer)
        probe = self._probes.pop(peer, None)
        if probe is not None:
            if self._host is not None:
                self._host.cancel_writable(probe.fileno())
            probe.close()
        gone = [mac for mac, where in self.table.items() if where == peer]
        for mac in gone:
            del self.table[mac]
        log.info("switch %s: peer %s is gone (%d addresses forgotten)", self.name,
                 Path(peer).name, len(gone))
        if held is not None and not self._held:
            self._wake()

