"""``pyvirtio bench net SOCK_TX SOCK_RX``: frames per second through virtio-net ports.

Two front-end processes (forked, so neither waits for the other's Python):
the transmitter connects to ``SOCK_TX`` and keeps its transmit ring full of
frames of ``--size`` bytes addressed to the receiver's MAC; the receiver
connects to ``SOCK_RX``, first sends one broadcast frame (so the switch learns
where the receiver's address is, and the frames go to it alone), then keeps
its receive ring full of buffers.  Chains are built once (split rings: the same
heads are republished; packed rings: the same buffers are added again), the
available index moves once per batch, and kicks honour EVENT_IDX.

The figures come from a window after a warm-up: ``pps`` is frames the receiver
got per second, ``drops`` frames the transmitter's ring gave back that never
reached the receiver (counted after the path drained), and each daemon's CPU
time per packet comes from ``/proc/PID/stat`` of the process serving each
socket (found with ``SO_PEERCRED`` on the vhost-user connection).  The
daemons' own drop counters (``pyvirtio stats``) are reported as well.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

from pyvirtio.client import ask
from pyvirtio.errors import BackendError, NoDaemon
from pyvirtio.frontend.connection import FrontendQueue, GuestRam, VhostUserFrontend
from pyvirtio.spec.common import Feature
from pyvirtio.spec.net import ETH_HLEN, HDR_SIZE
from pyvirtio.virtqueue.driver_split import DriverSplitQueue

__all__ = ["NetBenchConfig", "NetBenchResult", "run_net_bench"]

#: The transmitter's and the receiver's MAC addresses (locally administered).
MAC_TX = bytes.fromhex("02000ad6000a")
MAC_RX = bytes.fromhex("02000ad6000b")
#: Receive buffer: a 1518-byte frame and its header.
RX_BUFFER = HDR_SIZE + 1518
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Seconds of traffic before the window opens.
WARM_UP = 0.5
_CRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class NetBenchConfig:
    """What to run: frame size (bytes, no FCS), window (seconds), ring layout."""

    size: int = 64
    seconds: float = 5.0
    packed: bool = False
    queue_size: int = 256

    def __post_init__(self) -> None:
        if not ETH_HLEN + 2 <= self.size <= 1518:
            raise ValueError(f"--size must be {ETH_HLEN + 2}..1518 bytes, not {self.size}")
        if self.seconds <= 0:
            raise ValueError("--time must be positive")


@dataclass(slots=True)
class NetBenchResult:
    """The figures of one run (``--json`` prints :meth:`as_dict`)."""

    size: int
    seconds: float
    packed: bool
    pps: float
    gbit_per_s: float
    #: Frames the transmitter's ring gave back but the receiver never got (whole run).
    drops: int
    sent: int
    received: int
    #: Per daemon (one per distinct process): pid, sockets, CPU µs per packet, CPU use.
    daemons: list[dict[str, Any]] = field(default_factory=list)
    #: The daemons' own drop counters over the whole connection (``pyvirtio stats``).
    daemon_drops: dict[str, int] = field(default_factory=dict)
    tx_frontend_cpu_util: float = 0.0
    rx_frontend_cpu_util: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly; ``cpu_us_per_packet`` is all daemons' CPU per packet together."""
        out = asdict(self)
        per_packet = [d["cpu_us_per_packet"] for d in self.daemons]
        out["cpu_us_per_packet"] = (round(sum(per_packet), 2)
                                    if per_packet and None not in per_packet else None)
        return out


def _peer_pid(frontend: VhostUserFrontend) -> int:
    """The pid of the process that accepted the vhost-user connection."""
    raw = frontend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    return int(_CRED.unpack(raw)[0])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _frame(size: int) -> bytes:
    """A ``size``-byte frame from the transmitter to the receiver (experimental EtherType)."""
    return (MAC_RX + MAC_TX + b"\x88\xb5").ljust(size, b"\x00")


