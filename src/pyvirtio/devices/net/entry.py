"""virtio-net's entry in the device registry: ``pyvirtio serve net``, QEMU, ``probe``.

Apart from :mod:`pyvirtio.devices.net.device` because ``serve net`` chooses among back ends
(the switch, a tap, a tap uplink of the switch) that themselves import the model.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pyvirtio.devices.base import VirtioDevice
from pyvirtio.devices.net import (
    FrameBackend,
    NetDevice,
    NetDeviceConfig,
    OffloadBackend,
    default_mac,
    format_mac,
    parse_mac,
)
from pyvirtio.devices.net.switch import SwitchPort
from pyvirtio.devices.net.tap import TapBackend, check_tap_name
from pyvirtio.devices.net.uplink import UplinkedSwitchPort
from pyvirtio.devices.registry import DeviceType, ServeOptions, positive_int
from pyvirtio.spec.common import DeviceId
from pyvirtio.spec.net import CONFIG, CONFIG_SIZE, NetFeature, NetStatus

__all__ = ["NET_TYPE"]

#: The daemon's start-up lines (the logger ``pyvirtio serve`` always used for them).
log = logging.getLogger("pyvirtio")


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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mac", type=_mac, action="append",
                        help="MAC address (default: a stable, locally administered address "
                        "derived from the socket path); with several --socket, one --mac "
                        "per --socket in the same order, or none")
    parser.add_argument("--mtu", type=positive_int, default=1500, help="MTU (default 1500)")
    parser.add_argument("--switch", metavar="NAME",
                        help="join the learning switch NAME shared by every pyvirtio serve "
                        "net given the same name (default: no network; sent frames are "
                        "discarded)")
    parser.add_argument("--tap", metavar="NAME", type=_tap_name,
                        help="connect to the host tap interface NAME (created if missing; "
                        "needs CAP_NET_ADMIN); offers checksum and TCP segmentation "
                        "offloads. With --switch: connect the tap to the switch as its "
                        "uplink instead (the tap carries plain frames; one uplink per "
                        "switch)")
    parser.add_argument("--no-offloads", action="store_true",
                        help="on a switch port, offer no checksum or TCP segmentation "
                        "offload (by default they are offered, carried to ports of this "
                        "daemon whose guests negotiated them, and done in software for "
                        "any other receiver)")
    parser.add_argument("--queues", type=positive_int, default=1, metavar="N",
                        help="receive/transmit queue pairs (default 1; more offers "
                        "VIRTIO_NET_F_MQ; QEMU: -netdev vhost-user,...,queues=N "
                        "-device virtio-net-pci,...,mq=on)")
    parser.add_argument("--pcap", type=Path, metavar="FILE",
                        help="capture every frame sent and received (pcap, for tcpdump -r)")
    parser.add_argument("--qmp", type=Path, metavar="PATH",
                        help="QEMU's QMP socket (QEMU: -qmp unix:PATH,server=on,wait=off): "
                        "follow the guest's receive filter (promiscuous mode, MAC table, "
                        "VLANs), which QEMU's control queue keeps, and drop the frames it "
                        "excludes")
    parser.add_argument("--qmp-nic", metavar="ID",
                        help="with --qmp: the NIC's QEMU id (-device virtio-net-pci,id=ID); "
                        "default: the NIC with this daemon's MAC, or QEMU's only NIC")


def _port_mac(args: argparse.Namespace) -> bytes:
    """This port's MAC: its ``--mac`` (the n-th for the n-th ``--socket``), else derived.

    Raises:
        ValueError: several ``--socket`` and a ``--mac`` count that does not match.
    """
    index, ports = getattr(args, "port_index", 0), getattr(args, "ports", 1)
    macs: list[bytes] = ([args.mac] if isinstance(args.mac, bytes) else list(args.mac or ()))
    if not macs:
        return default_mac(args.socket)
    if ports == 1:
        return macs[-1]
    if len(macs) != ports:
        raise ValueError(f"{ports} --socket but {len(macs)} --mac: give one per --socket, "
                         "or none")
    if len(set(macs)) != len(macs):
        raise ValueError("the ports need different --mac addresses")
    return macs[index]


def _make(args: argparse.Namespace) -> tuple[VirtioDevice, ServeOptions]:
    mac = _port_mac(args)
    if args.qmp_nic is not None and args.qmp is None:
        raise ValueError("--qmp-nic needs --qmp")
    index, ports = getattr(args, "port_index", 0), getattr(args, "ports", 1)
    if ports > 1:
        if args.switch is None:
            raise ValueError("several --socket need --switch: they are ports of one switch")
        for option in ("pcap", "qmp"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option} serves one --socket")
    config = NetDeviceConfig(mac=mac, mtu=args.mtu, pcap=args.pcap, queues=args.queues,
                             qmp=args.qmp, qmp_nic=args.qmp_nic,
                             offloads=not args.no_offloads)
    backend: FrameBackend | OffloadBackend | None = None
    if args.switch is not None and args.tap is not None and index == 0:
        # With several ports, the first one's daemon side carries the uplink.
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
        f"switch {args.switch!r}" + (f", uplink tap {args.tap!r}" if args.tap and not index
                                     else "")
        + (", no offloads" if args.no_offloads else ", with offloads")
        if args.switch
        else f"tap {args.tap!r} with offloads" if args.tap
        else "no switch (frames are discarded)",
        f", capturing to {args.pcap}" if args.pcap else "",
    )
    # ``pyvirtio link SOCKET down`` closes the vhost-user socket: QEMU's NIC loses its link.
    return device, ServeOptions(link_commands=True)


def _decode_config(raw: bytes) -> dict[str, int | bool | str]:
    """``struct virtio_net_config`` (VIRTIO 1.4 §5.1.4), the fields pyvirtio fills in."""
    mac, status, pairs, mtu, *_ = CONFIG.unpack(raw)
    return {
        "mac": format_mac(mac),
        "link_up": bool(status & NetStatus.LINK_UP),
        "announce": bool(status & NetStatus.ANNOUNCE),
        "max_virtqueue_pairs": pairs,
        "mtu": mtu,
    }


NET_TYPE = DeviceType(
    name="net",
    summary="virtio-net port, optionally on a pyvirtio switch or a host tap",
    description="Serve a virtio-net device (QEMU: -netdev vhost-user,chardev=... "
    "-device virtio-net-pci,netdev=...).",
    device_id=DeviceId.NET,
    qemu_device="virtio-net-pci",
    qemu_netdev=True,
    add_arguments=_add_arguments,
    factory=_make,
    feature_names=NetFeature,
    config_read=CONFIG_SIZE,
    decode_config=_decode_config,
)
"""virtio-net: a port on a switch, a tap or both (:mod:`pyvirtio.devices.net`)."""
