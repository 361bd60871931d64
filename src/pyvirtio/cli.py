"""The ``pyvirtio`` command: argparse -> validated config -> run.

``pyvirtio serve <device> --socket PATH [options]`` serves one device over
vhost-user until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pyvirtio import __version__
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.blk import BlockConfig, BlockDevice
from pyvirtio.devices.rng import RngDevice
from pyvirtio.runtime import Server

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
        parents=[common],
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
        parents=[common],
        help="virtio-rng entropy source",
        description="Serve a virtio-rng device (QEMU: -device vhost-user-rng-pci).",
    )
    rng.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
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


def _make_rng(args: argparse.Namespace) -> VirtioDevice:
    log.info("virtio-rng: entropy from getrandom()")
    return RngDevice()


_FACTORIES: dict[str, Callable[[argparse.Namespace], VirtioDevice]] = {
    "blk": _make_blk,
    "rng": _make_rng,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` console script."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        device = _FACTORIES[args.device](args)
    except (OSError, ValueError) as exc:
        print(f"pyvirtio: {exc}", file=sys.stderr)
        return 2
    server = Server(args.socket, device)
    try:
        server.listen()
    except OSError as exc:
        device.close()
        print(f"pyvirtio: cannot listen on {args.socket}: {exc}", file=sys.stderr)
        return 2
    server.install_signal_handlers()
    server.serve_forever()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
