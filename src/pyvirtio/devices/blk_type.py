"""virtio-blk's entry in the device registry: ``pyvirtio serve blk``, QEMU, ``probe``.

Apart from :mod:`pyvirtio.devices.blk` because ``probe`` decodes the config space
with the driver side's :class:`~pyvirtio.frontend.blk.BlkInfo`, which the device
model has no reason to import.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pyvirtio.client import NOTIFIED, ask, command_failed
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.blk import AIO_MODES, DEFAULT_AIO_WORKERS, BlockConfig, BlockDevice
from pyvirtio.devices.registry import (
    ClientCommand,
    DeviceType,
    ServeOptions,
    parse_size,
    positive_int,
)
from pyvirtio.errors import NoDaemon
from pyvirtio.frontend.blk import BLK_CONFIG_READ, BlkInfo
from pyvirtio.spec.blk import BlkFeature
from pyvirtio.spec.common import DeviceId

__all__ = ["BLK_TYPE"]

#: The daemon's start-up lines (the logger ``pyvirtio serve`` always used for them).
log = logging.getLogger("pyvirtio")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        type=Path,
        help="raw image file (created sparse with --size if missing); "
        "default: a sparse image in a temporary folder, removed on exit",
    )
    parser.add_argument(
        "--size", type=parse_size, default=1 << 30,
        help="size of a new image (default 1G)",
    )
    parser.add_argument("--readonly", action="store_true", help="offer a read-only disk")
    parser.add_argument("--serial", default="pyvirtio",
                        help="disk serial (GET_ID), <= 20 bytes")
    parser.add_argument("--queues", type=positive_int, default=1,
                        help="request queues (default 1)")
    parser.add_argument(
        "--aio", choices=AIO_MODES, default="sync",
        help="how requests run: sync (default: in the event loop, one at a time; best "
        "on the page cache) or threads (worker threads, completing out of order; for "
        "--direct and slow storage)",
    )
    parser.add_argument(
        "--aio-workers", type=positive_int, default=DEFAULT_AIO_WORKERS,
        help=f"worker threads of --aio threads (default {DEFAULT_AIO_WORKERS})",
    )
    parser.add_argument(
        "--direct", action="store_true",
        help="open the image with O_DIRECT (bypass the host page cache); refused at "
        "start-up on a file system without direct I/O",
    )


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
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
        aio=args.aio,
        aio_workers=args.aio_workers,
        direct=args.direct,
    )
    device = BlockDevice(config)
    log.info(
        "virtio-blk: %s, %d sectors (%d bytes)%s, %d queue(s), serial %r, aio %s%s",
        device.path,
        device.capacity,
        device.capacity * 512,
        ", read-only" if config.readonly else "",
        config.queues,
        config.serial,
        config.aio,
        f" ({config.aio_workers} workers)" if config.aio == "threads" else "",
    )
    return device, ServeOptions()


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_blk_config`` (VIRTIO 1.4 §5.2.4): capacity, limits, queues."""
    return asdict(BlkInfo.decode(raw))


def _resize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("size", type=parse_size,
                        help="the new size: 2G, 1536M, 4096... (a multiple of 512 bytes)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def _resize(args: argparse.Namespace) -> int:
    """``pyvirtio resize SOCKET SIZE``: the daemon's ``resize`` control command."""
    try:
        result = ask(args.socket, f"resize {args.size}", timeout=10.0)
    except NoDaemon as exc:
        return command_failed("resize", str(exc))
    notified = str(result.get("notified"))
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("ok"):
        print(f"{args.socket}: {result['previous_size']} -> {result['size']} bytes "
              f"({result['sectors']} sectors); {NOTIFIED.get(notified, notified)}")
    if not result.get("ok"):
        return command_failed("resize", str(result.get("error", json.dumps(result))))
    if notified in ("failed", "no answer"):
        return command_failed("resize", f"the disk grew, but {NOTIFIED[notified]}")
    return 0


RESIZE_COMMAND = ClientCommand(
    name="resize",
    help="grow a running blk daemon's disk",
    description="Tell a running 'pyvirtio serve blk' daemon to grow its image file to SIZE "
    "and its capacity with it, and to tell the front-end (vhost-user "
    "CONFIG_CHANGE_MSG on the back-end request channel): the guest sees the new "
    "capacity without a reboot. Disks do not shrink; read-only ones do not change.",
    add_arguments=_resize_arguments,
    run=_resize,
)

BLK_TYPE = DeviceType(
    name="blk",
    summary="virtio-blk backed by a raw image file",
    description="Serve a virtio-blk disk (QEMU: -device vhost-user-blk-pci).",
    device_id=DeviceId.BLOCK,
    qemu_device="vhost-user-blk-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=BlkFeature,
    config_read=BLK_CONFIG_READ,
    decode_config=_decode_config,
    commands=(RESIZE_COMMAND,),
)
"""virtio-blk: a disk on a raw image file (:mod:`pyvirtio.devices.blk`)."""
