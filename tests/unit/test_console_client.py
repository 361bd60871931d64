"""The host side of ``pyvirtio serve console``: the terminal client (``pyvirtio
console``), the daemon's ``console`` / ``console-size`` control commands and
``pyvirtio probe --device console``, with real sockets and a real daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from pyvirtio.client import control_path, send_control
from pyvirtio.devices.console.client import attach_terminal
from pyvirtio.guestkit.backends import BackendProcess


def test_the_terminal_client_relays_both_ways_and_reports_the_size(tmp_path: Path) -> None:
    path = tmp_path / "con.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received = bytearray()

    def daemon_side() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                received.extend(data)
            conn.sendall(b"GUEST SAYS " + bytes(received).upper())

    server = threading.Thread(target=daemon_side)
    server.start()
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    os.write(stdin_w, b"hello console\n")
    os.close(stdin_w)
    sizes: list[tuple[int, int]] = []
    try:
        ended = attach_terminal(path, stdin=stdin_r, stdout=stdout_w,
                                on_resize=lambda c, r: sizes.append((c, r)))
        os.close(stdout_w)
        out = b""
        while chunk := os.read(stdout_r, 4096):
            out += chunk
    finally:
        server.join()
        listener.close()
        os.close(stdin_r)
        os.close(stdout_r)
    assert ended == "input ended"
    assert bytes(received) == b"hello console\n"
    assert out == b"GUEST SAYS HELLO CONSOLE\n"
    assert len(sizes) == 1  # once at the start (then on each SIGWINCH)


def test_the_daemon_tells_where_its_console_is_takes_a_size_and_probes_as_console(
    tmp_path: Path,
) -> None:
    console_sock = tmp_path / "con.sock"
    daemon = BackendProcess("console", tmp_path / "vhost.sock",
                            ["--console-socket", str(console_sock),
                             "--port", f"org.pyvirtio.data={tmp_path / 'data.sock'}",
                             "--cols", "90", "--rows", "30"])
    try:
        ctl = control_path(daemon.socket_path)
        answer = json.loads(send_control(ctl, "console"))
        assert answer["path"] == str(console_sock)
        assert [p["name"] for p in answer["ports"]] == [None, "org.pyvirtio.data"]
        sized = json.loads(send_control(ctl, "console-size 132 43"))
        assert sized["ok"] and (sized["cols"], sized["rows"]) == (132, 43)
        assert not json.loads(send_control(ctl, "console-size 1"))["ok"]
        probed = subprocess.run(
            [sys.executable, "-m", "pyvirtio.cli", "probe", "--device", "console", "--json",
             str(daemon.socket_path)], capture_output=True, text=True, timeout=60, check=False)
        assert probed.returncode == 0, probed.stdout + probed.stderr
        report = json.loads(probed.stdout)
        text = json.dumps(report)
        for name in ("SIZE", "MULTIPORT", "EMERG_WRITE"):
            assert name in text, text
        assert '"max_nr_ports": 2' in text and '"cols": 132' in text, text
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log, daemon.log
    assert not console_sock.exists()  # the daemon removes its sockets
