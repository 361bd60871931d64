"""Real Linux guests drive `pyvirtio serve vsock` (VIRTIO 1.4 §5.10): user-mode Linux and QEMU 7.2.

One UML boot checks the stream protocol both ways with 64 MiB and md5 (the guest's
reader sleeps first, so the credit runs out and the host's writer blocks), the
SHUTDOWN half-close, RST for a closed port in both directions and SEQPACKET message
boundaries.  The guest side is a Python script (UML runs host binaries from the
host's root).  Two UML guests in one ``--group`` talk to each other.  A QEMU 7.2
guest (``vhost-user-vsock-pci,seqpacket=on``) runs Debian's socat from its initramfs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.devices.vsock.bridge import connect_guest
from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args
from tests.e2e.test_uml import UmlGuest, uml  # noqa: F401 - the fixture

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
VIRTIO_VSOCK = 19
VSOCK_MODULES = ["net/vmw_vsock/vsock.ko", "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                 "net/vmw_vsock/vmw_vsock_virtio_transport.ko"]
SEQ_SIZES = [1, 300, 4096, 5000, 70000, 10]

GUEST_SCRIPT = r'''
import hashlib, socket, sys, time
AF = socket.AF_VSOCK
def result(key, value):
    print(f"RESULT {key}={value}", flush=True)
data_path, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
listener = socket.socket(AF, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 5000))
listener.listen(4)
print("LISTENING", flush=True)
# guest -> host: 64 MiB, then a half-close; the host answers after our EOF
s = socket.socket(AF, socket.SOCK_STREAM)
s.connect((2, 1234))
with open(data_path, "rb") as f:
    while chunk := f.read(1 << 20):
        s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
reply = b""
while part := s.recv(4096):
    reply += part
s.close()
result("g2h_reply", reply.decode())
# a closed host port: RST
s = socket.socket(AF, socket.SOCK_STREAM)
try:
    s.connect((2, 9999))
    result("closed_port", "connected")
except OSError as exc:
    result("closed_port", type(exc).__name__)
s.close()
# host -> guest: a slow reader (it sleeps first: the credit runs out)
conn, peer = listener.accept()
result("h2g_peer", f"{peer[0]}:{peer[1]}")
print("H2G-STALL", flush=True)
time.sleep(3)
md5, total = hashlib.md5(), 0
while part := conn.recv(65536):
    md5.update(part)
    total += len(part)
result("h2g_md5", md5.hexdigest())
result("h2g_bytes", total)
conn.close()
# seqpacket: message boundaries both ways
s = socket.socket(AF, socket.SOCK_SEQPACKET)
s.connect((2, 1240))
for i, size in enumerate(sizes):
    s.send(bytes([i + 1]) * size)
echoed = []
for _ in sizes:
    message = s.recv(1 << 20)
    echoed.append(f"{len(message)}:{message[:1].hex()}")
result("seq_echo", ",".join(echoed))
s.close()
'''


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _listen(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    sock.listen(4)
    sock.settimeout(120)
    return sock


class _Thread(threading.Thread):
    """A host-side peer; its exception fails the test."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self._target_fn()
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "host-side peer still running"
        if self.error is not None:
            raise self.error
        return self.value


def _vsock_table(socket_path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pyvirtio.cli", "vsock", str(socket_path),
                           "--json"], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    table: dict[str, Any] = json.loads(done.stdout)
    return table


