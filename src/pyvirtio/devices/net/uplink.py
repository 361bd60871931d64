"""A host tap as the uplink of a pyvirtio switch (``serve net --switch NAME --tap TAP``).

The daemon that serves a guest's port of switch NAME also carries the switch's
uplink (:class:`Uplink`): a second port of the switch, with a datagram socket
of its own in the switch folder, so every port learns the host's addresses
behind it and floods to it like to any other port.  Its frames go to and come
from a host tap (:class:`~pyvirtio.devices.net.tap.TapBackend`):

- switch -> tap: each frame is written with an all-zero ``virtio_net_hdr``:
  the switch carries complete frames, with nothing to checksum or segment;
- tap -> switch: the tap is told of no offloads (``TUNSETOFFLOAD`` 0), so the
  host kernel checksums and segments packets before it hands them over.  A
  frame that still comes with ``NEEDS_CSUM`` or a ``gso_type`` is dropped and
  counted (``uplink dropped: offloaded frame``).

One uplink per switch: the uplink holds an ``flock`` on ``uplink.lock`` in the
switch folder for its lifetime (:class:`UplinkLock`), so a second one fails
with :class:`~pyvirtio.errors.UplinkTaken`.  The kernel releases the lock of a killed process.

Both of the daemon's ports live in its one thread: neither reads its socket
while the other writes to it, and Linux queues only ``net.unix.max_dgram_qlen``
datagrams (10 by default) per socket.  A burst from one to the other would
find the queue full.  :class:`UplinkedSwitchPort`, the guest's back end, keeps
both queues short: after each frame from the guest it moves the frames waiting
for the tap, and it reads the tap :data:`LOCAL_BURST` frames at a time, reading
the guest's port in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pyvirtio.devices.base import DeviceHost
from pyvirtio.devices.net.switch import (
    RECEIVE_BUDGET,
    Receiver,
    SwitchPort,
    in_switch_dir,
    switch_dir,
)
from pyvirtio.devices.net.tap import TapBackend
from pyvirtio.errors import UplinkTaken
from pyvirtio.spec.net import GsoType, HdrFlag, NetHeader

__all__ = ["LOCAL_BURST", "LOCK_FILE", "Uplink", "UplinkLock", "UplinkedSwitchPort"]

log = logging.getLogger(__name__)

#: The lock file in the switch folder: its flock's holder is the switch's uplink.
LOCK_FILE = "uplink.lock"
#: Frames read from the tap before the guest's port is read: fewer than Linux's
#: default ``net.unix.max_dgram_qlen`` (10), so the uplink never finds that
#: port's queue full (both are read by the daemon's one thread).
LOCAL_BURST = 8
#: The header written with every frame to the tap: a complete frame, nothing to do.
_PLAIN = NetHeader()




class UplinkLock:
    """An ``flock`` on :data:`LOCK_FILE` in a switch folder, held until :meth:`release`.

    The file says who holds it (``pid N, tap NAME``), for the error message of
    the next process that asks.

    Args:
        switch: the switch's name.
        holder: written into the file for others to read.
        base: the folder holding switch folders (see :func:`switch_dir`).

    Raises:
        UplinkTaken: another process holds the lock.
        ValueError: a bad switch name.
        OSError: the folder or the file cannot be created.
    """

    def __init__(self, switch: str, holder: str, base: Path | None = None) -> None:
        folder = switch_dir(switch, base)
        self.path = folder / LOCK_FILE
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        while True:
            fd = in_switch_dir(folder, lambda: os.open(self.path, flags, 0o600))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 256, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UplinkTaken(switch, other or "another process") from None
            # The previous holder unlinks the file before it unlocks: if it did that
            # between our open and our flock, we hold a lock nobody else will see.
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then unlock (in this order: see the constructor)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


class Uplink:
    """Host tap ``tap`` as one more port of switch ``switch``: frames move both ways.

    The lock is taken first, so a second uplink fails before it touches a tap.

    Args:
        switch: the switch's name.
        tap: the tap interface (created if missing, see :class:`TapBackend`).
        base: the folder holding switch folders (see :func:`switch_dir`).
        tap_fd: an fd standing in for the tap (:class:`TapBackend`'s ``fd``).

    Attributes:
        port: the uplink's switch port; its counters are ``uplink sent``,
            ``uplink flooded`` (frames from the tap into the switch), ``uplink
            received`` (frames from the switch for the tap), ``uplink dropped:
            ...``.
        tap: the tap; its counters are ``tap sent`` (written to the tap),
            ``tap received`` (read from it), ``tap dropped: ...``.

    Raises:
        UplinkTaken: the switch has an uplink already.
        ValueError: a bad switch or tap name.
        OSError: the switch folder, its socket or the tap cannot be set up.
    """

    def __init__(
        self, switch: str, tap: str, base: Path | None = None, *, tap_fd: int | None = None
    ) -> None:
        self._lock = UplinkLock(switch, f"pid {os.getpid()}, tap {tap}", base)
        try:
            self.tap = TapBackend(tap, fd=tap_fd)
        except BaseException:
            self._lock.release()
            raise
        try:
            self.port = SwitchPort(switch, base, label="uplink")
        except BaseException:
            self.tap.close()
            self._lock.release()
            raise
        self.port.counters = self.tap.counters
        log.info("switch %s: uplink through tap %s", switch, self.tap.name)

    @property
    def counters(self) -> Counter[str]:
        """The uplink's counts, its port's and its tap's in one :class:`Counter`."""
        return self.port.counters

    @counters.setter
    def counters(self, counters: Counter[str]) -> None:
        self.port.counters = self.tap.counters = counters

    def to_tap(self) -> int:
        """Write the frames waiting at the uplink's port to the tap; return how many."""
        frames = self.port.receive()
        for frame in frames:
            self.tap.send_packet(_PLAIN, frame)
        return len(frames)

    def from_tap(self, limit: int = RECEIVE_BUDGET) -> int:
        """Forward up to ``limit`` frames from the tap into the switch; return how many were read.

        Nothing once the tap failed for good (it was deleted).
        """
        if self.tap.fileno() is None:
            return 0
        packets = self.tap.receive_packets(limit)
        for header, frame in packets:
            if header.flags & HdrFlag.NEEDS_CSUM or header.gso_type != GsoType.NONE:
                self.counters["uplink dropped: offloaded frame"] += 1
            else:
                self.port.send(frame)
        return len(packets)

    def close(self) -> None:
        """Close the tap, release the lock, then close the port (removing an empty folder)."""
        self.tap.close()
        self._lock.release()
        self.port.close()


class UplinkedSwitchPort:
    """A guest's switch port in the daemon that also carries the switch's uplink.

    A :class:`~pyvirtio.devices.net.FrameBackend` for the guest's device: one fd
    (an epoll set of the guest's port, the uplink's port and the tap) tells the
    daemon's loop when any of them has frames, and :meth:`receive` moves the
    uplink's frames along with the guest's.

    Args:
        port: the guest's port.
        uplink: the switch's uplink (closed with this back end).

    Attributes:
        counters: the guest port's ``switch ...`` counts and the uplink's
            ``uplink ...`` and ``tap ...`` counts in one :class:`Counter`.
    """

    def __init__(self, port: SwitchPort, uplink: Uplink) -> None:
        self.port = port
        self.uplink = uplink
        self._epoll = select.epoll()
        self._tap_fd = uplink.tap.fileno()
        for fd in (port.fileno(), uplink.port.fileno(), self._tap_fd):
            if fd is not None:
                self._epoll.register(fd, select.EPOLLIN)
        self.counters = port.counters

    @classmethod
    def open(cls, switch: str, tap: str, base: Path | None = None) -> UplinkedSwitchPort:
        """The guest's port on ``switch`` and the switch's uplink through ``tap``.

        Raises:
            UplinkTaken: the switch has an uplink already.
            ValueError: a bad switch or tap name.
            OSError: a socket or the tap cannot be set up.
        """
        uplink = Uplink(switch, tap, base)
        try:
            return cls(SwitchPort(switch, base), uplink)
        except BaseException:
            uplink.close()
            raise

    @property
    def counters(self) -> Counter[str]:
        """The counts of the guest's port and of the uplink, in one :class:`Counter`."""
        return self.port.counters

    @counters.setter
    def counters(self, counters: Counter[str]) -> None:
        self.port.counters = self.uplink.counters = counters

    def fileno(self) -> int:
        """An epoll fd, readable when the guest's port, the uplink's port or the tap is."""
        return self._epoll.fileno()

    def send(self, frame: bytes) -> None:
        """Forward a frame from the guest; if it went to the uplink, on to the tap at once."""
        self.port.send(frame)
        self.uplink.to_tap()

    #: :meth:`queue` takes views of the guest's buffers, and packets with offloads
    #: (see :class:`SwitchPort`: the uplink's frames are finished in software).
    takes_views = True
    carries_offloads = True

    def queue(self, frame: bytes | memoryview, header: NetHeader | None = None) -> None:
        """Forward a frame from the guest at the next :meth:`flush`."""
        self.port.queue(frame, header)

    def flush(self) -> None:
        """Send what :meth:`queue` holds; what went to the uplink, on to the tap at once."""
        self.port.flush()
        self.uplink.to_tap()

    def bind_receiver(self, receiver: Receiver, pressure: Callable[[], bool] | None = None,
                      accepts: Callable[[NetHeader, int], bool] | None = None) -> None:
        """Ports of the same switch in this process deliver to ``receiver`` directly."""
        self.port.bind_receiver(receiver, pressure, accepts)

    def attach_host(self, host: DeviceHost) -> None:
        """Both ports wait for full peers in ``host``'s loop (back-pressure)."""
        self.port.attach_host(host)
        self.uplink.port.attach_host(host)

    def congested(self) -> bool:
        """Whether a peer of the guest's port is full, or a port of this process asks
        its senders to hold frames now."""
        return self.port.congested()

    def wait_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once when a port of this process drained its backlog."""
        self.port.wait_room(resume)

    def drained(self) -> None:
        """The guest's device delivered frames: resume senders held for room."""
        self.port.drained()

    def receive(self) -> list[bytes]:
        """Move the uplink's frames; return those for the guest (about :data:`RECEIVE_BUDGET`).

        The tap is read :data:`LOCAL_BURST` frames at a time, and the guest's
        port after each burst, so the frames the uplink forwards to the guest
        never fill that port's queue.
        """
        self.uplink.to_tap()
        frames = self.port.receive()
        for _ in range(RECEIVE_BUDGET // LOCAL_BURST):
            if len(frames) >= RECEIVE_BUDGET or not self.uplink.from_tap(LOCAL_BURST):
                break
            frames += self.port.receive()
        if self._tap_fd is not None and self.uplink.tap.fileno() is None:
            # A deleted tap's fd stays readable (EPOLLERR): stop watching it.
            self._epoll.unregister(self._tap_fd)
            self._tap_fd = None
        return frames

    def close(self) -> None:
        """Close the guest's port and the uplink."""
        self._epoll.close()
        self.port.close()
        self.uplink.close()
