"""Two user-mode Linux guests on two ports of ONE ``pyvirtio serve net`` daemon
(``--socket A --socket B --switch S``, issue #18): frames pass between the ports
inside the daemon.  One boot of each guest: ping both ways, then a 4 MiB file over
TCP with its md5 checked on the host, and the daemon's counters show that nothing
went through a socket."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path

from pyvirtio.client import ask
from pyvirtio.guestkit.assets import BUSYBOX_PATH
from pyvirtio.guestkit.backends import BackendProcess
from tests.e2e.test_uml import NET_MODULES, VIRTIO_NET, UmlGuest, uml  # noqa: F401

MACS = ("02:00:0a:e2:00:01", "02:00:0a:e2:00:02")


def test_two_uml_guests_on_two_ports_of_one_daemon_ping_and_move_a_file(
    uml: None, tmp_path: Path  # noqa: F811
) -> None:
    switch = f"ports-{os.getpid()}-{secrets.token_hex(3)}"
    sock_b = tmp_path / "b.sock"
    daemon = BackendProcess("net", tmp_path / "a.sock",
                            ["--socket", str(sock_b), "--switch", switch,
                             "--mac", MACS[0], "--mac", MACS[1]])
    payload = os.urandom(4 << 20)
    (tmp_path / "data").write_bytes(payload)
    busybox = BUSYBOX_PATH

    def script(me: str, peer: str, role: str) -> str:
        transfer = (
            # The receiver: nc's stdin is a fifo it holds open, so nc exits when the
            # sender closes its side, not on its own stdin's end.
            f"""mkfifo {tmp_path}/hold-{me}; exec 3<>{tmp_path}/hold-{me}
            timeout 60 {busybox} nc -l -p 5000 <&3 >{tmp_path}/got || echo RESULT nc=failed
            echo RESULT got=$(md5sum {tmp_path}/got | cut -d' ' -f1)"""
            if role == "rx" else
            f"""sleep 1
            n=0
            until timeout 60 {busybox} nc 10.226.0.{peer} 5000 <{tmp_path}/data; do
                n=$((n + 1)); [ $n -ge 20 ] && {{ echo RESULT nc=failed; break; }}; sleep 0.5
            done""")
        return f"""
        dev=$(ls /sys/class/net | grep -v lo | head -n1)
        echo RESULT mac=$(cat /sys/class/net/$dev/address)
        ip addr add 10.226.0.{me}/24 dev $dev && ip link set $dev up
        for i in $(seq 30); do
            {busybox} ping -c 1 -W 1 10.226.0.{peer} >/dev/null 2>&1 && break
        done
        out=$({busybox} ping -c 3 -W 2 10.226.0.{peer} 2>&1)
        echo RESULT ping=$(echo "$out" | grep 'packets transmitted')
        {transfer}
        touch {tmp_path}/done-{me}
        for i in $(seq 300); do [ -e {tmp_path}/done-{peer} ] && break; sleep 0.1; done
        """

    try:
        deadline = time.monotonic() + 10
        while not sock_b.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        guests = [
            UmlGuest(tmp_path, "porta", script("1", "2", "rx"),
                     [f"{daemon.socket_path}:{VIRTIO_NET}"], NET_MODULES),
            UmlGuest(tmp_path, "portb", script("2", "1", "tx"),
                     [f"{sock_b}:{VIRTIO_NET}"], NET_MODULES),
        ]
        try:
            for guest in guests:
                guest.start()
            results = [guest.finish(150) for guest in guests]
            # Since the daemon started: the guests powered off, their connections ended.
            counts = [ask(path, "stats")["totals"] for path in (daemon.socket_path, sock_b)]
        finally:
            for guest in guests:
                guest.kill()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    for guest, r, mac in zip(guests, results, MACS, strict=True):
        assert "insmod_failed" not in r and "nc" not in r, guest.console
        assert r["mac"] == mac, guest.console
        assert re.search(r"3 packets transmitted, 3 packets received", r["ping"]), guest.console
    assert results[0]["got"] == hashlib.md5(payload).hexdigest(), guests[0].console
    # Every frame between the two went through the daemon's hub: none over a socket.
    # (A, the receiver, sends pings and ACKs: about 100, fewer with delayed ACKs.)  B's
    # guest hands its TCP data over in GSO packets (the port offers TSO), and A's takes
    # them as they are: fewer packets than 1514-byte frames, all the bytes.
    for queues in counts:
        kinds = queues[1]["kinds"]
        assert kinds.get("switch sent", 0) > 20, queues
        assert kinds.get("switch received", 0) > 0, queues
        assert not any("dropped" in k and "no rx buffer" not in k for k in kinds), queues
    assert counts[1][1]["bytes_from_guest"] > len(payload), counts[1]
    assert counts[1][1]["kinds"].get("gso packets", 0) > 0, counts[1]
    assert counts[0][0]["kinds"].get("gso packets", 0) > 0, counts[0]
    log = daemon.log
    assert "Traceback" not in log
    assert "joins 1 other port(s) of this process" in log
    print(f"two ports, one daemon: {len(payload)} bytes moved; A {counts[0][1]['kinds']}, "
          f"B {counts[1][1]['kinds']}")
