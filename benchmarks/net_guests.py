"""Two TCG guests moving a file over TCP through different networks, side by side.

Used by ``benchmarks/net_bench.py`` (section 4).  The same two Linux 6.1 guests
(QEMU 7.2, TCG, 1 vCPU, 512 MiB, ``virtio-net-pci,vectors=0``, MTU 1500) and the
same transfer in each network: the sender times ``nc PEER 5000 </tmp/data`` (busybox)
with ``/proc/uptime``; the receiver counts the bytes.

- ``pyvirtio-1``: one ``pyvirtio serve net`` daemon serving both guests' ports
  (``--socket A --socket B --switch S``): frames pass inside the daemon;
- ``pyvirtio-2``: two daemons on one switch (frames in batch datagrams between them);
- ``qemu-socket``: QEMU's built-in virtio-net back end with ``-netdev socket``
  (one QEMU listens on a TCP port, the other connects; frames go QEMU to QEMU);
- ``qemu-tap-bridge``: QEMU's built-in virtio-net on tap devices enslaved to a
  Linux bridge, in a private network namespace (needs root; skipped otherwise).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyvirtio.client import ask
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import Daemon, serve_command
from pyvirtio.guestkit.vm import GuestVM, qemu_command

MAC_A = "02:00:0a:d6:00:0a"
MAC_B = "02:00:0a:d6:00:0b"
NETWORKS = ("pyvirtio-1", "pyvirtio-2", "qemu-socket", "qemu-tap-bridge")

_SETUP = """
    ip link set eth0 up || exit 61
    ip addr add {ip}/24 dev eth0 || exit 62
    n=0
    until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 90 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
"""
RECEIVER = _SETUP + """
    mkfifo /tmp/hold
    exec 3<>/tmp/hold
    echo RESULT recv_bytes=$(nc -l -p 5000 <&3 | wc -c)
"""
SENDER = """
    dd if=/dev/zero of=/tmp/data bs=1048576 count={mib} 2>/dev/null
""" + _SETUP + """
    sleep 1
    t0=$(cut -d' ' -f1 /proc/uptime)
    nc {peer} 5000 </tmp/data || echo RESULT nc=failed
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo RESULT start=$t0
    echo RESULT end=$t1
"""


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _vhost_user(path: Path, mac: str) -> list[str]:
    return ["-chardev", f"socket,id=n0,path={path}", "-netdev", "vhost-user,id=n0n,chardev=n0",
            "-device", f"virtio-net-pci,netdev=n0n,vectors=0,mac={mac}"]


def _builtin(netdev: str, mac: str) -> list[str]:
    return ["-netdev", f"{netdev},id=n0n",
            "-device", f"virtio-net-pci,netdev=n0n,vectors=0,mac={mac}"]


def _serve(work: Path, sockets: Sequence[Path], switch: str,
           macs: Sequence[str]) -> Daemon:
    extra: list[str] = []
    for path in sockets[1:]:
        extra += ["--socket", str(path)]
    extra += ["--switch", switch]
    for mac in macs:
        extra += ["--mac", mac]
    daemon = Daemon(serve_command("net", sockets[0], extra, log_level="warning"), sockets[0],
                    work / f"{sockets[0].stem}.log")
    deadline = time.monotonic() + 10
    while not all(p.exists() for p in sockets) and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon


@contextlib.contextmanager
def _network(name: str, work: Path) -> Iterator[tuple[list[str], list[str], list[Daemon],
                                                        Callable[[list[str]], list[str]]]]:
    """QEMU arguments of guest A and B, the pyvirtio daemons, and a command prefix."""
    daemons: list[Daemon] = []
    plain: Callable[[list[str]], list[str]] = lambda command: command  # noqa: E731
    switch = f"g{os.getpid()}{secrets.token_hex(2)}"
    try:
        if name == "pyvirtio-1":
            a, b = work / f"{switch}-a.sock", work / f"{switch}-b.sock"
            daemons.append(_serve(work, [a, b], switch, [MAC_A, MAC_B]))
            yield _vhost_user(a, MAC_A), _vhost_user(b, MAC_B), daemons, plain
        elif name == "pyvirtio-2":
            a, b = work / f"{switch}-a.sock", work / f"{switch}-b.sock"
            daemons.append(_serve(work, [a], switch, [MAC_A]))
            daemons.append(_serve(work, [b], switch, [MAC_B]))
            yield _vhost_user(a, MAC_A), _vhost_user(b, MAC_B), daemons, plain
        elif name == "qemu-socket":
            port = _free_port()
            yield (_builtin(f"socket,listen=127.0.0.1:{port}", MAC_A),
                   _builtin(f"socket,connect=127.0.0.1:{port}", MAC_B), daemons, plain)
        elif name == "qemu-tap-bridge":
            ns = f"pvb{secrets.token_hex(3)}"
            run = ["ip", "netns", "exec", ns]
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                for command in (["ip", "link", "add", "br0", "type", "bridge"],
                                ["ip", "tuntap", "add", "tapa", "mode", "tap"],
                                ["ip", "tuntap", "add", "tapb", "mode", "tap"],
                                ["ip", "link", "set", "tapa", "master", "br0"],
                                ["ip", "link", "set", "tapb", "master", "br0"],
                                ["ip", "link", "set", "br0", "up"],
                                ["ip", "link", "set", "tapa", "up"],
                                ["ip", "link", "set", "tapb", "up"]):
                    subprocess.run(run + command, check=True)
                tap = "tap,ifname={},script=no,downscript=no,vhost=off"
                yield (_builtin(tap.format("tapa"), MAC_A), _builtin(tap.format("tapb"), MAC_B),
                       daemons, lambda command: run + command)
            finally:
                subprocess.run(["ip", "netns", "delete", ns], check=False)
        else:
            raise ValueError(name)
    finally:
        for daemon in daemons:
            daemon.stop()


def tap_bridge_possible() -> str | None:
    """Why ``qemu-tap-bridge`` cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    probe = f"pvp{secrets.token_hex(3)}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=False)
    return None


