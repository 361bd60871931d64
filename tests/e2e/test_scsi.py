"""virtio-scsi end to end: a Linux guest uses `pyvirtio serve scsi` as its SCSI host.

One QEMU 7.2 boot covers the issue's list, checked on the image files afterwards:
two LUNs (64 MiB and a 3 TiB sparse image) with their sizes and LUN numbers, data
both ways on both, ``blkdiscard`` punching a hole, the write cache type (and its
change through MODE SELECT), a read-only LUN refusing writes, an ISO mounted from
the CD-ROM, and a LUN hot-added then removed (``pyvirtio scsi SOCK add-lun`` /
``remove-lun``).  The same guest steps run against QEMU's built-in
``virtio-scsi-pci`` + ``scsi-hd``/``scsi-cd`` (hot-plug over QMP) and, without the
CD-ROM's file system, on user-mode Linux (``virtio_uml.device=SOCK:8``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.assets import ensure_host_tools
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args
from pyvirtio.guestkit.qmp import Qmp

from .test_uml import UmlGuest, uml  # noqa: F401 - the fixture

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
TiB = 1 << 40
BIG = 3 * TiB
BIG_READ_AT = 5 * TiB // 2  # host data the guest reads: past 2 TiB
BIG_WRITE_AT = 11 * TiB // 4
BLOCK = 65536
MODULES = ["virtio_scsi", "sd_mod", "sr_mod", "isofs"]
UML_MODULES = [
    "drivers/scsi/scsi_common.ko", "drivers/scsi/scsi_mod.ko", "drivers/scsi/virtio_scsi.ko",
    "lib/crc64.ko", "lib/crc64-rocksoft.ko", "crypto/crc64_rocksoft_generic.ko",
    "block/t10-pi.ko", "drivers/scsi/sd_mod.ko", "drivers/cdrom/cdrom.ko",
    "drivers/scsi/sr_mod.ko", "fs/isofs/isofs.ko",
]

#: The guest's steps, the same for every host.  Disks are found by their size in
#: 512-byte sectors (each image has its own), so the script needs no device names.
GUEST_STEPS = r"""
dev_of() {
    for b in /sys/block/sd*; do
        [ -e "$b/size" ] && [ "$(cat $b/size)" = "$1" ] && { echo "${b##*/}"; return; }
    done
}
hctl_of() { d=$(readlink -f /sys/block/$1/device); echo "${d##*/}"; }
md5_at() { dd if=/dev/$1 bs=65536 skip=$2 count=$3 2>/dev/null | md5sum | cut -d' ' -f1; }
i=0
while [ -z "$(dev_of 131072)" ] || [ -z "$(dev_of 6442450944)" ]; do
    sleep 0.2; i=$((i + 1)); [ $i -gt 100 ] && break
done
small=$(dev_of 131072); big=$(dev_of 6442450944)
echo "RESULT small=$(hctl_of $small)"
echo "RESULT big=$(hctl_of $big)"
echo "RESULT small_cache=$(cat /sys/block/$small/device/scsi_disk/*/cache_type)"
echo "RESULT big_cache=$(cat /sys/block/$big/device/scsi_disk/*/cache_type)"
echo "RESULT provisioning=$(cat /sys/block/$small/device/scsi_disk/*/provisioning_mode)"
echo "RESULT small_host_md5=$(md5_at $small 16 1)"
echo "RESULT big_host_md5=$(md5_at $big $((BIG_READ_AT / 65536)) 1)"
dd if=/dev/urandom of=$T/g1 bs=65536 count=4 2>/dev/null
dd if=/dev/urandom of=$T/g2 bs=65536 count=4 2>/dev/null
dd if=$T/g1 of=/dev/$small bs=65536 seek=128 conv=fsync 2>/dev/null || echo RESULT small_write=failed
dd if=$T/g2 of=/dev/$big bs=65536 seek=$((BIG_WRITE_AT / 65536)) conv=fsync 2>/dev/null \
    || echo RESULT big_write=failed
echo "RESULT small_guest_md5=$(md5sum $T/g1 | cut -d' ' -f1)"
echo "RESULT big_guest_md5=$(md5sum $T/g2 | cut -d' ' -f1)"
/usr/sbin/blkdiscard -o 16777216 -l 4194304 /dev/$small && echo RESULT discard=ok
for sdisk in /sys/block/$small/device/scsi_disk/*; do echo "write through" > $sdisk/cache_type; done
echo "RESULT small_cache_after=$(cat /sys/block/$small/device/scsi_disk/*/cache_type)"
cd_dev=
for d in /sys/bus/scsi/devices/*:*:*:*; do
    [ "$(cat $d/type)" = 5 ] && { echo "RESULT cdrom=${d##*/}"; cd_dev=$(ls $d/block); }