def test_uml_guest_streams_64mib_both_ways_half_close_rst_and_seqpacket(
    uml: None, serve: Serve, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    uds = tmp_path / "vsock.uds"
    tx_buffer = 256 * 1024
    daemon = serve("vsock", "--guest-cid", "3", "--uds-path", str(uds),
                   "--tx-buffer-size", str(tx_buffer))
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(64 * MiB))
    data_md5 = _md5(data)
    script = tmp_path / "guest.py"
    script.write_text(GUEST_SCRIPT)

    g2h_listener = _listen(Path(f"{uds}_1234"))
    seq_listener = _listen(Path(f"{uds}_1240"), socket.SOCK_SEQPACKET)

    def g2h() -> tuple[str, int]:
        conn, _ = g2h_listener.accept()
        with conn:
            conn.settimeout(120)
            md5, total = hashlib.md5(), 0
            while part := conn.recv(1 << 20):  # to the guest's half-close
                md5.update(part)
                total += len(part)
            conn.sendall(md5.hexdigest().encode())  # the other half still works
        return md5.hexdigest(), total

    def seq() -> list[int]:
        conn, _ = seq_listener.accept()
        with conn:
            conn.settimeout(60)
            sizes = []
            for _ in SEQ_SIZES:
                message = conn.recv(1 << 20)
                sizes.append(len(message))
                conn.send(message)
            return sizes

    g2h_thread, seq_thread = _Thread(g2h), _Thread(seq)
    g2h_thread.start()
    seq_thread.start()
    command = f"python3 {script} {data} {','.join(map(str, SEQ_SIZES))}"
    with UmlGuest(tmp_path, "vsock", command, [f"{daemon.socket_path}:{VIRTIO_VSOCK}"],
                  VSOCK_MODULES) as guest:
        guest.wait_for("LISTENING", 60)
        with pytest.raises(ConnectionRefusedError):  # nobody listens there: RST, closed
            connect_guest(uds, 7777)

        def h2g() -> int:
            sock, host_port = connect_guest(uds, 5000)
            with sock, open(data, "rb") as f:
                while chunk := f.read(1 << 20):
                    sock.sendall(chunk)
            return host_port

        h2g_thread = _Thread(h2g)
        h2g_thread.start()
        guest.wait_for("H2G-STALL", 180)
        stalled: dict[str, Any] | None = None
        live: list[dict[str, Any]] = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            rows = [c for c in _vsock_table(daemon.socket_path)["connections"]
                    if c["guest"] == "3:5000"]
            if rows and rows[0]["guest_credit"] == 0:
                stalled = rows[0]
                live = daemon.stats()["device"]["connections"]  # in ``pyvirtio stats``
                break
            time.sleep(0.1)
        results = guest.finish(300)
        host_port = h2g_thread.result()
    host_md5, host_total = g2h_thread.result()
    seq_sizes = seq_thread.result()
    console = guest.console
    assert (host_total, host_md5) == (64 * MiB, data_md5)
    assert results["g2h_reply"] == data_md5, console
    assert results["closed_port"] == "ConnectionResetError", console
    assert results["h2g_peer"] == f"2:{host_port}"
    assert results["h2g_md5"] == data_md5 and results["h2g_bytes"] == str(64 * MiB), console
    assert stalled is not None, "the guest's credit never ran out while it slept"
    assert stalled["held_bytes"] <= tx_buffer
    (row,) = [c for c in live if c["guest"] == "3:5000" and c["peer"] == stalled["peer"]]
    assert row["state"] == "established" and 0 < row["bytes_to_guest"] < 64 * MiB, live
    assert seq_sizes == SEQ_SIZES
    assert results["seq_echo"] == ",".join(
        f"{size}:{i + 1:02x}" for i, size in enumerate(SEQ_SIZES)), console
    stats = daemon.stats()
    tx_kinds = stats["totals"][1]["kinds"]
    rx_kinds = stats["totals"][0]["kinds"]
    assert not [k for k in tx_kinds if k.startswith("dropped_")], tx_kinds
    assert rx_kinds.get("RST", 0) >= 2  # the closed port, and clean closes
    assert stats["totals"][1]["bytes_from_guest"] >= 64 * MiB


SIBLING_A = r'''
import hashlib, socket, sys
AF = socket.AF_VSOCK
def result(key, value):
    print(f"RESULT {key}={value}", flush=True)
ready = sys.argv[1]
stream = socket.socket(AF, socket.SOCK_STREAM)
stream.bind((socket.VMADDR_CID_ANY, 6000))
stream.listen(1)
seq = socket.socket(AF, socket.SOCK_SEQPACKET)
seq.bind((socket.VMADDR_CID_ANY, 6001))
seq.listen(1)
open(ready, "w").close()
conn, peer = stream.accept()
result("stream_peer", f"{peer[0]}")
md5, total = hashlib.md5(), 0
while part := conn.recv(65536):
    md5.update(part)
    total += len(part)
conn.sendall(f"{md5.hexdigest()} {total}".encode())
conn.close()
conn, peer = seq.accept()
sizes = []
while message := conn.recv(1 << 20):
    sizes.append(len(message))
    conn.send(message)
result("seq_sizes", ",".join(map(str, sizes)))
'''

