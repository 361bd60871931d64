"""Guest reboots and QEMU restarts against one running pyvirtio daemon."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

Serve = Callable[..., BackendProcess]
MiB = 1 << 20


def test_guest_reboot_keeps_both_devices_working(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    blk = serve("blk", "--image", str(image))
    rng = serve("rng")
    # First boot: no marker on the disk yet, so write data and a marker, then reboot.
    # Second boot: the marker is there, so verify the data and entropy, then power off.
    script = """
        marker=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 6)
        if [ "$marker" != "BOOTED" ]; then
            echo RESULT first_boot=yes
            dd if=/dev/urandom of=/dev/vda bs=65536 seek=8 count=16 conv=fsync 2>/dev/null
            dd if=/dev/vda bs=65536 skip=8 count=16 2>/dev/null | md5sum | cut -d' ' -f1 > /tmp/sum
            { printf BOOTED; cat /tmp/sum; } | dd of=/dev/vda conv=fsync 2>/dev/null
            dd if=/dev/hwrng bs=16 count=1 2>/dev/null > /dev/null || exit 41
            reboot -f
        fi
        echo RESULT second_boot=yes
        expected=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 38 | tail -c 32)
        actual=$(dd if=/dev/vda bs=65536 skip=8 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        echo RESULT expected=$expected
        echo RESULT actual=$actual
        echo RESULT rng=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
        echo RESULT rng_current=$(cat /sys/class/misc/hw_random/rng_current)
    """
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "b0"),
        *vhost_user_device_args("rng", rng.socket_path, "r0"),
    ]
    result = kit.run(script, ["virtio_blk", "virtio-rng"], args, reboot=True, timeout=180)
    assert result.exit_code == 0, result.console
    assert "RESULT first_boot=yes" in result.console
    assert result.results["second_boot"] == "yes"
    assert result.results["expected"] == result.results["actual"]
    assert len(result.results["rng"]) == 32
    assert result.results["rng_current"].startswith("virtio_rng")
    with open(image, "rb") as f:
        f.seek(8 * 65536)
        assert hashlib.md5(f.read(16 * 65536)).hexdigest() == result.results["actual"]
    # Each reboot stopped and restarted the rings over the same connection.
    assert "GET_VRING_BASE" not in blk.log or "protocol error" not in blk.log
    assert blk.stop() == 0 and rng.stop() == 0


def test_qemu_restart_against_the_same_running_backends(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    blk = serve("blk", "--size", "16M")  # the embedded default: a temporary sparse image
    rng = serve("rng")
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "b0"),
        *vhost_user_device_args("rng", rng.socket_path, "r0"),
    ]
    first = kit.run(
        """
        dd if=/dev/urandom of=/tmp/d bs=4096 count=64 2>/dev/null
        dd if=/tmp/d of=/dev/vda bs=4096 seek=100 conv=fsync 2>/dev/null || exit 51
        echo RESULT sum=$(md5sum /tmp/d | cut -d' ' -f1)
        dd if=/dev/hwrng bs=16 count=1 2>/dev/null >/dev/null || exit 52
        """,
        ["virtio_blk", "virtio-rng"],
        args,
    )
    assert first.exit_code == 0, first.console
    second = kit.run(
        """
        echo RESULT sum=$(dd if=/dev/vda bs=4096 skip=100 count=64 2>/dev/null | md5sum | cut -d' ' -f1)
        echo RESULT rng=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
        """,
        ["virtio_blk", "virtio-rng"],
        args,
    )
    assert second.exit_code == 0, second.console
    assert second.results["sum"] == first.results["sum"]
    assert len(second.results["rng"]) == 32
    for backend in (blk, rng):
        assert backend.process.poll() is None, backend.log  # still running
        assert "front-end connected (connection 2)" in backend.log
        assert backend.stop() == 0
