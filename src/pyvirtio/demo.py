"""``make demo``: a real Linux guest uses pyvirtio's virtio-blk and virtio-rng.

Starts ``pyvirtio serve blk`` and ``pyvirtio serve rng`` through the CLI,
boots a Debian kernel under QEMU with both devices attached over vhost-user,
makes a file system on the pyvirtio disk, writes files, remounts and reads them
back, draws entropy, then checks on the host what the guest did and prints a
short report.  Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvirtio.guestkit import GuestError, GuestKit
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

__all__ = ["main"]

MiB = 1 << 20

GUEST_SCRIPT = r"""
echo RESULT sectors=$(cat /sys/block/vda/size)
echo RESULT serial=$(cat /sys/block/vda/serial)
mke2fs -q -L pyvirtio /dev/vda >/dev/null || exit 10
mkdir -p /mnt
mount -t ext2 /dev/vda /mnt || exit 11
echo "written by a Linux guest through pyvirtio's virtio-blk" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=65536 count=64 2>/dev/null || exit 12
echo RESULT written=$(md5sum /mnt/random.bin | cut -d' ' -f1)
umount /mnt || exit 13
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 /dev/vda /mnt || exit 14
echo RESULT reread=$(md5sum /mnt/random.bin | cut -d' ' -f1)
echo RESULT hello="$(cat /mnt/hello.txt)"
echo RESULT files=$(ls /mnt | grep -v lost+found | tr '\n' ' ')
umount /mnt
echo RESULT rng_current=$(cat /sys/class/misc/hw_random/rng_current)
echo RESULT draw1=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
echo RESULT draw2=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
"""


def _stats(log: str) -> str:
    """The last statistics line the daemon logged for queue 0."""
    lines = re.findall(r"queue 0: (\d+ requests.*)", log)
    return lines[-1] if lines else "no statistics logged"


def _check(ok: bool, text: str, failures: list[str]) -> str:
    if not ok:
        failures.append(text)
    return f"{text} {'ok' if ok else 'FAILED'}"


def run_demo(workdir: Path, size: int) -> int:
    """Run the demo in ``workdir``; print the report; return the exit status."""
    kit = GuestKit.ensure()
    image = workdir / "demo.img"
    print(f"pyvirtio demo: Linux {kit.version} under QEMU (TCG) with pyvirtio devices")
    print(f"  work folder {workdir}")
    blk = BackendProcess(
        "blk", workdir / "blk.sock",
        ["--image", str(image), "--size", str(size), "--serial", "pyvirtio-demo"],
    )
    try:
        rng = BackendProcess("rng", workdir / "rng.sock")
    except GuestError:
        blk.stop()
        raise
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "blk0"),
        *vhost_user_device_args("rng", rng.socket_path, "rng0"),
    ]
    started = time.monotonic()
    try:
        result = kit.run(
            GUEST_SCRIPT, ["virtio_blk", "virtio-rng", "crc32c_generic", "ext4"], args,
            timeout=180,
        )
    finally:
        blk_status, rng_status = blk.stop(), rng.stop()
    elapsed = time.monotonic() - started
    r = result.results
    failures: list[str] = []
    if result.exit_code != 0:
        failures.append(f"guest script exited with {result.exit_code}")
    host_hello = subprocess.run(
        ["debugfs", "-R", "cat /hello.txt", str(image)], capture_output=True, text=True,
        check=False,
    ).stdout.strip()
    sectors = int(r.get("sectors", "0"))
    print(f"  guest ran for {elapsed:.1f} s\n")
    print("virtio-blk  (pyvirtio serve blk, QEMU vhost-user-blk-pci)")
    print(f"  /dev/vda: {sectors} sectors = {sectors * 512 // MiB} MiB, "
          f"serial {r.get('serial', '?')!r}")
    print("  " + _check(sectors * 512 == size, "capacity matches the image:", failures))
    print(f"  made an ext2 file system, wrote: {r.get('files', '?').strip()}")
    print("  " + _check(
        r.get("written") is not None and r.get("written") == r.get("reread"),
        f"4 MiB file reread after remount, md5 {r.get('reread', '?')}:", failures))
    print("  " + _check(
        host_hello == r.get("hello") and bool(host_hello),
        f"host reads /hello.txt off the image: {host_hello!r}", failures))
    print(f"  backend: {_stats(blk.log)}")
    print("\nvirtio-rng  (pyvirtio serve rng, QEMU vhost-user-rng-pci)")
    print(f"  guest hwrng: {r.get('rng_current', '?')}")
    draws = (r.get("draw1", ""), r.get("draw2", ""))
    print(f"  two draws of 16 bytes: {draws[0]} {draws[1]}")
    print("  " + _check(
        r.get("rng_current", "").startswith("virtio_rng")
        and len(draws[0]) == 32 and draws[0] != draws[1],
        "entropy comes from pyvirtio and differs between draws:", failures))
    print(f"  backend: {_stats(rng.log)}")
    print()
    print(_check(blk_status == 0 and rng_status == 0,
                 "both daemons stopped cleanly on SIGTERM:", failures))
    if failures:
        print(f"\n{len(failures)} check(s) failed; guest console:\n{result.console}")
        return 1
    print("\nall checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pyvirtio.demo``."""
    parser = argparse.ArgumentParser(prog="python -m pyvirtio.demo", description=__doc__)
    parser.add_argument("--keep", type=Path,
                        help="work in this folder and keep the image and logs")
    parser.add_argument("--size", type=int, default=256 * MiB, help="disk size in bytes")
    args = parser.parse_args(argv)
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return run_demo(args.keep, args.size)
        with tempfile.TemporaryDirectory(prefix="pyvirtio-demo-") as tmp:
            return run_demo(Path(tmp), args.size)
    except GuestError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
