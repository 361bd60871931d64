"""``make demo``: a real Linux guest uses pyvirtio's virtio-blk, virtio-rng and virtio-net.

Starts ``pyvirtio serve blk``, ``pyvirtio serve rng`` and two ``pyvirtio serve
net`` ports of one switch through the CLI, and boots a Debian kernel under QEMU
with the blk, rng and one net device attached over vhost-user.  The guest makes
a file system on the pyvirtio disk, writes files, remounts and reads them back,
draws entropy, and pings 10.217.0.1 on its network.  That address is the
demo itself: pyvirtio's own virtio-net driver (:class:`~pyvirtio.frontend.NetDriver`)
on the switch's other port answers ARP and ping.  Then the demo checks on the
host what the guest did and prints a short report: each daemon's counters (both
directions for net), the network capture it keeps (``./demo-out/net.pcap``; the
rest goes with the work folder), and where the ``pyvirtio`` command is.  Exits
non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyvirtio
from pyvirtio.devices.base import QueueStats
from pyvirtio.errors import BackendError, GuestError
from pyvirtio.frontend import NetDriver
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import (
    BackendProcess,
    vhost_user_device_args,
    vhost_user_net_args,
)

__all__ = ["backend_summary", "command_hint", "main"]

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
ip link set eth0 up && ip addr add 10.217.0.2/24 dev eth0
echo RESULT mac=$(cat /sys/class/net/eth0/address)
echo RESULT ping="$(ping -c 3 -W 5 10.217.0.1 | grep 'packets transmitted')"
"""

#: The demo's network (test-only, on the demo's switch alone): the guest and the host.
GUEST_MAC, HOST_MAC = "02:00:0a:d9:de:02", "02:00:0a:d9:de:01"
HOST_IP = bytes([10, 217, 0, 1])


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(frame: bytes, mac: bytes, ip: bytes) -> bytes | None:
    """The reply a host at ``mac``/``ip`` gives an ARP request or ICMP echo, else None."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x06" and len(frame) >= 42 and frame[20:22] == b"\x00\x01" \
            and frame[38:42] == ip:  # an ARP request for ip
        sender_mac, sender_ip = frame[22:28], frame[28:32]
        return (sender_mac + mac + b"\x08\x06" + frame[14:20] + b"\x00\x02"
                + mac + ip + sender_mac + sender_ip)
    if ethertype == b"\x08\x00" and len(frame) >= 34 and frame[30:34] == ip \
            and frame[23] == 1:  # ICMP to ip
        ihl = (frame[14] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        icmp = frame[14 + ihl : 14 + total]
        if len(icmp) < 8 or icmp[0] != 8:
            return None
        reply = b"\x00\x00\x00\x00" + icmp[4:]
        reply = reply[:2] + _checksum(reply).to_bytes(2, "big") + reply[4:]
        header = bytearray(frame[14 : 14 + ihl])
        header[12:16], header[16:20] = frame[30:34], frame[26:30]
        header[10:12] = b"\0\0"
        header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
        return frame[6:12] + mac + b"\x08\x00" + bytes(header) + reply
    return None


class Responder(threading.Thread):
    """pyvirtio's NetDriver on a switch port, answering ARP and ping for ``ip``."""

    def __init__(self, driver: NetDriver, mac: bytes, ip: bytes) -> None:
        super().__init__(daemon=True)
        self.driver, self.mac, self.ip = driver, mac, ip
        self.stopping = threading.Event()
        self.answered = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for frame in self.driver.receive(0.2):
                    reply = answer(frame, self.mac, self.ip)
                    if reply is not None:
                        self.driver.send(reply)
                        self.answered += 1
        except BackendError as exc:
            self.error = exc


def backend_summary(device: str, snapshot: dict[str, Any]) -> str:
    """A daemon's counters since it started (``pyvirtio stats``' ``totals``), on one line.

    blk and rng: every queue together.  net: both directions, the receive
    queues' frames to the guest and the transmit queues' frames from it (the
    control queue, if any, is the odd one out at the end).
    """
    queues = [QueueStats.from_json(q) for q in snapshot["totals"]]
    total = sum(queues, QueueStats())
    if device != "net":
        return str(total)
    pairs = len(queues) // 2
    rx = sum(queues[0 : 2 * pairs : 2], QueueStats())
    tx = sum(queues[1 : 2 * pairs : 2], QueueStats())
    return (f"{rx.requests} frames ({rx.bytes_in} bytes) to the guest, {tx.requests} frames "
            f"({tx.bytes_out} bytes) from the guest, {total.errors} errors, "
            f"{total.violations} driver violations")


def _counters(daemon: BackendProcess) -> str:
    """:func:`backend_summary` of a running daemon."""
    try:
        return backend_summary(daemon.device, daemon.stats())
    except (OSError, ValueError, KeyError) as exc:
        return f"no statistics ({exc})"


def command_hint(cwd: Path | None = None) -> list[str]:
    """Where the ``pyvirtio`` command of this Python is, and how to run it from anywhere.

    ``make demo`` installs it into ``.venv/bin``, which is not on PATH.
    """
    here = cwd or Path.cwd()
    installed = Path(sys.executable).parent / "pyvirtio"
    script = _shown(installed, here)
    source = Path(pyvirtio.__file__).resolve().parents[2]  # src/pyvirtio/__init__.py
    pipx = (f"  pipx install {_shown(source, here)}   (on PATH for good; or pip install "
            "it into any environment)" if (source / "pyproject.toml").exists() else
            "  pipx install SOURCE-FOLDER   (on PATH for good)")
    if not installed.exists():
        return ["the pyvirtio command is not installed next to this Python:", pipx]
    found = shutil.which("pyvirtio")
    if found is not None and Path(found).resolve() == installed.resolve():
        return [f"the pyvirtio command: {script} (on your PATH: try pyvirtio --help)"]
    return [
        f"the pyvirtio command: {script} (try {script} --help); to type just pyvirtio:",
        f"  . {script.parent / 'activate'}   (in this shell), or",
        pipx,
    ]