SIBLING_B = r'''
import os, socket, sys, time
AF = socket.AF_VSOCK
def result(key, value):
    print(f"RESULT {key}={value}", flush=True)
ready, data_path, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
for _ in range(600):
    if os.path.exists(ready):
        break
    time.sleep(0.05)
s = socket.socket(AF, socket.SOCK_STREAM)
s.connect((3, 6000))
with open(data_path, "rb") as f:
    s.sendall(f.read())
s.shutdown(socket.SHUT_WR)
reply = b""
while part := s.recv(4096):
    reply += part
s.close()
result("stream_reply", reply.decode())
s = socket.socket(AF, socket.SOCK_SEQPACKET)
s.connect((3, 6001))
echoed = []
for i, size in enumerate(sizes):
    s.send(bytes([i + 1]) * size)
    echoed.append(len(s.recv(1 << 20)))
s.close()
result("seq_echo", ",".join(map(str, echoed)))
s = socket.socket(AF, socket.SOCK_STREAM)
try:
    s.connect((5, 6000))
    result("no_sibling", "connected")
except OSError as exc:
    result("no_sibling", type(exc).__name__)
'''


def test_two_uml_guests_in_one_group_talk_by_cid(
    uml: None, serve: Serve, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    group = f"test-{os.getpid()}-{time.monotonic_ns()}"
    a = serve("vsock", "--guest-cid", "3", "--uds-path", str(tmp_path / "a.uds"),
              "--group", group, name="a")
    b = serve("vsock", "--guest-cid", "4", "--uds-path", str(tmp_path / "b.uds"),
              "--group", "other-group", "--group", group, name="b")
    data = tmp_path / "sibling.bin"
    data.write_bytes(os.urandom(8 * MiB))
    ready = tmp_path / "a.ready"
    (tmp_path / "a.py").write_text(SIBLING_A)
    (tmp_path / "b.py").write_text(SIBLING_B)
    sizes = ",".join(map(str, SEQ_SIZES))
    guest_a = UmlGuest(tmp_path, "sib-a", f"python3 {tmp_path / 'a.py'} {ready}",
                       [f"{a.socket_path}:{VIRTIO_VSOCK}"], VSOCK_MODULES)
    guest_b = UmlGuest(tmp_path, "sib-b", f"python3 {tmp_path / 'b.py'} {ready} {data} {sizes}",
                       [f"{b.socket_path}:{VIRTIO_VSOCK}"], VSOCK_MODULES)
    with guest_a, guest_b:
        results_b = guest_b.finish(120)
        results_a = guest_a.finish(60)
    assert results_b["stream_reply"] == f"{_md5(data)} {8 * MiB}", guest_b.console
    assert results_a["stream_peer"] == "4", guest_a.console
    assert results_a["seq_sizes"] == sizes and results_b["seq_echo"] == sizes
    assert results_b["no_sibling"] == "ConnectionResetError", guest_b.console
    for daemon in (a, b):
        kinds = daemon.stats()["totals"][1]["kinds"]
        assert not [k for k in kinds if k.startswith("dropped_")], kinds


QEMU_SCRIPT = """
dd if=/dev/urandom of=/tmp/g2h bs=1048576 count=64 2>/dev/null
echo RESULT g2h_md5=$(md5sum /tmp/g2h | cut -d' ' -f1)
/usr/bin/socat -u VSOCK-LISTEN:5000 - 2>/tmp/listen.err | (sleep 3; md5sum > /tmp/h2g.md5) &
/usr/bin/socat -t 60 - VSOCK-CONNECT:2:1234 < /tmp/g2h > /tmp/reply 2>/tmp/connect.err
echo RESULT g2h_rc=$?
echo RESULT g2h_reply=$(cat /tmp/reply)
rm /tmp/g2h
/usr/bin/socat -u - VSOCK-CONNECT:2:9999 < /dev/null 2>/tmp/rst.err
echo RESULT closed_rc=$?
echo RESULT closed_err=$(grep -o 'reset by peer' /tmp/rst.err | head -1 | tr ' ' _)
wait
echo RESULT h2g_md5=$(cut -d' ' -f1 /tmp/h2g.md5)
head -c 150000 /dev/urandom > /tmp/messages
echo RESULT seq_md5=$(md5sum /tmp/messages | cut -d' ' -f1)
/usr/bin/socat -b 70000 -u FILE:/tmp/messages VSOCK-CONNECT:2:1240,socktype=5 2>/tmp/seq.err
echo RESULT seq_rc=$?
cat /tmp/*.err
"""


@pytest.mark.parametrize("qemu", ["7.2", "10"])
def test_qemu_guest_socat_64mib_both_ways_rst_and_seqpacket(
    kit: GuestKit, serve: Serve, tmp_path: Path, qemu: str, request: pytest.FixtureRequest
) -> None:
    """QEMU 7.2's and QEMU 10's ``vhost-user-vsock-pci``."""
    if qemu == "10":
        kit = request.getfixturevalue("kit10")
    socat = Path("/usr/bin/socat")
    if not socat.exists():
        pytest.fail("socat missing (apt-get install socat, see HOST_PACKAGES)")
    uds = tmp_path / "q.uds"
    daemon = serve("vsock", "--guest-cid", "3", "--uds-path", str(uds))
    g2h_listener = _listen(Path(f"{uds}_1234"))
    seq_listener = _listen(Path(f"{uds}_1240"), socket.SOCK_SEQPACKET)
    h2g_data = os.urandom(64 * MiB)

    def g2h() -> tuple[str, int]:
        conn, _ = g2h_listener.accept()
        with conn:
            conn.settimeout(120)
            md5, total = hashlib.md5(), 0
            while part := conn.recv(1 << 20):
                md5.update(part)
                total += len(part)
            conn.sendall(md5.hexdigest().encode())
        return md5.hexdigest(), total

    def h2g() -> int:
        refused = 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                sock, _ = connect_guest(uds, 5000)
            except ConnectionRefusedError:  # not listening yet: the guest's RST closed it
                refused += 1
                time.sleep(0.3)
                continue
            with sock:
                sock.sendall(h2g_data)
            return refused
        raise AssertionError("the guest never listened on port 5000")

    def seq() -> tuple[list[int], str]:
        conn, _ = seq_listener.accept()
        with conn:
            conn.settimeout(60)
            sizes, md5 = [], hashlib.md5()
            while message := conn.recv(1 << 20):
                sizes.append(len(message))
                md5.update(message)
            return sizes, md5.hexdigest()

    threads = [_Thread(g2h), _Thread(h2g), _Thread(seq)]
    for thread in threads:
        thread.start()
    result = kit.run(
        QEMU_SCRIPT, ["vmw_vsock_virtio_transport"],
        vhost_user_device_args("vsock", daemon.socket_path, "v0", seqpacket="on"),
        files=binary_files(socat), timeout=300,
    )
    r = result.results
    (host_md5, host_total), refused, (seq_sizes, seq_md5) = (t.result() for t in threads)
    assert result.exit_code == 0, result.console
    assert (host_total, host_md5) == (64 * MiB, r["g2h_md5"]), result.console
    assert r["g2h_rc"] == "0" and r["g2h_reply"] == r["g2h_md5"], result.console
    assert r["closed_rc"] != "0" and r["closed_err"] == "reset_by_peer", result.console
    assert r["h2g_md5"] == hashlib.md5(h2g_data).hexdigest(), result.console
    assert r["seq_rc"] == "0", result.console
    assert seq_sizes == [70000, 70000, 10000] and seq_md5 == r["seq_md5"], result.console
    print(f"host CONNECTs refused before the guest listened: {refused}")
    kinds = daemon.stats()["totals"][1]["kinds"]
    assert not [k for k in kinds if k.startswith("dropped_")], kinds
