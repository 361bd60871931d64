"""virtio-net receive filtering and guest announcements with a real Linux guest.

QEMU's virtio-net answers the guest's control queue itself for a vhost-user
back end; ``pyvirtio serve net --qmp`` follows the result over QMP and drops
the frames the guest did not ask for (VIRTIO 1.4 §5.1.9.5.1-3).  The test is
the guest's only peer: it joins the same pyvirtio switch with a port of its
own (a real switch socket) and sends it crafted frames, on a test-only subnet
(10.216.0.0/24) that exists only on this switch.

1. The guest brings eth0 up (Linux turns promiscuous mode off and sends its
   multicast list) and adds VLANs 5 and 9 (VLAN_ADD).  Frames for another
   MAC, for VLAN 7 and for a multicast group it did not join are dropped by
   the daemon and counted; its own, VLAN 5 and broadcast frames arrive.
2. A frame on VLAN 9 makes the guest turn promiscuous mode on; after QEMU's
   NIC_RX_FILTER_CHANGED the daemon lets the same frames through.
3. QMP ``announce-self`` (GUEST_ANNOUNCE, offered by the daemon): the guest
   sends gratuitous ARPs for its addresses.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pyvirtio.devices.net.switch import SwitchPort
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.guestkit.qmp import Qmp
from pyvirtio.spec.net import NetFeature

from .test_net import NET, net_args

Serve = Callable[..., BackendProcess]
MAC = "02:00:0a:d8:00:02"
GUEST_MAC = bytes.fromhex(MAC.replace(":", ""))
PEER_MAC = bytes.fromhex("02000ad80001")  # the test's own switch port
OTHER_MAC = bytes.fromhex("02000ad80099")  # nobody's
UNJOINED_GROUP = bytes.fromhex("01005e7f0099")  # an IPv4 multicast group nobody joined
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: the guest's stack ignores it
SENDS = 3

GUEST = """
    ip link set eth0 up || exit 61
    ip addr add 10.216.0.2/24 dev eth0 || exit 62
    for vid in 5 9; do
        ip link add link eth0 name eth0.$vid type vlan id $vid || exit 63
        ip link set eth0.$vid up || exit 64
    done
    ip addr add 10.216.5.2/24 dev eth0.5
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat $d/device)" = 0x0001 ] && echo RESULT features=$(cat $d/features)
    done
    echo RESULT ready=yes
    rx9() { cat /sys/class/net/eth0.9/statistics/rx_packets; }
    wait_rx9() {
        n=0
        until [ "$(rx9)" -ge $1 ]; do
            n=$((n + 1))
            [ $n -ge 1200 ] && { echo RESULT trigger=timeout; exit 65; }
            sleep 0.1
        done
    }
    wait_rx9 1
    ip link set eth0 promisc on || exit 66
    echo RESULT promisc=on
    wait_rx9 2
    echo RESULT done=yes
"""


def ether(dst: bytes, vlan: int | None = None) -> bytes:
    """A minimal frame from the test's port, optionally 802.1Q-tagged."""
    tag = b"\x81\x00" + vlan.to_bytes(2, "big") if vlan is not None else b""
    return dst + PEER_MAC + tag + ETHERTYPE + b"pyvirtio filter test".ljust(46, b".")


def send(port: SwitchPort, frames: list[bytes]) -> None:
    for frame in frames:
        for _ in range(SENDS):
            port.send(frame)
            time.sleep(0.01)


def counters(daemon: BackendProcess) -> tuple[int, Counter[str]]:
    """Receive queue 0's delivered frames and filtered counts (``pyvirtio stats``)."""
    queue0 = daemon.stats()["queues"][0]
    kinds = Counter({k: n for k, n in queue0["kinds"].items() if k.startswith("filtered: ")})
    return queue0["requests"], kinds


def wait_log(daemon: BackendProcess, pattern: str, after: int = 0, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, daemon.log[after:])):
        assert time.monotonic() < deadline, f"{pattern!r} not in the log:\n{daemon.log}"
        time.sleep(0.1)
    return found.group(0)


