"""Guest shell fragments and host-side checks shared by the end-to-end tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def image_file(image: Path, path: str) -> bytes:
    """Read ``path`` from the ext2 file system on a raw image, on the host (debugfs)."""
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


def remount_check(blocks: int, text: str) -> str:
    """Make ext2 on /dev/vda, write ``blocks`` x 4 KiB and a text file, remount, read back.

    Prints RESULT before=, after= (md5 of the data file) and hello= (the text).
    """
    return f"""
        mke2fs -q /dev/vda >/dev/null || exit 11
        mkdir -p /mnt
        mount -t ext2 /dev/vda /mnt || exit 12
        dd if=/dev/urandom of=/mnt/data.bin bs=4096 count={blocks} 2>/dev/null
        echo "{text}" > /mnt/hello.txt
        md5sum /mnt/data.bin | cut -d' ' -f1 > /tmp/before
        umount /mnt || exit 13
        echo 3 > /proc/sys/vm/drop_caches
        mount -t ext2 /dev/vda /mnt || exit 14
        echo RESULT before=$(cat /tmp/before)
        echo RESULT after=$(md5sum /mnt/data.bin | cut -d' ' -f1)
        echo RESULT hello="$(cat /mnt/hello.txt)"
        umount /mnt
    """
