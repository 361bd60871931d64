"""virtio-balloon's entry in the device registry: ``pyvirtio serve balloon``, QEMU, ``probe``.

Apart from :mod:`pyvirtio.devices.balloon`, as blk's entry is, to keep the model short.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pyvirtio.client import NOTIFIED, ask, command_failed
from pyvirtio.devices.balloon import BalloonDevice, BalloonOptions
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import ClientCommand, DeviceType, ServeOptions, parse_size
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.balloon import CONFIG, CONFIG_SIZE, BalloonFeature
from pyvirtio.spec.common import DeviceId

__all__ = ["BALLOON_TYPE", "decode_config", "qemu10_args"]


def decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_balloon_config`` (§5.5.4), for ``pyvirtio probe``."""
    num_pages, actual, cmd_id, poison = CONFIG.unpack_from(raw.ljust(CONFIG_SIZE, b"\0"))
    return {"num_pages": num_pages, "actual": actual, "free_page_hint_cmd_id": cmd_id,
            "poison_val": poison}


def qemu10_args(socket_path: Path | str, ident: str, *, vq_size: int = 256) -> list[str]:
    """QEMU 10 arguments attaching ``pyvirtio serve balloon``: QEMU has no
    vhost-user balloon, so the generic ``vhost-user-device-pci`` with the
    balloon's ID, five queues and its 16-byte config space."""
    return ["-chardev", f"socket,id={ident},path={socket_path}",
            "-device", f"vhost-user-device-pci,chardev={ident},virtio-id=5,num_vqs=5,"
            f"vq_size={vq_size},config_size={CONFIG_SIZE}"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=parse_size, default=0,
                        help="the balloon size asked for at start (default 0)")
    parser.add_argument("--no-stats", action="store_true",
                        help="do not offer STATS_VQ (memory statistics)")
    parser.add_argument("--no-deflate-on-oom", action="store_true",
                        help="do not offer DEFLATE_ON_OOM (Linux then lowers MemTotal "
                        "as it inflates)")
    parser.add_argument("--no-free-page-hint", action="store_true",
                        help="do not offer FREE_PAGE_HINT")
    parser.add_argument("--no-page-reporting", action="store_true",
                        help="do not offer PAGE_REPORTING")
    parser.add_argument("--no-discard", action="store_true",
                        help="count the pages given back, but keep them (no MADV_REMOVE)")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    options = BalloonOptions(
        stats=not args.no_stats, deflate_on_oom=not args.no_deflate_on_oom,
        free_page_hint=not args.no_free_page_hint, page_reporting=not args.no_page_reporting,
        discard=not args.no_discard, target=args.target,
    )
    names = [f.name for f in BalloonFeature if options.features() >> f & 1]
    logging.getLogger("pyvirtio").info("virtio-balloon: features %s, target %d bytes%s",
                                       ", ".join(names) or "none", options.target,
                                       "" if options.discard else ", pages kept (--no-discard)")
    return BalloonDevice(options), ServeOptions()


def _balloon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("size", type=parse_size, nargs="?",
                        help="the new balloon size: 64M, 1G, 0... (default: only report)")
    parser.add_argument("--hint", action="store_true",
                        help="also start a round of free page hinting (FREE_PAGE_HINT)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


#: The memory statistics that count bytes (VIRTIO 1.4 §5.5.6.3.1).
_BYTE_STATS = frozenset({"swap_in", "swap_out", "memfree", "memtot", "avail", "caches"})


def _balloon(args: argparse.Namespace) -> int:
    """``pyvirtio balloon SOCKET [SIZE]``: the daemon's ``balloon`` control command."""
    command = "balloon" + ("" if args.size is None else f" {args.size}")
    command += " hint" if args.hint else ""
    try:
        result = ask(args.socket, command, timeout=15.0)
    except NoDaemon as exc:
        return command_failed("balloon", str(exc))
    if not result.get("ok"):
        return command_failed("balloon", str(result.get("error", json.dumps(result))))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mib = 1 << 20
    print(f"{args.socket}: balloon {result['actual_bytes'] / mib:.1f} MiB "
          f"(target {result['target_bytes'] / mib:.1f} MiB), "
          f"{result['released_bytes'] / mib:.1f} MiB released to the host ("
          + ", ".join(f"{k} {v / mib:.1f}" for k, v in result["released"].items()) + ")")
    if "notified" in result:
        notified = str(result["notified"])
        print(NOTIFIED.get(notified, notified).replace("capacity", "target"))
    stats = result["stats"]
    if stats:
        age = result["stats_age_seconds"]
        print(f"guest memory statistics ({age} s old):")
        for name, value in stats.items():
            unit = f"{value / mib:.1f} MiB" if name in _BYTE_STATS else str(value)
            print(f"  {name}: {unit}")
    else:
        print("no memory statistics from the guest (yet)")
    return 0


BALLOON_COMMAND = ClientCommand(
    name="balloon",
    help="set a balloon daemon's size; show it and the guest's memory statistics",
    description="Talk to a running 'pyvirtio serve balloon' daemon. With SIZE, ask the guest "
    "for a balloon of SIZE bytes (a config change: the guest gives that much memory back, "
    "0 returns it). Prints the balloon's actual size, the bytes released to the host and "
    "the guest's fresh memory statistics.",
    add_arguments=_balloon_arguments,
    run=_balloon,
)

BALLOON_TYPE = DeviceType(
    name="balloon",
    summary="virtio-balloon: guest memory given back to the host",
    description="Serve a traditional virtio memory balloon (QEMU 10: -device "
    "vhost-user-device-pci,virtio-id=5,num_vqs=5,config_size=16; user-mode Linux: "
    "virtio_uml.device=SOCK:5). 'pyvirtio balloon SOCK SIZE' sets its size.",
    device_id=DeviceId.BALLOON_TRADITIONAL,
    qemu_device="vhost-user-device-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=BalloonFeature,
    config_read=CONFIG_SIZE,
    decode_config=decode_config,
    commands=(BALLOON_COMMAND,),
)
"""virtio-balloon's registry entry (:class:`BalloonDevice`)."""
