"""virtio-net end to end with a host tap as the back end (``pyvirtio serve net --tap``).

Everything runs in a network namespace made for the test: the daemon creates
its tap there (``ip netns exec``; its vhost-user socket is a file, so QEMU in
the root namespace still reaches it), the tap's host side gets 10.214.0.1/24,
the guest 10.214.0.2/24.  The namespace is always deleted afterwards; no
traffic leaves it and the guest's link.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.spec.net import NetFeature

from .guest_scripts import (
    FILE_SWAP_GUEST,
    check_file_swap,
    file_swap_host,
    serve_in_netns,
    tap_address,
)
from .test_net import NET, net_args

TAP = "pvtap0"
HOST_IP = "10.214.0.1"
GUEST_IP = "10.214.0.2"
MAC = "02:00:0a:d6:00:02"
TRANSFER_MIB = 8


def _features(text: str) -> dict[str, bool]:
    """The guest's ``features`` string (one '0'/'1' per bit, bit 0 first) by name."""
    bits = (NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4,
            NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN, NetFeature.HOST_TSO4,
            NetFeature.HOST_TSO6, NetFeature.HOST_ECN, NetFeature.MRG_RXBUF)
    return {bit.name: text[bit] == "1" for bit in bits}


def test_guest_on_a_tap_pings_the_host_and_moves_files_both_ways_with_offloads(
    kit: GuestKit, netns: str, tmp_path: Path
) -> None:
    """Checksum and TCP segmentation offloads are negotiated and used both ways; GSO
    packets reach the guest spread over mergeable receive buffers (MRG_RXBUF)."""
    socket_path = tmp_path / "tap.sock"
    daemon = serve_in_netns(netns, socket_path, tmp_path / "tap.log", "--tap", TAP,
                            "--mac", MAC)
    try:
        tap_address(netns, TAP, f"{HOST_IP}/24")
        started = time.monotonic()
        with (
            file_swap_host(netns, HOST_IP, GUEST_IP, TRANSFER_MIB) as host,
            kit.start(FILE_SWAP_GUEST.format(ip=GUEST_IP, peer=HOST_IP, payload=1472,
                                             mib=TRANSFER_MIB),
                      NET, net_args(socket_path, "n0", MAC, 1500)) as vm,
        ):
            result = vm.wait(timeout=300)
            host_out, _ = host.communicate(timeout=30)
        elapsed = time.monotonic() - started
        assert result.exit_code == 0, result.console
        assert host.returncode == 0, host_out
        guest = result.results
        features = _features(guest["features"])
        assert all(features.values()), features  # the offloads, and MRG_RXBUF with them
        assert guest["rx_length_errors"] == "0", guest  # merged buffers all arrived together
        assert "5 packets transmitted, 5 packets received" in guest["ping"], guest
        check_file_swap(guest, host_out, TRANSFER_MIB)
        print(f"tap: ping and {TRANSFER_MIB} MiB each way over TCP in {elapsed:.1f} s")
    finally:
        status = daemon.stop()
    log = daemon.log
    assert status == 0, log
    assert "Traceback" not in log, log
    # QEMU's disconnect logged the counters: GSO packets went both ways, those to the
    # guest over several receive buffers, the tap took the guest's frames, and nothing
    # was malformed.
    assert re.search(r"queue 0: [^\n]*gso packets [1-9]", log), log
    assert re.search(r"queue 0: [^\n]*merged frames [1-9]", log), log
    # Packets read by the tap straight into the guest's receive buffers (one readv).
    assert re.search(r"queue 0: [^\n]*tap read in place [1-9]", log), log
    assert re.search(r"queue 1: [^\n]*gso packets [1-9]", log), log
    assert re.search(r"queue 1: [^\n]*tap sent [1-9]", log), log
    assert "offloads to the guest 0xf" in log, log
    for bad in ("malformed header", "offload not negotiated", "oversized frame",
                "rx buffer too small", "bad frame size", "write error", "rx ring too small",
                "rx driver violation"):
        assert f"dropped: {bad}" not in log, log
