"""virtio-net end to end with a host tap as the back end (``pyvirtio serve net --tap``).

Everything runs in a network namespace made for the test: the daemon creates
its tap there (``ip netns exec``; its vhost-user socket is a file, so QEMU in
the root namespace still reaches it), the tap's host side gets 10.214.0.1/24,
the guest 10.214.0.2/24.  The namespace is always deleted afterwards; no
traffic leaves it and the guest's link.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import Daemon
from pyvirtio.spec.net import NetFeature

from .test_net import NET, net_args

TAP = "pvtap0"
HOST_IP = "10.214.0.1"
GUEST_IP = "10.214.0.2"
MAC = "02:00:0a:d6:00:02"
TRANSFER_MIB = 8

# The guest: show the virtio-net device's negotiated features, ping the host side, send
# a file to the host, then receive one from it (nc -l holds a fifo as stdin, so it exits
# when the host closes the connection, not when stdin ends).
GUEST = """
    ip link set eth0 up || exit 61
    ip addr add {guest}/24 dev eth0 || exit 62
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat $d/device)" = 0x0001 ] && echo RESULT features=$(cat $d/features)
    done
    n=0
    until ping -c 1 -W 1 {host} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 60 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
    echo RESULT ping="$(ping -c 5 -i 0.2 {host} | grep 'packets transmitted')"
    dd if=/dev/urandom of=/tmp/data bs=1048576 count={mib} 2>/dev/null
    echo RESULT sent_md5=$(md5sum /tmp/data | cut -d' ' -f1)
    n=0
    until nc {host} 5000 </tmp/data; do
        n=$((n + 1))
        [ $n -ge 30 ] && {{ echo RESULT nc=failed; exit 64; }}
        sleep 1
    done
    echo RESULT sent=yes
    rm /tmp/data
    mkfifo /tmp/hold
    exec 3<>/tmp/hold
    nc -l -p 5001 <&3 >/tmp/recv || echo RESULT nc=failed
    echo RESULT recv_bytes=$(wc -c < /tmp/recv)
    echo RESULT recv_md5=$(md5sum /tmp/recv | cut -d' ' -f1)
"""

# The host side, in the namespace: take the guest's file, then send one back.
HOST = """
import hashlib, os, socket, sys, time
host, guest, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
server = socket.create_server((host, 5000))
server.settimeout(300)
conn, _ = server.accept()
digest, size = hashlib.md5(), 0
while data := conn.recv(1 << 20):
    digest.update(data)
    size += len(data)
conn.close()
print(f"HOST recv_bytes={size}", flush=True)
print(f"HOST recv_md5={digest.hexdigest()}", flush=True)
payload = os.urandom(mib << 20)
print(f"HOST sent_md5={hashlib.md5(payload).hexdigest()}", flush=True)
deadline = time.monotonic() + 120
while True:
    try:
        out = socket.create_connection((guest, 5001), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
out.settimeout(300)
out.sendall(payload)
out.close()
print("HOST sent=yes", flush=True)
"""


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, always deleted afterwards."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    name = f"pyvirtio-test-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"ip netns add failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def _features(text: str) -> dict[str, bool]:
    """The guest's ``features`` string (one '0'/'1' per bit, bit 0 first) by name."""
    bits = (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4,
            NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN, NetFeature.HOST_TSO4,
            NetFeature.HOST_TSO6, NetFeature.HOST_ECN, NetFeature.MRG_RXBUF)
    return {bit.name: text[bit] == "1" for bit in bits}


def test_guest_on_a_tap_pings_the_host_and_moves_files_both_ways_with_offloads(
    kit: GuestKit, netns: str, tmp_path: Path
) -> None:
    """Checksum and TCP segmentation offloads are negotiated and used both ways."""
    socket_path = tmp_path / "tap.sock"
    daemon = Daemon(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "pyvirtio.cli", "serve", "net",
         "--socket", str(socket_path), "--tap", TAP, "--mac", MAC, "--log-level", "info"],
        socket_path, tmp_path / "tap.log",
    )
    host: subprocess.Popen[str] | None = None
    try:
        _run("ip", "netns", "exec", netns, "ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        _run("ip", "netns", "exec", netns, "ip", "link", "set", TAP, "up")
        host = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", HOST, HOST_IP, GUEST_IP,
             str(TRANSFER_MIB)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        started = time.monotonic()
        with kit.start(GUEST.format(guest=GUEST_IP, host=HOST_IP, mib=TRANSFER_MIB), NET,
                       net_args(socket_path, "n0", MAC, 1500)) as vm:
            result = vm.wait(timeout=300)
        elapsed = time.monotonic() - started
        host_out, _ = host.communicate(timeout=30)
        assert result.exit_code == 0, result.console
        assert host.returncode == 0, host_out
        guest = result.results
        features = _features(guest["features"])
        assert all(on for name, on in features.items() if name != "MRG_RXBUF"), features
        assert not features["MRG_RXBUF"], features  # GSO packets need one big buffer
        assert "5 packets transmitted, 5 packets received" in guest["ping"], guest
        host_results = dict(re.findall(r"HOST (\w+)=(\S+)", host_out))
        assert host_results["recv_bytes"] == str(TRANSFER_MIB << 20), host_out
        assert host_results["recv_md5"] == guest["sent_md5"]
        assert guest["recv_bytes"] == str(TRANSFER_MIB << 20), guest
        assert guest["recv_md5"] == host_results["sent_md5"]
        print(f"tap: ping and {TRANSFER_MIB} MiB each way over TCP in {elapsed:.1f} s")
    finally:
        if host is not None and host.poll() is None:
            host.kill()
            host.wait()
        status = daemon.stop()
    log = daemon.log
    assert status == 0, log
    assert "Traceback" not in log, log
    # QEMU's disconnect logged the counters: GSO packets went both ways, the tap took
    # the guest's frames, and nothing was malformed.
    assert re.search(r"queue 0: [^\n]*gso packets [1-9]", log), log
    assert re.search(r"queue 1: [^\n]*gso packets [1-9]", log), log
    assert re.search(r"queue 1: [^\n]*tap sent [1-9]", log), log
    assert "offloads to the guest 0xf" in log, log
    for bad in ("malformed header", "offload not negotiated", "oversized frame",
                "rx buffer too small", "bad frame size", "write error"):
        assert f"dropped: {bad}" not in log, log
