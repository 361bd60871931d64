"""Compare ``pyvirtio serve scsi`` with ``pyvirtio serve blk`` and QEMU's built-in virtio-scsi.

A Linux guest under QEMU 7.2 (TCG) runs fio (libaio, direct I/O) on one disk backed by
the same raw image, in three set-ups:

- ``scsi``: ``pyvirtio serve scsi --disk IMAGE`` through ``vhost-user-scsi-pci``;
- ``scsi-sync``: the same with ``--aio sync`` (medium I/O in the event loop, as blk's
  default, instead of the LUN's threads);
- ``blk``: ``pyvirtio serve blk --image IMAGE`` through ``vhost-user-blk-pci``;
- ``qemu``: QEMU's own ``virtio-scsi-pci`` + ``scsi-hd`` on the image (no vhost-user).

Workloads: 4k random read at iodepth 32 and 128k sequential read at iodepth 8.  The
set-ups run alternately, ``--rounds`` times (one guest boot each), because the machine
may be shared: compare the ratios of one round, and the median over rounds.  For the
two pyvirtio daemons the daemon's CPU time per I/O is measured too (/proc: its CPU
time over the boot, divided by the I/Os fio counted; boot-time requests included).

Usage: ``python benchmarks/compare_scsi.py [--rounds N] [--time S] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from pyvirtio.guestkit import GuestKit, binary_files
from pyvirtio.guestkit.backends import BackendProcess, vhost_user_device_args

SETUPS = ("scsi", "scsi-sync", "blk", "qemu")
WORKLOADS = (("4k randread qd32", "randread", "4k", 32), ("128k read qd8", "read", "128k", 8))
IMAGE_SIZE = 512 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

FIO_SCRIPT = """
dev=/dev/{device}
i=0
while [ ! -b $dev ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
run() {{
    out=$(/usr/bin/fio --name=$1 --filename=$dev --rw=$2 --bs=$3 --direct=1 \\
        --ioengine=libaio --iodepth=$4 --runtime={seconds} --time_based --size=256M \\
        --output-format=terse --terse-version=3 2>/tmp/fio.err)
    echo "RESULT $1_iops=$(echo "$out" | cut -d';' -f8)"
    [ -n "$out" ] || cat /tmp/fio.err
}}
{runs}
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _script(device: str, seconds: int) -> str:
    runs = "\n".join(f"run w{i} {rw} {bs} {depth}"
                     for i, (_, rw, bs, depth) in enumerate(WORKLOADS))
    return FIO_SCRIPT.format(device=device, seconds=seconds, runs=runs)


def _one(kit: GuestKit, setup: str, image: Path, *, work: Path, seconds: int,
         files: dict[str, bytes]) -> dict[str, float]:
    """One guest boot on ``setup``: each workload's IOPS (and the daemon's CPU per I/O)."""
    daemon: BackendProcess | None = None
    socket = work / f"{setup}.sock"
    if setup.startswith("scsi"):
        options = ["--disk", str(image)] + (["--aio", "sync"] if setup == "scsi-sync" else [])
        daemon = BackendProcess("scsi", socket, options, log_level="warning")
        args, device, modules = vhost_user_device_args("scsi", socket, "c0"), "sda", [
            "virtio_scsi", "sd_mod"]
    elif setup == "blk":
        daemon = BackendProcess("blk", socket, ["--image", str(image)], log_level="warning")
        args, device, modules = vhost_user_device_args("blk", socket, "b0"), "vda", [
            "virtio_blk"]
    else:
        args = ["-device", "virtio-scsi-pci,id=s0", "-blockdev",
                f"driver=file,node-name=d0,filename={image}",
                "-device", "scsi-hd,drive=d0,bus=s0.0,scsi-id=0,lun=0"]
        device, modules = "sda", ["virtio_scsi", "sd_mod"]
    try:
        before = _cpu_seconds(daemon.process.pid) if daemon is not None else 0.0
        result = kit.run(_script(device, seconds), modules, args, files=files,
                         timeout=90 + 3 * seconds * len(WORKLOADS))
        cpu = _cpu_seconds(daemon.process.pid) - before if daemon is not None else 0.0
    finally:
        if daemon is not None:
            daemon.stop()
    if result.exit_code != 0:
        raise SystemExit(f"{setup}: guest run failed:\n{result.console[-3000:]}")
    figures: dict[str, float] = {}
    ios = 0.0
    for i, (name, *_rest) in enumerate(WORKLOADS):
        figures[name] = float(result.results.get(f"w{i}_iops") or 0)
        ios += figures[name] * seconds
    if daemon is not None and ios:
        figures["daemon_cpu_us_per_io"] = cpu / ios * 1e6
    return figures


def main() -> int:
    """Run the rounds and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three set-ups")
    parser.add_argument("--time", type=int, default=8, help="seconds per fio run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    fio = shutil.which("fio")
    if fio is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    kit = GuestKit.ensure()
    files = binary_files(Path(fio))
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-scsi-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:  # real data, so reads are not of holes
            for _ in range(IMAGE_SIZE >> 20):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        for n in range(args.rounds):
            measured = {setup: _one(kit, setup, image, work=work, seconds=args.time,
                                    files=files)
                        for setup in SETUPS}
            rounds.append(measured)
            print(f"round {n + 1}:")
            for name, *_rest in WORKLOADS:
                s, y, b, q = (measured[x][name] for x in SETUPS)
                print(f"  {name:<18} scsi {s:>7,.0f}  scsi-sync {y:>7,.0f}  blk {b:>7,.0f}  "
                      f"qemu-scsi {q:>7,.0f}   scsi/blk {s / b if b else 0:>5.0%}  "
                      f"sync/blk {y / b if b else 0:>5.0%}  scsi/qemu {s / q if q else 0:>5.0%}",
                      flush=True)
            cpu = {x: measured[x].get("daemon_cpu_us_per_io", 0.0) for x in SETUPS[:3]}
            print(f"  daemon CPU per I/O: scsi {cpu['scsi']:.1f} us, scsi-sync "
                  f"{cpu['scsi-sync']:.1f} us, blk {cpu['blk']:.1f} us", flush=True)
    print("median over rounds:")
    summary: dict[str, dict[str, float]] = {}
    for name, *_rest in WORKLOADS:
        med = {x: statistics.median(r[x][name] for r in rounds) for x in SETUPS}
        ratio_blk = statistics.median(r["scsi"][name] / r["blk"][name] for r in rounds
                                      if r["blk"][name])
        ratio_sync = statistics.median(r["scsi-sync"][name] / r["blk"][name] for r in rounds
                                       if r["blk"][name])
        ratio_qemu = statistics.median(r["scsi"][name] / r["qemu"][name] for r in rounds
                                       if r["qemu"][name])
        summary[name] = {**med, "scsi_over_blk": ratio_blk, "sync_over_blk": ratio_sync,
                         "scsi_over_qemu": ratio_qemu}
        print(f"  {name:<18} scsi {med['scsi']:>7,.0f}  scsi-sync {med['scsi-sync']:>7,.0f}  "
              f"blk {med['blk']:>7,.0f}  qemu-scsi {med['qemu']:>7,.0f}   scsi/blk "
              f"{ratio_blk:>5.0%}  sync/blk {ratio_sync:>5.0%}  scsi/qemu {ratio_qemu:>5.0%}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
