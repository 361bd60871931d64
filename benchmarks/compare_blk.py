"""Compare pyvirtio's vhost-user-blk back-end with qemu-storage-daemon (QSD).

Both serve the same raw image. Two drivers measure them:

1. **Front-end driven** (no guest): ``pyvirtio bench blk`` runs, one after the
   other against each back-end, 4k randread at qd1 and qd32, 4k randwrite at qd32
   and 128k sequential read at qd8.  Each back-end's CPU time per I/O is read
   from /proc, and so is the load generator's, which shows who the bottleneck is.
2. **Guest driven**: a Linux guest under QEMU (TCG) runs fio (libaio, direct
   I/O) on the disk, 4k randread at qd1 and qd32, against each back-end.
3. **O_DIRECT** (front-end driven, 4k random reads and writes at qd32): pyvirtio
   as it serves by default (``--aio sync``, page cache), ``--aio sync --direct``
   and ``--aio threads --direct``, against QSD with ``cache.direct=on`` and
   ``aio=threads`` and ``aio=native``.  The image must then be on a file system
   that supports O_DIRECT (``--dir``; tmpfs does not before Linux 6.6, and
   bypasses nothing after).

Usage: ``python benchmarks/compare_blk.py [--time S] [--guest-time S] [--json FILE]
[--dir DIR] [--repeat N] [--skip-guest] [--skip-direct] [--direct-only]``
(``make bench`` runs it with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.backends import BackendProcess, StorageDaemon, vhost_user_device_args

WORKLOADS = [
    ("4k randread qd1", ["--rw", "randread", "--bs", "4k", "--iodepth", "1"]),
    ("4k randread qd32", ["--rw", "randread", "--bs", "4k", "--iodepth", "32"]),
    ("4k randwrite qd32", ["--rw", "randwrite", "--bs", "4k", "--iodepth", "32"]),
    ("128k read qd8", ["--rw", "read", "--bs", "128k", "--iodepth", "8"]),
]
GUEST_WORKLOADS = [("4k randread qd1", 1), ("4k randread qd32", 32)]
DIRECT_WORKLOADS = [
    ("4k randread qd32", ["--rw", "randread", "--bs", "4k", "--iodepth", "32"]),
    ("4k randwrite qd32", ["--rw", "randwrite", "--bs", "4k", "--iodepth", "32"]),
]
#: The back-ends of the O_DIRECT comparison: label, then QSD's ``aio=`` or pyvirtio's
#: ``serve blk`` options.
DIRECT_BACKENDS: list[tuple[str, str | None, list[str]]] = [
    ("pyvirtio sync (page cache)", None, []),
    ("pyvirtio sync --direct", None, ["--direct"]),
    ("pyvirtio threads --direct", None, ["--aio", "threads", "--direct"]),
    ("QSD direct aio=threads", "threads", []),
    ("QSD direct aio=native", "native", []),
]
IMAGE_SIZE = 512 << 20
SPAN = "256M"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    qemu = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                          text=True, check=False).stdout.splitlines()[0]
    return (f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {qemu}")


Starter = Callable[[], AbstractContextManager[object]]


def _bench(socket: Path, args: list[str], seconds: float) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtio.cli", "bench", "blk", str(socket), *args,
         "--time", str(seconds), "--span", SPAN, "--json", "--quiet"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench failed: {out.stdout}{out.stderr}")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def frontend_driven(image: Path, work: Path, seconds: float) -> list[dict[str, object]]:
    """Run every workload against QSD then pyvirtio; return one row per workload."""
    rows = []
    for name, args in WORKLOADS:
        row: dict[str, object] = {"workload": name}
        for label in ("qsd", "pyvirtio"):
            row[label] = _run_backend(image, work / f"{label}.sock", qsd=label == "qsd",
                                      args=args, seconds=seconds)
        rows.append(row)
        _print_row(row)
    return rows


def _print_row(row: dict[str, object]) -> None:
    q = row["qsd"]
    p = row["pyvirtio"]
    assert isinstance(q, dict) and isinstance(p, dict)
    ratio = p["iops"] / q["iops"] if q["iops"] else 0.0
    print(f"{row['workload']:<18} {q['iops']:>10,.0f} {p['iops']:>10,.0f} {ratio:>7.0%}"
          f" {q['lat_p50_us']:>9.1f} {p['lat_p50_us']:>9.1f}"
          f" {q['backend_cpu_per_io_us']:>8.1f} {p['backend_cpu_per_io_us']:>8.1f}"
          f" {q['generator_cpu_per_io_us']:>6.1f} {p['generator_cpu_per_io_us']:>6.1f}",
          flush=True)


FIO_SCRIPT = """
for depth in {depths}; do
    iops=$(/usr/bin/fio --name=r$depth --filename=/dev/vda --rw=randread --bs=4k \\
        --direct=1 --ioengine=libaio --iodepth=$depth --runtime={seconds} --time_based \\
        --size=256M --output-format=terse --terse-version=3 2>/tmp/fio.err | cut -d';' -f8)
    echo RESULT qd$depth=$iops
    [ -n "$iops" ] || cat /tmp/fio.err
