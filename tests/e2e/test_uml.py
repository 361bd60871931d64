"""User-mode Linux guests drive `pyvirtio serve blk` and `pyvirtio serve net`.

UML's ``virtio_uml`` is a vhost-user front-end of its own (Debian package
``user-mode-linux``, kernel 6.1): it sends SET_MEM_TABLE with two region slots,
needs the back-end request channel, asks for an ack of every SET message and
never sends GET_VRING_BASE or SET_STATUS.  The guest boots the host's root as a
read-write hostfs with a host script as init in about a second, so the guest
and the test share files in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pyvirtio.guestkit.assets import BUSYBOX_PATH, ensure_host_tools
from pyvirtio.guestkit.backends import BackendProcess

Serve = Callable[..., BackendProcess]
log = logging.getLogger(__name__)

MiB = 1 << 20
#: virtio device ids for ``virtio_uml.device=SOCKET:ID``.
VIRTIO_NET, VIRTIO_BLK = 1, 2
#: UML's own modules, each after the ones it needs (modules.dep order, reversed).
BLK_MODULES = ["drivers/block/virtio_blk.ko"]
NET_MODULES = ["net/core/failover.ko", "drivers/net/net_failover.ko", "drivers/net/virtio_net.ko"]
#: A boot that shows no sign of init by then hung early (it happens now and then).
INIT_TIMEOUT = 20.0


class UmlGuest:
    """One ``linux.uml`` process running a host script as init.

    It runs in its own process group: UML ignores SIGTERM and its helper
    processes outlive it, so it is stopped with SIGKILL to the whole group.
    A boot that does not reach init within :data:`INIT_TIMEOUT` is killed and
    started once more.
    """

    def __init__(self, workdir: Path, name: str, script: str, devices: Sequence[str],
                 modules: Sequence[str]) -> None:
        self.workdir = workdir
        self.name = name
        self.console_path = workdir / f"{name}.console"
        self.retries = 0
        moddir = _uml_modules()
        init = workdir / f"{name}.init"
        loads = "\n".join(f"insmod {moddir / m} || echo RESULT insmod_failed={m}"
                          for m in modules)
        init.write_text(f"""#!/bin/bash
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo UML-INIT
mount -t proc proc /proc; mount -t sysfs sysfs /sys
{loads}
run() {{
{script}
}}
run
echo "UML-DONE rc=$?"
poweroff -f
""")
        init.chmod(0o755)
        self.command = [
            _linux_uml(), "mem=256M", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
            f"init={init}", "con=null", "con0=fd:0,fd:1", f"uml_dir={workdir}",
            f"umid={name}-{secrets.token_hex(3)}",
            *(f"virtio_uml.device={d}" for d in devices),
        ]
        self._cursor = 0
        self._process: subprocess.Popen[bytes] | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> UmlGuest:
        """Boot; retry once after an early-boot hang (no init within 20 s)."""
        for attempt in range(2):
            self._launch()
            if self._wait_text("UML-INIT", INIT_TIMEOUT, fail=False):
                return self
            self.kill()
            self.retries += 1
            log.warning("UML guest %s: no init within %.0f s (attempt %d), killed%s",
                        self.name, INIT_TIMEOUT, attempt + 1,
                        "; retrying" if attempt == 0 else "")
            print(f"UML guest {self.name}: early-boot hang, killed and retried", file=sys.stderr)
        raise AssertionError(f"UML guest {self.name} hung twice before init:\n{self.console}")

    def _launch(self) -> None:
        self._cursor = 0
        with open(self.console_path, "wb") as out:
            self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL UML's whole process group (its helpers too)."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def finish(self, timeout: float = 60.0) -> dict[str, str]:
        """Wait for the script's end; return its ``RESULT key=value`` lines."""
        try:
            self.wait_for("UML-DONE", timeout)
            assert self._process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(10)
        finally:
            self.kill()
        return self.results

    def __enter__(self) -> UmlGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- console --------------------------------------------------------------------------

    @property
    def console(self) -> str:
        """Everything UML printed, ``\\r`` removed."""
        try:
            return self.console_path.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    @property
    def results(self) -> dict[str, str]:
        """The ``RESULT key=value`` lines so far."""
        return dict(re.findall(r"RESULT (\w+)=(.*)", self.console))

    def _wait_text(self, text: str, timeout: float, *, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            console = self.console
            found = console.find(text, self._cursor)
            if found >= 0 and console.find("\n", found) >= 0:
                self._cursor = console.find("\n", found) + 1
                return True
            exited = self._process is not None and self._process.poll() is not None
            if exited or time.monotonic() > deadline:
                if fail:
                    raise AssertionError(
                        f"UML guest {self.name}: no {text!r} "
                        f"({'exited' if exited else 'timed out'}):\n{console[-4000:]}")
                return False
            time.sleep(0.02)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears after the previous match."""
        self._wait_text(text, timeout)


def _linux_uml() -> str:
    path = shutil.which("linux.uml")
    assert path is not None, "linux.uml missing (package user-mode-linux)"
    return path


def _uml_modules() -> Path:
    found = sorted(Path("/usr/lib/uml/modules").glob("6.1.*/kernel"))
    assert found, "no UML modules under /usr/lib/uml/modules/6.1.*"
    return found[-1]


@pytest.fixture(scope="module")
def uml() -> None:
    """The host tools, user-mode-linux among them (installed on first use)."""
    ensure_host_tools()
    _linux_uml()
    _uml_modules()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _resize(socket_path: Path, size: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "resize", str(socket_path), size, "--json"],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(("notifications", "ring"), [("eventfds", "packed"), ("inband", "split")])
def test_uml_guest_sees_capacity_serial_data_both_ways_with_odirect_and_a_resize(
    uml: None, serve: Serve, tmp_path: Path, notifications: str, ring: str
) -> None:
    """With ``inband``, kicks are VRING_KICK messages and calls VRING_CALL messages on
    the back-end channel (the daemon offers INBAND_NOTIFICATIONS, UML takes it).  UML
    takes packed rings when offered (§2.8); ``--no-packed`` makes it use split ones."""
    image = tmp_path / "disk.img"
    host_block = os.urandom(64 * 1024)
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(MiB)
        f.write(host_block)
    inband = ["--inband-notifications"] if notifications == "inband" else []
    layout = ["--no-packed"] if ring == "split" else []
    blk = serve("blk", "--image", str(image), "--serial", "uml-serial-7", *inband, *layout,
                "--log-level", "debug")
    guest_data = tmp_path / "guest.bin"
    script = f"""
    echo RESULT size=$(cat /sys/block/vda/size)
    echo RESULT serial=$(cat /sys/block/vda/serial)
    echo RESULT packed=$(cut -c35 /sys/block/vda/device/features)
    echo RESULT host_md5=$(dd if=/dev/vda bs=65536 skip=16 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    dd if=/dev/urandom of={guest_data} bs=65536 count=4 2>/dev/null
    dd if={guest_data} of=/dev/vda bs=65536 seek=64 oflag=direct conv=fsync 2>/dev/null || echo RESULT write=failed
    echo RESULT guest_md5=$(md5sum {guest_data} | cut -d' ' -f1)
    echo RESIZE-READY
    size=$(cat /sys/block/vda/size)
    for i in $(seq 200); do
        [ "$(cat /sys/block/vda/size)" != "$size" ] && break
        sleep 0.05
    done
    echo RESULT resized=$(cat /sys/block/vda/size)
    echo RESULT tail_md5=$(dd if=/dev/vda bs=65536 skip=$((48 * 16)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    """
    with UmlGuest(tmp_path, "blk", script, [f"{blk.socket_path}:{VIRTIO_BLK}"],
                  BLK_MODULES) as guest:
        guest.wait_for("RESIZE-READY")
        tail = os.urandom(65536)
        answer = _resize(blk.socket_path, "64M")
        with open(image, "r+b") as f:  # the grown part is the host's to fill
            f.seek(48 * MiB)
            f.write(tail)
        r = guest.finish()
    assert "insmod_failed" not in r, guest.console
    assert r["size"] == str(32 * MiB // 512), guest.console
    assert r["serial"] == "uml-serial-7"
    assert r["packed"] == ("1" if ring == "packed" else "0"), guest.console
    assert r["host_md5"] == _md5(host_block)
    assert "write" not in r
    with open(image, "rb") as f:
        f.seek(64 * 65536)
        assert _md5(f.read(4 * 65536)) == r["guest_md5"] == _md5(guest_data.read_bytes())
    assert answer["notified"] == "acked", answer
    assert answer["size"] == 64 * MiB and answer["previous_size"] == 32 * MiB
    assert r["resized"] == str(64 * MiB // 512), guest.console
    assert r["tail_md5"] == _md5(tail)
    log_text = blk.log
    kicks = log_text.count(": VRING_KICK flags=")
    assert (kicks > 0) == (notifications == "inband"), log_text
    print(f"UML blk ({notifications}, {ring} rings, {kicks} in-band kicks): capacity {r['size']} -> "
          f"{r['resized']} sectors after resize "
          f"(ack in {answer.get('ack_seconds')} s), serial {r['serial']!r}, "
          f"boot retries {guest.retries}")
    assert blk.stop() == 0
    assert " ERROR " not in blk.log, blk.log


def test_two_uml_guests_ping_over_a_pyvirtio_switch(
    uml: None, serve: Serve, tmp_path: Path
) -> None:
    switch = f"uml-{os.getpid()}-{secrets.token_hex(3)}"
    macs = {"a": "02:00:0a:e1:00:01", "b": "02:00:0a:e1:00:02"}
    # Guest a's port offers packed rings (UML takes them), b's only split ones.
    layouts = {"a": [], "b": ["--no-packed"]}
    nets = {n: serve("net", "--switch", switch, "--mac", mac, *layouts[n], name=f"net{n}")
            for n, mac in macs.items()}
    busybox = BUSYBOX_PATH

    def script(me: str, peer: str) -> str:
        return f"""
        dev=$(ls /sys/class/net | grep -v lo | head -n1)
        echo RESULT dev=$dev
        echo RESULT mac=$(cat /sys/class/net/$dev/address)
        echo RESULT packed=$(cut -c35 /sys/class/net/$dev/device/features)
        ip addr add 10.225.0.{me}/24 dev $dev && ip link set $dev up
        # The peer boots at its own pace: wait until it answers, then count.
        for i in $(seq 30); do
            {busybox} ping -c 1 -W 1 10.225.0.{peer} >/dev/null 2>&1 && break
        done
        out=$({busybox} ping -c 3 -W 2 10.225.0.{peer} 2>&1)
        echo RESULT ping=$(echo "$out" | grep 'packets transmitted')
        echo RESULT rtt=$(echo "$out" | grep 'round-trip')
        # Stay up until the peer has counted its pings too.
        touch {tmp_path}/done-{me}
        for i in $(seq 300); do [ -e {tmp_path}/done-{peer} ] && break; sleep 0.1; done
        """

    guests = [
        UmlGuest(tmp_path, "neta", script("1", "2"), [f"{nets['a'].socket_path}:{VIRTIO_NET}"],
                 NET_MODULES),
        UmlGuest(tmp_path, "netb", script("2", "1"), [f"{nets['b'].socket_path}:{VIRTIO_NET}"],
                 NET_MODULES),
    ]
    try:
        for guest in guests:
            guest.start()
        results = [guest.finish(90) for guest in guests]
    finally:
        for guest in guests:
            guest.kill()
    for guest, r, mac in zip(guests, results, macs.values(), strict=True):
        assert "insmod_failed" not in r, guest.console
        assert r["mac"] == mac, guest.console
        assert r["packed"] == ("0" if guest.name == "netb" else "1"), guest.console
        assert re.search(r"3 packets transmitted, 3 packets received", r["ping"]), guest.console
        print(f"UML {guest.name}: {r['dev']} {r['mac']}: {r['ping']}; {r['rtt']}")
    for net in nets.values():
        assert net.stop() == 0
        # Frames that reach a port before its guest has rings are dropped (and logged).
        errors = [line for line in net.log.splitlines()
                  if " ERROR " in line and "no rx buffer" not in line]
        assert not errors, net.log
