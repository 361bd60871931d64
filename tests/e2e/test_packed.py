"""Packed virtqueues end to end: QEMU's ``packed=on`` and an unmodified Linux guest.

The guest negotiates VIRTIO_F_RING_PACKED (bit 34) with pyvirtio's daemons; the
same data checks as the split-ring tests then run over packed rings, and a guest
reboot stops and restarts them (``GET_VRING_BASE`` / ``SET_VRING_BASE`` with wrap
counters).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

from .guest_scripts import image_file, remount_check

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
BLK = ["virtio_blk"]

#: Print bit 34 (RING_PACKED) of each virtio device's negotiated features, by device ID
#: (``features`` is one 0/1 character per bit, bit 0 first).
FEATURE_BITS = """
    for dev in /sys/bus/virtio/devices/virtio*; do
        echo RESULT packed_$(cat $dev/device)=$(cut -c35 $dev/features)
    done
"""


def _image(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _clean(backend: BackendProcess) -> None:
    """The daemon stopped cleanly and saw no error and no driver violation."""
    assert backend.stop() == 0
    log = backend.log
    assert " ERROR " not in log, log
    assert not re.search(r"[1-9]\d* driver violations", log), log


def test_packed_blk_serves_host_data_and_guest_writes_while_rng_stays_split(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 32 * MiB)
    host_block = os.urandom(256 * 1024)
    with open(image, "r+b") as f:
        f.seek(2 * MiB)
        f.write(host_block)
    blk = serve("blk", "--image", str(image), "--serial", "packed-e2e")
    rng = serve("rng")
    script = FEATURE_BITS + """
        echo RESULT serial=$(cat /sys/block/vda/serial)
        echo RESULT host_md5=$(dd if=/dev/vda bs=65536 skip=32 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
        dd if=/dev/urandom of=/tmp/g bs=65536 count=64 2>/dev/null
        dd if=/tmp/g of=/dev/vda bs=65536 seek=128 conv=fsync 2>/dev/null || echo RESULT write=failed
        echo RESULT guest_md5=$(md5sum /tmp/g | cut -d' ' -f1)
        echo RESULT rng=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
    """
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "b0", packed="on"),
        *vhost_user_device_args("rng", rng.socket_path, "r0"),
    ]
    result = kit.run(script, [*BLK, "virtio-rng"], args)
    assert result.exit_code == 0, result.console
    assert result.results["packed_0x0002"] == "1"  # blk: packed ring negotiated
    assert result.results["packed_0x0004"] == "0"  # rng without packed=on: split ring
    assert result.results["serial"] == "packed-e2e"
    assert result.results["host_md5"] == _md5(host_block)
    assert "write" not in result.results
    with open(image, "rb") as f:
        f.seek(128 * 65536)
        assert _md5(f.read(64 * 65536)) == result.results["guest_md5"]
    assert len(result.results["rng"]) == 64
    _clean(blk)
    _clean(rng)
    assert re.search(r"flush [1-9]", blk.log), blk.log


def test_packed_blk_file_system_survives_remount_and_is_readable_on_host(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 64 * MiB)
    blk = serve("blk", "--image", str(image))
    script = FEATURE_BITS + remount_check(600, "packed rings")
    result = kit.run(
        script,
        [*BLK, "crc32c_generic", "ext4"],
        vhost_user_device_args("blk", blk.socket_path, "b0", packed="on"),
    )
    assert result.exit_code == 0, result.console
    assert result.results["packed_0x0002"] == "1"
    assert result.results["before"] == result.results["after"]
    assert result.results["hello"] == "packed rings"
    _clean(blk)
    data = image_file(image, "/data.bin")
    assert len(data) == 600 * 4096
    assert _md5(data) == result.results["after"]


def test_packed_rng_and_two_packed_blk_queues_with_two_vcpus(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 32 * MiB)
    blk = serve("blk", "--image", str(image), "--queues", "2")
    rng = serve("rng")
    script = FEATURE_BITS + """
        echo RESULT current=$(cat /sys/class/misc/hw_random/rng_current)
        echo RESULT a=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
        echo RESULT b=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
        for cpu in 0 1; do
            taskset -c $cpu dd if=/dev/urandom of=/tmp/d$cpu bs=65536 count=32 2>/dev/null
            taskset -c $cpu dd if=/tmp/d$cpu of=/dev/vda bs=65536 count=32 seek=$((cpu * 64)) conv=fsync 2>/dev/null || exit 31
        done
        echo 3 > /proc/sys/vm/drop_caches
        for cpu in 0 1; do
            a=$(md5sum /tmp/d$cpu | cut -d' ' -f1)
            b=$(taskset -c $cpu dd if=/dev/vda bs=65536 count=32 skip=$((cpu * 64)) 2>/dev/null | md5sum | cut -d' ' -f1)
            [ "$a" = "$b" ] && echo RESULT same$cpu=yes
        done
    """
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "b0", num_queues=2, packed="on"),
        *vhost_user_device_args("rng", rng.socket_path, "r0", packed="on"),
    ]
    result = kit.run(script, [*BLK, "virtio-rng"], args, smp=2)
    assert result.exit_code == 0, result.console
    assert result.results["packed_0x0002"] == "1"
    assert result.results["packed_0x0004"] == "1"
    assert result.results["current"].startswith("virtio_rng")
    a, b = result.results["a"], result.results["b"]
    assert len(a) == len(b) == 128 and a != b
    assert result.results["same0"] == result.results["same1"] == "yes"
    _clean(blk)
    _clean(rng)
    counts = {int(q): int(n) for q, n in re.findall(r"queue (\d+): (\d+) requests", blk.log)}
    assert counts.get(0, 0) > 0 and counts.get(1, 0) > 0, blk.log


def test_guest_reboot_with_packed_rings(kit: GuestKit, serve: Serve, tmp_path: Path) -> None:
    """The reboot stops the rings (GET_VRING_BASE returns positions and wrap counters) and
    the new guest starts fresh ones over the same connection."""
    image = _image(tmp_path, 16 * MiB)
    blk = serve("blk", "--image", str(image))
    rng = serve("rng")
    script = FEATURE_BITS + """
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
        echo 3 > /proc/sys/vm/drop_caches
        actual=$(dd if=/dev/vda bs=65536 skip=8 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        echo RESULT expected=$expected
        echo RESULT actual=$actual
        echo RESULT rng=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
    """
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "b0", packed="on"),
        *vhost_user_device_args("rng", rng.socket_path, "r0", packed="on"),
    ]
    result = kit.run(script, ["virtio_blk", "virtio-rng"], args, reboot=True, timeout=180)
    assert result.exit_code == 0, result.console
    assert "RESULT first_boot=yes" in result.console
    assert result.results["second_boot"] == "yes"
    assert result.results["packed_0x0002"] == result.results["packed_0x0004"] == "1"
    assert result.results["expected"] == result.results["actual"]
    assert len(result.results["rng"]) == 32
    with open(image, "rb") as f:
        f.seek(8 * 65536)
        assert _md5(f.read(16 * 65536)) == result.results["actual"]
    # Each boot's rings were stopped with both positions and wrap counters reported.
    stops = re.findall(r"queue 0 stopped at (0x[0-9a-f]{8})", blk.log)
    assert stops, blk.log
    _clean(blk)
    _clean(rng)
