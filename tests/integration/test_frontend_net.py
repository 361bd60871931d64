"""pyvirtio's virtio-net driver against two ``pyvirtio serve net`` daemons on one switch.

Real processes, real sockets, real shared memory: port A sends, port B's
driver sets its receive filter through the control queue (VIRTIO 1.4
§5.1.9.5) and sees only the frames it asked for.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.errors import NetDriverError
from pyvirtio.frontend.net import NetDriver
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.net import CtrlRx, NetFeature

MAC_A = bytes.fromhex("02000ad90001")
MAC_B = bytes.fromhex("02000ad90002")
OTHER = bytes.fromhex("02000ad90099")
NEW_B = bytes.fromhex("02000ad900b2")
GROUP = bytes.fromhex("01005e000042")


def ether(dst: bytes, vlan: int | None = None, tag: bytes = b"") -> bytes:
    vlan_tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + MAC_A + vlan_tag + b"\x88\xb5" + tag.ljust(46, b".")


class Ports:
    def __init__(self, a: NetDriver, b: NetDriver) -> None:
        self.a, self.b = a, b

    def delivered(self, frames: list[bytes]) -> list[bytes]:
        """Send ``frames`` from A; return those B received (a marker frame ends the wait)."""
        self.b.receive(0.05)  # nothing left over
        marker = ether(b"\xff" * 6, tag=secrets.token_bytes(8))
        for frame in [*frames, marker]:
            self.a.send(frame)
        got: list[bytes] = []
        for _ in range(50):
            got += self.b.receive(0.2)
            if marker in got:
                break
        assert marker in got, "the broadcast marker frame never arrived"
        return [f for f in got if f != marker]


@pytest.fixture
def ports(tmp_path: Path) -> Iterator[Ports]:
    switch = f"itest-{os.getpid()}-{secrets.token_hex(3)}"
    daemons = [BackendProcess("net", tmp_path / f"{name}.sock",
                              ["--switch", switch, "--mac", mac.hex(":")])
               for name, mac in (("a", MAC_A), ("b", MAC_B))]
    drivers = [NetDriver.open(d.socket_path) for d in daemons]
    try:
        yield Ports(*drivers)
    finally:
        for driver in drivers:
            driver.close()
        for daemon in daemons:
            assert daemon.stop() == 0
            assert "Traceback" not in daemon.log, daemon.log


def test_driver_negotiates_the_control_queue(ports: Ports) -> None:
    for bit in (NetFeature.CTRL_VQ, NetFeature.CTRL_RX, NetFeature.CTRL_RX_EXTRA,
                NetFeature.CTRL_VLAN, NetFeature.CTRL_MAC_ADDR):
        assert ports.b.has_feature(bit), bit
    assert ports.b.ctrl is not None and ports.b.ctrl.index == 2  # §5.1.2: 2N, N = 1


def test_receive_modes_mac_table_and_vlans_decide_what_port_b_receives(ports: Ports) -> None:
    b = ports.b
    # After reset the device is promiscuous (as QEMU's): everything arrives.
    assert ports.delivered([ether(OTHER), ether(GROUP)]) == [ether(OTHER), ether(GROUP)]
    b.set_rx_mode(CtrlRx.PROMISC, False)
    assert ports.delivered([ether(OTHER), ether(MAC_B), ether(GROUP)]) == [ether(MAC_B)]
    b.set_mac_table([OTHER], [GROUP])
    assert ports.delivered([ether(OTHER), ether(GROUP)]) == [ether(OTHER), ether(GROUP)]
    b.set_rx_mode(CtrlRx.NOMULTI, True)
    assert ports.delivered([ether(GROUP)]) == []
    b.set_rx_mode(CtrlRx.NOMULTI, False)
    b.vlan(5)
    assert ports.delivered([ether(MAC_B, vlan=5), ether(MAC_B, vlan=7)]) == [
        ether(MAC_B, vlan=5)]
    b.set_mac(NEW_B)
    assert ports.delivered([ether(MAC_B), ether(NEW_B)]) == [ether(NEW_B)]
    b.set_rx_mode(CtrlRx.PROMISC, True)
    assert len(ports.delivered([ether(MAC_B), ether(MAC_B, vlan=7)])) == 2


def test_a_command_the_device_refuses_is_answered_err(ports: Ports) -> None:
    with pytest.raises(NetDriverError, match="VIRTIO_NET_ERR"):
        ports.b.vlan(5000)
    with pytest.raises(NetDriverError, match="VIRTIO_NET_ERR"):
        ports.b.set_queue_pairs(2)  # MQ not negotiated
    ports.b.set_rx_mode(CtrlRx.ALLMULTI, True)  # the queue still works


def test_probe_names_the_net_features(tmp_path: Path) -> None:
    daemon = BackendProcess("net", tmp_path / "p.sock", ["--queues", "2"])
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pyvirtio.cli", "probe", "--device", "net",
             str(daemon.socket_path), "--json"],
            capture_output=True, text=True, timeout=30, check=True).stdout
    finally:
        assert daemon.stop() == 0
    report = json.loads(out)
    for name in ("CTRL_VQ", "CTRL_RX", "CTRL_VLAN", "GUEST_ANNOUNCE", "MQ", "MRG_RXBUF"):
        assert name in report["feature_names"], report
    assert report["config"]["max_virtqueue_pairs"] == 2
