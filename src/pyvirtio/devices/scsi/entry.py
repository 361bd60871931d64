"""virtio-scsi's entry in the device registry: ``pyvirtio serve scsi``, ``pyvirtio scsi``.

QEMU: ``-chardev socket,id=c0,path=SOCK -device vhost-user-scsi-pci,chardev=c0``
(QEMU supplies the config space itself); user-mode Linux:
``virtio_uml.device=SOCK:8``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pyvirtio.client import ask, command_failed
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import ClientCommand, DeviceType, ServeOptions, positive_int
from pyvirtio.devices.scsi.device import ScsiDevice, ScsiOptions
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.scsi import CONFIG, ScsiConfig, ScsiFeature

__all__ = ["SCSI_COMMAND", "SCSI_TYPE", "decode_config"]

#: The daemon's start-up lines (the logger ``pyvirtio serve`` always used for them).
log = logging.getLogger("pyvirtio")


def decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_scsi_config`` (VIRTIO 1.4 §5.6.4), for ``pyvirtio probe``."""
    config = ScsiConfig.unpack(raw)
    return {name: getattr(config, name) for name in (
        "num_queues", "seg_max", "max_sectors", "cmd_per_lun", "event_info_size",
        "sense_size", "cdb_size", "max_channel", "max_target", "max_lun")}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", type=Path, action="append", default=[], metavar="FILE",
                        help="a raw disk image, LUN 0, 1... in order (repeat for more)")
    parser.add_argument("--cdrom", type=Path, metavar="ISO",
                        help="an ISO image on a CD-ROM, the LUN after the disks")
    parser.add_argument("--readonly", action="store_true",
                        help="every disk is read-only (writes get WRITE PROTECTED)")
    parser.add_argument("--queues", type=positive_int, default=1,
                        help="request queues (QEMU: num_queues=N; default 1)")
    parser.add_argument("--workers", type=positive_int, default=4,
                        help="I/O threads per LUN (default 4)")
    parser.add_argument("--aio", choices=("threads", "sync"), default="threads",
                        help="threads: medium I/O in each LUN's threads (the default: "
                        "requests never wait on each other); sync: in the event loop, "
                        "one at a time (less CPU when the image is in the page cache)")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    options = ScsiOptions(disks=tuple(args.disk), cdrom=args.cdrom, readonly=args.readonly,
                          queues=args.queues, workers=args.workers, aio=args.aio)
    device = ScsiDevice(options)
    log.info("virtio-scsi: target 0 with %d LUN(s), %d request queue(s)", len(device.luns),
             options.queues)
    return device, ServeOptions()


def _scsi_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    add = verbs.add_parser("add-lun", help="add an image as a new LUN (the guest sees it)")
    add.add_argument("file", type=Path, help="the raw image (or ISO with --cdrom)")
    add.add_argument("--readonly", action="store_true", help="a read-only disk")
    add.add_argument("--cdrom", action="store_true", help="a CD-ROM with this ISO")
    remove = verbs.add_parser("remove-lun", help="remove LUN N (the guest sees it go)")
    remove.add_argument("lun", type=int, help="the LUN number")
    verbs.add_parser("list", help="list the LUNs")


def _scsi(args: argparse.Namespace) -> int:
    """``pyvirtio scsi SOCK add-lun FILE | remove-lun N | list``."""
    if args.verb == "add-lun":
        command = f"scsi add-lun {args.file.resolve()}"
        command += " ro" if args.readonly else ""
        command += " cdrom" if args.cdrom else ""
        if any(ch.isspace() for ch in str(args.file.resolve())):
            return command_failed("scsi", "the image's path must not contain white space")
    elif args.verb == "remove-lun":
        command = f"scsi remove-lun {args.lun}"
    else:
        command = "scsi list"
    try:
        result = ask(args.socket, command, timeout=15.0)
    except NoDaemon as exc:
        return command_failed("scsi", str(exc))
    if args.json:
        print(json.dumps(result, indent=2))
    if not result.get("ok"):
        if not args.json:
            return command_failed("scsi", str(result.get("error", json.dumps(result))))
        return 1
    if args.json:
        return 0
    told = "" if result.get("notified", True) else " (the driver did not negotiate HOTPLUG: " \
        "it sees the change at its next scan)"
    if args.verb == "add-lun":
        print(f"{args.socket}: LUN {result['lun']} added: {result['kind']} {result['path']}, "
              f"{result['size']} bytes{' read-only' if result['readonly'] else ''}{told}")
    elif args.verb == "remove-lun":
        print(f"{args.socket}: LUN {result['lun']} removed{told}")
    else:
        for lun in result["luns"]:
            print(f"LUN {lun['lun']}: {lun['kind']} {lun['path']}, {lun['size']} bytes"
                  f"{', read-only' if lun['readonly'] else ''}"
                  f"{', write cache on' if lun['write_cache'] and lun['kind'] == 'disk' else ''}")
    return 0


SCSI_COMMAND = ClientCommand(
    name="scsi",
    help="add or remove a LUN of a running scsi daemon, or list its LUNs",
    description="Talk to a running 'pyvirtio serve scsi' daemon: 'add-lun FILE' opens "
    "FILE as a new LUN (after the highest one) and 'remove-lun N' removes LUN N; the "
    "guest's driver hears of both on the event queue (VIRTIO_SCSI_T_TRANSPORT_RESET, "
    "RESCAN or REMOVED) and adds or removes the disk. 'list' shows the LUNs.",
    add_arguments=_scsi_arguments,
    run=_scsi,
)

SCSI_TYPE = DeviceType(
    name="scsi",
    summary="virtio-scsi: a SCSI target whose LUNs are disk images and an ISO",
    description="Serve a virtio-scsi host with one target: LUN n is the n-th --disk, then "
    "the --cdrom (QEMU: -device vhost-user-scsi-pci,chardev=...; user-mode Linux: "
    "virtio_uml.device=SOCK:8). 'pyvirtio scsi SOCK add-lun FILE' and 'remove-lun N' "
    "hot-plug LUNs.",
    device_id=DeviceId.SCSI,
    qemu_device="vhost-user-scsi-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=ScsiFeature,
    config_read=CONFIG.size,
    decode_config=decode_config,
    commands=(SCSI_COMMAND,),
)
"""virtio-scsi (:mod:`pyvirtio.devices.scsi.device`)."""
