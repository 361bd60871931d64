"""Counters that outlive a connection: ``pyvirtio stats`` shows the current
connection's, the last finished one's and the totals since the daemon started."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.cli import main, render_stats
from pyvirtio.client import control_path, send_control
from pyvirtio.devices.base import QueueStats
from pyvirtio.devices.rng import RngDevice
from pyvirtio.frontend import RngDriver
from pyvirtio.runtime import Server

TIMEOUT = 5.0


def test_queue_stats_add_up_and_round_trip_through_json() -> None:
    a = QueueStats(requests=3, bytes_in=10, bytes_out=1, errors=1, violations=0,
                   kinds=Counter({"in": 2, "flush": 1}))
    b = QueueStats(requests=2, bytes_in=5, violations=1, kinds=Counter({"in": 2}))
    total = a + b
    assert total == QueueStats(requests=5, bytes_in=15, bytes_out=1, errors=1, violations=1,
                               kinds=Counter({"in": 4, "flush": 1}))
    assert a.kinds == Counter({"in": 2, "flush": 1})  # the operands are unchanged
    assert QueueStats.from_json(total.as_json()) == total
    assert total.as_json()["bytes_to_guest"] == 15


@pytest.fixture
def rng_server() -> Iterator[Server]:
    folder = Path(tempfile.mkdtemp(prefix="pv-"))  # sun_path is short
    sock = folder / "rng.sock"
    server = Server(sock, RngDevice(), control_path=control_path(sock))
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(TIMEOUT)
    shutil.rmtree(folder, ignore_errors=True)


def snapshot(server: Server) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(send_control(control_path(server.socket_path), "stats"))
    return answer


def wait_disconnected(server: Server) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while (snap := snapshot(server))["connected"]:
        assert time.monotonic() < deadline, "the daemon did not see the front-end go"
        time.sleep(0.02)
    return snap


def read_entropy(server: Server, sizes: list[int]) -> None:
    with RngDriver.open(server.socket_path) as driver:
        for size in sizes:
            driver.read(size)


def test_stats_after_a_disconnect_show_the_last_connection_and_the_totals(
    rng_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    read_entropy(rng_server, [16, 32, 64])
    snap = wait_disconnected(rng_server)
    assert snap["queues"][0]["requests"] == 0  # the device's own counters start again
    last = snap["last_connection"]
    assert last["connection"] == 1 and last["ended"] == "front-end disconnected"
    assert last["queues"][0]["requests"] == 3
    assert last["queues"][0]["bytes_to_guest"] == 112
    assert snap["totals"] == last["queues"]

    with RngDriver.open(rng_server.socket_path) as driver:
        driver.read(8)
        driver.read(8)
        snap = snapshot(rng_server)
        assert snap["connected"] and snap["connections"] == 2
        assert snap["connected_seconds"] >= 0
        assert snap["queues"][0]["requests"] == 2
        assert snap["last_connection"]["queues"][0]["requests"] == 3
        assert snap["totals"][0]["requests"] == 5
        assert snap["totals"][0]["bytes_to_guest"] == 128
        assert main(["stats", str(rng_server.socket_path)]) == 0
        text = capsys.readouterr().out
        assert "connected (connection #2" in text
        assert "this connection:\n  queue 0: 2 requests" in text
        assert "last connection (#1, " in text and "  queue 0: 3 requests" in text
        assert "since the daemon started:\n  queue 0: 5 requests, 128 bytes" in text

    snap = wait_disconnected(rng_server)
    assert snap["last_connection"]["connection"] == 2
    assert snap["last_connection"]["queues"][0]["requests"] == 2
    assert snap["totals"][0]["requests"] == 5
    assert main(["stats", str(rng_server.socket_path)]) == 0
    text = capsys.readouterr().out
    assert "no front-end connected (2 connections so far" in text
    assert "since the last connection ended" not in text  # nothing counted since
    assert "last connection (#2, " in text and "front-end disconnected):" in text
    assert "since the daemon started:\n  queue 0: 5 requests" in text
    assert main(["stats", str(rng_server.socket_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"][0]["requests"] == 5


def test_a_fresh_daemon_has_no_last_connection(rng_server: Server,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    snap = snapshot(rng_server)
    assert snap["connections"] == 0 and snap["last_connection"] is None
    assert snap["totals"] == snap["queues"]
    assert main(["stats", str(rng_server.socket_path)]) == 0
    text = capsys.readouterr().out
    assert "no front-end connected (0 connections so far" in text
    assert "last connection" not in text
    assert snap["device"] == {} and "device:" not in text  # rng has no figures of its own


def test_a_devices_own_figures_are_printed_after_the_queues() -> None:
    snap = {"socket": "/s", "connected": False, "connections": 0, "uptime_seconds": 1.0,
            "connected_seconds": None, "queues": [], "last_connection": None, "totals": [],
            "device": {"connections": [{"guest": "3:5000", "state": "established"}],
                       "connections_closed": 2}}
    assert render_stats(snap)[-4:] == [
        "device:", "  connections: 1", "    guest=3:5000 state=established",
        "  connections_closed: 2"]
