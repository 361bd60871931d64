"""Guest shell fragments and host-side checks shared by the end-to-end tests."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pyvirtio.guestkit.backends import Daemon


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


#: Bring eth0 up as {ip}/24, show its MAC and MTU, wait until {peer} answers a ping, then
#: ping it 5 times, and 3 times with {payload} bytes of ICMP payload (MTU - 28 fills a frame).
PING = """
    ip link set eth0 up || exit 61
    ip addr add {ip}/24 dev eth0 || exit 62
    echo RESULT mac=$(cat /sys/class/net/eth0/address)
    echo RESULT mtu=$(cat /sys/class/net/eth0/mtu)
    n=0
    until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge 90 ] && {{ echo RESULT ping=unreachable; exit 63; }}
    done
    echo RESULT ping_tries=$n
    echo RESULT ping="$(ping -c 5 -i 0.2 {peer} | grep 'packets transmitted')"
    echo RESULT full_ping="$(ping -c 3 -i 0.2 -s {payload} {peer} | grep 'packets transmitted')"
"""

#: {mib} MiB of random bytes in /tmp/data; prints their md5 (sent_md5).
MAKE_DATA = """
    dd if=/dev/urandom of=/tmp/data bs=1048576 count={mib} 2>/dev/null
    echo RESULT sent_md5=$(md5sum /tmp/data | cut -d' ' -f1)
"""

#: Send /tmp/data to {peer}, TCP port 5000, trying again until it listens (sent=yes).
SEND_DATA = """
    n=0
    until nc {peer} 5000 </tmp/data; do
        n=$((n + 1))
        [ $n -ge 30 ] && {{ echo RESULT nc=failed; exit 64; }}
        sleep 1
    done
    echo RESULT sent=yes
"""

#: Receive a file on TCP port 5000 into /tmp/recv; prints its size and md5 (recv_bytes,
#: recv_md5).  nc's stdin is a fifo it holds open, so nc exits when the sender's side
#: shuts down (at the end of the file), not when stdin ends.
RECEIVE_DATA = """
    mkfifo /tmp/hold
    exec 3<>/tmp/hold
    nc -l -p 5000 <&3 >/tmp/recv || echo RESULT nc=failed
    echo RESULT recv_bytes=$(wc -c < /tmp/recv)
    echo RESULT recv_md5=$(md5sum /tmp/recv | cut -d' ' -f1)
"""

#: The virtio-net device's negotiated features: one '0'/'1' per bit, bit 0 first (features).
NET_FEATURES = """
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat $d/device)" = 0x0001 ] && echo RESULT features=$(cat $d/features)
    done
"""

#: The guest driver's receive length errors (rx_length_errors).  Linux counts one for a
#: frame whose num_buffers buffers it did not all find used ("rx error: N buffers out of
#: M missing"), and for a buffer too short for a header: 0 when frames are merged right.
RX_ERRORS = """
    echo RESULT rx_length_errors=$(cat /sys/class/net/eth0/statistics/rx_length_errors)
"""

#: A file swap over TCP between a guest ({ip}) and the host ({peer}, in a network
#: namespace: :func:`file_swap_host`).  The guest shows the virtio-net device's negotiated
#: features, pings the host (:data:`PING`), sends it {mib} MiB, receives a file, then
#: shows its driver's receive length errors (:data:`RX_ERRORS`).
FILE_SWAP_GUEST = NET_FEATURES + PING + MAKE_DATA + SEND_DATA + """
    rm /tmp/data
""" + RECEIVE_DATA + RX_ERRORS

# The host side (argv: host, guest, MiB): take the guest's file, then send one back.
FILE_SWAP_HOST = """
import hashlib, os, socket, sys, time
host, guest, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
server = socket.create_server((host, 5000))
server.settimeout(300)
conn, _ = server.accept()
digest, size = hashlib.md5(), 0
while data := conn.recv(1 << 20):
    digest.update(data)
    size += len(data)
conn.close()
print(f"HOST recv_bytes={size}", flush=True)
print(f"HOST recv_md5={digest.hexdigest()}", flush=True)
payload = os.urandom(mib << 20)
print(f"HOST sent_md5={hashlib.md5(payload).hexdigest()}", flush=True)
deadline = time.monotonic() + 120
while True:
    try:
        out = socket.create_connection((guest, 5000), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
out.settimeout(300)
out.sendall(payload)
out.close()
print("HOST sent=yes", flush=True)
"""


def serve_in_netns(netns: str, socket_path: Path, log_path: Path, *options: str) -> Daemon:
    """``pyvirtio serve net --socket socket_path *options`` in network namespace ``netns``.

    Its vhost-user socket is a file, so QEMU in the root namespace still reaches it.
    """
    return Daemon(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "pyvirtio.cli", "serve", "net",
         "--socket", str(socket_path), "--log-level", "info", *options],
        socket_path, log_path,
    )


def tap_address(netns: str, tap: str, address: str) -> None:
    """Give the host side of ``tap`` (in ``netns``) ``address`` (``10.x.y.z/24``), bring it up."""
    for command in (["ip", "addr", "add", address, "dev", tap], ["ip", "link", "set", tap, "up"]):
        subprocess.run(["ip", "netns", "exec", netns, *command], check=True,
                       capture_output=True, text=True)


@contextlib.contextmanager
def file_swap_host(
    netns: str, host: str, guest: str, mib: int
) -> Iterator[subprocess.Popen[str]]:
    """The host side of :data:`FILE_SWAP_GUEST`, in ``netns``; killed if it outlives the block.

    Read its output with ``communicate()`` once the guest is done.
    """
    process = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", FILE_SWAP_HOST, host, guest,
         str(mib)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def check_file_swap(guest: dict[str, str], host_out: str, mib: int) -> None:
    """Both files of a swap arrived whole: sizes and md5 sums agree on both sides."""
    host = dict(re.findall(r"HOST (\w+)=(\S+)", host_out))
    assert host["recv_bytes"] == str(mib << 20), host_out
    assert host["recv_md5"] == guest["sent_md5"], (host_out, guest)
    assert guest["recv_bytes"] == str(mib << 20), guest
    assert guest["recv_md5"] == host["sent_md5"], (host_out, guest)
