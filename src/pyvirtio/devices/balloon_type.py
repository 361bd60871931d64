"""virtio-balloon's entry in the device registry: ``pyvirtio serve balloon``, QEMU, ``probe``.

Apart from :mod:`pyvirtio.devices.balloon`, as blk's entry is, to keep the model short.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pyvirtio.devices.balloon import BalloonDevice, BalloonOptions
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import DeviceType, ServeOptions, parse_size
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
)
"""virtio-balloon's registry entry (:class:`BalloonDevice`)."""
