"""``pip install .`` into a fresh virtualenv gives a ``pyvirtio`` that serves, probes,
benches and keeps its counters, with nothing else installed (what ``pipx install .`` does)."""

from __future__ import annotations

import shutil
import subprocess
import time
import venv
from pathlib import Path

import pytest

from pyvirtio.client import control_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh virtualenv with pyvirtio installed from a copy of the tree."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = base / "venv"
    venv.create(env, with_pip=True)
    bin_dir = env / "bin"
    run = subprocess.run([str(bin_dir / "pip"), "install", "--quiet", str(source)],
                         capture_output=True, text=True, timeout=300, check=False)
    if run.returncode != 0 and "satisfies the requirement setuptools" in run.stderr:
        pytest.skip(f"no package index for the build back-end here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stdout + run.stderr
    return bin_dir


def test_pip_install_gives_a_pyvirtio_command_that_needs_nothing_else(installed: Path,
                                                                      tmp_path: Path) -> None:
    packages = subprocess.run([str(installed / "pip"), "list", "--format=freeze"],
                              capture_output=True, text=True, check=True).stdout
    assert {line.split("==")[0] for line in packages.split()} <= {"pip", "setuptools",
                                                                  "pyvirtio"}
    pyvirtio = str(installed / "pyvirtio")
    version = subprocess.run([pyvirtio, "--version"], capture_output=True, text=True,
                             check=True, cwd=tmp_path)
    assert version.stdout.startswith("pyvirtio ")
    where = subprocess.run([str(installed / "python"), "-c",
                            "import pyvirtio; print(pyvirtio.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.startswith(str(installed.parent))  # not this checkout's src/

    sock = tmp_path / "blk.sock"
    daemon = subprocess.Popen([pyvirtio, "serve", "blk", "--socket", str(sock), "--size", "16M"],
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for _ in range(100):
            if control_path(sock).exists():
                break
            time.sleep(0.05)

        def cli(*args: str) -> str:
            run = subprocess.run([pyvirtio, *args], capture_output=True, text=True,
                                 timeout=60, check=False, cwd=tmp_path)
            assert run.returncode == 0, run.stderr
            return run.stdout

        assert "capacity" in cli("probe", "--device", "blk", str(sock))
        assert "IOPS" in cli("bench", "blk", str(sock), "--time", "0.2", "--quiet")
        assert "last connection (#2, " in cli("stats", str(sock))
    finally:
        daemon.terminate()
        _, log = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, log
    assert "Traceback" not in log
