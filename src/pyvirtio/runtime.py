"""The I/O runtime: a Unix-socket server and one epoll loop per daemon.

One thread polls the listening socket (while no front-end is connected), the
connection, every started ring's kick eventfd, the back-end request channel
(the front-end's answers to CONFIG_CHANGE_MSG and friends), the control socket
and a signal wake-up pipe.  A
message is read without blocking (a peer that stops mid-message stalls
nothing), decoded, handed to the back-end and answered.  When the front-end
breaks the protocol or hangs up, the back-end forgets it and the server
accepts the next connection, so a QEMU restart or ``reconnect=`` chardev
finds pyvirtio still there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pyvirtio.control import answer
from pyvirtio.devices.base import QueueStats, Tally, Timer, VirtioDevice
from pyvirtio.errors import BackendChannelError, NoFrontend, PyVirtioError
from pyvirtio.memory import GuestMemory
from pyvirtio.timers import TimerHeap
from pyvirtio.vhost_user.backend import VhostUserBackend
from pyvirtio.vhost_user.channel import AckCallback, BackendChannel
from pyvirtio.vhost_user.protocol import MAX_FDS, MessageDecoder, close_fds
from pyvirtio.virtqueue.chain import DescriptorChain

__all__ = ["Server", "prepare_socket_path", "serve_together"]

log = logging.getLogger(__name__)

_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
#: How long a message to the front-end may wait for room in the channel's socket.
CHANNEL_SEND_TIMEOUT = 5.0


def prepare_socket_path(path: Path) -> None:
    """Remove a stale socket file at ``path``, refusing to steal a live one.

    Raises:
        FileExistsError: something that is not a socket is there, or a live
            server answers on it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a killed daemon
        return
    finally:
        probe.close()
    raise FileExistsError(f"another server is listening on {path}")


