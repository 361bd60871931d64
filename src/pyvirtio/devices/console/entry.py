"""virtio-console's entry in the device registry: ``pyvirtio serve console``, QEMU, ``probe``.

QEMU has no vhost-user console of its own: QEMU 10's generic
``vhost-user-device-pci`` carries it (``virtio-id=3``, ``num_vqs`` = 2 x ports + 2,
``config_size=12``); user-mode Linux takes it as ``virtio_uml.device=SOCK:3``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pyvirtio.client import command_failed
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.console.client import attach_terminal, find_console
from pyvirtio.devices.console.device import RESIZE_ORDERS, ConsoleConfig, ConsoleDevice, PortSpec
from pyvirtio.devices.registry import ClientCommand, DeviceType, ServeOptions
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.console import CONFIG, ConsoleFeature

__all__ = ["CONSOLE_TYPE", "parse_port"]

#: The daemon's start-up lines (the logger ``pyvirtio serve`` always used for them).
log = logging.getLogger("pyvirtio")


def parse_port(text: str) -> PortSpec:
    """``NAME=PATH`` (an argparse ``type``)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"not NAME=PATH: {text!r}")
    try:
        return PortSpec(name, Path(path))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"0..65535: {value}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--console-socket", type=Path,
        help="port 0 (the guest's hvc0) on this Unix socket, which the daemon listens on "
        "(one client at a time; 'pyvirtio console SOCKET' attaches a terminal); default: "
        "the daemon's stdin and stdout",
    )
    parser.add_argument(
        "--port", type=parse_port, action="append", default=[], metavar="NAME=PATH",
        help="a named port (the guest's /sys/class/virtio-ports/*/name) bridged to the Unix "
        "socket PATH; repeat for more ports",
    )
    parser.add_argument("--cols", type=_size, default=80, help="console columns (default 80)")
    parser.add_argument("--rows", type=_size, default=25, help="console rows (default 25)")
    parser.add_argument(
        "--resize-order", choices=RESIZE_ORDERS, default="spec",
        help="field order of the RESIZE control message: spec (cols, rows: VIRTIO 1.4 "
        "§5.3.6.2 and current Linux, the default) or rows-first (what Linux kernels "
        "without the fix 'virtio_console: fix order of fields cols and rows' read)",
    )


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    config = ConsoleConfig(
        console_socket=args.console_socket, ports=tuple(args.port), cols=args.cols,
        rows=args.rows, resize_order=args.resize_order,
    )
    device = ConsoleDevice(config)
    log.info("virtio-console: console on %s, %d named port(s)%s, %dx%d, %d queues",
             config.console_socket or "stdin/stdout", len(config.ports),
             "".join(f", {p.name} on {p.path}" for p in config.ports),
             config.cols, config.rows, device.num_queues)
    return device, ServeOptions()


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_console_config`` (VIRTIO 1.4 §5.3.4)."""
    cols, rows, max_nr_ports, emerg_wr = CONFIG.unpack_from(raw.ljust(CONFIG.size, b"\0"))
    return {"cols": cols, "rows": rows, "max_nr_ports": max_nr_ports, "emerg_wr": emerg_wr}


def _console_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket or --console-socket")


def _console(args: argparse.Namespace) -> int:
    """``pyvirtio console SOCKET``: this terminal on the console (port 0)."""
    try:
        path, on_resize = find_console(args.socket)
        ended = attach_terminal(path, on_resize=on_resize)
    except (NoDaemon, OSError, ValueError) as exc:
        return command_failed("console", str(exc))
    print(f"\r\npyvirtio console: {ended}", file=sys.stderr)
    return 0


CONSOLE_COMMAND = ClientCommand(
    name="console",
    help="attach this terminal to a console daemon's console (port 0)",
    description="Attach this terminal to the console (port 0, the guest's hvc0) of a "
    "running 'pyvirtio serve console' daemon: raw mode, every key goes to the guest, "
    "Ctrl-] detaches. SOCKET is the daemon's --socket (the client asks its control "
    "socket where the console socket is, and sends it the terminal's size at start and "
    "on every SIGWINCH) or the --console-socket itself (then without resize).",
    add_arguments=_console_arguments,
    run=_console,
)

CONSOLE_TYPE = DeviceType(
    name="console",
    summary="virtio-console: the console and named ports on Unix sockets",
    description="Serve a virtio-console device with MULTIPORT: port 0 is the console "
    "(hvc0), each --port a named port; each is bridged to a Unix socket the daemon listens "
    "on (QEMU 10: -device vhost-user-device-pci,virtio-id=3,num_vqs=2*PORTS+2,"
    "config_size=12; user-mode Linux: virtio_uml.device=SOCKET:3).",
    device_id=DeviceId.CONSOLE,
    qemu_device="vhost-user-device-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=ConsoleFeature,
    config_read=CONFIG.size,
    decode_config=_decode_config,
    commands=(CONSOLE_COMMAND,),
)
"""virtio-console (:mod:`pyvirtio.devices.console.device`)."""
