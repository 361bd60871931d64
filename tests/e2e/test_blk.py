"""virtio-blk end to end: an unmodified Linux guest uses `pyvirtio serve blk`.

Each test checks on the host what the guest did through the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

from .guest_scripts import image_file, remount_check

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
BLK = ["virtio_blk"]


def _image(tmp_path: Path, size: int = 64 * MiB) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _queue_requests(log: str) -> dict[int, int]:
    """Requests per queue from the daemon's statistics lines (last one wins)."""
    counts: dict[int, int] = {}
    for m in re.finditer(r"queue (\d+): (\d+) requests", log):
        counts[int(m.group(1))] = int(m.group(2))
    return counts


def test_guest_sees_capacity_serial_and_host_data_and_writes_reach_image_and_a_resize(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 48 * MiB)
    host_block = os.urandom(64 * 1024)
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(host_block)
    blk = serve("blk", "--image", str(image), "--serial", "e2e-serial-42")
    script = """
        echo RESULT size=$(cat /sys/block/vda/size)
        echo RESULT serial=$(cat /sys/block/vda/serial)
        echo RESULT host_md5=$(dd if=/dev/vda bs=65536 skip=16 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
        dd if=/dev/urandom of=/tmp/g bs=65536 count=4 2>/dev/null
        dd if=/tmp/g of=/dev/vda bs=65536 seek=64 conv=fsync 2>/dev/null || echo RESULT write=failed
        echo RESULT guest_md5=$(md5sum /tmp/g | cut -d' ' -f1)
        size=$(cat /sys/block/vda/size)
        echo RESIZE-READY
        i=0
        while [ "$(cat /sys/block/vda/size)" = "$size" ] && [ $i -lt 300 ]; do
            sleep 0.1; i=$((i + 1))
        done
        echo RESULT resized=$(cat /sys/block/vda/size)
    """
    with kit.start(script, BLK, vhost_user_device_args("blk", blk.socket_path, "blk0")) as vm:
        vm.wait_for("RESIZE-READY", timeout=120)
        # `pyvirtio resize`: the daemon grows the image and sends CONFIG_CHANGE_MSG,
        # QEMU re-reads the config and interrupts the guest: no reboot.
        resize = subprocess.run(
            [sys.executable, "-m", "pyvirtio.cli", "resize", str(blk.socket_path), "80M",
             "--json"], capture_output=True, text=True, check=False, timeout=30)
        result = vm.wait(timeout=120)
    assert resize.returncode == 0, resize.stdout + resize.stderr
    answer = json.loads(resize.stdout)
    assert result.exit_code == 0, result.console
    assert result.results["size"] == str(48 * MiB // 512)
    assert result.results["serial"] == "e2e-serial-42"
    assert result.results["host_md5"] == _md5(host_block)
    assert "write" not in result.results
    assert result.results["guest_md5"] == _md5(_read(image, 64 * 65536, 4 * 65536))
    assert answer["notified"] == "acked", answer
    assert result.results["resized"] == str(80 * MiB // 512), result.console
    assert image.stat().st_size == 80 * MiB
    print(f"QEMU blk resize: {result.results['size']} -> {result.results['resized']} "
          f"sectors, front-end ack after {answer.get('ack_seconds')} s")
    blk.signal(signal.SIGUSR1)
    assert blk.stop() == 0
    assert not blk.socket_path.exists()
    log = blk.log
    assert re.search(r"flush [1-9]", log), log  # conv=fsync reached the device as FLUSH
    assert " ERROR " not in log


def test_resize_refuses_to_shrink_and_read_only_disks(serve: Serve, tmp_path: Path) -> None:
    image = _image(tmp_path, 16 * MiB)
    blk = serve("blk", "--image", str(image))
    ro_image = tmp_path / "ro.img"
    ro_image.write_bytes(bytes(MiB))
    ro = serve("blk", "--image", str(ro_image), "--readonly", name="ro")
    cli = [sys.executable, "-m", "pyvirtio.cli", "resize"]
    shrink = subprocess.run([*cli, str(blk.socket_path), "8M"], capture_output=True, text=True,
                            check=False, timeout=30)
    assert shrink.returncode == 1
    assert "shrinking is not supported" in shrink.stderr
    readonly = subprocess.run([*cli, str(ro.socket_path), "32M", "--json"],
                              capture_output=True, text=True, check=False, timeout=30)
    assert readonly.returncode == 1
    assert "read-only" in json.loads(readonly.stdout)["error"]
    grow = subprocess.run([*cli, str(blk.socket_path), "32M"], capture_output=True, text=True,
                          check=False, timeout=30)
    assert grow.returncode == 0, grow.stderr
    assert "16777216 -> 33554432 bytes" in grow.stdout
    assert "no front-end connected" in grow.stdout
    assert image.stat().st_size == 32 * MiB


def test_filesystem_made_in_guest_survives_remount_and_is_readable_on_host(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path)
    blk = serve("blk", "--image", str(image))
    script = remount_check(300, "hello from the guest")
    result = kit.run(script, [*BLK, "crc32c_generic", "ext4"], vhost_user_device_args("blk", blk.socket_path, "b0"))
    assert result.exit_code == 0, result.console
    assert result.results["before"] == result.results["after"]
    assert result.results["hello"] == "hello from the guest"
    assert blk.stop() == 0
    # The host reads the guest's file system straight off the image.
    assert image_file(image, "/hello.txt") == b"hello from the guest\n"
    data = image_file(image, "/data.bin")
    assert len(data) == 300 * 4096
    assert _md5(data) == result.results["after"]


def test_discard_and_write_zeroes_reach_the_image(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 32 * MiB)
    with open(image, "r+b") as f:
        f.write(os.urandom(16 * MiB))
        os.fsync(f.fileno())
    blk = serve("blk", "--image", str(image))
    blkdiscard = Path("/usr/sbin/blkdiscard")
    script = """
        echo RESULT discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
        echo RESULT zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
        /usr/sbin/blkdiscard -o 1048576 -l 4194304 /dev/vda || exit 21
        /usr/sbin/blkdiscard -z -o 8388608 -l 2097152 /dev/vda || exit 22
    """
    result = kit.run(
        script, BLK, vhost_user_device_args("blk", blk.socket_path, "b0"),
        files=binary_files(blkdiscard),
    )
    assert result.exit_code == 0, result.console
    assert int(result.results["discard_max"]) > 0
    assert int(result.results["zeroes_max"]) > 0
    assert blk.stop() == 0
    log = blk.log
    assert re.search(r"discard [1-9]", log), log
    assert re.search(r"write_zeroes [1-9]", log), log
    # Discarded range: deallocated on the host (a hole), reads as zeroes.
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) >= 5 * MiB
    finally:
        os.close(fd)
    assert _read(image, MiB, 4 * MiB) == bytes(4 * MiB)
    # Written zeroes: the range reads zero, its neighbours kept their data.
    assert _read(image, 8 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert _read(image, 8 * MiB - 4096, 4096) != bytes(4096)
    assert _read(image, 10 * MiB, 4096) != bytes(4096)


def test_readonly_disk_refuses_guest_writes_and_serves_reads(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 16 * MiB)
    content = os.urandom(16 * MiB)
    image.write_bytes(content)
    blk = serve("blk", "--image", str(image), "--readonly")
    script = """
        echo RESULT ro=$(cat /sys/block/vda/ro)
        echo RESULT read_md5=$(dd if=/dev/vda bs=1048576 count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/tmp/err; then
            echo RESULT write=succeeded
        else
            echo RESULT write=failed
            echo RESULT write_error="$(tail -n1 /tmp/err)"
        fi
    """
    result = kit.run(script, BLK, vhost_user_device_args("blk", blk.socket_path, "b0"))
    assert result.exit_code == 0, result.console
    assert result.results["ro"] == "1"
    assert result.results["read_md5"] == _md5(content)
    assert result.results["write"] == "failed", result.results
    assert blk.stop() == 0
    assert image.read_bytes() == content


def test_two_queues_both_carry_requests_with_two_vcpus(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    image = _image(tmp_path, 32 * MiB)
    blk = serve("blk", "--image", str(image), "--queues", "2")
    script = """
        echo RESULT hw_queues=$(ls /sys/block/vda/mq | wc -l)
        for cpu in 0 1; do
            taskset -c $cpu dd if=/dev/urandom of=/dev/vda bs=65536 count=32 seek=$((cpu * 64)) conv=fsync 2>/dev/null || exit 31
            echo 3 > /proc/sys/vm/drop_caches
            taskset -c $cpu dd if=/dev/vda of=/dev/null bs=65536 count=32 skip=$((cpu * 64)) 2>/dev/null || exit 32
        done
        echo RESULT cpus=$(nproc)
    """
    result = kit.run(
        script, BLK, vhost_user_device_args("blk", blk.socket_path, "b0", num_queues=2), smp=2
    )
    assert result.exit_code == 0, result.console
    assert result.results["cpus"] == "2"
    assert result.results["hw_queues"] == "2"
    assert blk.stop() == 0
    counts = _queue_requests(blk.log)
    assert counts.get(0, 0) > 0 and counts.get(1, 0) > 0, blk.log


def test_aio_threads_with_direct_io_keeps_a_guests_data_intact(
    kit: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    """`--aio threads --direct`: requests run in worker threads on an O_DIRECT image and
    complete out of order.  The guest writes and reads back with O_DIRECT (dd), the host
    checks the image, and fio checks its own writes at queue depth 32 (verify=crc32c)."""
    image = _image(tmp_path, 48 * MiB)
    try:
        os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    blk = serve("blk", "--image", str(image), "--aio", "threads", "--direct")
    fio = shutil.which("fio")
    files = binary_files(Path(fio)) if fio else None
    script = f"""
        dd if=/dev/urandom of=/tmp/g bs=65536 count=64 2>/dev/null
        dd if=/tmp/g of=/dev/vda bs=65536 seek=256 oflag=direct conv=fsync 2>/tmp/err || {{ echo RESULT write=failed; cat /tmp/err; }}
        echo RESULT guest_md5=$(md5sum /tmp/g | cut -d' ' -f1)
        echo RESULT read_md5=$(dd if=/dev/vda bs=65536 skip=256 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        if [ -x "{fio or '/nonexistent'}" ]; then
            {fio} --name=verify --filename=/dev/vda --size=8M --rw=randwrite --bs=4k \\
                --direct=1 --ioengine=libaio --iodepth=32 --verify=crc32c --do_verify=1 \\
                --verify_fatal=1 --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err
            echo RESULT fio=$?
            cat /tmp/fio.err
        else
            echo RESULT fio=absent
        fi
    """
    result = kit.run(script, BLK, vhost_user_device_args("blk", blk.socket_path, "b0"),
                     files=files, timeout=180)
    assert result.exit_code == 0, result.console
    assert "write" not in result.results, result.console
    assert result.results["read_md5"] == result.results["guest_md5"], result.console
    assert result.results["guest_md5"] == _md5(_read(image, 256 * 65536, 64 * 65536))
    if fio:
        assert result.results["fio"] == "0", result.console
    blk.signal(signal.SIGUSR1)
    assert blk.stop() == 0
    log = blk.log
    assert "O_DIRECT" in log and "aio threads" in log, log
    assert re.search(r"in [1-9]", log) and re.search(r"out [1-9]", log), log
    assert " ERROR " not in log, log
    lines = re.findall(r"queue 0: (\d+) requests(.*)", log)
    busiest = max(lines, key=lambda line: int(line[0]))
    print(f"--aio threads --direct: {busiest[0]} requests{busiest[1]}")
