"""Guest shell fragments shared by the end-to-end tests."""

from __future__ import annotations


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
