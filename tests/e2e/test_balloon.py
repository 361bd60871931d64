"""Real guests drive ``pyvirtio serve balloon``: user-mode Linux and QEMU 10.0.

One boot each.  The guest fills a tmpfs with 96 MiB (the host's memory file grows),
then ``pyvirtio balloon SOCK 64M``: the guest's MemTotal drops by 64 MiB (the
daemon offers no DEFLATE_ON_OOM, so Linux takes the pages out of MemTotal); the
guest removes its file and free page reporting gives those pages back too.  The
host's memory for guest RAM (the allocated blocks of QEMU's memfd or UML's
memory file) falls by at least 64 MiB, the daemon's statistics show the guest's
free memory, and ``pyvirtio balloon SOCK 0`` gives the memory back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.devices.balloon_type import qemu10_args
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess
from tests.e2e.test_uml import UmlGuest, uml  # noqa: F401 - the fixture, shared

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
VIRTIO_BALLOON = 5
UML_BALLOON_MODULES = ["drivers/virtio/virtio_balloon.ko"]
#: How long the host waits for the guest to act on a change (not a timing assertion:
#: the checks are on what happened, this only bounds a hang).
DEADLINE = 60.0


def _script(mount: str) -> str:
    """The guest's side: fill a tmpfs, wait for the balloon, free the file, wait for
    the balloon to empty; print MemTotal/MemFree at each step."""
    return f"""
    mem() {{ grep "^$1:" /proc/meminfo | tr -s ' ' | cut -d' ' -f2; }}
    t0=$(mem MemTotal)
    echo RESULT memtotal0=$t0
    mkdir -p {mount} && mount -t tmpfs -o size=150m tmpfs {mount}
    dd if=/dev/zero of={mount}/fill bs=1M count=96 2>/dev/null
    echo RESULT filled=$(du -m {mount}/fill | cut -f1)
    echo BALLOON-FILLED
    # The balloon takes the pages a batch at a time: wait for all 64 MiB of them.
    i=0; while [ $((t0 - $(mem MemTotal))) -lt 65536 ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
    echo RESULT memtotal1=$(mem MemTotal)
    rm {mount}/fill
    echo RESULT memfree1=$(mem MemFree)
    echo BALLOON-FREED
    i=0; while [ "$(mem MemTotal)" != "$t0" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
    echo RESULT memtotal2=$(mem MemTotal)
    """


def _balloon(socket_path: Path, *size: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "balloon", str(socket_path), *size, "--json"],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _wait_balloon(socket_path: Path, key: str, want: Callable[[int], bool]) -> dict[str, object]:
    """Ask the daemon until ``want(report[key])`` holds (bounded by :data:`DEADLINE`)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        report = _balloon(socket_path)
        value = report[key]
        assert isinstance(value, int)
        if want(value) or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def _allocated(path: Path) -> int:
    """Bytes of disk (memory) a memfd, shmem or tmpfs file has allocated."""
    return os.stat(path).st_blocks * 512


def _guest_ram_file(pid: int, pattern: str) -> Path:
    """The fd of process ``pid`` that is its guest RAM (QEMU's memfd, UML's file),
    once the process made it."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if re.search(pattern, target):
                return Path(link)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} has no fd matching {pattern!r}")


def _exercise(socket_path: Path, ram: Path, wait_for: Callable[[str], object],
              ) -> dict[str, object]:
    """The host's side of :func:`_script`; returns the figures it saw."""
    wait_for("BALLOON-FILLED")
    full = _allocated(ram)
    inflated = _balloon(socket_path, "64M")
    report = _wait_balloon(socket_path, "actual_bytes", lambda v: v == 64 * MiB)
    wait_for("BALLOON-FREED")
    # Inflated pages and the freed file's pages (reported free) leave the host.
    lowest = full
    deadline = time.monotonic() + DEADLINE
    while lowest > full - 64 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
        lowest = min(lowest, _allocated(ram))
    stats = _balloon(socket_path)
    emptied = _balloon(socket_path, "0")
    final = _wait_balloon(socket_path, "actual_bytes", lambda v: v == 0)
    return {"full": full, "lowest": lowest, "inflated": inflated, "report": report,
            "stats": stats, "emptied": emptied, "final": final}


def _check(r: dict[str, str], seen: dict[str, object], console: str) -> None:
    assert int(r["filled"]) == 96, console
    assert int(r["memtotal0"]) - int(r["memtotal1"]) == 64 * 1024, console  # kB
    assert r["memtotal2"] == r["memtotal0"], console
    assert seen["inflated"]["notified"] == "acked", seen  # type: ignore[index]
    report = seen["report"]
    assert isinstance(report, dict)
    assert report["target_bytes"] == report["actual_bytes"] == 64 * MiB, report
    assert report["inflated_pages"] == 16384, report
    stats = seen["stats"]
    assert isinstance(stats, dict)
    released = stats["released"]
    assert released["inflate"] >= 64 * MiB, stats
    assert stats["released_bytes"] >= 64 * MiB, stats
    # The guest's statistics (§5.5.6.3) say what its MemFree says.
    memfree = stats["stats"]["memfree"]
    assert abs(memfree - int(r["memfree1"]) * 1024) < 32 * MiB, (memfree, r["memfree1"])
    # The host really got the memory back.
    full, lowest = seen["full"], seen["lowest"]
    assert isinstance(full, int) and isinstance(lowest, int)
    assert full - lowest >= 64 * MiB, (full, lowest, stats)
    assert seen["final"]["actual_bytes"] == 0 and seen["final"]["inflated_pages"] == 0  # type: ignore[index]


def test_uml_guest_inflates_and_reports_free_pages_and_the_memory_file_shrinks(
    uml: None, serve: Serve, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    balloon = serve("balloon", "--no-deflate-on-oom")
    script = _script(str(tmp_path / "mnt"))
    with UmlGuest(tmp_path, "balloon", script,
                  [f"{balloon.socket_path}:{VIRTIO_BALLOON}"], UML_BALLOON_MODULES) as guest:
        assert guest._process is not None
        ram = _guest_ram_file(guest._process.pid, r"\(deleted\)$")
        seen = _exercise(balloon.socket_path, ram, guest.wait_for)
        r = guest.finish()
    assert "insmod_failed" not in r, guest.console
    _check(r, seen, guest.console)
    assert balloon.stop() == 0
    assert "Traceback" not in balloon.log and "violation:" not in balloon.log, balloon.log


def test_qemu10_guest_inflates_and_reports_free_pages_and_the_memfd_shrinks(
    kit10: GuestKit, serve: Serve
) -> None:
    listed = subprocess.run([str(kit10.qemu), "-device", "help"], capture_output=True,
                            text=True, check=False, timeout=30).stdout
    if "vhost-user-device-pci" not in listed:
        # QEMU made the generic device non-user-creatable (commit 6275989647, with
        # vhost-user-base); Debian's 10.0.2 is built so: "Parameter 'driver' expects
        # a pluggable device type".  QEMU has no vhost-user balloon of its own.
        pytest.skip("this QEMU 10 cannot create vhost-user-device-pci from -device")
    balloon = serve("balloon", "--no-deflate-on-oom")
    with kit10.start(_script("/mnt/balloon"), ["virtio_balloon"],
                     qemu10_args(balloon.socket_path, "bal0"), memory_mb=256) as vm:
        ram = _guest_ram_file(vm.pid, r"^/memfd:")
        seen = _exercise(balloon.socket_path, ram, vm.wait_for)
        result = vm.wait(DEADLINE)
    assert result.exit_code == 0, result.console
    _check(result.results, seen, result.console)
    assert balloon.stop() == 0
    assert "Traceback" not in balloon.log and "violation:" not in balloon.log, balloon.log
