"""The ``pyvirtio`` command: argparse -> validated config -> run.

- ``pyvirtio serve <device> --socket PATH [options]`` serves one device over
  vhost-user until SIGINT/SIGTERM;
- ``pyvirtio stats SOCKET [--json]`` shows a running daemon's per-queue counters:
  the current connection's, the last finished one's and the totals;
- ``pyvirtio link SOCKET [up|down]`` takes a net daemon's link down or up;
- ``pyvirtio resize SOCKET SIZE [--json]`` grows a blk daemon's disk; the guest
  sees the new capacity at once;
- ``pyvirtio probe --device blk|net|rng SOCKET`` shows what a back-end offers;
- ``pyvirtio bench blk SOCKET [options]`` measures a vhost-user-blk back-end;
- ``pyvirtio vm [--blk IMAGE] [--rng] [--net SWITCH] [--run CMD]`` boots a
  throwaway Linux guest on pyvirtio devices (:mod:`pyvirtio.vmcmd`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyvirtio import __version__, vmcmd
from pyvirtio.devices.base import QueueStats, VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.net import (
    FrameBackend,
    NetDevice,
    NetDeviceConfig,
    OffloadBackend,
    default_mac,
    format_mac,
    parse_mac,
)
from pyvirtio.devices.rng import RngDevice
from pyvirtio.devices.switch import SwitchPort
from pyvirtio.devices.tap import TapBackend, check_tap_name
from pyvirtio.devices.uplink import UplinkedSwitchPort
from pyvirtio.errors import PyVirtioError
from pyvirtio.frontend.bench import WORKLOADS, BenchConfig, run_bench
from pyvirtio.frontend.probe import DEVICE_FEATURES, probe
from pyvirtio.runtime import Server, control_path, send_control

__all__ = ["main", "parse_size"]

log = logging.getLogger("pyvirtio")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``512M``, ``1G``, ``2T`` (binary units; an optional ``iB``/``B``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    serve_common = argparse.ArgumentParser(add_help=False)
    serve_common.add_argument(
        "--strict",
        action="store_true",
        help="on the first driver violation, enter DEVICE_NEEDS_RESET and stop serving "
        "(default: report it, return the bad buffer, go on)",
    )
    serve_common.add_argument(
        "--inband-notifications",
        action="store_true",
        help="also offer vhost-user INBAND_NOTIFICATIONS: a front-end that takes it kicks "
        "with VRING_KICK messages and gets VRING_CALL messages on the back-end channel "
        "instead of eventfds (for simulations such as user-mode Linux time travel; slower)",
    )
    serve_common.add_argument(
        "--no-packed",
        action="store_true",
        help="do not offer VIRTIO_F_RING_PACKED: the front-end uses split rings "
        "(default: offer both layouts, the front-end chooses)",
    )
    common.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: info)",
    )
    parser = argparse.ArgumentParser(
        prog="pyvirtio",
        description="VirtIO devices in Python, served over vhost-user.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a device over vhost-user", parents=[common])
    devices = serve.add_subparsers(dest="device", required=True)

    blk = devices.add_parser(
        "blk",
        parents=[common, serve_common],
        help="virtio-blk backed by a raw image file",
        description="Serve a virtio-blk disk (QEMU: -device vhost-user-blk-pci).",
    )
    blk.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
    blk.add_argument(
        "--image",
        type=Path,
        help="raw image file (created sparse with --size if missing); "
        "default: a sparse image in a temporary folder, removed on exit",
    )
    blk.add_argument(
        "--size", type=parse_size, default=1 << 30,
        help="size of a new image (default 1G)",
    )
    blk.add_argument("--readonly", action="store_true", help="offer a read-only disk")
    blk.add_argument("--serial", default="pyvirtio", help="disk serial (GET_ID), <= 20 bytes")
    blk.add_argument("--queues", type=_positive, default=1, help="request queues (default 1)")

    rng = devices.add_parser(
        "rng",
        parents=[common, serve_common],
        help="virtio-rng entropy source",
        description="Serve a virtio-rng device (QEMU: -device vhost-user-rng-pci).",
    )
    rng.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")

    net = devices.add_parser(
        "net",
        parents=[common, serve_common],
        help="virtio-net port, optionally on a pyvirtio switch or a host tap",
        description="Serve a virtio-net device (QEMU: -netdev vhost-user,chardev=... "
        "-device virtio-net-pci,netdev=...).",
    )
    net.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
    net.add_argument("--mac", type=_mac,
                     help="MAC address (default: a stable, locally administered address "
                     "derived from the socket path)")
    net.add_argument("--mtu", type=_positive, default=1500, help="MTU (default 1500)")
    net.add_argument("--switch", metavar="NAME",
                     help="join the learning switch NAME shared by every pyvirtio serve net "
                     "given the same name (default: no network; sent frames are discarded)")
    net.add_argument("--tap", metavar="NAME", type=_tap_name,
                     help="connect to the host tap interface NAME (created if missing; "
                     "needs CAP_NET_ADMIN); offers checksum and TCP segmentation offloads. "
                     "With --switch: connect the tap to the switch as its uplink instead "
                     "(plain frames, no offloads; one uplink per switch)")
    net.add_argument("--queues", type=_positive, default=1, metavar="N",
                     help="receive/transmit queue pairs (default 1; more offers "
                     "VIRTIO_NET_F_MQ; QEMU: -netdev vhost-user,...,queues=N "
                     "-device virtio-net-pci,...,mq=on)")
    net.add_argument("--pcap", type=Path, metavar="FILE",
                     help="capture every frame sent and received (pcap, for tcpdump -r)")
    net.add_argument("--qmp", type=Path, metavar="PATH",
                     help="QEMU's QMP socket (QEMU: -qmp unix:PATH,server=on,wait=off): "
                     "follow the guest's receive filter (promiscuous mode, MAC table, VLANs), "
                     "which QEMU's control queue keeps, and drop the frames it excludes")
    net.add_argument("--qmp-nic", metavar="ID",
                     help="with --qmp: the NIC's QEMU id (-device virtio-net-pci,id=ID); "
                     "default: the NIC with this daemon's MAC, or QEMU's only NIC")

    probe_cmd = sub.add_parser(
        "probe",
        parents=[common],
        help="show what a vhost-user back-end offers",
        description="Connect to a vhost-user back-end (pyvirtio's or any other) and print "
        "its features, protocol features, queue count, memory slots and config space.",
    )
    probe_cmd.add_argument("socket", type=Path, help="the back-end's Unix socket")
    probe_cmd.add_argument("--device", required=True, choices=sorted(DEVICE_FEATURES),
                           help="device type, to decode feature names and config")
    probe_cmd.add_argument("--json", action="store_true", help="print JSON")

    link = sub.add_parser(
        "link",
        parents=[common],
        help="take a net device's link down or up",
        description="Talk to a running 'pyvirtio serve net' daemon. 'down' closes its vhost-user "
        "socket: QEMU marks the NIC's link down and the guest sees carrier loss. 'up' listens "
        "again; QEMU reconnects when its chardev has reconnect=N. Without a state, print it.",
    )
    link.add_argument("socket", type=Path, help="the daemon's --socket")
    link.add_argument("state", nargs="?", choices=["up", "down"], help="the new link state")

    stats = sub.add_parser(
        "stats",
        parents=[common],
        help="show a running daemon's per-queue counters",
        description="Ask a running 'pyvirtio serve' daemon for its counters: per queue the "
        "requests (packets), bytes each way, errors (drops), driver violations and counts by "
        "kind (drop reasons, filtered frames, switch and tap counters...): for the current "
        "connection, for the last one that ended, and since the daemon started.",
    )
    stats.add_argument("socket", type=Path, help="the daemon's --socket")
    stats.add_argument("--json", action="store_true", help="print JSON")

    resize = sub.add_parser(
        "resize",
        parents=[common],
        help="grow a running blk daemon's disk",
        description="Tell a running 'pyvirtio serve blk' daemon to grow its image file to SIZE "
        "and its capacity with it, and to tell the front-end (vhost-user "
        "CONFIG_CHANGE_MSG on the back-end request channel): the guest sees the new "
        "capacity without a reboot. Disks do not shrink; read-only ones do not change.",
    )
    resize.add_argument("socket", type=Path, help="the daemon's --socket")
    resize.add_argument("size", type=parse_size,
                        help="the new size: 2G, 1536M, 4096... (a multiple of 512 bytes)")
    resize.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")

    vmcmd.add_parser(sub, [common], parse_size)

    bench = sub.add_parser("bench", parents=[common], help="benchmark a vhost-user back-end")
    bench_devices = bench.add_subparsers(dest="device", required=True)
    bench_blk = bench_devices.add_parser(
        "blk",
        parents=[common],
        help="drive a vhost-user-blk back-end",
        description="Drive a vhost-user-blk back-end from Python (no guest) and report IOPS, "
        "throughput and latency. Writes destroy the disk's data.",
    )
    bench_blk.add_argument("socket", type=Path, help="the back-end's Unix socket")
    bench_blk.add_argument("--rw", choices=WORKLOADS, default="randread", help="workload")
    bench_blk.add_argument("--bs", type=parse_size, default=4096, help="block size (4k)")
    bench_blk.add_argument("--iodepth", type=_positive, default=1, help="requests in flight "
                           "per queue (1..256)")
    bench_blk.add_argument("--queues", type=_positive, default=1, help="queues to drive")
    bench_blk.add_argument("--time", type=float, default=5.0, help="seconds (5)")
    bench_blk.add_argument("--verify", action="store_true",
                           help="write a pattern, check every read, read all back at the end")
    bench_blk.add_argument("--span", type=parse_size,
                           help="bytes of the disk to use (default: all; 64M with --verify)")
    bench_blk.add_argument("--rwmixread", type=int, default=50, help="%% reads in randrw")
    bench_blk.add_argument("--packed", action="store_true",
                           help="use packed virtqueues (VIRTIO_F_RING_PACKED)")
    bench_blk.add_argument("--json", action="store_true", help="print the result as JSON")
    bench_blk.add_argument("--quiet", action="store_true", help="no live progress line")
    return parser


def _make_blk(args: argparse.Namespace) -> VirtioDevice:
    image: Path | None = args.image
    if image is not None and not image.exists():
        if args.readonly:
            raise ValueError(f"{image} does not exist (and --readonly cannot create it)")
        with open(image, "wb") as f:
            f.truncate(args.size)
        log.info("created sparse image %s of %d bytes", image, args.size)
    config = BlockConfig(
        image=image,
        size=args.size,
        readonly=args.readonly,
        serial=args.serial,
        queues=args.queues,
    )
    device = BlockDevice(config)
    log.info(
        "virtio-blk: %s, %d sectors (%d bytes)%s, %d queue(s), serial %r",
        device.path,
        device.capacity,
        device.capacity * 512,
        ", read-only" if config.readonly else "",
        config.queues,
        config.serial,
    )
    return device


def _mac(text: str) -> bytes:
    try:
        return parse_mac(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tap_name(text: str) -> str:
    try:
        return check_tap_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _make_net(args: argparse.Namespace) -> VirtioDevice:
    mac: bytes = args.mac if args.mac is not None else default_mac(args.socket)
    if args.qmp_nic is not None and args.qmp is None:
        raise ValueError("--qmp-nic needs --qmp")
    config = NetDeviceConfig(mac=mac, mtu=args.mtu, pcap=args.pcap, queues=args.queues,
                             qmp=args.qmp, qmp_nic=args.qmp_nic)
    backend: FrameBackend | OffloadBackend | None = None
    if args.switch is not None and args.tap is not None:
        backend = UplinkedSwitchPort.open(args.switch, args.tap)
    elif args.switch is not None:
        backend = SwitchPort(args.switch)
    elif args.tap is not None:
        backend = TapBackend(args.tap)
    try:
        device = NetDevice(config, backend)
    except OSError:
        if backend is not None:
            backend.close()
        raise
    log.info(
        "virtio-net: MAC %s, MTU %d, %d queue pair(s), %s%s", format_mac(mac), config.mtu,
        config.queues,
        f"switch {args.switch!r}" + (f", uplink tap {args.tap!r}" if args.tap else "")
        if args.switch
        else f"tap {args.tap!r} with offloads" if args.tap
        else "no switch (frames are discarded)",
        f", capturing to {args.pcap}" if args.pcap else "",
    )
    return device


def _make_rng(args: argparse.Namespace) -> VirtioDevice:
    log.info("virtio-rng: entropy from getrandom()")
    return RngDevice()


_FACTORIES: dict[str, Callable[[argparse.Namespace], VirtioDevice]] = {
    "blk": _make_blk,
    "net": _make_net,
    "rng": _make_rng,
}


def _fail(command: str, message: str, status: int = 1) -> int:
    """Print ``pyvirtio COMMAND: message`` on stderr; return ``status``."""
    print(f"pyvirtio {command}: {message}", file=sys.stderr)
    return status


def _link(args: argparse.Namespace) -> int:
    command = "link" if args.state is None else f"link {args.state}"
    try:
        answer = send_control(control_path(args.socket), command)
    except OSError as exc:
        return _fail("link", f"no daemon at {control_path(args.socket)}: {exc}")
    if not answer.startswith("link"):
        return _fail("link", answer.removeprefix("error: "))
    print(answer)
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        answer = send_control(control_path(args.socket), "stats")
        snapshot = json.loads(answer)
    except (OSError, ValueError) as exc:
        return _fail("stats", f"no daemon answering at {control_path(args.socket)}: {exc}")
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print("\n".join(render_stats(snapshot)))
    return 0


def render_stats(snapshot: dict[str, Any]) -> list[str]:
    """``pyvirtio stats`` for people: this connection, the last one, the totals.

    Each queue's line is the one ``SIGUSR1`` and a disconnect log.
    """

    def queues(title: str, entries: list[dict[str, Any]]) -> list[str]:
        return [title, *(f"  queue {q['queue']}: {QueueStats.from_json(q)}" for q in entries)]

    count, up = snapshot["connections"], f"daemon up {snapshot['uptime_seconds']:.1f} s"
    current = snapshot["queues"]
    if snapshot["connected"]:
        lines = [f"{snapshot['socket']}: connected (connection #{count}, "
                 f"{snapshot['connected_seconds']:.1f} s so far; {up})",
                 *queues("this connection:", current)]
    else:
        lines = [f"{snapshot['socket']}: no front-end connected ({count} connection"
                 f"{'' if count == 1 else 's'} so far; {up})"]
        if any(QueueStats.from_json(q) != QueueStats() for q in current):
            lines += queues("since the last connection ended:", current)
    last = snapshot["last_connection"]
    if last is not None:
        lines += queues(f"last connection (#{last['connection']}, {last['seconds']:.1f} s, "
                        f"{last['ended']}):", last["queues"])
    return lines + queues("since the daemon started:", snapshot["totals"])


#: What the front-end made of a resize (the daemon's ``notified``), for people.
_NOTIFIED = {
    "acked": "the front-end acknowledged the config change",
    "sent": "config change sent to the front-end (it does not acknowledge)",
    "failed": "the front-end refused the config change notification",
    "no answer": "the front-end went away before it acknowledged the config change",
    "no front-end": "no front-end connected: the next one reads the new capacity",
    "no channel": "the front-end set up no back-end request channel: the guest sees the "
    "new capacity only when its driver re-reads the config",
}


def _resize(args: argparse.Namespace) -> int:
    try:
        answer = send_control(control_path(args.socket), f"resize {args.size}", timeout=10.0)
        result = json.loads(answer)
    except (OSError, ValueError) as exc:
        return _fail("resize", f"no daemon answering at {control_path(args.socket)}: {exc}")
    notified = str(result.get("notified"))
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("ok"):
        print(f"{args.socket}: {result['previous_size']} -> {result['size']} bytes "
              f"({result['sectors']} sectors); {_NOTIFIED.get(notified, notified)}")
    if not result.get("ok"):
        return _fail("resize", str(result.get("error", answer)))
    if notified in ("failed", "no answer"):
        return _fail("resize", f"the disk grew, but {_NOTIFIED[notified]}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    try:
        report = probe(args.socket, args.device)
    except PyVirtioError as exc:
        return _fail("probe", str(exc))
    for warning in report.warnings:
        print(f"pyvirtio probe: warning: {warning}", file=sys.stderr)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        config = BenchConfig(
            rw=args.rw, bs=args.bs, iodepth=args.iodepth, queues=args.queues,
            seconds=args.time, verify=args.verify, span=args.span, rwmixread=args.rwmixread,
            packed=args.packed,
        )
        result = run_bench(args.socket, config, None if args.quiet else sys.stderr)
    except (PyVirtioError, ValueError) as exc:
        return _fail("bench", str(exc))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(
            f"{result.rw} bs={result.bs} iodepth={result.iodepth} queues={result.queues}"
            f"{' packed' if result.packed else ''}: "
            f"{result.iops:,.0f} IOPS, {result.mb_per_s:.1f} MB/s, latency mean "
            f"{result.lat_mean_us:.1f} us p50 {result.lat_p50_us:.1f} us "
            f"p99 {result.lat_p99_us:.1f} us; {result.ios} I/Os in {result.seconds:.1f} s, "
            f"load generator {result.frontend_cpu_per_io_us:.1f} us CPU per I/O"
        )
        if result.verify:
            print(f"verify: {result.verified_blocks} blocks read back, "
                  f"{result.failure_count} failures")
        for failure in result.verify_failures:
            print(f"  {failure}")
    if result.errors:
        _fail("bench", f"{result.errors} requests failed")
    elif not result.ok:
        _fail("bench", f"verify found {result.failure_count} failures")
    return 0 if result.ok else 1


def _serve(args: argparse.Namespace) -> int:
    try:
        device = _FACTORIES[args.device](args)
    except (OSError, ValueError) as exc:
        return _fail("serve", str(exc), 2)
    server = Server(args.socket, device, strict=args.strict,
                    control_path=control_path(args.socket), link_commands=args.device == "net",
                    inband_notifications=args.inband_notifications,
                    packed_rings=not args.no_packed)
    try:
        server.listen()
    except OSError as exc:
        device.close()
        return _fail("serve", f"cannot listen on {args.socket}: {exc}", 2)
    server.install_signal_handlers()
    server.serve_forever()
    log.info("stopped")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "probe": _probe,
    "link": _link,
    "stats": _stats,
    "resize": _resize,
    "bench": _bench,
    "vm": vmcmd.main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` console script.

    Every error message starts ``pyvirtio COMMAND:`` (argparse's own:
    ``pyvirtio COMMAND [DEVICE]: error:``); a failure pyvirtio foresaw never
    ends in a traceback.
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _COMMANDS[args.command](args)
    except (PyVirtioError, OSError) as exc:  # one a command did not expect to meet
        return _fail(args.command, str(exc))
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
