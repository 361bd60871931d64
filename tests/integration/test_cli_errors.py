"""Every subcommand's errors say which command failed: ``pyvirtio <command>: ...`` on
stderr, a non-zero exit status, and no traceback (through the real CLI)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.guestkit.backends import BackendProcess


@pytest.fixture(scope="module")
def rng_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProcess]:
    daemon = BackendProcess("rng", tmp_path_factory.mktemp("errors") / "rng.sock")
    yield daemon
    assert daemon.stop() == 0


def _errors(rng: Path, missing: Path) -> list[tuple[str, list[str], str]]:
    """(command, arguments, what stderr says) for one provoked error per subcommand."""
    return [
        ("serve", ["serve", "blk", "--socket", str(missing.parent / "no" / "b.sock")],
         "cannot listen on"),
        ("serve", ["serve", "blk", "--socket", str(missing), "--image", str(missing),
                   "--readonly"], "cannot create it"),
        ("probe", ["probe", "--device", "blk", str(missing)], "cannot connect"),
        ("bench", ["bench", "blk", str(missing), "--time", "0.1"], "cannot connect"),
        ("bench", ["bench", "blk", str(rng), "--time", "0.1"], "smaller than one block"),
        ("stats", ["stats", str(missing)], "no daemon answering"),
        ("link", ["link", str(rng), "down"], "link commands are for net devices"),
        ("link", ["link", str(missing)], "no daemon at"),
        ("resize", ["resize", str(rng), "1G"], "resize is not a command of this device (RngDevice"),
        ("resize", ["resize", str(missing), "1G"], "no daemon answering"),
        ("vm", ["vm", "--blk", str(missing), "--run", "true"], "no such image file"),
        ("vm", ["vm", "--export", str(missing), "--run", "true"], "--export"),
        # argparse's own errors carry the command too
        ("probe", ["probe", str(missing)], "error: the following arguments are required"),
        ("resize", ["resize", str(rng), "lots"], "error: argument size: not a size"),
    ]


def test_every_subcommand_error_carries_its_prefix(rng_daemon: BackendProcess,
                                                   tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    seen = set()
    for command, argv, says in _errors(rng_daemon.socket_path, missing):
        run = subprocess.run([sys.executable, "-m", "pyvirtio.cli", *argv],
                             capture_output=True, text=True, timeout=60, check=False)
        what = f"pyvirtio {' '.join(argv)}: exit {run.returncode}\n{run.stderr}"
        assert run.returncode != 0, what
        assert "Traceback" not in run.stderr, what
        messages = [line for line in run.stderr.splitlines()
                    if line.startswith(f"pyvirtio {command}")]
        assert messages, what
        assert says in "\n".join(messages), what
        seen.add(command)
    assert seen == {"serve", "probe", "bench", "stats", "link", "resize", "vm"}
    assert "Traceback" not in rng_daemon.log