def gratuitous_arps(frames: list[bytes]) -> set[str]:
    """The IPv4 addresses the guest announced (ARP with sender IP == target IP)."""
    found = set()
    for frame in frames:
        offset = 16 if frame[12:14] == b"\x81\x00" else 12
        arp = frame[offset + 2 :]
        if frame[6:12] == GUEST_MAC and frame[offset : offset + 2] == b"\x08\x06" \
                and len(arp) >= 28 and arp[14:18] == arp[24:28]:
            found.add(".".join(str(b) for b in arp[14:18]))
    return found


def test_the_guests_receive_filter_drops_frames_at_the_daemon_and_announce_works(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    switch = f"e2e-filter-{os.getpid()}-{secrets.token_hex(3)}"
    qmp_daemon, qmp_test = tmp_path / "qmp-daemon.sock", tmp_path / "qmp-test.sock"
    daemon = serve("net", "--switch", switch, "--mac", MAC, "--qmp", str(qmp_daemon),
                   name="filter")
    port = SwitchPort(switch)
    qemu_args = [*net_args(daemon.socket_path, "n0", MAC, 1500),
                 "-qmp", f"unix:{qmp_daemon},server=on,wait=off",
                 "-qmp", f"unix:{qmp_test},server=on,wait=off"]
    modules = [*NET, "8021q"]
    try:
        with kit.start(GUEST, modules, qemu_args) as vm:
            vm.wait_for("RESULT ready=yes", timeout=120)
            console = vm.console
            features = re.search(r"RESULT features=([01]+)", console)
            assert features, console
            assert features.group(1)[NetFeature.GUEST_ANNOUNCE] == "1", features.group(1)
            assert features.group(1)[NetFeature.CTRL_VQ] == "1"
            # Linux's rx mode and VLANs reach QEMU, then the daemon.
            wait_log(daemon, r"receive filter of \S+: mac 02:00:0a:d8:00:02, modes normal, "
                     r"\d+ unicast and \d+ multicast addresses, vlans 0,5,9")

            unwanted = [ether(OTHER_MAC), ether(GUEST_MAC, vlan=7), ether(UNJOINED_GROUP)]
            wanted = [ether(GUEST_MAC), ether(GUEST_MAC, vlan=5), ether(BROADCAST)]
            delivered0, kinds0 = counters(daemon)
            send(port, unwanted + wanted)
            time.sleep(1)
            delivered1, kinds1 = counters(daemon)
            assert kinds1["filtered: unicast"] - kinds0["filtered: unicast"] == SENDS
            assert kinds1["filtered: vlan"] - kinds0["filtered: vlan"] == SENDS
            assert kinds1["filtered: multicast"] - kinds0["filtered: multicast"] == SENDS
            assert delivered1 - delivered0 >= len(wanted) * SENDS

            # Promiscuous mode on: the same unwanted frames now reach the guest.
            mark = len(daemon.log)
            port.send(ether(GUEST_MAC, vlan=9))
            vm.wait_for("RESULT promisc=on", timeout=60)
            wait_log(daemon, r"receive filter of \S+: mac \S+, modes promisc", after=mark)
            send(port, unwanted)
            time.sleep(1)
            delivered2, kinds2 = counters(daemon)
            assert kinds2 == kinds1, (kinds1, kinds2)
            assert delivered2 - delivered1 >= len(unwanted) * SENDS

            # GUEST_ANNOUNCE: QEMU sets VIRTIO_NET_S_ANNOUNCE, the guest announces itself.
            port.receive()
            with Qmp(qmp_test) as qmp:
                qmp.execute("announce-self", initial=50, max=550, rounds=3, step=100)
            announced: set[str] = set()
            deadline = time.monotonic() + 30
            while announced < {"10.216.0.2", "10.216.5.2"} and time.monotonic() < deadline:
                time.sleep(0.2)
                announced |= gratuitous_arps(port.receive())
            assert {"10.216.0.2", "10.216.5.2"} <= announced, announced

            port.send(ether(GUEST_MAC, vlan=9))
            result = vm.wait(timeout=60)
        assert result.exit_code == 0, result.console
        assert result.results["done"] == "yes"
    finally:
        port.close()
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log, daemon.log
    print(f"filtered before promisc: {dict(kinds1)}; delivered after: "
          f"{delivered2 - delivered1}; announced {sorted(announced)}")
