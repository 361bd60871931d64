"""Real guests drive ``pyvirtio serve console`` (VIRTIO 1.4 §5.3): user-mode Linux
(``virtio_uml``) and QEMU 10's generic ``vhost-user-device-pci`` with the Debian 6.1
guest's ``virtio_console``.

One boot per front-end checks, in order: ``/dev/hvc0`` output on the host's console
socket and host input back to the guest; the console size (``stty size``) before and
after a ``console-size`` control command; the named port ``org.pyvirtio.data``
found in ``/sys/class/virtio-ports/*/name`` carrying a line each way; a 10 MiB
transfer guest to host through that port, read slowly on purpose by the host, whose
md5 matches the guest's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.client import control_path, send_control
from pyvirtio.guestkit import GuestKit
from pyvirtio.guestkit.backends import BackendProcess

from .test_uml import UmlGuest, uml  # noqa: F401 - the fixture

Serve = Callable[..., BackendProcess]
MiB = 1 << 20
BIG = 10 * MiB
PORT_NAME = "org.pyvirtio.data"
VIRTIO_CONSOLE = 3
UML_MODULES = ["drivers/char/virtio_console.ko"]


def guest_script(work: str) -> str:
    """The guest's half (POSIX sh: UML runs bash, the QEMU guest busybox)."""
    return f"""
    W={work}; mkdir -p $W
    node() {{ [ -e $W/$1 ] || mknod $W/$1 c $(cut -d: -f1 $2) $(cut -d: -f2 $2); }}
    i=0; while [ ! -e /sys/class/tty/hvc0/dev ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    node hvc0 /sys/class/tty/hvc0/dev
    port=""; i=0
    while [ -z "$port" ] && [ $i -lt 100 ]; do
        for f in /sys/class/virtio-ports/*/name; do
            [ "$(cat $f 2>/dev/null)" = {PORT_NAME} ] && port=$(basename $(dirname $f))
        done
        [ -z "$port" ] && sleep 0.1; i=$((i+1))
    done
    echo RESULT port=$port
    echo RESULT packed=$(cut -c35 /sys/class/virtio-ports/$port/device/features)
    node $port /sys/class/virtio-ports/$port/dev
    exec 3<>$W/hvc0
    stty -F $W/hvc0 raw -echo
    echo RESULT size0=$(stty -F $W/hvc0 size)
    echo hello-from-hvc0 >&3
    read -r line <&3; echo RESULT hvc_in=$line
    s0=$(stty -F $W/hvc0 size)
    echo resize-ready >&3
    i=0; while [ "$(stty -F $W/hvc0 size)" = "$s0" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    echo RESULT size1=$(stty -F $W/hvc0 size)
    exec 4<>$W/$port
    echo line-from-guest >&4
    read -r l <&4; echo RESULT port_in=$l
    head -c {BIG} /dev/urandom > $W/big
    echo RESULT big_md5=$(md5sum < $W/big | cut -d' ' -f1)
    dd if=$W/big bs=65536 2>$W/dd.err >&4; echo RESULT dd=$?; tail -n 3 $W/dd.err
    # The driver's writes return once queued: stay until the host has it all.
    read -r ack <&4; echo RESULT ack=$ack
    exec 4>&- 3>&-
    """


@dataclasses.dataclass
class HostPeer:
    """The host's half, in a thread: talks to the console and data sockets."""

    daemon: BackendProcess
    console_path: Path
    data_path: Path
    resize_answer: dict[str, object] = dataclasses.field(default_factory=dict)
    console_text: bytes = b""
    data_line: bytes = b""
    big_md5: str = ""
    big_bytes: int = 0
    big_seconds: float = 0.0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.console.connect(str(self.console_path))
        self.data = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.data.connect(str(self.data_path))
        for sock in (self.console, self.data):
            sock.settimeout(120)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _until(self, sock: socket.socket, text: bytes, seen: bytes) -> bytes:
        while text not in seen:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"socket closed before {text!r}: {seen!r}")
            seen += chunk
        return seen

    def _run(self) -> None:
        try:
            self.console_text = self._until(self.console, b"hello-from-hvc0", b"")
            self.console.sendall(b"ping-from-host\n")
            self.console_text = self._until(self.console, b"resize-ready", self.console_text)
            self.resize_answer = json.loads(send_control(control_path(self.daemon.socket_path),
                                                         "console-size 120 50"))
            data = self._until(self.data, b"line-from-guest\n", b"")
            self.data_line, _, rest = data.partition(b"\n")
            self.data.sendall(b"line-from-host\n")
            digest = hashlib.md5(rest)
            got = len(rest)
            started = time.monotonic()
            while got < BIG:  # deliberately slow: small reads with a pause between them
                chunk = self.data.recv(min(16384, BIG - got))
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
                time.sleep(0.002)
            self.big_seconds = time.monotonic() - started
            self.big_bytes, self.big_md5 = got, digest.hexdigest()
            self.data.sendall(b"got-it\n")
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> HostPeer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)
        for sock in (self.console, self.data):
            with contextlib.suppress(OSError):
                sock.close()