class _Port:
    """One front-end: a connection, its RAM and both rings of queue pair 0."""

    def __init__(self, path: str, config: NetBenchConfig) -> None:
        self.frontend = VhostUserFrontend.connect(path)
        self.frontend.probe()
        wanted = (1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX)
        if config.packed:
            if not self.frontend.features_offered & (1 << Feature.RING_PACKED):
                raise BackendError("the back-end does not offer VIRTIO_F_RING_PACKED",
                                   request="GET_FEATURES")
            wanted |= 1 << Feature.RING_PACKED
        self.frontend.negotiate(wanted)
        self.ram = GuestRam((4 << 20) + 2 * config.queue_size * RX_BUFFER)
        self.frontend.share_memory(self.ram)
        self.rx = self.frontend.setup_queue(0, config.queue_size)
        self.tx = self.frontend.setup_queue(1, config.queue_size)
        self.frontend.driver_ok()
        #: Per queue: head / buffer id -> the chain's buffers, to make it available again.
        self.chains: dict[int, dict[int, tuple[list[tuple[int, int]],
                                               list[tuple[int, int]]]]] = {0: {}, 1: {}}

    def fill(self, queue: FrontendQueue, readable: list[tuple[int, int]],
             writable: list[tuple[int, int]], count: int) -> None:
        """Make ``count`` chains of fresh buffers like these available, kick once."""
        ring = queue.ring
        heads = []
        for _ in range(count):
            r = [(self.ram.alloc(n), n) for _, n in readable]
            for (gpa, n), (src, _) in zip(r, readable, strict=True):
                self.ram.view(gpa, n)[:] = self.ram.view(src, n)
            w = [(self.ram.alloc(n), n) for _, n in writable]
            if isinstance(ring, DriverSplitQueue):
                head = ring.add(r, w, publish=False)
                heads.append(head)
            else:
                head = ring.add(r, w)
            self.chains[queue.index][head] = (r, w)
        if isinstance(ring, DriverSplitQueue):
            ring.publish_many(heads)
        queue.kick()

    def pump(self, queue: FrontendQueue, count: ctypes.c_int64, stop: Connection,
             *, settle: float = 0.0) -> int:
        """Give every used chain straight back until ``stop`` is readable; return the
        chains used.  ``count`` follows the total for the parent.

        ``settle``: then wait up to that long for the chains still available to be
        used (a transmitter's last frames, so that they count as sent).
        """
        total = 0
        while not stop.poll(0):
            used = self._reap(queue, republish=True)
            if used:
                total += used
                count.value = total
                queue.kick_if_needed()
            elif not queue.wait(0.2):
                queue.kick()  # a spurious kick is allowed (VIRTIO 1.4 §2.7.10.2)
        outstanding, deadline = len(self.chains[queue.index]), time.monotonic() + settle
        while outstanding and time.monotonic() < deadline:
            used = self._reap(queue, republish=False)
            outstanding -= used
            total += used
            if not used:
                queue.wait(0.05)
        count.value = total
        return total

    def _reap(self, queue: FrontendQueue, *, republish: bool) -> int:
        """Take the used chains (making them available again with ``republish``)."""
        ring, chains = queue.ring, self.chains[queue.index]
        if isinstance(ring, DriverSplitQueue):
            used = ring.reap()
            if republish and used:
                ring.publish_many([head for head, _ in used])
        else:
            used = ring.get_used()
            for head, _ in used:
                r, w = chains.pop(head)
                if republish:
                    chains[ring.add(r, w)] = (r, w)
        return len(used)

    def close(self) -> None:
        self.frontend.close()
        self.ram.close()


