"""``pyvirtio serve net`` with several ports in one daemon, and ``pyvirtio bench net``
(issue #18), through the real CLI in child processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.client import ask
from pyvirtio.guestkit.backends import BackendProcess

MAC_A = "02:00:0a:d9:00:0a"
MAC_B = "02:00:0a:d9:00:0b"


def bench(tx: Path, rx: Path, *options: str) -> dict[str, Any]:
    """``pyvirtio bench net TX RX --json ...``: its JSON."""
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "bench", "net", str(tx), str(rx), "--json",
         *options], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def one_daemon(tmp_path: Path) -> Iterator[tuple[BackendProcess, Path]]:
    """One daemon serving ports A (a.sock) and B (b.sock) of one switch."""
    switch = f"ports-{os.getpid()}-{secrets.token_hex(3)}"
    b_sock = tmp_path / "b.sock"
    daemon = BackendProcess("net", tmp_path / "a.sock",
                            ["--socket", str(b_sock), "--switch", switch,
                             "--mac", MAC_A, "--mac", MAC_B])
    deadline = time.monotonic() + 10
    while not b_sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield daemon, b_sock
    finally:
        daemon.stop()


def test_one_daemon_forwards_between_its_ports_and_bench_reports_it(
    one_daemon: tuple[BackendProcess, Path],
) -> None:
    daemon, b_sock = one_daemon
    result = bench(daemon.socket_path, b_sock, "--size", "64", "--time", "1")
    for key in ("pps", "drops", "gbit_per_s", "cpu_us_per_packet", "daemons", "sent",
                "received"):
        assert key in result
    assert isinstance(result["pps"], int) and result["pps"] > 0
    assert result["received"] > 1000
    assert result["drops"] == result["sent"] - result["received"]
    (only,) = result["daemons"]
    assert only["pid"] == daemon.process.pid
    assert only["sockets"] == [str(daemon.socket_path), str(b_sock)]
    assert only["cpu_us_per_packet"] > 0
    # Each port has its own control socket and counters.
    for path in (daemon.socket_path, b_sock):
        snapshot = ask(path, "stats")
        assert snapshot["socket"] == str(path)
        assert snapshot["last_connection"] is not None
    log = daemon.log
    assert f"MAC {MAC_A}" in log and f"MAC {MAC_B}" in log
    assert "joins 1 other port(s) of this process" in log
    assert "Traceback" not in log
    # SIGUSR1 logs every port's counters.
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while daemon.log.count("queue 1:") < 2 * 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.log.count("queue 1:") >= 4  # two disconnects + SIGUSR1, per port


def test_bench_net_packed_rings_and_full_size_frames(
    one_daemon: tuple[BackendProcess, Path],
) -> None:
    daemon, b_sock = one_daemon
    result = bench(daemon.socket_path, b_sock, "--size", "1500", "--time", "1", "--packed")
    assert result["packed"] is True and result["size"] == 1500
    assert result["received"] > 100
    assert result["gbit_per_s"] > 0


def test_bench_net_across_two_daemons_reports_each(tmp_path: Path) -> None:
    switch = f"ports2-{os.getpid()}-{secrets.token_hex(3)}"
    a = BackendProcess("net", tmp_path / "a.sock", ["--switch", switch, "--mac", MAC_A])
    try:
        b = BackendProcess("net", tmp_path / "b.sock", ["--switch", switch, "--mac", MAC_B])
        try:
            result = bench(a.socket_path, b.socket_path, "--size", "64", "--time", "1")
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0
    daemons = result["daemons"]
    assert [d["pid"] for d in daemons] == sorted([a.process.pid, b.process.pid])
    assert result["received"] > 1000
    assert "Traceback" not in a.log + b.log


def test_bench_net_says_what_is_wrong(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "bench", "net", str(tmp_path / "none.sock"),
         str(tmp_path / "none2.sock"), "--time", "1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("pyvirtio bench: ")
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "bench", "net", "a", "b", "--size", "9000"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "--size must be" in done.stderr
