"""``make demo`` end to end: the demo's own checks pass with a real guest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_make_demo_passes_every_check(tmp_path: Path) -> None:
    # Run where make demo runs, a folder of its own: the capture is kept in ./demo-out.
    run = subprocess.run([sys.executable, "-m", "pyvirtio.demo"], capture_output=True,
                         text=True, timeout=300, check=False, cwd=tmp_path)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "all checks passed" in out and "FAILED" not in out
    for section in ("virtio-blk", "virtio-rng", "virtio-net"):
        assert section in out
    assert "guest pings the NetDriver: 3 packets transmitted, 3 packets received" in out

    # The capture outlives the work folder, and the report says where it is.
    pcap = tmp_path / "demo-out" / "net.pcap"
    assert "capture kept in demo-out/net.pcap: " in out
    assert pcap.stat().st_size > 24  # a pcap header and frames
    assert pcap.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")  # pcap magic, little-endian

    # The net backend line counts both directions: the guest's pings and ARP go out.
    net = re.search(r"virtio-net.*?backend: (\d+) frames \((\d+) bytes\) to the guest, "
                    r"(\d+) frames \((\d+) bytes\) from the guest", out, re.DOTALL)
    assert net is not None, out
    to_guest, from_guest = int(net[1]), int(net[3])
    assert to_guest >= 4 and from_guest >= 4, out  # 3 echo replies + ARP each way
    assert int(net[4]) > 0

    # It ends by saying where the pyvirtio command is.
    assert f"the pyvirtio command: {Path(sys.executable).parent / 'pyvirtio'}" in out
    assert out.rstrip().splitlines()[-1].lstrip().startswith(("pipx install", "the pyvirtio"))