def _shown(path: Path, cwd: Path) -> Path:
    """``path`` relative to ``cwd`` when it is under it (``.`` for ``cwd`` itself)."""
    try:
        return path.relative_to(cwd)
    except ValueError:
        return path


def _check(ok: bool, text: str, failures: list[str]) -> str:
    if not ok:
        failures.append(text)
    return f"{text} {'ok' if ok else 'FAILED'}"


def run_demo(workdir: Path, size: int, out: Path) -> int:
    """Run the demo in ``workdir``; print the report; return the exit status.

    The network capture goes to ``out``, which is kept.
    """
    kit = GuestKit.ensure()
    image = workdir / "demo.img"
    out.mkdir(parents=True, exist_ok=True)
    pcap = out.resolve() / "net.pcap"
    print(f"pyvirtio demo: Linux {kit.version} under QEMU (TCG) with pyvirtio devices")
    print(f"  work folder {workdir}")
    blk = BackendProcess(
        "blk", workdir / "blk.sock",
        ["--image", str(image), "--size", str(size), "--serial", "pyvirtio-demo"],
    )
    daemons = [blk]
    try:
        rng = BackendProcess("rng", workdir / "rng.sock")
        daemons.append(rng)
        switch = f"demo-{os.getpid()}"
        net = BackendProcess("net", workdir / "net.sock", [
            "--switch", switch, "--mac", GUEST_MAC, "--pcap", str(pcap)])
        daemons.append(net)
        host_port = BackendProcess("net", workdir / "host.sock",
                                   ["--switch", switch, "--mac", HOST_MAC])
        daemons.append(host_port)
        driver = NetDriver.open(host_port.socket_path)
    except (GuestError, BackendError):
        for daemon in daemons:
            daemon.stop()
        raise
    responder = Responder(driver, bytes.fromhex(HOST_MAC.replace(":", "")), HOST_IP)
    responder.start()
    args = [
        *vhost_user_device_args("blk", blk.socket_path, "blk0"),
        *vhost_user_device_args("rng", rng.socket_path, "rng0"),
        *vhost_user_net_args(net.socket_path, "net0", GUEST_MAC),
    ]
    started = time.monotonic()
    try:
        result = kit.run(
            GUEST_SCRIPT,
            ["virtio_blk", "virtio-rng", "virtio_net", "crc32c_generic", "ext4"], args,
            timeout=180,
        )
    finally:
        responder.stopping.set()
        responder.join(10)
        driver.close()
        counters = {daemon.device: _counters(daemon) for daemon in (blk, rng, net)}
        statuses = [daemon.stop() for daemon in daemons]
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
    print(f"  backend: {counters['blk']}")
    print("\nvirtio-rng  (pyvirtio serve rng, QEMU vhost-user-rng-pci)")
    print(f"  guest hwrng: {r.get('rng_current', '?')}")
    draws = (r.get("draw1", ""), r.get("draw2", ""))
    print(f"  two draws of 16 bytes: {draws[0]} {draws[1]}")
    print("  " + _check(
        r.get("rng_current", "").startswith("virtio_rng")
        and len(draws[0]) == 32 and draws[0] != draws[1],
        "entropy comes from pyvirtio and differs between draws:", failures))
    print(f"  backend: {counters['rng']}")
    print("\nvirtio-net  (pyvirtio serve net on a pyvirtio switch, QEMU virtio-net-pci)")
    print(f"  guest eth0: {r.get('mac', '?')} 10.217.0.2/24; the host port 10.217.0.1 is "
          "pyvirtio's own NetDriver")
    print("  " + _check(
        "3 packets transmitted, 3 packets received" in r.get("ping", ""),
        f"guest pings the NetDriver: {r.get('ping', '?')}:", failures))
    print("  " + _check(responder.error is None and responder.answered >= 4,
                        f"NetDriver answered {responder.answered} ARP and ping requests:",
                        failures))
    shown = _shown(pcap, Path.cwd())
    print(f"  capture kept in {shown}: {pcap.stat().st_size if pcap.exists() else 0} bytes "
          f"(tcpdump -r {shown})")
    print(f"  backend: {counters['net']}")
    print()
    print(_check(all(status == 0 for status in statuses),
                 f"all {len(statuses)} daemons stopped cleanly on SIGTERM:", failures))
    if failures:
        print(f"\n{len(failures)} check(s) failed; guest console:\n{result.console}")
        return 1
    print("\nall checks passed\n")
    print("\n".join(command_hint()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pyvirtio.demo``."""
    parser = argparse.ArgumentParser(prog="python -m pyvirtio.demo", description=__doc__)
    parser.add_argument("--keep", type=Path,
                        help="work in this folder and keep the image and logs")
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="where to keep the network capture net.pcap (default: "
                        "./demo-out, which git ignores)")
    parser.add_argument("--size", type=int, default=256 * MiB, help="disk size in bytes")
    args = parser.parse_args(argv)
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            return run_demo(args.keep, args.size, args.out)
        with tempfile.TemporaryDirectory(prefix="pyvirtio-demo-") as tmp:
            return run_demo(Path(tmp), args.size, args.out)
    except (GuestError, OSError) as exc:
        print(f"pyvirtio demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
