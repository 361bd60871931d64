"""Per-request cost of `pyvirtio serve fs`, driven from the host (no guest).

pyvirtio's own FUSE driver (:class:`pyvirtio.frontend.fs.FuseDriver`) sends one
request at a time to a real ``pyvirtio serve fs --cache never`` daemon over
vhost-user and measures, per request, the daemon's CPU time (all its threads, from
``/proc/PID/task/*/schedstat``, in nanoseconds) and the round trip.  Workloads:

- ``getattr``: GETATTR of a file;
- ``lookup``: LOOKUP of a file (in the dentry cache);
- ``create+release+unlink+forget``: one file's life, per request of the four;
- ``read 4k`` / ``write 4k``: at random 4 KiB offsets of a 64 MiB file (in the
  page cache), the reply in one descriptor per 4 KiB page as Linux posts it;
- ``read 1M`` / ``write 1M``: sequential, 256 descriptors of 4 KiB each.

The CPU time is also split into user and system time (from ``/proc/PID/task/*/stat``).
``--virtiofsd`` also measures QEMU's C virtiofsd, the same way (the reference of
``benchmarks/compare_fs.py``).  ``--profile FILE`` runs the daemon under cProfile
(its event loop only).  Usage:
``python benchmarks/fs_requests.py [--count N] [--rounds R] [--baseline SRC]
[--json FILE] [--virtiofsd] [--only WORDS]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyvirtio.errors import BackendError
from pyvirtio.frontend.fs import FuseDriver
from pyvirtio.guestkit.backends import BackendProcess, Daemon, serve_command
from pyvirtio.spec.fuse import (
    CREATE_IN,
    ENTRY_OUT,
    FORGET_IN,
    FUSE_ROOT_ID,
    GETATTR_IN,
    OPEN_OUT,
    READ_IN,
    RELEASE_IN,
    WRITE_IN,
    InitFlag,
    Opcode,
)

FILE_SIZE = 64 << 20
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
PAGE = 4096


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (ns)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total


def _user_sys_us(pid: int) -> tuple[float, float]:
    """User and system CPU time of every thread of ``pid`` so far (µs, in clock ticks:
    exact to a few µs per request only over thousands of requests)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
        user += int(fields[11])
        system += int(fields[12])
    return user * 1e6 / tick, system * 1e6 / tick


def _check(fs: FuseDriver, unique: int) -> bytes:
    reply = fs.wait(unique)
    if reply.error:
        raise SystemExit(f"request {unique} failed: {os.strerror(-reply.error)}"
                         )
    return reply.payload


def _workloads(fs: FuseDriver, nodeid: int, fh: int
               ) -> dict[str, tuple[int, Callable[[int], None]]]:
    """name -> (requests per step, step)."""
    rng = random.Random(1)
    small = FILE_SIZE // PAGE
    data4k = os.urandom(PAGE)
    data1m = os.urandom(1 << 20)

    def getattr_(_: int) -> None:
        _check(fs, fs.submit(Opcode.GETATTR, nodeid, GETATTR_IN.pack(0, 0, 0), out_len=256))

    def lookup(_: int) -> None:
        _check(fs, fs.submit(Opcode.LOOKUP, FUSE_ROOT_ID, b"data\0", out_len=256))

    def life(i: int) -> None:
        name = b"f%d\0" % i
        out = _check(fs, fs.submit(Opcode.CREATE, FUSE_ROOT_ID,
                                   CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + name,
                                   out_len=256))
        node = ENTRY_OUT.unpack_from(out)[0]
        new_fh = OPEN_OUT.unpack_from(out, ENTRY_OUT.size)[0]
        _check(fs, fs.submit(Opcode.RELEASE, node, RELEASE_IN.pack(new_fh, 0, 0, 0),
                             out_len=256))
        _check(fs, fs.submit(Opcode.UNLINK, FUSE_ROOT_ID, name, out_len=256))
        fs.wait(fs.submit(Opcode.FORGET, node, FORGET_IN.pack(1), out_len=0, hiprio=True))

    def read4k(_: int) -> None:
        off = rng.randrange(small) * PAGE
        _check(fs, fs.submit(Opcode.READ, nodeid, READ_IN.pack(fh, off, PAGE, 0, 0, 0, 0),
                             out_len=16 + PAGE, segment=PAGE))

    def write4k(_: int) -> None:
        off = rng.randrange(small) * PAGE
        _check(fs, fs.submit(Opcode.WRITE, nodeid,
                             WRITE_IN.pack(fh, off, PAGE, 0, 0, 0, 0) + data4k, out_len=64))

    def read1m(i: int) -> None:
        off = (i % 64) << 20
        _check(fs, fs.submit(Opcode.READ, nodeid, READ_IN.pack(fh, off, 1 << 20, 0, 0, 0, 0),
                             out_len=16 + (1 << 20), segment=PAGE))

    def write1m(i: int) -> None:
        off = (i % 64) << 20
        _check(fs, fs.submit(Opcode.WRITE, nodeid,
                             WRITE_IN.pack(fh, off, 1 << 20, 0, 0, 0, 0) + data1m,
                             out_len=64, segment=PAGE))

    return {"getattr": (1, getattr_), "lookup": (1, lookup),
            "create+release+unlink+forget": (4, life), "read 4k": (1, read4k),
            "write 4k": (1, write4k), "read 1M": (1, read1m), "write 1M": (1, write1m)}


