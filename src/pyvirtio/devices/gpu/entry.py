"""virtio-gpu's entry in the device registry: ``pyvirtio serve gpu``, ``pyvirtio screenshot``.

QEMU attaches it as ``-chardev socket,id=g0,path=SOCK -device
vhost-user-gpu-pci,chardev=g0`` (QEMU 10 runs it under TCG; 7.2 wants KVM), with
``max_outputs=N`` for ``--outputs N``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from urllib.parse import quote

from pyvirtio.client import ask, command_failed
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.gpu.device import GpuConfig, GpuDevice
from pyvirtio.devices.gpu.resources import DEFAULT_MAX_MEMORY
from pyvirtio.devices.registry import (
    ClientCommand,
    DeviceType,
    ServeOptions,
    parse_size,
    positive_int,
)
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.gpu import CONFIG, GpuFeature

__all__ = ["GPU_TYPE", "SCREENSHOT_COMMAND"]

log = logging.getLogger("pyvirtio")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=positive_int, default=1280,
                        help="each output's preferred width, 16..4095 (default 1280)")
    parser.add_argument("--height", type=positive_int, default=800,
                        help="each output's preferred height, 16..4095 (default 800)")
    parser.add_argument("--outputs", type=positive_int, default=1,
                        help="scanouts, 1..16 (default 1; QEMU: max_outputs=N)")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="keep a PNG of output 0 in DIR every --record-every flushes")
    parser.add_argument("--record-every", type=positive_int, default=60, metavar="N",
                        help="flushes between two recorded frames (default 60)")
    parser.add_argument("--max-memory", type=parse_size, default=DEFAULT_MAX_MEMORY,
                        metavar="SIZE",
                        help="host memory all the guest's resources may take (default 256M)")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    config = GpuConfig(width=args.width, height=args.height, outputs=args.outputs,
                       record=args.record, record_every=args.record_every,
                       max_memory=args.max_memory)
    if config.record is not None:
        config.record.mkdir(parents=True, exist_ok=True)
    log.info("virtio-gpu: %d output(s) of %dx%d, %d MiB for resources%s", config.outputs,
             config.width, config.height, config.max_memory >> 20,
             f", a frame every {config.record_every} flushes into {config.record}"
             if config.record else "")
    return GpuDevice(config), ServeOptions()


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_gpu_config`` (VIRTIO 1.4 §5.7.4)."""
    events_read, events_clear, scanouts, capsets = CONFIG.unpack_from(
        raw.ljust(CONFIG.size, b"\0"))
    return {"events_read": events_read, "events_clear": events_clear,
            "num_scanouts": scanouts, "num_capsets": capsets}


def _screenshot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("output", type=Path, help="the PNG file to write")
    parser.add_argument("--scanout", type=int, default=0, help="which output (default 0)")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def _screenshot(args: argparse.Namespace) -> int:
    """``pyvirtio screenshot SOCKET OUT.png``: the daemon writes its copy of the scanout."""
    if args.scanout < 0:
        return command_failed("screenshot", f"--scanout {args.scanout}: 0 or more")
    path = quote(str(args.output.resolve()))
    try:
        result = ask(args.socket, f"screenshot {path} {args.scanout}", timeout=15.0)
    except NoDaemon as exc:
        return command_failed("screenshot", str(exc))
    if not result.get("ok"):
        return command_failed("screenshot", str(result.get("error", json.dumps(result))))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['path']}: scanout {result['scanout']}, {result['width']}x"
              f"{result['height']}, {result['bytes']} bytes")
    return 0


SCREENSHOT_COMMAND = ClientCommand(
    name="screenshot",
    help="write a PNG of what a gpu daemon's scanout shows",
    description="Ask a running 'pyvirtio serve gpu' daemon for a PNG of a scanout, from "
    "the daemon's own copy of the guest's screen (no QEMU needed). The daemon writes "
    "the file, so OUTPUT is a path on the daemon's host.",
    add_arguments=_screenshot_arguments,
    run=_screenshot,
)

GPU_TYPE = DeviceType(
    name="gpu",
    summary="virtio-gpu 2D: the guest's screen, shown in QEMU over vhost-user-gpu",
    description="Serve a virtio-gpu 2D device (resources, scanouts, cursor, EDID). QEMU 10: "
    "-chardev socket,id=g0,path=SOCKET -device vhost-user-gpu-pci,chardev=g0[,max_outputs=N];"
    " QEMU's display and QMP screendump show the guest's screen, and 'pyvirtio screenshot "
    "SOCKET OUT.png' writes the daemon's own copy.",
    device_id=DeviceId.GPU,
    qemu_device="vhost-user-gpu-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=GpuFeature,
    config_read=CONFIG.size,
    decode_config=_decode_config,
    commands=(SCREENSHOT_COMMAND,),
)
"""virtio-gpu (:mod:`pyvirtio.devices.gpu.device`)."""
