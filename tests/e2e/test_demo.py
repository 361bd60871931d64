"""``make demo`` end to end: the demo's own checks pass with a real guest."""

from __future__ import annotations

import subprocess
import sys


def test_make_demo_passes_every_check() -> None:
    run = subprocess.run([sys.executable, "-m", "pyvirtio.demo"], capture_output=True,
                         text=True, timeout=300, check=False)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "all checks passed" in out and "FAILED" not in out
    for section in ("virtio-blk", "virtio-rng", "virtio-net"):
        assert section in out
    assert "guest pings the NetDriver: 3 packets transmitted, 3 packets received" in out
