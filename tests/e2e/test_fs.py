"""virtio-fs end to end: a real Linux guest mounts `pyvirtio serve fs` and works in it.

One guest script does the issue's whole list (reading host files and a big file,
readdir, 200 files and nested directories, an 8 MiB write read back after dropping
the caches, rename, symlink, hard link, chmod, truncate, append, a sparse file,
unlink, rmdir, statfs, writing to an open unlinked file, utimes, umount); every
result is then checked on the host directory.  It runs in user-mode Linux (about a
second to boot; the tag comes from the config space), in a QEMU 7.2 guest
(``vhost-user-fs-pci``, busybox tools) and in a QEMU 10 guest.  A canary file beside the shared
directory must come through untouched.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import vhost_user_device_args

from .conftest import Serve
from .test_uml import UmlGuest, _uml_modules, uml  # noqa: F401 - uml is a fixture

MiB = 1 << 20
VIRTIO_FS = 26
TAG = "e2efs"
UML_MODULES = ["fs/fuse/fuse.ko", "fs/fuse/virtiofs.ko"]
#: QEMU 7.2's C back-end (package qemu-system-common): the behaviour to match.
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: The utimes the guest sets: 2001-02-03 04:05:06 UTC.
STAMP = calendar.timegm((2001, 2, 3, 4, 5, 6))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _script(mnt: str, tag: str = TAG, prefix: str = "") -> str:
    """The guest's work: POSIX sh with tools both busybox and a Debian host have.
    Each result is ``RESULT <prefix><key>=<value>``."""
    body = f"""
    M={mnt}
    mkdir -p $M
    mount -t virtiofs {tag} $M && echo RESULT mounted=yes
    echo RESULT hello=$(cat $M/hello.txt)
    echo RESULT big_md5=$(md5sum $M/big.bin | cut -d' ' -f1)
    echo RESULT listing=$(ls $M/sub | tr '\\n' ,)
    mkdir -p $M/many/a/b/c
    i=0
    while [ $i -lt 200 ]; do echo "file $i" > $M/many/f$i; i=$((i + 1)); done
    echo RESULT many=$(ls $M/many | wc -l)
    dd if=/dev/urandom of=$M/w8.bin bs=1048576 count=8 conv=fsync 2>/dev/null || echo RESULT w8=failed
    sync; echo 3 > /proc/sys/vm/drop_caches
    echo RESULT w8_md5=$(md5sum $M/w8.bin | cut -d' ' -f1)
    mv $M/hello.txt $M/renamed.txt && echo RESULT renamed=yes
    ln -s renamed.txt $M/link && echo RESULT link_reads=$(cat $M/link)
    echo RESULT readlink=$(readlink $M/link)
    ln $M/renamed.txt $M/hard && echo RESULT nlink=$(stat -c %h $M/renamed.txt)
    chmod 640 $M/renamed.txt && echo RESULT mode=$(stat -c %a $M/renamed.txt)
    printf 0123456789 > $M/trunc
    dd if=/dev/null of=$M/trunc bs=1 seek=4 2>/dev/null
    echo RESULT trunc=$(cat $M/trunc)
    echo one > $M/app; echo two >> $M/app
    echo RESULT app=$(cat $M/app | tr '\\n' ,)
    dd if=/dev/zero of=$M/sparse bs=4096 count=1 seek=2559 2>/dev/null
    echo RESULT sparse_size=$(stat -c %s $M/sparse)
    rm $M/many/f0 && echo RESULT unlinked=yes
    rmdir $M/many/a 2>/dev/null && echo RESULT rmdir_nonempty=removed || echo RESULT rmdir_nonempty=refused
    rmdir $M/many/a/b/c && echo RESULT rmdir_empty=yes
    echo RESULT statfs=$(stat -f -c '%b,%S' $M)
    exec 3>$M/ghost
    exec 4<$M/ghost
    rm $M/ghost
    echo ghostdata >&3
    read ghost <&4
    echo RESULT ghost=$ghost
    exec 3>&- 4<&-
    touch -t 200102030405.06 $M/renamed.txt && echo RESULT mtime=$(stat -c %Y $M/renamed.txt)
    umount $M && echo RESULT umount=yes
    """
    return body.replace("RESULT ", f"RESULT {prefix}")


def _strip(results: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


#: Results that differ between two correct back-ends (none do, so far).
BACKEND_SPECIFIC: set[str] = set()


def _prepare(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """The shared dir (a small file, a big one, a folder), and a canary beside it."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_text("hello-from-host\n")
    big = os.urandom(12 * MiB + 123)
    (share / "big.bin").write_bytes(big)
    for name in ("x1", "x2", "x3"):
        (share / "sub" / name).write_text(name)
    canary = tmp_path / "canary.txt"
    canary.write_text("canary: must never be read or written by the guest\n")
    os.utime(canary, (STAMP, STAMP))  # a read would move the access time (relatime)
    return share, canary, big


