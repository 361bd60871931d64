"""``pyvirtio vm`` as a user runs it: the real CLI in a subprocess, a real guest under QEMU.

Each run gets its own ``TMPDIR``, so the tests also see that the daemons' sockets, logs and
the initramfs are gone afterwards.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from pyvirtio.guestkit.backends import vhost_user_device_args
from pyvirtio.vmcmd import EXIT_FAILED, EXIT_INTERRUPTED
from tests.e2e.conftest import Serve

#: The console script the venv holds (what the README tells users to run).
SCRIPT = Path(sys.executable).with_name("pyvirtio")
PYVIRTIO = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pyvirtio.cli"]

#: An image size that is not a round number: 48 MiB and 8 sectors.
IMAGE_SIZE = (48 << 20) + 4096
IMAGE_SECTORS = IMAGE_SIZE // 512


def make_image(folder: Path) -> Path:
    image = folder / "disk.img"
    with image.open("wb") as stream:
        stream.truncate(IMAGE_SIZE)
    return image


def private_tmp(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir(exist_ok=True)
    return folder


def vm(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``pyvirtio vm ARGS`` with stdin not a terminal; checks it left no temporary files."""
    tmp = private_tmp(tmp_path)
    completed = subprocess.run(
        [*PYVIRTIO, "vm", *args], check=False, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert "Traceback" not in completed.stderr, completed.stderr
    assert list(tmp.iterdir()) == [], "pyvirtio vm left files behind"
    return completed


def test_run_prints_the_disk_size_in_sectors(tmp_path: Path) -> None:
    make_image(tmp_path)
    completed = vm(tmp_path, "--blk", "disk.img", "--run", "cat /sys/block/vda/size")
    assert (completed.returncode, completed.stdout, completed.stderr) == (
        0, f"{IMAGE_SECTORS}\n", "")


def test_run_reads_the_guest_hwrng(tmp_path: Path) -> None:
    completed = vm(tmp_path, "--rng", "--run", "head -c 16 /dev/hwrng | wc -c")
    assert (completed.returncode, completed.stdout) == (0, "16\n"), completed.stderr


def test_run_keeps_stdout_and_stderr_apart_and_exits_with_the_commands_status(
    tmp_path: Path,
) -> None:
    completed = vm(tmp_path, "--run", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert completed.returncode == 3
    assert completed.stdout == "to-stdout\n"
    assert completed.stderr == "to-stderr\n"


def test_a_missing_image_is_a_one_line_error(tmp_path: Path) -> None:
    completed = vm(tmp_path, "--blk", "missing.img", "--run", "true")
    assert completed.returncode == EXIT_FAILED
    assert completed.stdout == ""
    assert completed.stderr.startswith("pyvirtio vm: missing.img: no such image file")
    assert len(completed.stderr.splitlines()) == 1


def test_qemu_failure_quotes_the_console_tail_and_cleans_up(tmp_path: Path) -> None:
    make_image(tmp_path)
    completed = vm(tmp_path, "--blk", "disk.img", "--run", "true",
                   "--qemu-args=-no-such-option")
    assert completed.returncode == EXIT_FAILED
    assert completed.stderr.startswith("pyvirtio vm: the guest failed:")
    assert "-no-such-option: invalid option" in completed.stderr


def test_print_cmdline_output_runs_in_a_shell(tmp_path: Path) -> None:
    """The printed lines start the daemons, boot QEMU on the cached kernel and initramfs,
    run the command on the console, and stop the daemons again."""
    make_image(tmp_path)
    command = "cat /sys/block/vda/size; head -c 16 /dev/hwrng | wc -c; ip -o -4 addr show eth0"
    switch = f"e2e-vm-{os.getpid()}-{secrets.token_hex(3)}"
    printed = vm(tmp_path, "--blk", "disk.img", "--rng", "--net", f"{switch},ip=10.219.0.2/24",
                 "--run", command, "--print-cmdline")
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout
    assert "serve blk" in script and "vhost-user-blk-pci" in script
    tmp = private_tmp(tmp_path)
    executed = subprocess.run(
        ["bash", "-c", script], check=False, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)},
    )
    lines = executed.stdout.replace("\r", "").splitlines()
    assert executed.returncode == 0, executed.stdout + executed.stderr
    assert str(IMAGE_SECTORS) in lines and "16" in lines, executed.stdout
    assert any("inet 10.219.0.2/24" in line for line in lines), executed.stdout
    assert "PYVIRTIO-GUEST-END status=0" in lines
    assert list(tmp.iterdir()) == [], "the printed script left its socket folder"


def test_export_writes_files_that_the_readme_qemu_line_boots(
    tmp_path: Path, serve: Serve
) -> None:
    """``-kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic``, as in the
    README, reaches the shell; what is typed there runs; ``exit`` powers off."""
    exported = vm(tmp_path, "--export", "out")
    assert exported.returncode == 0, exported.stderr
    assert "wrote" in exported.stdout and "initrd.img" in exported.stdout
    kernel, initrd = tmp_path / "out" / "vmlinuz", tmp_path / "out" / "initrd.img"
    assert kernel.stat().st_size > 1 << 20 and initrd.stat().st_size > 1 << 20
    rng = serve("rng")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "512M",
         "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
         "-numa", "node,memdev=mem", *vhost_user_device_args("rng", rng.socket_path, "rng0"),
         "-kernel", str(kernel), "-initrd", str(initrd),
         "-append", "console=ttyS0", "-nographic"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert qemu.stdin is not None and qemu.stdout is not None
    console = bytearray()
    reader = threading.Thread(target=read_into, args=(qemu.stdout, console))
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while b"vm:/# " not in console and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"vm:/# " in console, console.decode(errors="replace")
        qemu.stdin.write(b"head -c 16 /dev/hwrng | wc -c; exit 5\n")
        qemu.stdin.flush()
        assert qemu.wait(30) == 0
    finally:
        qemu.kill()
        qemu.wait()
        reader.join()
    lines = console.decode(errors="replace").replace("\r", "").splitlines()
    assert "16" in lines and "PYVIRTIO-GUEST-END status=5" in lines


def read_into(stream: IO[bytes], into: bytearray) -> None:
    """Append what *stream* (a pipe) yields to *into*, until EOF."""
    while chunk := os.read(stream.fileno(), 65536):
        into.extend(chunk)


def test_ctrl_c_stops_the_guest_and_the_daemons(tmp_path: Path) -> None:
    make_image(tmp_path)
    tmp = private_tmp(tmp_path)
    process = subprocess.Popen(
        [*PYVIRTIO, "vm", "--blk", "disk.img", "--run", "sleep 60"], cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not list(tmp.glob("pyvirtio-vm-*/initramfs.cpio")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # QEMU is booting
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert stderr.startswith("pyvirtio vm: interrupted") and "Traceback" not in stderr
    assert list(tmp.iterdir()) == []
