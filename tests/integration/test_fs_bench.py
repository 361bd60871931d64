"""`pyvirtio bench fs` through the real CLI, against `pyvirtio serve fs` and against
QEMU's C virtiofsd: every operation runs, every reply is checked, the bench file lands
in the share, and mistakes are refused with a clear message."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.guestkit.backends import BackendProcess

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MiB = 1 << 20


def _bench(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "bench", "fs", str(socket), "--time", "0.5",
         "--quiet", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    share = tmp_path / "share"
    share.mkdir()
    with BackendProcess("fs", tmp_path / "fs.sock", ["--shared-dir", str(share), "--tag",
                                                    "benchtag"]) as daemon:
        yield daemon.socket_path, share


@contextlib.contextmanager
def _virtiofsd(socket: Path, share: Path) -> Iterator[None]:
    """QEMU 7.2's C virtiofsd, which serves one front-end and exits."""
    socket.unlink(missing_ok=True)
    process = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={socket}", "-o", f"source={share}", "-o",
         "sandbox=chroot", "-o", "cache=none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert process.poll() is None and time.monotonic() < deadline, "no virtiofsd"
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def virtiofsd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A share and the socket where each run starts a virtiofsd of its own."""
    share = tmp_path / "vshare"
    share.mkdir()
    yield tmp_path / "v.sock", share


@pytest.mark.parametrize("backend", ["ours", "virtiofsd"])
def test_every_operation_runs_and_checks_its_replies(
    backend: str, request: pytest.FixtureRequest
) -> None:
    socket, share = request.getfixturevalue(backend)
    results = {}
    for op, extra in (("getattr", ()), ("lookup", ("--size", "1M")), ("read", ()),
                      ("write", ("--bs", "64k")), ("read", ("--bs", "1M")),
                      ("write", ("--iodepth", "8"))):
        with _virtiofsd(socket, share) if backend == "virtiofsd" else contextlib.nullcontext():
            run = _bench(socket, "--op", op, "--json", *extra)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert result["op"] == op and result["errors"] == 0, result
        assert result["requests"] > 10 and result["per_second"] > 0, result
        assert 0 < result["lat_p50_us"] <= result["lat_p99_us"] <= result["lat_max_us"]
        results[op, result["bs"], result["iodepth"]] = result
    # The first run that needed the file made it, 1 MiB (--size); the others used it.
    assert (share / "pyvirtio-bench.dat").stat().st_size == MiB
    assert results["write", 65536, 1]["mb_per_s"] > 0
    assert results["read", MiB, 1]["requests"] >= 10
    # Eight in flight: more requests than one at a time (the back-end overlaps them).
    assert results["write", 4096, 8]["per_second"] > results["read", 4096, 1]["per_second"] / 2
    # Only pyvirtio serves the tag from the config space (virtiofsd leaves it to QEMU).
    assert results["getattr", 4096, 1]["tag"] == ("benchtag" if backend == "ours" else "")
    with _virtiofsd(socket, share) if backend == "virtiofsd" else contextlib.nullcontext():
        text = _bench(socket, "--op", "read")
    assert text.returncode == 0 and text.stdout.startswith("fs read bs=4096: "), text
    assert "requests/s" in text.stdout and " 0 errors" in text.stdout


def test_mistakes_are_refused_clearly(ours: tuple[Path, Path], tmp_path: Path) -> None:
    socket, share = ours
    (share / "small").write_bytes(b"x" * 100)
    run = _bench(socket, "--op", "read", "--file", "small")
    assert run.returncode == 1
    assert run.stderr.strip() == "pyvirtio bench: small holds 100 bytes, less than --bs"
    # LOOKUP moves no data: a small file will do.
    lookup = _bench(socket, "--op", "lookup", "--file", "small", "--json")
    assert lookup.returncode == 0 and json.loads(lookup.stdout)["errors"] == 0, lookup.stderr
    for args, message in (
        (("--file", "../escape"), "--file '../escape' is not a name in the share's root"),
        (("--bs", "1000"), "--bs 1000 is not a multiple of 4 KiB up to 1 MiB"),
        (("--bs", "2M"), "--bs 2097152 is not a multiple of 4 KiB up to 1 MiB"),
        (("--iodepth", "33"), "--iodepth must be 1..32"),
    ):
        run = _bench(socket, "--op", "read", *args)
        assert run.returncode == 1 and run.stderr.strip() == f"pyvirtio bench: {message}", run
    missing = _bench(tmp_path / "nothing.sock")
    assert missing.returncode == 1 and "pyvirtio bench:" in missing.stderr
    assert os.listdir(share) == ["small"]  # nothing made by the refused runs