def _check(r: dict[str, str], share: Path, canary: Path, big: bytes, console: str) -> None:
    """Every result of :func:`_script`, checked on the host directory."""
    assert r.get("mounted") == "yes", console
    assert r["hello"] == "hello-from-host"
    assert r["big_md5"] == _md5(big)
    assert r["listing"] == "x1,x2,x3,"
    assert r["many"] == "201"  # 200 files and the folder a
    assert "w8" not in r, console
    assert r["w8_md5"] == _md5((share / "w8.bin").read_bytes())
    assert (share / "w8.bin").stat().st_size == 8 * MiB
    assert r["renamed"] == "yes"
    assert not (share / "hello.txt").exists()
    assert (share / "renamed.txt").read_text() == "hello-from-host\n"
    assert r["link_reads"] == "hello-from-host" and r["readlink"] == "renamed.txt"
    assert os.readlink(share / "link") == "renamed.txt"
    assert r["nlink"] == "2"
    host = (share / "renamed.txt").stat()
    assert host.st_nlink == 2 and (share / "hard").stat().st_ino == host.st_ino
    assert r["mode"] == "640" and stat.S_IMODE(host.st_mode) == 0o640
    assert r["trunc"] == "0123" and (share / "trunc").read_bytes() == b"0123"
    assert r["app"] == "one,two," and (share / "app").read_text() == "one\ntwo\n"
    sparse = (share / "sparse").stat()
    assert r["sparse_size"] == str(10 * MiB) == str(sparse.st_size)
    assert sparse.st_blocks * 512 <= 256 * 1024, "the sparse file was filled on the host"
    assert r["unlinked"] == "yes" and not (share / "many" / "f0").exists()
    names = sorted(os.listdir(share / "many"))
    assert len(names) == 200 and (share / "many" / "f199").read_text() == "file 199\n"
    assert r["rmdir_nonempty"] == "refused" and (share / "many" / "a" / "b").is_dir()
    assert r["rmdir_empty"] == "yes" and not (share / "many" / "a" / "b" / "c").exists()
    blocks, size = (int(x) for x in r["statfs"].split(","))
    vfs = os.statvfs(share)
    assert blocks * size == vfs.f_blocks * vfs.f_frsize
    assert r["ghost"] == "ghostdata" and not (share / "ghost").exists()
    assert r["mtime"] == str(STAMP) and int(host.st_mtime) == STAMP
    assert r["umount"] == "yes", console
    assert (canary.stat().st_atime, canary.stat().st_mtime) == (STAMP, STAMP)
    assert canary.read_text().startswith("canary:")


def test_uml_guest_mounts_the_share_and_every_change_reaches_the_host(
    uml: None, serve: Serve, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    share, canary, big = _prepare(tmp_path)
    fs = serve("fs", "--shared-dir", str(share), "--tag", TAG)
    mnt = tmp_path / "mnt"
    guest = UmlGuest(tmp_path, "fs", _script(str(mnt)), [f"{fs.socket_path}:{VIRTIO_FS}"],
                     UML_MODULES)
    with guest:
        r = guest.finish(timeout=120)
    assert "insmod_failed" not in r, guest.console
    _check(r, share, canary, big, guest.console)


def test_qemu_guest_mounts_the_share_and_every_change_reaches_the_host(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    """One boot, two devices: pyvirtio's share and, as the reference, QEMU's C virtiofsd
    on a twin share.  The same script runs on both; every result is checked on the host,
    and pyvirtio's must equal virtiofsd's."""
    share, canary, big = _prepare(tmp_path / "ours")
    ref_share, ref_canary, _ = _prepare(tmp_path / "ref")
    (ref_share / "big.bin").write_bytes(big)
    fs = serve("fs", "--shared-dir", str(share), "--tag", TAG, "--cache", "never")
    ref_socket = tmp_path / "virtiofsd.sock"
    reference = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={ref_socket}", "-o", f"source={ref_share}",
         "-o", "sandbox=chroot", "-o", "cache=none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not ref_socket.exists():
            assert reference.poll() is None and time.monotonic() < deadline, "no virtiofsd"
            time.sleep(0.05)
        script = _script("/mnt/ours", TAG, "p_") + _script("/mnt/ref", "ref", "c_")
        devices = (vhost_user_device_args("fs", fs.socket_path, "fs0", tag=TAG)
                   + vhost_user_device_args("fs", ref_socket, "fs1", tag="ref"))
        result = kit.run(script, ["virtiofs"], devices, timeout=300)
    finally:
        reference.terminate()
        reference.wait(10)
    ours, ref = _strip(result.results, "p_"), _strip(result.results, "c_")
    _check(ours, share, canary, big, result.console)
    _check(ref, ref_share, ref_canary, big, result.console)
    differ = {k for k in ours.keys() | ref.keys() if ours.get(k) != ref.get(k)}
    assert differ <= BACKEND_SPECIFIC | {"w8_md5"}, {k: (ours.get(k), ref.get(k))
                                                     for k in differ}


def test_qemu10_guest_mounts_the_share_and_every_change_reaches_the_host(
    kit10: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    """QEMU 10's ``vhost-user-fs-pci`` (it reads the config space, 7.2 did not), with
    packed rings: the same script, the same checks."""
    share, canary, big = _prepare(tmp_path)
    fs = serve("fs", "--shared-dir", str(share), "--tag", TAG)
    devices = vhost_user_device_args("fs", fs.socket_path, "fs0", tag=TAG, packed="on")
    script = _script("/mnt/ours") + """
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat $d/device)" = 0x001a ] && echo RESULT packed=$(cut -c35 $d/features)
    done
    """
    result = kit10.run(script, ["virtiofs"], devices, timeout=300)
    _check(result.results, share, canary, big, result.console)
    assert result.results["packed"] == "1", result.console
    assert fs.stop() == 0
    assert "Traceback" not in fs.log and "violation:" not in fs.log, fs.log
