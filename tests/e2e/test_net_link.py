"""Link down and up from pyvirtio (`pyvirtio link SOCKET down|up`), seen by a Linux guest.

QEMU 7.2 answers virtio-net's config space (and its link status bit) itself, but it
marks the NIC's link down when the vhost-user socket goes away and up again when it
reconnects (chardev ``reconnect=``).  So ``link down`` closes the daemon's socket,
the guest sees carrier loss, and ``link up`` brings carrier and traffic back.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess

Serve = Callable[..., BackendProcess]
SUBNET = "10.213.2"
MAC_A = "02:00:0a:d5:02:01"
MAC_B = "02:00:0a:d5:02:02"

PEER = f"""
    ip link set eth0 up && ip addr add {SUBNET}.2/24 dev eth0 || exit 61
    sleep 120
"""

WATCHER = f"""
    ip link set eth0 up && ip addr add {SUBNET}.1/24 dev eth0 || exit 61
    n=0
    until ping -c 1 -W 1 {SUBNET}.2 >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -ge 90 ] && {{ echo RESULT error=unreachable; exit 62; }}
    done
    echo RESULT carrier_before=$(cat /sys/class/net/eth0/carrier)
    echo "LINK-TEST ready"
    n=0
    while [ "$(cat /sys/class/net/eth0/carrier)" = 1 ]; do
        sleep 0.2; n=$((n + 1)); [ $n -ge 300 ] && {{ echo RESULT error=stayed_up; exit 63; }}
    done
    echo RESULT carrier_down=$(cat /sys/class/net/eth0/carrier)
    ping -c 1 -W 1 {SUBNET}.2 >/dev/null 2>&1 && echo RESULT ping_while_down=answered
    echo "LINK-TEST down"
    n=0
    while [ "$(cat /sys/class/net/eth0/carrier)" != 1 ]; do
        sleep 0.2; n=$((n + 1)); [ $n -ge 300 ] && {{ echo RESULT error=stayed_down; exit 64; }}
    done
    echo RESULT carrier_up=$(cat /sys/class/net/eth0/carrier)
    n=0
    until ping -c 1 -W 1 {SUBNET}.2 >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -ge 60 ] && {{ echo RESULT error=no_traffic_after_up; exit 65; }}
    done
    echo RESULT ping_after_up=ok
"""


def _net(socket_path: Path, mac: str, *, reconnect: bool) -> list[str]:
    chardev = f"socket,id=n0,path={socket_path}" + (",reconnect=1" if reconnect else "")
    return [
        "-chardev", chardev,
        "-netdev", "vhost-user,id=n0n,chardev=n0",
        "-device", f"virtio-net-pci,netdev=n0n,vectors=0,mac={mac}",  # see test_net.py
    ]


def _link(socket_path: Path, *state: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "link", str(socket_path), *state],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_link_down_shows_as_carrier_loss_and_link_up_restores_traffic(
    kit: GuestKit, serve: Serve
) -> None:
    switch = f"e2e-link-{os.getpid()}-{secrets.token_hex(3)}"
    net_a = serve("net", "--switch", switch, "--mac", MAC_A, name="linka")
    net_b = serve("net", "--switch", switch, "--mac", MAC_B, name="linkb")
    assert _link(net_a.socket_path) == "link up"
    with (
        kit.start(PEER, ["virtio_net"], _net(net_b.socket_path, MAC_B, reconnect=False)),
        kit.start(WATCHER, ["virtio_net"],
                  _net(net_a.socket_path, MAC_A, reconnect=True)) as vm_a,
    ):
        vm_a.wait_for("LINK-TEST ready", timeout=180)
        assert _link(net_a.socket_path, "down") == "link down"
        assert not net_a.socket_path.exists()
        vm_a.wait_for("LINK-TEST down", timeout=90)
        assert _link(net_a.socket_path, "up") == "link up"
        result = vm_a.wait(timeout=120)
    r = result.results
    assert result.exit_code == 0, result.console
    assert r["carrier_before"] == "1"
    assert r["carrier_down"] == "0"
    assert "ping_while_down" not in r
    assert r["carrier_up"] == "1"
    assert r["ping_after_up"] == "ok"
    log = net_a.log
    assert "link down" in log and "link up" in log
    assert "front-end connected (connection 2)" in log, log  # QEMU came back
