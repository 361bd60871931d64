"""virtio-vsock's entry in the device registry: ``pyvirtio serve vsock``, QEMU, ``probe``,
and ``pyvirtio vsock SOCKET`` (the connection table).

QEMU 7.2: ``-chardev socket,id=c0,path=SOCK -device vhost-user-vsock-pci,chardev=c0``
(``seqpacket=on`` needs VIRTIO_VSOCK_F_SEQPACKET, which the device offers); only
rx and tx reach the back-end, the event queue stays in QEMU.  User-mode Linux:
``virtio_uml.device=SOCK:19``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pyvirtio.client import ask, command_failed
from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.registry import ClientCommand, DeviceType, ServeOptions, parse_size
from pyvirtio.devices.vsock.device import DEFAULT_TX_BUFFER, VsockConfig, VsockDevice
from pyvirtio.errors import NoDaemon
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.vsock import CONFIG, VsockFeature

__all__ = ["VSOCK_COMMAND", "VSOCK_TYPE", "render_table"]

log = logging.getLogger("pyvirtio")


def _cid(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CID: {text!r}") from None
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest-cid", type=_cid, required=True,
                        help="the guest's context ID (3 or more; VIRTIO 1.4 §5.10.4)")
    parser.add_argument(
        "--uds-path", type=Path, required=True,
        help="host side: host programs connect here and write 'CONNECT PORT\\n' (answer "
        "'OK <host port>\\n'); a guest connecting to CID 2 port P reaches the Unix socket "
        "UDS_PATH_P")
    parser.add_argument(
        "--group", action="append", default=[], metavar="NAME",
        help="sibling VMs: daemons with the same group connect their guests to each other "
        "by CID (repeat for several groups)")
    parser.add_argument(
        "--tx-buffer-size", type=parse_size, default=DEFAULT_TX_BUFFER, metavar="N",
        help="credit published per connection: the most the daemon holds for a far side "
        f"that does not read (default {DEFAULT_TX_BUFFER // 1024}K)")


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    config = VsockConfig(guest_cid=args.guest_cid, uds_path=args.uds_path,
                         groups=tuple(args.group), tx_buffer_size=args.tx_buffer_size)
    device = VsockDevice(config)
    log.info("virtio-vsock: guest CID %d, host side on %s (guest to host port P: %s_P)%s",
             config.guest_cid, config.uds_path, config.uds_path,
             "".join(f", group {g}" for g in config.groups))
    return device, ServeOptions()


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_vsock_config`` (VIRTIO 1.4 §5.10.4)."""
    (guest_cid,) = CONFIG.unpack_from(raw.ljust(CONFIG.size, b"\0"))
    return {"guest_cid": guest_cid}


def _vsock_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("socket", type=Path, help="the daemon's --socket")
    parser.add_argument("--json", action="store_true", help="print JSON")


def render_table(result: dict[str, object]) -> list[str]:
    """The connection table for people."""
    conns = result["connections"]
    assert isinstance(conns, list)
    lines = [f"guest CID {result['guest_cid']}, host side {result['uds_path']}, "
             f"{len(conns)} connection{'' if len(conns) == 1 else 's'}"]
    if conns:
        lines.append(f"{'GUEST':<16} {'PEER':<16} {'TYPE':<9} {'BY':<7} {'STATE':<11} "
                     f"{'TO GUEST':>12} {'FROM GUEST':>12} {'HELD':>8}")
    for c in conns:
        lines.append(f"{c['guest']:<16} {c['peer']:<16} {c['type']:<9} {c['initiator']:<7} "
                     f"{c['state']:<11} {c['bytes_to_guest']:>12} {c['bytes_from_guest']:>12} "
                     f"{c['held_bytes']:>8}")
    return lines


def _vsock(args: argparse.Namespace) -> int:
    """``pyvirtio vsock SOCKET``: the daemon's connection table."""
    try:
        result = ask(args.socket, "connections")
    except NoDaemon as exc:
        return command_failed("vsock", str(exc))
    if not isinstance(result, dict) or not result.get("ok"):
        return command_failed("vsock", json.dumps(result))
    print(json.dumps(result, indent=2) if args.json else "\n".join(render_table(result)))
    return 0


VSOCK_COMMAND = ClientCommand(
    name="vsock",
    help="show a vsock daemon's connections (states, bytes each way)",
    description="Show the connection table of a running 'pyvirtio serve vsock' daemon: "
    "each connection's guest and peer addresses, type, who opened it, state and bytes "
    "each way.",
    add_arguments=_vsock_arguments,
    run=_vsock,
)

VSOCK_TYPE = DeviceType(
    name="vsock",
    summary="virtio-vsock: guest sockets to host Unix sockets and to sibling guests",
    description="Serve a virtio-vsock device, hybrid vsock over Unix sockets (as rust-vmm's "
    "vhost-device-vsock): guest to host port P goes to UDS_PATH_P, host programs connect to "
    "UDS_PATH and write 'CONNECT P'; daemons of one --group connect their guests by CID. "
    "STREAM and SEQPACKET. QEMU: -device vhost-user-vsock-pci,chardev=ID[,seqpacket=on]; "
    "user-mode Linux: virtio_uml.device=SOCKET:19.",
    device_id=DeviceId.VSOCK,
    qemu_device="vhost-user-vsock-pci",
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=VsockFeature,
    config_read=CONFIG.size,
    decode_config=_decode_config,
    commands=(VSOCK_COMMAND,),
)