def _connect(daemon: Daemon) -> FuseDriver:
    deadline = time.monotonic() + 10
    while True:
        try:
            return FuseDriver.open(daemon.socket_path, queue_size=1024, slots=2,
                                   room=(1 << 20) + 4096)
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _serve(tmp: Path, label: str, profile: Path | None, src: Path | None) -> Daemon:
    share = tmp / f"share-{label}"
    share.mkdir()
    with open(share / "data", "wb") as f:
        f.write(os.urandom(FILE_SIZE))
    if label == "virtiofsd":
        sock = tmp / "virtiofsd.sock"
        return Daemon([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share}",
                       "-o", "sandbox=chroot", "-o", "cache=none"], sock, tmp / "virtiofsd.log")
    options = ["--shared-dir", str(share), "--tag", "bench", "--cache", "never",
               "--sandbox", "none"]
    sock = tmp / f"{label}.sock"
    saved = os.environ.get("PYTHONPATH")
    if src is not None:  # the daemon imports pyvirtio from there
        os.environ["PYTHONPATH"] = str(src)
    try:
        if profile:
            program = (sys.executable, "-m", "cProfile", "-o", str(profile.resolve()), "-m",
                       "pyvirtio.cli")
            return Daemon(serve_command("fs", sock, options, log_level="warning",
                                        program=program), sock, tmp / f"{label}.log")
        return BackendProcess("fs", sock, options, log_level="warning")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def run(count: int, rounds: int, profile: Path | None, baseline: Path | None, *,
        only: str = "", virtiofsd: bool = False) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Figures by daemon (``pyvirtio``, and ``virtiofsd`` and ``baseline`` when asked),
    workload and kind; each round runs every workload on the others, then on this tree."""
    labels = (["virtiofsd"] if virtiofsd else []) + (["baseline"] if baseline else []) + [
        "pyvirtio"]
    with tempfile.TemporaryDirectory(prefix="pyvirtio-fsreq-") as tmp:
        daemons = {label: _serve(Path(tmp), label, profile if label == "pyvirtio" else None,
                                 baseline if label == "baseline" else None)
                   for label in labels}
        drivers: dict[str, FuseDriver] = {}
        try:
            steps = {}
            for label, daemon in daemons.items():
                fs = drivers[label] = _connect(daemon)
                # As Linux asks: 1 MiB requests (without MAX_PAGES, virtiofsd takes 128 KiB).
                fs.init(int(InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS
                            | InitFlag.DO_READDIRPLUS | InitFlag.MAX_PAGES))
                nodeid = fs.lookup(FUSE_ROOT_ID, b"data").nodeid
                steps[label] = _workloads(fs, nodeid, fs.open_file(nodeid, os.O_RDWR))
            out: dict[str, dict[str, dict[str, list[float]]]] = {label: {} for label in labels}
            for _ in range(rounds):
                for name in steps["pyvirtio"]:
                    if only not in name:
                        continue
                    for label in labels:
                        pid = daemons[label].process.pid
                        per, step = steps[label][name]
                        n = count if "1M" not in name else max(count // 16, 20)
                        for i in range(min(n // 10, 50)):  # warm up
                            step(10**6 + i)
                        (u0, s0), cpu0 = _user_sys_us(pid), _cpu_ns(pid)
                        t0 = time.perf_counter_ns()
                        for i in range(n):
                            step(i)
                        cpu1, t1 = _cpu_ns(pid), time.perf_counter_ns()
                        u1, s1 = _user_sys_us(pid)
                        row = out[label].setdefault(name, {"cpu_us": [], "rtt_us": [],
                                                           "user_us": [], "sys_us": []})
                        row["cpu_us"].append((cpu1 - cpu0) / (n * per) / 1000)
                        row["rtt_us"].append((t1 - t0) / (n * per) / 1000)
                        row["user_us"].append((u1 - u0) / (n * per))
                        row["sys_us"].append((s1 - s0) / (n * per))
        finally:
            for fs in drivers.values():
                fs.close()
            for daemon in daemons.values():
                daemon.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="requests per workload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="cProfile output of the daemon")
    parser.add_argument("--baseline", type=Path,
                        help="a src/ folder of another pyvirtio: its daemon runs too, "
                        "alternately, and is reported first")
    parser.add_argument("--only", default="", help="only the workloads naming this")
    parser.add_argument("--virtiofsd", action="store_true",
                        help=f"also measure QEMU's C virtiofsd ({VIRTIOFSD}, needs root)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    out = run(args.count, args.rounds, args.profile, args.baseline, only=args.only,
              virtiofsd=args.virtiofsd)
    print(f"{'daemon':<9} {'workload':<30} {'CPU µs/req':>11} {'user + sys':>12} "
          f"{'round trip µs':>14}  per round (CPU)")
    for name in out["pyvirtio"]:
        for label, rows in out.items():
            row = rows[name]
            split = (f"{statistics.median(row['user_us']):.0f} + "
                     f"{statistics.median(row['sys_us']):.0f}")
            print(f"{label:<9} {name:<30} {statistics.median(row['cpu_us']):>11.1f} "
                  f"{split:>12} {statistics.median(row['rtt_us']):>14.1f}  "
                  + " ".join(f"{x:.1f}" for x in row["cpu_us"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