def _boot(kit: GuestKit, work: Path, script: str, qemu_args: list[str],
          wrap: Callable[[list[str]], list[str]]) -> GuestVM:
    folder = Path(tempfile.mkdtemp(prefix="vm-", dir=work))
    initrd = kit.build_initramfs(script, ["virtio_net"], folder / "initramfs.cpio")
    command = qemu_command(kit.qemu, kit.kernel, initrd, qemu_args)
    return GuestVM(wrap(command))


def guest_tcp(kit: GuestKit, work: Path, network: str, mib: int) -> dict[str, Any]:
    """Guest B sends ``mib`` MiB over TCP to guest A through ``network``."""
    with _network(network, work) as (args_a, args_b, daemons, wrap):
        cpu0 = [_cpu_seconds(d.process.pid) for d in daemons]
        with (
            _boot(kit, work, RECEIVER.format(ip="10.213.0.1", peer="10.213.0.2"), args_a,
                  wrap) as vm_a,
            _boot(kit, work, SENDER.format(ip="10.213.0.2", peer="10.213.0.1", mib=mib),
                  args_b, wrap) as vm_b,
        ):
            result_b = vm_b.wait(timeout=900)
            result_a = vm_a.wait(timeout=60)
        cpu = [round(_cpu_seconds(d.process.pid) - c, 2)
               for d, c in zip(daemons, cpu0, strict=True)]
        gso = sum(_count(ask(path, "stats"), "gso packets") for d in daemons
                  for path in [d.socket_path] + [Path(x) for x, before in
                                                 zip(d.command[1:], d.command, strict=False)
                                                 if before == "--socket"])
    if result_a.exit_code != 0 or result_b.exit_code != 0 or "end" not in result_b.results:
        raise SystemExit(f"{network}: guest run failed:\n{result_a.console[-2000:]}\n"
                         f"{result_b.console[-2000:]}")
    seconds = float(result_b.results["end"]) - float(result_b.results["start"])
    received = int(result_a.results["recv_bytes"])
    return {
        "network": network,
        "bytes_sent": mib << 20,
        "bytes_received": received,
        "seconds": round(seconds, 2),
        "mb_per_s": round(received / seconds / 1e6, 2),
        "daemon_cpu_s_whole_run": cpu,
        # Packets the guests handed the daemons for TCP segmentation (and got as such).
        "gso_packets": gso,
    }


def _count(snapshot: object, key: str) -> int:
    """The sum of every ``key`` entry anywhere in a ``pyvirtio stats`` snapshot."""
    if isinstance(snapshot, dict):
        return sum(v if k == key and isinstance(v, int) else _count(v, key)
                   for k, v in snapshot.items())
    if isinstance(snapshot, list):
        return sum(_count(v, key) for v in snapshot)
    return 0


if __name__ == "__main__":  # one network, for trying it out: net_guests.py NETWORK [MIB]
    with tempfile.TemporaryDirectory(prefix="pyvirtio-guests-") as tmp:
        print(guest_tcp(GuestKit.ensure(), Path(tmp), sys.argv[1],
                        int(sys.argv[2]) if len(sys.argv) > 2 else 16))