def serve_console(serve: Serve, tmp_path: Path, *options: str) -> BackendProcess:
    return serve("console", "--console-socket", str(tmp_path / "con.sock"),
                 "--port", f"{PORT_NAME}={tmp_path / 'data.sock'}", "--cols", "100",
                 "--rows", "40", *options)


def check(peer: HostPeer, r: dict[str, str], console: str, daemon: BackendProcess) -> None:
    assert peer.error is None, f"{peer.error!r}\n{console}"
    assert r["port"].startswith("vport"), console
    assert r["size0"] == "40 100", console
    assert b"hello-from-hvc0" in peer.console_text
    assert r["hvc_in"] == "ping-from-host", console
    assert peer.resize_answer.get("ok"), peer.resize_answer
    assert r["size1"] == "50 120", console
    assert peer.data_line == b"line-from-guest"
    assert r["port_in"] == "line-from-host", console
    assert r["dd"] == "0" and r["ack"] == "got-it", console
    assert peer.big_bytes == BIG and peer.big_md5 == r["big_md5"], console
    print(f"console: port {r['port']}, size {r['size0']} -> {r['size1']} "
          f"({peer.resize_answer.get('notified')}), {BIG} bytes guest->host in "
          f"{peer.big_seconds:.1f} s with a slow reader, md5 {peer.big_md5}")
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "malformed" not in daemon.log, daemon.log


@pytest.mark.parametrize("ring", ["packed", "split"])
def test_uml_guest_uses_hvc0_a_named_port_resize_and_10mib_through_the_port(
    uml: None, serve: Serve, tmp_path: Path, ring: str  # noqa: F811 - the fixture
) -> None:
    """UML takes packed rings when offered (§2.8); ``--no-packed`` gives it split ones."""
    daemon = serve_console(serve, tmp_path, *(["--no-packed"] if ring == "split" else []))
    with HostPeer(daemon, tmp_path / "con.sock", tmp_path / "data.sock") as peer, \
            UmlGuest(tmp_path, "console", guest_script(str(tmp_path / "guest")),
                     [f"{daemon.socket_path}:{VIRTIO_CONSOLE}"], UML_MODULES) as guest:
        r = guest.finish(120)
    assert "insmod_failed" not in r, guest.console
    assert r["packed"] == ("1" if ring == "packed" else "0"), guest.console
    print(f"UML, {ring} rings, boot retries {guest.retries}")
    check(peer, r, guest.console, daemon)


def generic_device_refused(qemu: Path, workdir: Path) -> str:
    """QEMU's complaint about ``-device vhost-user-device-pci`` ("" when it takes it).

    QEMU 10.0 builds the device but marks it not user-creatable ("Parameter
    'driver' expects a pluggable device type").  The chardev connects to a socket
    that listens and never answers, so a QEMU that takes the device waits there.
    """
    path = workdir / "probe.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        try:
            done = subprocess.run(
                [str(qemu), "-nodefaults", "-display", "none", "-machine", "pc", "-S",
                 "-chardev", f"socket,id=c0,path={path}",
                 "-device", "vhost-user-device-pci,chardev=c0,virtio-id=3"],
                capture_output=True, text=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return ""
    return done.stderr.strip() if "pluggable device type" in done.stderr else ""


def test_qemu10_guest_uses_hvc0_a_named_port_resize_and_10mib_through_the_port(
    kit10: GuestKit, serve: Serve, tmp_path: Path
) -> None:
    refused = generic_device_refused(kit10.qemu, tmp_path)
    if refused:
        pytest.xfail(f"QEMU 10 refuses vhost-user-device-pci on its command line: {refused}")
    daemon = serve_console(serve, tmp_path)
    args = ["-chardev", f"socket,id=con0,path={daemon.socket_path}",
            "-device", "vhost-user-device-pci,chardev=con0,virtio-id=3,num_vqs=6,"
            "vq_size=256,config_size=12"]
    with HostPeer(daemon, tmp_path / "con.sock", tmp_path / "data.sock") as peer:
        result = kit10.run(guest_script("/tmp/w"), ["virtio_console"], args, timeout=150)
    assert result.exit_code == 0, result.console
    check(peer, result.results, result.console, daemon)
