"""pyvirtio's devices under QEMU 10.0 (Debian bookworm-backports), a second QEMU front-end.

QEMU 10 is fetched once into the kit's cache (:func:`ensure_qemu_backports`) and runs
with its own modules.  One guest boot: a blk disk on split rings, one on packed rings
(``packed=on``) and the entropy device; the guest reads host data from both disks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

Serve = Callable[..., BackendProcess]
MiB = 1 << 20


def test_qemu10_guest_uses_blk_on_split_and_packed_rings_and_rng(
    kit10: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    data = {name: os.urandom(MiB) for name in ("split", "packed")}
    disks = {}
    for name, block in data.items():
        image = tmp_path / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
            f.write(block)
        disks[name] = serve("blk", "--image", str(image), "--serial", f"q10-{name}", name=name)
    rng = serve("rng")
    script = """
        for d in vda vdb; do
            echo RESULT $(cat /sys/block/$d/serial)=$(cat /sys/block/$d/size),$(cut -c35 /sys/block/$d/device/features),$(dd if=/dev/$d bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        done
        echo RESULT rng=$(cat /sys/class/misc/hw_random/rng_current),$(head -c 32 /dev/hwrng | wc -c)
    """
    args = [
        *vhost_user_device_args("blk", disks["split"].socket_path, "b0"),
        *vhost_user_device_args("blk", disks["packed"].socket_path, "b1", packed="on"),
        *vhost_user_device_args("rng", rng.socket_path, "r0"),
    ]
    result = kit10.run(script, ["virtio_blk", "virtio-rng"], args)
    assert result.exit_code == 0, result.console
    version = subprocess.run([str(kit10.qemu), "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version.startswith("QEMU emulator version 10."), version
    r = result.results
    for name, layout in (("split", "0"), ("packed", "1")):
        expected = f"{16 * MiB // 512},{layout},{hashlib.md5(data[name]).hexdigest()}"
        assert r[f"q10-{name}"] == expected, result.console
    assert r["rng"] == "virtio_rng.0,32", result.console
    for daemon in (*disks.values(), rng):
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log and "violation:" not in daemon.log, daemon.log
