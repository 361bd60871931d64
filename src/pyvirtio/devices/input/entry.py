"""virtio-input's entry in the device registry: ``pyvirtio serve input``, ``pyvirtio input``.

QEMU 10 attaches it as ``-chardev socket,id=c0,path=SOCK -device
vhost-user-input-pci,chardev=c0`` (QEMU 7.2 refuses vhost-user-input under TCG);
user-mode Linux as ``virtio_uml.device=SOCK:18``.
"""

from __future__ import annotations

import argparse
import logging

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.input import client
from pyvirtio.devices.input.caps import Kind, capabilities
from pyvirtio.devices.input.device import InputDevice
from pyvirtio.devices.registry import ClientCommand, DeviceType, ServeOptions
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.input import CONFIG_HEADER, CONFIG_SIZE

__all__ = ["INPUT_COMMAND", "INPUT_TYPE", "decode_config"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", type=Kind, choices=list(Kind), default=Kind.KEYBOARD,
                        help="what the device is (default keyboard)")
    parser.add_argument("--name", help="the name the guest sees (ID_NAME; default "
                        "'pyvirtio Keyboard' and so on)")
    parser.add_argument("--serial", default="", help="the serial number (ID_SERIAL; "
                        "default none)")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    caps = capabilities(args.kind, args.name, args.serial)
    logging.getLogger("pyvirtio").info(
        "virtio-input: %s %r, events %s", args.kind, caps.name,
        ", ".join(f"{type_:#x}:{len(codes)}" for type_, codes in sorted(caps.events.items())))
    return InputDevice(caps, args.kind), ServeOptions()


def decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_input_config``'s header (§5.8.4), for ``pyvirtio probe``."""
    select, subsel, size = CONFIG_HEADER.unpack_from(raw.ljust(CONFIG_SIZE, b"\0"))
    return {"select": select, "subsel": subsel, "size": size}


INPUT_COMMAND = ClientCommand(
    name="input",
    help="send keys, text, moves and clicks to an input daemon's guest",
    description="Send events to a running 'pyvirtio serve input' daemon, which gives them "
    "to the guest: --text types with a US layout, --key presses a key, --move moves a "
    "mouse, --abs puts a tablet's pointer somewhere (or touches a multitouch screen), "
    "--click clicks; the options act in the order given. --evdev forwards a host "
    "input device. Without options: the device's name, counters and LED state.",
    add_arguments=client.add_arguments,
    run=client.run,
)

INPUT_TYPE = DeviceType(
    name="input",
    summary="virtio-input: a keyboard, mouse, tablet or touch screen fed by 'pyvirtio input'",
    description="Serve a virtio input device (QEMU 10: -device vhost-user-input-pci,"
    "chardev=...; user-mode Linux: virtio_uml.device=SOCK:18). 'pyvirtio input SOCK "
    "--text hello' types in the guest; the LEDs the guest sets show in 'pyvirtio stats'.",
    device_id=DeviceId.INPUT,
    qemu_device="vhost-user-input-pci",
    add_arguments=_add_arguments,
    factory=_make,
    config_read=CONFIG_SIZE,
    decode_config=decode_config,
    commands=(INPUT_COMMAND,),
)
"""virtio-input's registry entry (:class:`InputDevice`)."""