done
if [ "$WITH_ISO" = 1 ]; then
    mkdir -p $T/iso
    mount -t iso9660 -o ro /dev/$cd_dev $T/iso && echo "RESULT iso_fs=$(grep $T/iso /proc/mounts | cut -d' ' -f3)"
    echo "RESULT iso_text=$(cat $T/iso/hello.txt)"
    echo "RESULT iso_md5=$(md5sum $T/iso/data.bin | cut -d' ' -f1)"
    umount $T/iso
fi
echo HOTPLUG-READY
i=0
while [ -z "$(dev_of 32768)" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ro=$(dev_of 32768)
echo "RESULT ro_disk=$(hctl_of $ro)"
echo "RESULT ro_flag=$(cat /sys/block/$ro/ro)"
echo "RESULT ro_md5=$(md5_at $ro 0 256)"
if dd if=/dev/zero of=/dev/$ro bs=4096 count=1 conv=fsync 2>/dev/null; then
    echo RESULT ro_write=accepted
else
    echo RESULT ro_write=refused
fi
echo REMOVE-READY
i=0
while [ -n "$(dev_of 32768)" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -z "$(dev_of 32768)" ] && echo RESULT ro_removed=yes
echo RESULT done=yes
""".replace("BIG_READ_AT", str(BIG_READ_AT)).replace("BIG_WRITE_AT", str(BIG_WRITE_AT))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@dataclass
class Images:
    """The images of one run and what the host put on them."""

    small: Path
    big: Path
    ro: Path
    iso: Path
    small_host: bytes
    big_host: bytes
    ro_content: bytes
    iso_data: bytes


def _make_iso(tmp_path: Path) -> tuple[Path, bytes]:
    tree = tmp_path / "isotree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello from the iso\n")
    data = os.urandom(MiB)
    (tree / "data.bin").write_bytes(data)
    iso = tmp_path / "cd.iso"
    if shutil.which("xorriso") is None:
        ensure_host_tools()
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "PYVIRTIO", "-o", str(iso),
                    str(tree)], check=True, capture_output=True)
    return iso, data


@pytest.fixture
def images(tmp_path: Path) -> Images:
    small, big, ro = (tmp_path / n for n in ("small.img", "big.img", "ro.img"))
    small_host, big_host = os.urandom(BLOCK), os.urandom(BLOCK)
    with open(small, "wb") as f:
        f.truncate(64 * MiB)
    _write(small, 16 * BLOCK, small_host)
    _write(small, 16 * MiB, os.urandom(8 * MiB))  # the guest discards 16..20 MiB
    with open(big, "wb") as f:
        f.truncate(BIG)
    _write(big, BIG_READ_AT, big_host)
    ro_content = os.urandom(16 * MiB)
    ro.write_bytes(ro_content)
    iso, iso_data = _make_iso(tmp_path)
    return Images(small, big, ro, iso, small_host, big_host, ro_content, iso_data)


def _check_results(results: dict[str, str], images: Images, *, iso: bool = True) -> None:
    """What every host must give: the guest's view and the image files agree."""
    assert results.get("done") == "yes", results
    host = results["small"].split(":")[0]
    assert results["small"] == f"{host}:0:0:0"
    assert results["big"] == f"{host}:0:0:1"
    assert results["small_cache"] == "write back"
    assert results["big_cache"] == "write back"
    assert results["small_cache_after"] == "write through"
    assert results["provisioning"] in ("unmap", "writesame_16")
    assert results["small_host_md5"] == _md5(images.small_host)
    assert results["big_host_md5"] == _md5(images.big_host)
    assert "small_write" not in results and "big_write" not in results
    assert results["small_guest_md5"] == _md5(_read(images.small, 128 * BLOCK, 4 * BLOCK))
    assert results["big_guest_md5"] == _md5(_read(images.big, BIG_WRITE_AT, 4 * BLOCK))
    assert os.path.getsize(images.big) == BIG
    assert results["discard"] == "ok"
    fd = os.open(images.small, os.O_RDONLY)
    try:
        assert os.lseek(fd, 16 * MiB, os.SEEK_HOLE) == 16 * MiB
        assert os.lseek(fd, 16 * MiB, os.SEEK_DATA) >= 20 * MiB
    finally:
        os.close(fd)
    assert _read(images.small, 16 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert _read(images.small, 20 * MiB, 4096) != bytes(4096)
    assert results["cdrom"] == f"{host}:0:0:2"
    if iso:
        assert results["iso_fs"] == "iso9660"
        assert results["iso_text"] == "hello from the iso"
        assert results["iso_md5"] == _md5(images.iso_data)
    # The hot-added read-only LUN 3, then its removal.
    assert results["ro_disk"] == f"{host}:0:0:3"
    assert results["ro_flag"] == "1"
    assert results["ro_md5"] == _md5(images.ro_content)
    assert results["ro_write"] == "refused"
    assert images.ro.read_bytes() == images.ro_content
    assert results["ro_removed"] == "yes"


def _scsi_cli(socket_path: Path, *words: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "pyvirtio.cli", "scsi", str(socket_path),
                           "--json", *words], capture_output=True, text=True, check=False,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def _builtin_args(images: Images, qmp: Path) -> list[str]:
    def drive(node: str, path: Path, *, ro: bool = False) -> list[str]:
        return ["-blockdev", f"driver=file,node-name={node},filename={path},discard=unmap"
                f"{',read-only=on' if ro else ''}"]

    return [
        "-qmp", f"unix:{qmp},server=on,wait=off", "-device", "virtio-scsi-pci,id=s0",
        *drive("d0", images.small), "-device", "scsi-hd,drive=d0,bus=s0.0,scsi-id=0,lun=0",
        *drive("d1", images.big), "-device", "scsi-hd,drive=d1,bus=s0.0,scsi-id=0,lun=1",
        *drive("cd", images.iso, ro=True),
        "-device", "scsi-cd,drive=cd,bus=s0.0,scsi-id=0,lun=2",
    ]


@pytest.mark.parametrize("host", ["pyvirtio", "qemu-builtin", "pyvirtio-qemu10"])
def test_guest_uses_luns_cdrom_discard_and_a_hot_added_readonly_lun(
    serve: Serve, images: Images, tmp_path: Path, host: str, request: pytest.FixtureRequest,
) -> None:
    """``pyvirtio-qemu10``: pyvirtio's device under QEMU 10's ``vhost-user-scsi-pci``."""
    files = binary_files(Path("/usr/sbin/blkdiscard"))
    qmp_path = tmp_path / "qmp.sock"
    kit: GuestKit = request.getfixturevalue("kit10" if host.endswith("-qemu10") else "kit")
    ours = host.startswith("pyvirtio")
    if ours:
        scsi = serve("scsi", "--disk", str(images.small), "--disk", str(images.big),
                     "--cdrom", str(images.iso))
        args = vhost_user_device_args("scsi", scsi.socket_path, "c0")
    else:
        args = _builtin_args(images, qmp_path)
    qmp: Qmp | None = None
    try:
        with kit.start("T=/tmp WITH_ISO=1\n" + GUEST_STEPS, MODULES, args, files=files) as vm:
            vm.wait_for("HOTPLUG-READY", timeout=150)
            if ours:
                added = _scsi_cli(scsi.socket_path, "add-lun", str(images.ro), "--readonly")
                assert (added["lun"], added["readonly"], added["notified"]) == (3, True, True)
            else:
                qmp = Qmp(qmp_path)
                qmp.execute("blockdev-add", driver="file", filename=str(images.ro),
                            **{"node-name": "ro", "read-only": True})
                qmp.execute("device_add", driver="scsi-hd", drive="ro", bus="s0.0", id="ro0",
                            **{"scsi-id": 0, "lun": 3})
            vm.wait_for("REMOVE-READY", timeout=60)
            if ours:
                assert _scsi_cli(scsi.socket_path, "remove-lun", "3")["ok"] is True
            else:
                assert qmp is not None
                qmp.execute("device_del", id="ro0")
            result = vm.wait(timeout=90)
    finally:
        if qmp is not None:
            qmp.close()
    assert result.exit_code == 0, result.console
    _check_results(result.results, images)
    if ours:
        listing = _scsi_cli(scsi.socket_path, "list")
        luns = listing["luns"]
        assert isinstance(luns, list) and [lun["lun"] for lun in luns] == [0, 1, 2]
        assert scsi.stop() == 0
        assert " ERROR " not in scsi.log, scsi.log


def test_uml_guest_uses_the_same_luns(
    uml: None, serve: Serve, images: Images, tmp_path: Path  # noqa: F811 - fixture
) -> None:
    scsi = serve("scsi", "--disk", str(images.small), "--disk", str(images.big),
                 "--cdrom", str(images.iso))
    script = f"T={tmp_path} WITH_ISO=1\n" + GUEST_STEPS
    with UmlGuest(tmp_path, "scsi", script, [f"{scsi.socket_path}:8"], UML_MODULES) as guest:
        guest.wait_for("HOTPLUG-READY", 60)
        added = _scsi_cli(scsi.socket_path, "add-lun", str(images.ro), "--readonly")
        assert added["lun"] == 3, added
        guest.wait_for("REMOVE-READY", 60)
        _scsi_cli(scsi.socket_path, "remove-lun", "3")
        results = guest.finish(60)
    _check_results(results, images)
    assert scsi.stop() == 0
    assert " ERROR " not in scsi.log, scsi.log