def _child(role: str, path: str, config: NetBenchConfig, count: ctypes.c_int64,
           conn: Connection) -> None:
    """A front-end process: set up, report READY and the daemon's pid, pump until told."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    try:
        port = _Port(path, config)
        try:
            pid = _peer_pid(port.frontend)
            if role == "tx":
                frame = bytes(HDR_SIZE) + _frame(config.size)
                src = port.ram.alloc(len(frame))
                port.ram.view(src, len(frame))[:] = frame
                template: tuple[list[tuple[int, int]], list[tuple[int, int]]] = (
                    [(src, len(frame))], [])
                queue = port.tx
                # Buffers for frames to the transmitter (the receiver's hello floods).
                port.fill(port.rx, [], [(0, RX_BUFFER)], 8)
            else:
                hello = bytes(HDR_SIZE) + (b"\xff" * 6 + MAC_RX + b"\x88\xb5").ljust(60, b"\0")
                gpa = port.ram.alloc(len(hello))
                port.ram.view(gpa, len(hello))[:] = hello
                port.tx.submit([(gpa, len(hello))], (), timeout=10.0, what="hello frame")
                template, queue = ([], [(0, RX_BUFFER)]), port.rx
            conn.send(("ready", pid))
            if conn.recv() != "go":
                return
            port.fill(queue, *template, config.queue_size)
            cpu0 = time.process_time()
            total = port.pump(queue, count, conn, settle=2.0 if role == "tx" else 0.0)
            conn.recv()
            conn.send(("done", total, time.process_time() - cpu0))
        finally:
            port.close()
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Child:
    def __init__(self, role: str, path: Path, config: NetBenchConfig) -> None:
        ctx = multiprocessing.get_context("fork")
        self.role = role
        self.count: ctypes.c_int64 = ctx.RawValue(ctypes.c_int64, 0)
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(role, str(path), config, self.count,
                                                         theirs), daemon=True)
        self.process.start()
        theirs.close()
        self.daemon_pid = int(self._expect("ready", 15.0)[1])

    def _expect(self, what: str, timeout: float) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise BackendError(f"the {self.role} front-end did not report {what} within "
                               f"{timeout:g} s", request="virtqueue")
        message: tuple[Any, ...] = self.conn.recv()
        if message[0] == "error":
            raise BackendError(f"{self.role} front-end: {message[1]}", request="virtqueue")
        return message

    def go(self) -> None:
        self.conn.send("go")

    def stop(self) -> tuple[int, float]:
        """Stop pumping; return the chains used and the front-end's CPU seconds."""
        self.conn.send("stop")
        _, total, cpu = self._expect("its counts", 15.0)
        return int(total), float(cpu)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def _daemon_drops(paths: list[Path]) -> dict[str, int]:
    """The daemons' drop counters of the current connection, per socket and reason."""
    drops: dict[str, int] = {}
    for path in paths:
        try:
            snapshot = ask(path, "stats")
        except NoDaemon:
            continue
        # A port whose front-end left already: the connection that just ended.
        last = snapshot.get("last_connection") or {}
        queues = snapshot["queues"] if snapshot["connected"] else last.get("queues", [])
        for queue in queues:
            for kind, number in queue["kinds"].items():
                if "dropped" in kind and number:
                    key = f"{path.name} {kind}"
                    drops[key] = drops.get(key, 0) + int(number)
    return drops


def run_net_bench(tx_socket: Path, rx_socket: Path, config: NetBenchConfig,
                  progress: TextIO | None = None) -> NetBenchResult:
    """Drive ``tx_socket``'s transmit ring and ``rx_socket``'s receive ring; measure.

    Raises:
        BackendError: a front-end could not set up or stalled.
    """
    rx = _Child("rx", rx_socket, config)
    try:
        tx = _Child("tx", tx_socket, config)
        try:
            return _measure(tx, rx, [tx_socket, rx_socket], config, progress)
        finally:
            tx.close()
    finally:
        rx.close()


def _measure(tx: _Child, rx: _Child, paths: list[Path], config: NetBenchConfig,
             progress: TextIO | None) -> NetBenchResult:
    pids = sorted({tx.daemon_pid, rx.daemon_pid})
    rx.go()
    tx.go()
    time.sleep(WARM_UP)
    t0 = time.monotonic()
    cpu0 = {pid: _cpu_seconds(pid) for pid in pids}
    got0 = rx.count.value
    time.sleep(config.seconds)
    got1 = rx.count.value
    cpu = {pid: _cpu_seconds(pid) - cpu0[pid] for pid in pids}
    elapsed = time.monotonic() - t0
    sent, tx_cpu = tx.stop()
    # Let what is in flight arrive: until the receiver's count stands still.
    last, still = rx.count.value, time.monotonic()
    while time.monotonic() - still < 0.3 and rx.count.value < sent:
        time.sleep(0.05)
        if rx.count.value != last:
            last, still = rx.count.value, time.monotonic()
    daemon_drops = _daemon_drops(paths)
    received, rx_cpu = rx.stop()
    window = got1 - got0
    pps = window / elapsed
    daemons: list[dict[str, Any]] = []
    for pid in pids:
        sockets = [str(p) for p, owner in zip(paths, (tx.daemon_pid, rx.daemon_pid),
                                               strict=True) if owner == pid]
        daemons.append({
            "pid": pid, "sockets": sockets,
            "cpu_us_per_packet": round(cpu[pid] / window * 1e6, 2) if window else None,
            "cpu_util": round(cpu[pid] / elapsed, 2),
        })
    result = NetBenchResult(
        size=config.size, seconds=round(elapsed, 2), packed=config.packed,
        pps=round(pps), gbit_per_s=round(pps * config.size * 8 / 1e9, 4),
        drops=max(sent - received, 0), sent=sent, received=received, daemons=daemons,
        daemon_drops=daemon_drops,
        tx_frontend_cpu_util=round(tx_cpu / (elapsed + WARM_UP), 2),
        rx_frontend_cpu_util=round(rx_cpu / (elapsed + WARM_UP), 2),
    )
    if progress is not None:
        progress.write(f"{result.pps:,.0f} pps over {elapsed:.1f} s\n")
    return result
