"""`pyvirtio probe` and `pyvirtio bench` through the real CLI against both back-ends."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtio.guestkit.backends import BackendProcess, Daemon, StorageDaemon

from .conftest import IMAGE_SIZE


def _pyvirtio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_probe_decodes_features_queues_and_config(blk_backend: Daemon) -> None:
    out = _pyvirtio("probe", "--device", "blk", str(blk_backend.socket_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "VERSION_1" in report["feature_names"]
    assert "FLUSH" in report["feature_names"]
    assert "CONFIG" in report["protocol_feature_names"]
    assert report["queue_num"] == 2
    assert report["config"]["capacity"] == IMAGE_SIZE // 512
    assert report["device_mismatch"] is None and report["warnings"] == []
    text = _pyvirtio("probe", "--device", "blk", str(blk_backend.socket_path))
    assert text.returncode == 0
    assert "capacity" in text.stdout and "VERSION_1" in text.stdout
    assert "warning" not in text.stderr


@pytest.mark.parametrize("asked", ["rng", "net"])
def test_probe_as_another_device_warns(blk_backend: Daemon, asked: str) -> None:
    """A blk back-end probed as rng or net: the decoding comes with a warning."""
    out = _pyvirtio("probe", "--device", asked, str(blk_backend.socket_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device_mismatch"]["expected"] == asked
    assert report["device_mismatch"]["looks_like"] == ["blk"]
    assert report["warnings"][0].startswith(f"the back-end does not look like virtio-{asked}")
    assert (f"pyvirtio probe: warning: the back-end does not look like virtio-{asked}"
            in out.stderr)
    text = _pyvirtio("probe", "--device", asked, str(blk_backend.socket_path))
    assert text.returncode == 0 and "it looks like virtio-blk" in text.stderr


def test_stats_after_a_disconnected_bench_show_its_requests(image: Path, tmp_path: Path) -> None:
    """`pyvirtio stats` keeps a finished run's counters: the last connection's and the totals."""
    with BackendProcess("blk", tmp_path / "s.sock", ["--image", str(image)]) as daemon:
        sock = str(daemon.socket_path)
        run = _pyvirtio("bench", "blk", sock, "--time", "0.5", "--json", "--quiet")
        assert run.returncode == 0, run.stderr
        ios = json.loads(run.stdout)["ios"]
        deadline = time.monotonic() + 10
        while daemon.stats()["connected"]:  # the daemon sees the hang-up soon after
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = _pyvirtio("stats", sock)
        snapshot = json.loads(_pyvirtio("stats", sock, "--json").stdout)
    assert ios > 0
    assert text.returncode == 0, text.stderr
    assert "no front-end connected (1 connection so far" in text.stdout
    assert "last connection (#1, " in text.stdout
    assert f"  queue 0: {ios} requests" in text.stdout
    assert f"since the daemon started:\n  queue 0: {ios} requests" in text.stdout
    assert snapshot["queues"][0]["requests"] == 0
    assert snapshot["last_connection"]["queues"][0]["requests"] == ios
    assert snapshot["last_connection"]["ended"] == "front-end disconnected"
    assert snapshot["totals"][0]["requests"] == ios


@pytest.mark.parametrize(
    ("rw", "iodepth", "queues"),
    [("randrw", 8, 2), ("randwrite", 16, 1), ("write", 4, 2), ("randread", 1, 1)],
)
def test_bench_verify_passes(blk_backend: Daemon, rw: str, iodepth: int, queues: int) -> None:
    args = (
        "bench", "blk", str(blk_backend.socket_path), "--rw", rw, "--bs", "4k",
        "--iodepth", str(iodepth), "--queues", str(queues), "--time", "0.5", "--verify",
        "--span", "4M", "--json",
    )
    out = _pyvirtio(*args)
    assert out.returncode == 0, out.stdout + out.stderr + blk_backend.log
    result = json.loads(out.stdout)
    assert result["verify"] is True
    assert result["failure_count"] == 0
    assert result["errors"] == 0
    assert result["verified_blocks"] > 0
    assert result["ios"] > 0 and result["iops"] > 0
    assert result["queues"] == queues
    assert result["lat_p50_us"] <= result["lat_p99_us"] <= result["lat_max_us"]
    if rw in ("randrw", "randwrite", "write"):
        assert result["writes"] > 0


def test_bench_verify_catches_a_disk_that_changes_under_it(tmp_path: Path) -> None:
    """Data changed behind the driver's back must be reported, not passed."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    backend = BackendProcess("blk", tmp_path / "b.sock", ["--image", str(image)])
    try:
        # A reader-only run over a span that another writer keeps scribbling on.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio.cli", "bench", "blk", str(backend.socket_path),
             "--rw", "randread", "--iodepth", "4", "--time", "3", "--verify", "--span", "1M",
             "--json", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(1.5)  # the pattern is written and reads are being checked
        with open(image, "r+b") as f:
            f.write(b"\xee" * (1 << 20))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        backend.stop()
    assert proc.returncode == 1, stdout + stderr
    result = json.loads(stdout)
    assert result["failure_count"] > 0
    assert "expected generation" in result["verify_failures"][0]


def test_bench_refuses_writes_on_a_readonly_disk(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with BackendProcess("blk", tmp_path / "ro.sock", ["--image", str(image), "--readonly"]) as b:
        out = _pyvirtio("bench", "blk", str(b.socket_path), "--rw", "randwrite", "--time", "1")
    assert out.returncode == 1
    assert "read-only" in out.stderr


def test_probe_of_a_missing_socket_fails_clearly(tmp_path: Path) -> None:
    out = _pyvirtio("probe", "--device", "blk", str(tmp_path / "nobody.sock"))
    assert out.returncode == 1
    assert "cannot connect" in out.stderr


@pytest.mark.parametrize(("rw", "iodepth", "queues"), [("randrw", 8, 2), ("randread", 1, 1)])
def test_bench_packed_verify_passes_against_pyvirtio(
    tmp_path: Path, rw: str, iodepth: int, queues: int
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with BackendProcess("blk", tmp_path / "p.sock", ["--image", str(image), "--queues", "2"]) as b:
        out = _pyvirtio(
            "bench", "blk", str(b.socket_path), "--packed", "--rw", rw, "--iodepth",
            str(iodepth), "--queues", str(queues), "--time", "1", "--verify", "--span", "4M",
            "--json",
        )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["packed"] is True
    assert result["failure_count"] == 0 and result["errors"] == 0
    assert result["verified_blocks"] > 0 and result["ios"] > 0


def test_bench_packed_against_a_split_only_backend_fails_clearly(
    image: Path, tmp_path: Path
) -> None:
    with StorageDaemon(image, tmp_path / "qsd.sock") as qsd:
        out = _pyvirtio("bench", "blk", str(qsd.socket_path), "--packed", "--time", "1")
    assert out.returncode == 1
    assert "VIRTIO_F_RING_PACKED" in out.stderr