class Server:
    """Serves one device over vhost-user on a Unix socket, one front-end at a time.

    Args:
        socket_path: where to listen.
        device: the device model to serve.
        strict: the device enters DEVICE_NEEDS_RESET on the first driver violation.
        control_path: where to listen for control commands: ``stats`` (every
            device), ``link up|down`` (with ``link_commands``).
        link_commands: take the link commands (a net device).
        inband_notifications: also offer vhost-user INBAND_NOTIFICATIONS (kicks
            and calls as messages; see :class:`VhostUserBackend`).
    """

    def __init__(
        self,
        socket_path: Path,
        device: VirtioDevice,
        *,
        strict: bool = False,
        control_path: Path | None = None,
        link_commands: bool = False,
        inband_notifications: bool = False,
        packed_rings: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.control_path = control_path
        self.link_commands = link_commands
        self._control: socket.socket | None = None
        #: False while the link is down (see :meth:`set_link`).
        self.link_up = True
        self.device = device
        self.backend = VhostUserBackend(device, watcher=self, strict=strict,
                                        inband_notifications=inband_notifications,
                                        packed_rings=packed_rings)
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._decoder = MessageDecoder()
        self._kicks: dict[int, int] = {}
        #: The back-end request channel's fd, when the front-end gave one.
        self._channels: dict[int, BackendChannel] = {}
        #: Fds the device watches itself (DeviceHost.watch_fd), and their callbacks.
        self._device_fds: dict[int, Callable[[], None]] = {}
        #: Fds a device waits to have room in (DeviceHost.when_writable): one call each.
        self._writable_fds: dict[int, Callable[[], None]] = {}
        #: The device's timers (DeviceHost.call_later), soonest first.
        self._timers = TimerHeap()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._dump_stats = False
        self.connections = 0
        self._started = time.monotonic()
        self._connected_at = 0.0
        #: Counters of the connections that ended, per queue (the device's start()
        #: resets its own when a front-end goes away).
        self._finished: list[QueueStats] = []
        #: The last connection that ended: number, why, how long, counters per queue.
        self.last_connection: dict[str, object] | None = None
        device.attach(self)

    # -- FdWatcher -------------------------------------------------------------------

    def watch_kick(self, fd: int, queue: int) -> None:
        """Poll a ring's kick eventfd."""
        self._epoll.register(fd, _READ)
        self._kicks[fd] = queue

    def unwatch_kick(self, fd: int) -> None:
        """Stop polling a kick eventfd before the back-end closes it."""
        if self._kicks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def watch_channel(self, fd: int, channel: BackendChannel) -> None:
        """Carry the back-end request channel over ``fd``; read the front-end's answers."""
        os.set_blocking(fd, False)
        channel.transport = lambda data: _write_all(fd, data, CHANNEL_SEND_TIMEOUT)
        self._epoll.register(fd, _READ)
        self._channels[fd] = channel

    def unwatch_channel(self, fd: int) -> None:
        """Stop reading the channel's fd before the back-end closes it."""
        if self._channels.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _read_channel(self, fd: int, channel: BackendChannel) -> None:
        """The front-end answered on (or closed) the back-end request channel."""
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            log.error("back-end request channel: %s", exc)
        try:
            if data:
                channel.receive(data)
                return
            channel.eof()
            log.info("the front-end closed the back-end request channel")
        except BackendChannelError as exc:
            log.error("back-end request channel: %s; closing it", exc)
        self.backend.close_channel()

    # -- DeviceHost: devices with work from outside the guest (net receive) -----------

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (a device's own socket)."""
        self._device_fds[fd] = callback
        self._update_device_fd(fd)

    def when_writable(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when ``fd`` has room (a device's output waiting).

        An fd epoll cannot watch (a regular file: never full) gets its call at once,
        from the loop.
        """
        self._writable_fds[fd] = callback
        try:
            self._update_device_fd(fd)
        except PermissionError:
            del self._writable_fds[fd]
            self.call_later(0, callback)

    def unwatch_fd(self, fd: int) -> None:
        """Stop watching a device's fd for input."""
        if self._device_fds.pop(fd, None) is not None:
            self._update_device_fd(fd)

    def cancel_writable(self, fd: int) -> None:
        """Forget a :meth:`when_writable` wait."""
        if self._writable_fds.pop(fd, None) is not None:
            self._update_device_fd(fd)

    def _update_device_fd(self, fd: int) -> None:
        """(Re-)register a device's fd for the events it is watched for."""
        events = (_READ if fd in self._device_fds else 0) | (
            select.EPOLLOUT if fd in self._writable_fds else 0)
        if not events:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
            return
        try:
            self._epoll.modify(fd, events)
        except FileNotFoundError:  # not registered yet
            self._epoll.register(fd, events)

    def _device_fd_event(self, fd: int, events: int) -> None:
        """A device's fd is readable or has room: call what it watches it for."""
        calls = []
        if events & select.EPOLLOUT and fd in self._writable_fds:
            calls.append(self._writable_fds.pop(fd))
            self._update_device_fd(fd)
        if events & _READ and fd in self._device_fds:
            calls.append(self._device_fds[fd])
        for callback in calls:
            try:
                callback()
            except Exception:
                log.exception("device fd %d handler failed", fd)

    def process_queue(self, queue: int) -> None:
        """Process ``queue`` as if the driver had kicked it (new work from outside)."""
        self.backend.kick(queue)

    @property
    def memory(self) -> GuestMemory:
        """Guest memory as the front-end's memory table maps it."""
        return self.backend.memory

    def complete(self, queue: int, chain: DescriptorChain, written: int,
                 tally: Tally | None = None) -> None:
        """Use a chain the device deferred (any thread; see :class:`DeviceHost`)."""
        self.backend.engine.complete(queue, chain, written, tally)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` in the loop after ``delay`` seconds."""
        return self._timers.schedule(time.monotonic() + max(delay, 0.0), callback)

    def config_changed(self, on_ack: AckCallback | None = None) -> bool:
        """Send CONFIG_CHANGE_MSG to the front-end (see :class:`DeviceHost`).

        Raises:
            NoFrontend: no front-end is connected.
        """
        if self._conn is None:
            raise NoFrontend("no front-end connected: the next one reads the config space")
        return self.backend.config_changed(on_ack)

    def queue_ready(self, queue: int) -> bool:
        """Whether ``queue`` is started and enabled (the back-end's ring state)."""
        return self.backend.queue_ready(queue)

    # -- life cycle --------------------------------------------------------------------

    def listen(self) -> None:
        """Create the listening socket (before QEMU starts, as vhost-user requires).

        With a control path, also listen there for control commands
        (:func:`send_control`).
        """
        self._listener = self._open_socket(self.socket_path)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        log.info("listening on %s", self.socket_path)
        if self.control_path is not None:
            self._control = self._open_socket(self.control_path)
            log.info("control socket %s", self.control_path)

    def _open_socket(self, path: Path) -> socket.socket:
        prepare_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(1)
        sock.setblocking(False)
        self._epoll.register(sock.fileno(), _READ)
        return sock

    def set_link(self, up: bool) -> None:
        """Take the link down or bring it back up.

        Down closes the front-end's connection and the vhost-user socket. QEMU
        then marks the NIC's link down, and the guest sees carrier loss. Up
        listens again, and a QEMU whose chardev has ``reconnect=`` comes back and
        marks the link up.
        """
        if up == self.link_up:
            return
        self.link_up = up
        if up:
            self._listener = self._open_socket(self.socket_path)
            log.info("link up: listening on %s again", self.socket_path)
            return
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # not registered while a front-end is on
                self._epoll.unregister(listener.fileno())
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._drop_connection("link down")
        log.info("link down: %s closed", self.socket_path)

    def stats_snapshot(self) -> dict[str, object]:
        """The device's counters, per queue (``pyvirtio stats``, JSON-friendly).

        - ``queues``: the current connection's counters (with no front-end
          connected: what was counted since the last one went away);
        - ``last_connection``: the last connection that ended (``connection``
          number, ``ended`` reason, ``seconds`` and its ``queues``), or None;
        - ``totals``: per queue, everything since the daemon started;
        - ``device``: the device's own figures
          (:meth:`~pyvirtio.devices.base.VirtioDevice.stats_details`).
        """
        connected = self._conn is not None
        return {
            "socket": str(self.socket_path),
            "connected": connected,
            "connections": self.connections,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "connected_seconds": (
                round(time.monotonic() - self._connected_at, 3) if connected else None
            ),
            "queues": _queue_entries(self.device.stats),
            "last_connection": self.last_connection,
            "totals": _queue_entries(_add_stats(self._finished, self.device.stats)),
            "device": self.device.stats_details(),
        }

    def _control_command(self) -> None:
        """Answer one command on the control socket (:func:`pyvirtio.control.answer`)."""
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except BlockingIOError:
            return
        with conn:
            answer(self, conn)

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def install_signal_handlers(self, *others: Server) -> None:
        """SIGINT/SIGTERM stop the server cleanly; SIGUSR1 logs queue statistics.

        ``others``: servers run in the same loop (:func:`serve_together`), whose
        statistics SIGUSR1 logs too.
        """

        def on_stop(signum: int, frame: FrameType | None) -> None:
            log.info("%s received, shutting down", signal.Signals(signum).name)
            self.stop()

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            for server in (self, *others):
                server._dump_stats = True
                with contextlib.suppress(OSError):
                    os.write(server._wake_w, b"s")

        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGUSR1, on_usr1)

    def serve_forever(self) -> None:
        """Run until :meth:`stop`; then close everything and remove the socket file."""
        serve_together([self])

    def _start_loop(self) -> None:
        """Listen (if not yet) and watch the engine's completion fd: before the first round."""
        if self._listener is None:
            self.listen()
        self._epoll.register(self.backend.engine.completion_fd, select.EPOLLIN)

    def _timeout(self) -> float | None:
        """How long the loop may sleep before this server has work (None: until an event)."""
        interval = self.backend.recheck_interval
        next_due = self._timers.next_due()
        if next_due is not None:
            due = max(next_due - time.monotonic(), 0.0)
            interval = due if interval is None else min(interval, due)
        return interval

    def run_once(self, timeout: float | None) -> None:
        """One round of the loop: wait at most ``timeout`` s for events, handle them,
        run the due timers, use what was completed."""
        backend = self.backend
        for fd, events in self._epoll.poll(-1 if timeout is None else timeout):
            self._dispatch(fd, events)
            if self._stopping:
                break
        self._run_timers()
        backend.flush()
        if backend.recheck_interval is not None:
            backend.recheck()

    def _run_timers(self) -> None:
        """Call the device's timers that are due."""
        for call in self._timers.pop_due(time.monotonic()):
            try:
                call.callback()
            except Exception:
                log.exception("device timer failed")

    def close(self) -> None:
        """Drop the connection, flush the device and remove the socket file."""
        self._drop_connection("server stopping")
        for sock, path in ((self._listener, self.socket_path), (self._control, self.control_path)):
            if sock is not None and path is not None:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._listener = self._control = None
        self.backend.close()  # before the device: it restarts the device's counters
        self.device.close()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def log_stats(self) -> None:
        """Log every queue's counters."""
        for index, stats in enumerate(self.device.stats):
            log.info("queue %d: %s", index, stats)

    # -- events ------------------------------------------------------------------------

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self.backend.engine.completion_fd:
            self.backend.engine.woken()
            return
        if fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 64)
            if self._dump_stats:
                self._dump_stats = False
                self.log_stats()
            return
        channel = self._channels.get(fd)
        if channel is not None:
            self._read_channel(fd, channel)
            return
        if fd in self._device_fds or fd in self._writable_fds:
            self._device_fd_event(fd, events)
            return
        queue = self._kicks.get(fd)
        if queue is not None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass  # spurious wake-up: another kick was already consumed
            except OSError as exc:
                log.error("queue %d: kick fd failed (%s); stopping the ring", queue, exc)
                self.unwatch_kick(fd)
                return
            try:
                self.backend.kick(queue)
            except Exception:  # a pyvirtio bug must not take the daemon down
                log.exception("queue %d: processing failed", queue)
                self._drop_connection("internal error")
            return
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
            return
        if self._control is not None and fd == self._control.fileno():
            self._control_command()
            return
        if self._conn is not None and fd == self._conn.fileno():
            self._read_messages()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._conn = conn
        self.connections += 1
        self._connected_at = time.monotonic()
        self._epoll.unregister(self._listener.fileno())
        self._epoll.register(conn.fileno(), _READ)
        log.info("front-end connected (connection %d)", self.connections)

    def _read_messages(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, self._decoder.wanted, MAX_FDS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_connection(f"connection error: {exc}")
            return
        if not data:
            for fd in fds:
                os.close(fd)
            try:
                self._decoder.eof()
            except PyVirtioError as exc:
                self._drop_connection(f"protocol error: {exc}")
                return
            self._drop_connection("front-end disconnected")
            return
        self._decoder.feed(data, fds)
        try:
            while (msg := self._decoder.next_message()) is not None:
                reply = self.backend.handle(msg)
                if reply.data is not None:
                    self._send(reply.data, list(reply.fds))
                close_fds(list(reply.fds))
                if reply.error is not None:
                    self._drop_connection(f"protocol error: {reply.error}")
                    return
        except PyVirtioError as exc:  # the decoder: a malformed header
            self._drop_connection(f"protocol error: {exc}")
        except Exception:  # a pyvirtio bug must not take the daemon down
            log.exception("internal error while handling a message")
            self._drop_connection("internal error")

    def _send(self, data: bytes, fds: list[int] | None = None) -> None:
        conn = self._conn
        if conn is None:
            return
        conn.setblocking(True)
        conn.settimeout(5.0)
        try:
            if fds:
                socket.send_fds(conn, [data], fds)
            else:
                conn.sendall(data)
        except OSError as exc:
            log.error("cannot send reply: %s", exc)
        finally:
            conn.setblocking(False)

    def _drop_connection(self, reason: str) -> None:
        conn = self._conn
        if conn is None:
            return
        level = (
            logging.ERROR
            if reason.startswith(("protocol", "connection", "internal"))
            else logging.INFO
        )
        log.log(level, "%s; waiting for the next front-end", reason)
        self.log_stats()
        # The device's counters start again with the next front-end: keep this one's.
        self._finished = _add_stats(self._finished, self.device.stats)
        self.last_connection = {
            "connection": self.connections,
            "ended": reason,
            "seconds": round(time.monotonic() - self._connected_at, 3),
            "queues": _queue_entries(self.device.stats),
        }
        with contextlib.suppress(OSError):
            self._epoll.unregister(conn.fileno())
        conn.close()
        self._conn = None
        self._decoder.discard()
        self.backend.disconnect()
        if self._listener is not None:
            try:
                self._epoll.register(self._listener.fileno(), _READ)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise


def serve_together(servers: list[Server]) -> None:
    """Run several servers in one thread until one is stopped; then close them all.

    Each server keeps its own epoll set; one more epoll set watches theirs, so a
    round handles only the servers with events (``pyvirtio serve net --socket A
    --socket B``: several ports of one switch in one process, whose devices hand
    frames to each other without a syscall).  One server alone is its own loop.
    """
    try:
        for server in servers:
            server._start_loop()
        if len(servers) == 1:
            only = servers[0]
            while not only._stopping:
                only.run_once(only._timeout())
            return
        outer = select.epoll()
        try:
            by_fd = {server._epoll.fileno(): server for server in servers}
            for fd in by_fd:
                outer.register(fd, select.EPOLLIN)
            while not any(server._stopping for server in servers):
                timeouts = [t for t in (s._timeout() for s in servers) if t is not None]
                ready = {fd for fd, _ in outer.poll(min(timeouts) if timeouts else -1)}
                for fd, server in by_fd.items():
                    # After a poll that timed out, a server with a timer or a recheck
                    # runs too (its timers and rechecks are its own to judge).
                    if fd in ready or (not ready and server._timeout() is not None):
                        server.run_once(0)
        finally:
            outer.close()
    finally:
        for server in servers:
            server.close()


def _queue_entries(stats: list[QueueStats]) -> list[dict[str, object]]:
    """Per queue counters as ``pyvirtio stats --json`` lists them."""
    return [{"queue": index, **q.as_json()} for index, q in enumerate(stats)]


def _add_stats(a: list[QueueStats], b: list[QueueStats]) -> list[QueueStats]:
    """Queue by queue sums (new objects; a missing queue counts as zeros)."""
    return [
        (a[i] if i < len(a) else QueueStats()) + (b[i] if i < len(b) else QueueStats())
        for i in range(max(len(a), len(b)))
    ]


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    """Write all of ``data`` to the non-blocking ``fd``, waiting at most ``timeout`` s.

    Raises:
        OSError: the write failed, or ``fd`` had no room for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise OSError(errno.ETIMEDOUT, "the peer reads nothing")
