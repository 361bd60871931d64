"""DPDK's testpmd as a third-party vhost-user front-end or back-end, driven over stdin.

Used by the interop tests (tests/integration/test_dpdk.py) and the net benchmark.
testpmd runs in interactive mode (``-i``): :meth:`TestPmd.command` writes one
command line to its stdin and returns what it printed up to the next
``testpmd>`` prompt, so counts are read exactly, after forwarding stopped.

- ``net_virtio_user0,path=SOCK`` makes testpmd a virtio-net *driver* of the
  vhost-user back-end listening on SOCK (:func:`virtio_user`);
- ``net_vhost0,iface=SOCK`` makes it a vhost-user net *back-end* listening on
  SOCK (:func:`vhost`).

The Debian package is ``dpdk-dev`` (DPDK 22.11); hugepages are not needed
(``--no-huge -m 1024``).  Each process busy-polls one CPU while forwarding.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.closing import Closing
from pyvirtio.errors import TestPmdError

__all__ = ["TESTPMD", "PortStats", "TestPmd", "vhost", "virtio_user"]

#: The executable (Debian package ``dpdk-dev``).
TESTPMD = "dpdk-testpmd"
#: EAL options that work on a machine without hugepages or PCI devices: two lcores
#: (the main one reads stdin, the other forwards) and a 1 GiB memory pool (512 MiB
#: cannot hold testpmd's default mbuf pool).
EAL_OPTIONS = ("-l", "0,1", "--no-huge", "-m", "1024", "--no-pci")
PROMPT = "testpmd> "

_STATS = re.compile(
    r"NIC statistics for port (\d+)\s+#+\s+"
    r"RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)\s+"
    r"RX-errors:\s*(\d+)\s+RX-nombuf:\s*(\d+)\s+"
    r"TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)"
)


@dataclass(frozen=True, slots=True)
class PortStats:
    """One port's counters from ``show port stats``."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


def virtio_user(socket_path: Path, *, mac: str | None = None, extra: str = "") -> str:
    """A ``--vdev`` for testpmd as the driver of the back-end at ``socket_path``."""
    vdev = f"net_virtio_user0,path={socket_path},queues=1"
    if mac is not None:
        vdev += f",mac={mac}"
    return vdev + extra


def vhost(socket_path: Path, *, index: int = 0) -> str:
    """A ``--vdev`` for testpmd as a vhost-user net back-end listening on ``socket_path``.

    ``index`` numbers the back-ends of one testpmd process (``net_vhostN``).
    """
    return f"net_vhost{index},iface={socket_path}"


class TestPmd(Closing):
    """One interactive ``dpdk-testpmd`` process.

    Args:
        name: short name, unique among the running testpmd processes (its
            ``--file-prefix`` and output file derive from it).
        work: folder for its output file (``testpmd-NAME.out``).
        vdevs: ``--vdev`` arguments.
        options: testpmd's own options (after ``--``), e.g. ``--forward-mode=txonly``.
        eal: further EAL options (e.g. ``--iova-mode=va`` for ``net_vhost``).
        timeout: seconds to wait for each prompt.

    Raises:
        TestPmdError: it exited or printed no prompt within ``timeout``.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        name: str,
        work: Path,
        vdevs: Sequence[str],
        options: Sequence[str] = (),
        *,
        eal: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        binary = shutil.which(TESTPMD)
        if binary is None:
            raise TestPmdError(f"{TESTPMD} not found; install the Debian package dpdk-dev")
        self.name = name
        self.timeout = timeout
        self.prefix = f"pyvirtio-{name}-{os.getpid()}"
        self.output = work / f"testpmd-{name}.out"
        command = ["stdbuf", "-o0", binary, *EAL_OPTIONS, *eal, f"--file-prefix={self.prefix}"]
        for vdev in vdevs:
            command += ["--vdev", vdev]
        self.command_line = [*command, "--", "-i", *options]
        # stdbuf -o0: stdout is a file, and testpmd's printf output would otherwise sit
        # in a buffer while its prompt (written directly) already arrived.
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                self.command_line, stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._seen = 0  # output offset after the last prompt
        try:
            self._wait_prompt()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """testpmd's process id."""
        return self.process.pid

    def text(self) -> str:
        """Everything testpmd printed so far."""
        return self.output.read_text(errors="replace")

    def _wait_prompt(self) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            text = self.text()
            end = text.find(PROMPT, self._seen)
            if end >= 0:
                answer = text[self._seen:end]
                self._seen = end + len(PROMPT)
                return answer
            if self.process.poll() is not None:
                raise TestPmdError(f"testpmd {self.name} exited with "
                                   f"{self.process.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise TestPmdError(f"testpmd {self.name}: no prompt within "
                                   f"{self.timeout} s:\n{text[-3000:]}")
            time.sleep(0.02)

    def command(self, line: str) -> str:
        """Run one interactive command; return what testpmd printed for it.

        Raises:
            TestPmdError: testpmd exited or did not prompt again in time.
        """
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise TestPmdError(f"testpmd {self.name} is gone:\n{self.text()[-3000:]}") from exc
        return self._wait_prompt()

    def start(self, *, tx_first: bool = False) -> None:
        """Start forwarding (``start tx_first`` sends one burst on each port first)."""
        self.command("start tx_first" if tx_first else "start")

    def stop(self) -> str:
        """Stop forwarding (the forwarding lcore idles); return testpmd's forward statistics."""
        return self.command("stop")

    def port_stats(self) -> dict[int, PortStats]:
        """``show port stats all``: each port's counters (the PMD's own, since start).

        Raises:
            TestPmdError: the answer could not be parsed.
        """
        answer = self.command("show port stats all")
        stats = {int(m[0]): PortStats(*(int(v) for v in m[1:]))
                 for m in _STATS.findall(answer)}
        if not stats:
            raise TestPmdError(f"testpmd {self.name}: no port statistics in:\n{answer}")
        return stats

    def close(self) -> None:
        """``quit``, then SIGINT, then SIGKILL; remove its runtime folder."""
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.write(b"quit\n")
                self.process.stdin.flush()
        for action in (None, signal.SIGINT, signal.SIGKILL):
            if action is not None and self.process.poll() is None:
                self.process.send_signal(action)
            try:
                self.process.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
