"""virtio-net end to end: guests on a pyvirtio switch reach the host through a tap uplink.

Guest A's daemon (``serve net --switch S --tap pvup0``) runs in a network
namespace made for the test (``ip netns exec``), where it creates the tap and
connects it to switch S as the switch's uplink; the tap's host side gets
10.215.0.1/24.  Guest B's daemon is a plain port of S in the root namespace
(a switch is a folder of Unix sockets, which namespaces do not separate).
Guest A pings the host side and swaps files with it over TCP; guest B pings it
through A's daemon.  The namespace is always deleted afterwards; no traffic
leaves it and the guests' links.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess
from pyvirtio.spec.net import NetFeature

from .guest_scripts import (
    FILE_SWAP_GUEST,
    PING,
    check_file_swap,
    file_swap_host,
    serve_in_netns,
    tap_address,
)
from .test_net import NET, net_args

Serve = Callable[..., BackendProcess]
TAP = "pvup0"
HOST_IP = "10.215.0.1"
IP_A, IP_B = "10.215.0.2", "10.215.0.3"
MAC_A, MAC_B = "02:00:0a:d7:00:02", "02:00:0a:d7:00:03"
TRANSFER_MIB = 4
#: Full-size Ethernet frames of IPv4 TCP data at MTU 1500 (1448 bytes of payload each).
_SEGMENTS = (TRANSFER_MIB << 20) // 1448


def queue_kinds(log: str, queue: int) -> Counter[str]:
    """The largest count of each kind (``tap sent``, ``uplink flooded``...) logged for ``queue``."""
    kinds: Counter[str] = Counter()
    for listed in re.findall(rf"queue {queue}: [^\n(]*\(([^\n]*)\)$", log, re.MULTILINE):
        for item in listed.split(", "):
            name, _, count = item.rpartition(" ")
            kinds[name] = max(kinds[name], int(count))
    return kinds


def test_guests_on_a_switch_reach_the_host_through_its_tap_uplink(
    kit: GuestKit, netns: str, serve: Serve, tmp_path: Path
) -> None:
    """Ping and 4 MiB each way over TCP through the uplink; one uplink per switch."""
    switch = f"e2e-up-{os.getpid()}-{secrets.token_hex(3)}"
    socket_a = tmp_path / "a.sock"
    daemon_a = serve_in_netns(netns, socket_a, tmp_path / "a.log", "--switch", switch,
                              "--tap", TAP, "--mac", MAC_A)
    try:
        # A second uplink of the switch is refused before it makes a tap (in the namespace
        # all the same, so a tap made by mistake goes with it).
        second = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "pyvirtio.cli", "serve",
             "net", "--socket", str(tmp_path / "c.sock"), "--switch", switch, "--tap",
             "pvup1"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert second.returncode == 2, second.stderr
        assert f"switch {switch!r} already has a tap uplink" in second.stderr, second.stderr
        assert f"tap {TAP}" in second.stderr, second.stderr

        net_b = serve("net", "--switch", switch, "--mac", MAC_B, name="netb")
        tap_address(netns, TAP, f"{HOST_IP}/24")
        started = time.monotonic()
        with (
            file_swap_host(netns, HOST_IP, IP_A, TRANSFER_MIB) as host,
            kit.start(FILE_SWAP_GUEST.format(ip=IP_A, peer=HOST_IP, payload=1472,
                                             mib=TRANSFER_MIB),
                      NET, net_args(socket_a, "n0", MAC_A, 1500)) as vm_a,
            kit.start(PING.format(ip=IP_B, peer=HOST_IP, payload=1472), NET,
                      net_args(net_b.socket_path, "n0", MAC_B, 1500)) as vm_b,
        ):
            result_b = vm_b.wait(timeout=300)
            result_a = vm_a.wait(timeout=300)
            host_out, _ = host.communicate(timeout=30)
        elapsed = time.monotonic() - started
        assert result_a.exit_code == 0, result_a.console
        assert result_b.exit_code == 0, result_b.console
        assert host.returncode == 0, host_out
        a, b = result_a.results, result_b.results
        # The port offers offloads; what the guest sends with them reaches the tap as
        # plain frames, finished in software (checked below).
        assert a["features"][NetFeature.CSUM] == "1", a
        for guest in (a, b):  # through the uplink, with frames of the full MTU too
            assert "5 packets transmitted, 5 packets received" in guest["ping"], guest
            assert "3 packets transmitted, 3 packets received" in guest["full_ping"], guest
        check_file_swap(a, host_out, TRANSFER_MIB)
        print(f"uplink: pings, {TRANSFER_MIB} MiB each way over TCP in {elapsed:.1f} s")
        status_b = net_b.stop()
        assert status_b == 0 and "Traceback" not in net_b.log, net_b.log
    finally:
        status_a = daemon_a.stop()
    log = daemon_a.log
    assert status_a == 0, log
    assert "Traceback" not in log, log
    assert f"switch {switch}: uplink through tap {TAP}" in log, log
    # QEMU's disconnect logged the counters: the uplink's are on queue 1's line with the
    # guest port's.  TCP data crossed the tap both ways, and nothing of it was dropped.
    kinds = queue_kinds(log, 1)
    print("daemon A, queue 1:", dict(kinds))
    assert kinds["tap received"] >= _SEGMENTS and kinds["uplink sent"] >= _SEGMENTS, kinds
    assert kinds["tap sent"] >= _SEGMENTS and kinds["uplink received"] >= _SEGMENTS, kinds
    assert kinds["uplink flooded"] > 0 and kinds["switch sent"] > 0, kinds
    # The guest's GSO packets reach the uplink's port whole, which segments them for
    # the tap (the segments counted above as "tap sent").
    assert kinds["gso packets"] > 0, kinds
    assert kinds["uplink offloads done in software"] > 0, kinds
    assert not [kind for kind in kinds if kind.startswith(("uplink dropped", "tap dropped"))], \
        kinds