done
"""


def _run_backend(image: Path, socket: Path, *, qsd: bool, qsd_direct: bool = False,
                 qsd_aio: str | None = None, options: Sequence[str] = (),
                 args: list[str], seconds: float) -> dict[str, float]:
    """One back-end on ``image``, driven by ``pyvirtio bench blk``: QSD (``qsd``,
    with ``cache.direct`` and ``aio=`` as asked) or ``pyvirtio serve blk`` with
    ``options``; the bench's figures and the back-end's CPU per I/O."""
    daemon: StorageDaemon | BackendProcess
    if qsd:
        daemon = StorageDaemon(image, socket, direct=qsd_direct, aio=qsd_aio)
    else:
        daemon = BackendProcess("blk", socket, ["--image", str(image), *options],
                                log_level="warning")
    try:
        cpu0 = _cpu_seconds(daemon.process.pid)
        result = _bench(socket, args, seconds)
        cpu = _cpu_seconds(daemon.process.pid) - cpu0
    finally:
        daemon.stop()
    ios = int(str(result["ios"]))
    return {
        "iops": float(str(result["iops"])),
        "mb_per_s": float(str(result["mb_per_s"])),
        "lat_p50_us": float(str(result["lat_p50_us"])),
        "lat_p99_us": float(str(result["lat_p99_us"])),
        "backend_cpu_per_io_us": round(cpu / ios * 1e6, 2),
        "generator_cpu_per_io_us": float(str(result["frontend_cpu_per_io_us"])),
    }


def direct_driven(image: Path, work: Path, seconds: float, repeat: int) -> list[dict[str, object]]:
    """The O_DIRECT comparison: every back-end of :data:`DIRECT_BACKENDS`, one workload at
    a time, ``repeat`` rounds (the back-ends take turns); the median round counts."""
    rows = []
    for name, args in DIRECT_WORKLOADS:
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in DIRECT_BACKENDS}
        for _ in range(repeat):
            for label, qsd_aio, options in DIRECT_BACKENDS:
                socket = work / "direct.sock"
                runs[label].append(_run_backend(
                    image, socket, qsd=qsd_aio is not None, qsd_direct=True, qsd_aio=qsd_aio,
                    options=options, args=args, seconds=seconds))
        row: dict[str, object] = {"workload": name}
        for label, measured in runs.items():
            chosen = sorted(measured, key=lambda m: m["iops"])[len(measured) // 2]  # median
            row[label] = {**chosen, "iops_runs": [round(m["iops"]) for m in measured]}
        rows.append(row)
        _print_direct_row(row)
    return rows


def _print_direct_row(row: dict[str, object]) -> None:
    print(f"{row['workload']}:")
    threads = row["pyvirtio threads --direct"]
    assert isinstance(threads, dict)
    for label, _, _ in DIRECT_BACKENDS:
        m = row[label]
        assert isinstance(m, dict)
        ratio = threads["iops"] / m["iops"] if m["iops"] else 0.0
        print(f"  {label:<28} {m['iops']:>10,.0f} IOPS  p50 {m['lat_p50_us']:>8.1f} us"
              f"  cpu {m['backend_cpu_per_io_us']:>6.1f} us/IO  threads/this {ratio:>5.0%}"
              f"  runs {m['iops_runs']}", flush=True)


def _supports_direct(folder: Path) -> bool:
    probe = folder / "o_direct.probe"
    probe.write_bytes(bytes(4096))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def guest_driven(kit: GuestKit, image: Path, work: Path, seconds: float) -> list[dict[str, object]]:
    """fio in a Linux guest against QSD then pyvirtio."""
    fio = shutil.which("fio")
    if fio is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    files = binary_files(Path(fio))
    script = FIO_SCRIPT.format(depths=" ".join(str(d) for _, d in GUEST_WORKLOADS),
                               seconds=int(seconds))
    measured: dict[str, dict[str, str]] = {}
    for label in ("qsd", "pyvirtio"):
        socket = work / f"guest-{label}.sock"
        daemon: StorageDaemon | BackendProcess
        if label == "qsd":
            daemon = StorageDaemon(image, socket)
        else:
            daemon = BackendProcess("blk", socket, ["--image", str(image)], log_level="warning")
        try:
            result = kit.run(script, ["virtio_blk"], vhost_user_device_args("blk", socket, "b0"),
                             files=files, timeout=60 + 4 * seconds)
        finally:
            daemon.stop()
        if result.exit_code != 0:
            raise SystemExit(f"guest run failed:\n{result.console}")
        measured[label] = result.results
    rows = []
    for name, depth in GUEST_WORKLOADS:
        q = float(measured["qsd"].get(f"qd{depth}") or 0)
        p = float(measured["pyvirtio"].get(f"qd{depth}") or 0)
        rows.append({"workload": name, "qsd_iops": q, "pyvirtio_iops": p})
        print(f"{name:<18} {q:>10,.0f} {p:>10,.0f} {p / q if q else 0:>7.0%}", flush=True)
    return rows


def main() -> int:
    """Run both comparisons and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=float, default=5.0, help="seconds per front-end run")
    parser.add_argument("--guest-time", type=float, default=8.0, help="seconds per fio run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--skip-guest", action="store_true", help="front-end comparison only")
    parser.add_argument("--skip-direct", action="store_true", help="no O_DIRECT comparison")
    parser.add_argument("--direct-only", action="store_true",
                        help="the O_DIRECT comparison alone")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the O_DIRECT comparison (the median counts)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the image goes (default: a temporary folder; it must "
                        "support O_DIRECT for the O_DIRECT comparison)")
    args = parser.parse_args()
    machine = _machine()
    print(f"machine: {machine}\n")
    front: list[dict[str, object]] = []
    guest: list[dict[str, object]] = []
    direct: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:  # real data, so reads are not of holes
            for _ in range(IMAGE_SIZE >> 20):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        if not args.direct_only:
            print("front-end driven (pyvirtio bench blk, same image, page cache):")
            print(f"{'workload':<18} {'QSD IOPS':>10} {'pyvirtio':>10} {'ratio':>7}"
                  f" {'QSD p50':>9} {'py p50':>9} {'QSD cpu':>8} {'py cpu':>8}"
                  f" {'gen/Q':>6} {'gen/py':>6}")
            print(f"{'':<18} {'':>10} {'IOPS':>10} {'':>7} {'us':>9} {'us':>9}"
                  f" {'us/IO':>8} {'us/IO':>8} {'us/IO':>6} {'us/IO':>6}")
            front = frontend_driven(image, work, args.time)
        if not args.direct_only and not args.skip_guest:
            kit = GuestKit.ensure()
            print("\nguest driven (fio in a Linux guest under QEMU TCG, libaio, direct I/O):")
            print(f"{'workload':<18} {'QSD IOPS':>10} {'pyvirtio':>10} {'ratio':>7}")
            guest = guest_driven(kit, image, work, args.guest_time)
        if not args.skip_direct:
            if _supports_direct(work):
                print(f"\nO_DIRECT (pyvirtio bench blk, {args.repeat} round(s), median):")
                direct = direct_driven(image, work, args.time, max(args.repeat, 1))
            else:
                print(f"\nO_DIRECT comparison skipped: {work} does not support O_DIRECT "
                      "(--dir on ext4, xfs or btrfs)")
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": machine, "frontend": front, "guest": guest, "direct": direct},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
